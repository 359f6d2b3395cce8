"""The planner's time model: FLOPs / throughput by default, measured per-block times when a device
profile has them for the planned model and dtype (scaled linearly in tokens)."""
from __future__ import annotations

import pytest

from hsplit.planner.api import make_plan
from hsplit.planner.cost import block_backward_flops_frozen, block_forward_flops
from hsplit.planner.fleet import Fleet
from hsplit.planner.model import load_model_profile
from hsplit.planner.plan import Training

MODEL = load_model_profile("smollm2-135m")


def _device(block_times=None):
    d = {"name": "lab-cpu", "kind": "cpu", "memory_gib": 16.0, "flops": {"fp32": 2.0e10},
         "uplink_mbps": 1000.0, "downlink_mbps": 1000.0}
    if block_times is not None:
        d["block_times"] = block_times
    return d


def _bt(model_hash):
    return [{"model": "smollm2-135m", "model_hash": model_hash, "batch_size": 2, "seq_len": 64, "dtype": "fp32",
             "forward_s": 0.04, "backward_s": 0.06, "lora_s_per_param": 3e-7, "embed_s": 1e-4, "head_s": 0.9,
             "repetitions": 5}]


def _plan(device):
    fleet = Fleet.from_dict({"server": {"device": "a100-80gb"}, "clients": [{"device": device, "splits": [4, 4]}]},
                            "<fleet>")
    return make_plan(fleet, MODEL, modules=["q_proj"], ranks=(0, 8), training=Training(batch_size=4, seq_len=128,
                                                                                        local_steps=1))


def test_flops_model_by_default():
    c = _plan(_device()).clients[0]
    assert c.predicted["time_model"] == "flops"
    b, T = 4, 128
    compute = 4 * block_forward_flops(MODEL, b, T) + 4 * block_backward_flops_frozen(MODEL, b, T) \
        + 6 * b * T * 8 * (576 + 576) * 4
    link = 2 * 8 * b * T * 576 * 4 / 1e9
    assert c.predicted["step_s"] == pytest.approx(compute / 2.0e10 + link, rel=1e-3)


def test_measured_block_times_replace_the_flops_model_and_scale_with_tokens():
    c = _plan(_device(_bt(MODEL.arch_hash()))).clients[0]
    assert c.predicted["time_model"] == "measured"
    k = (4 * 128) / (2 * 64)
    params = 4 * 8 * (576 + 576)
    link = 2 * 8 * 4 * 128 * 576 * 4 / 1e9
    expected = k * (1e-4 + 4 * 0.04 + 4 * 0.06 + 3e-7 * params) + link
    assert c.predicted["step_s"] == pytest.approx(expected, rel=1e-3)


def test_block_times_of_another_model_are_ignored():
    assert _plan(_device(_bt("not-this-model"))).clients[0].predicted["time_model"] == "flops"
