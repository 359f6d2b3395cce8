"""Infeasible fleets: a message per offending client naming the binding resource with amounts."""
from __future__ import annotations

import pytest

from hsplit.planner.api import make_plan
from hsplit.planner.errors import InfeasibleError
from hsplit.planner.fleet import Fleet


def _fleet(clients, server="a100-80gb"):
    return Fleet.from_dict({"server": {"device": server}, "clients": clients}, "<test fleet>")


def test_memory_binding_client_is_named_with_amounts():
    fleet = _fleet([{"device": "raspberry-pi-5-8gb", "count": 2, "budget": {"memory_gib": 0.1}},
                    {"device": "rtx-3060-12gb"}])
    with pytest.raises(InfeasibleError) as e:
        make_plan(fleet, "smollm2-135m")
    (line,) = e.value.reasons
    assert line.startswith("c0, c1 (raspberry-pi-5-8gb): memory: even the smallest split (1 block, no adapters) needs")
    assert "GiB, budget 0.10 GiB" in line


def test_round_time_binding_client():
    fleet = _fleet([{"device": "raspberry-pi-5-8gb", "budget": {"round_s": 0.5}}, {"device": "rtx-3060-12gb"}])
    with pytest.raises(InfeasibleError) as e:
        make_plan(fleet, "smollm2-135m")
    (line,) = e.value.reasons
    assert line.startswith("c0 (raspberry-pi-5-8gb): round time: even the smallest split (1 block, no adapters) takes")
    # aggregation bounded (the default): the download floor of one block, 4 x 2 x 10,176 bytes
    assert "s per round (10 steps + 0.00651 s of merge download, up to 81.4 kB), budget 0.5 s" in line


def test_server_too_small_for_the_frozen_model():
    fleet = _fleet([{"device": "rtx-4090-24gb"}], server="rtx-3060-12gb")
    with pytest.raises(InfeasibleError) as e:
        make_plan(fleet, "llama-2-7b")
    assert e.value.reasons[0].startswith("server (rtx-3060-12gb x1): memory: the frozen model needs 24.6 GiB in fp32, the server has 11.0 GiB")


def test_server_slot_memory_binds_shallow_splits():
    """Per-client server memory (activations, logits, server adapters) rules out shallow splits."""
    fleet = _fleet([{"device": "rtx-4090-24gb", "splits": [1, 2]}], server="a100-80gb")
    from hsplit.planner.plan import Training
    with pytest.raises(InfeasibleError) as e:
        make_plan(fleet, "llama-2-7b", training=Training(batch_size=64, seq_len=2048))
    assert "server memory: even the deepest allowed split (2 blocks on the client) needs" in e.value.reasons[0]


def test_exhaustive_refuses_large_instances():
    with pytest.raises(ValueError, match="use --solver cbc or --solver highs"):
        make_plan("example", "smollm2-135m", solver="exhaustive")


def test_amounts_get_enough_digits_to_differ():
    from hsplit.planner.cost import GIB
    from hsplit.planner.instance import build_instance
    from hsplit.planner.model import load_model_profile
    model = load_model_profile("smollm2-135m")
    base = _fleet([{"device": "raspberry-pi-5-8gb"}])
    need = build_instance(base, model).classes[0].memory(1, 0, 0) / GIB
    budget = need - 1e-4
    assert f"{budget:.2f}" == f"{need:.2f}"  # two decimals would print the same number twice
    fleet = _fleet([{"device": "raspberry-pi-5-8gb", "budget": {"memory_gib": budget}}])
    with pytest.raises(InfeasibleError) as e:
        make_plan(fleet, "smollm2-135m")
    got, cap = e.value.reasons[0].split("needs ")[1].split(" GiB, budget ")
    assert got != cap.removesuffix(" GiB"), e.value.reasons[0]
    from hsplit.planner.instance import two_amounts
    assert two_amounts(1.5201, 1.5249, 2) == ("1.520", "1.525")
    assert two_amounts(25.0, 12.0, 1) == ("25.0", "12.0")


def test_exhaustive_counts_are_printed_compactly():
    with pytest.raises(ValueError) as e:
        make_plan("example", "smollm2-135m", solver="exhaustive")
    assert "has ~" in str(e.value) and "e141 configurations" in str(e.value) and len(str(e.value)) < 200
