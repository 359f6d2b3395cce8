"""Runtime model pieces: split forward == model forward, LoRA ranks applied and verified, aggregation."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsplit.planner.errors import ConfigError
from hsplit.runtime.strategies import ClientFactors
from hsplit.runtime.strategies.hsplitlora import HSplitLoRA as ExactMerge
from hsplit.runtime.strategies.hsplitlora import update_delta
from hsplit.runtime.strategies.splitlora import SplitLoRA as FedAvg
from hsplit.runtime.models.lora import AdapterBank, rank_pattern_key
from hsplit.runtime.models.causal_lm import SplitLM, check_model_hash, load_lm
from hsplit.runtime.models.tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama", layers=4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "mistral"])
def test_split_forward_equals_model_forward_at_every_cut(tmp_path, family):
    lm = load_lm(str(save_tiny_model(tmp_path / family, family)), progress=False)
    split = SplitLM(lm.model, lm.profile.family)
    ids = torch.randint(0, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                    # left padding exercises the mask path
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=mask).logits
        for s in range(1, lm.profile.layers + 1):
            out = split.server_forward(split.client_forward(ids, mask, s), mask, s)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_rank_pattern_keys_are_anchored_so_layer_3_never_matches_layer_13():
    import re
    key = rank_pattern_key("model.layers.3.self_attn.q_proj")
    assert re.match(rf"(.*\.)?({key})$", "model.layers.3.self_attn.q_proj")
    assert not re.match(rf"(.*\.)?({key})$", "model.layers.13.self_attn.q_proj")
    assert not re.match(rf"(.*\.)?({key})$", "model.layers.3.self_attn.q_projX")


def test_heterogeneous_ranks_are_applied_exactly_per_adapter(tiny_dir):
    lm = load_lm(str(tiny_dir), progress=False)
    bank = AdapterBank(lm.model, lm.profile.family, alpha_over_rank=2.0, dropout=0.0)
    r0 = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 8, "model.layers.3.self_attn.v_proj": 4}
    r1 = {"model.layers.0.self_attn.q_proj": 4, "model.layers.2.mlp.up_proj": 2}
    bank.add("c0", r0)
    bank.add("c1", r1)
    for name, ranks in (("c0", r0), ("c1", r1)):
        got = {m: a.shape[0] for m, (a, b) in bank.factors(name).items()}
        assert got == ranks
        for m in ranks:
            assert bank.layers()[m].scaling[name] == pytest.approx(2.0)
    # c1 has no adapter on layers.1.mlp.down_proj: activating c1 must leave it untouched
    assert "c1" not in bank.layers()["model.layers.1.mlp.down_proj"].lora_A


def test_rank_verification_names_the_module_when_peft_applied_something_else(tiny_dir):
    lm = load_lm(str(tiny_dir), progress=False)
    bank = AdapterBank(lm.model, lm.profile.family, 2.0, 0.0, source="plan.yaml")
    bank.add("c0", {"model.layers.0.self_attn.q_proj": 4})
    bank.ranks["c0"] = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 2}
    with pytest.raises(ConfigError) as e:
        bank.verify("c0")
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj has rank 4, planned 8" in msg
    assert "model.layers.1.self_attn.q_proj was planned with rank 2 but got no LoRA layer" in msg


def test_a_module_the_model_lacks_is_one_clear_error(tiny_dir):
    lm = load_lm(str(tiny_dir), progress=False)
    bank = AdapterBank(lm.model, lm.profile.family, 2.0, 0.0, source="plan.yaml")
    with pytest.raises(ConfigError, match="model.layers.9.self_attn.q_proj' does not exist"):
        bank.add("c0", {"model.layers.9.self_attn.q_proj": 4})


def test_plan_for_another_architecture_is_rejected_by_hash(tiny_dir):
    lm = load_lm(str(tiny_dir), progress=False)
    check_model_hash(lm.profile.arch_hash(), lm.profile, "plan.yaml")     # same model: fine
    check_model_hash(None, lm.profile, "plan.yaml")                       # hand-written plan: fine
    with pytest.raises(ConfigError, match="another model architecture"):
        check_model_hash("0" * 64, lm.profile, "plan.yaml")


def _factors(ranks, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ClientFactors(weight=w, A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g),
                          scaling=2.0) for w, r in ranks]


def test_exact_aggregate_is_the_weighted_sum_of_products_with_heterogeneous_ranks():
    fs = _factors([(1.0, 2), (3.0, 8), (2.0, 4)])
    delta = update_delta(ExactMerge().aggregate({"m": fs}), "m")
    p = torch.tensor([1.0, 3.0, 2.0]) / 6.0
    expected = sum(pk * f.scaling * f.B @ f.A for pk, f in zip(p, fs))
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)


def test_fedavg_differs_from_exact_by_the_cross_terms():
    fs = _factors([(1.0, 4), (1.0, 4)])
    exact = update_delta(ExactMerge().aggregate({"m": fs}), "m")
    a, b = FedAvg().aggregate({"m": fs}).assign["m"]
    fedavg = 2.0 * b @ a
    cross = 2.0 * 0.25 * (fs[0].B @ fs[1].A + fs[1].B @ fs[0].A)
    # (sum p B)(sum p A) = sum p^2 B_k A_k + cross;  exact = sum p B_k A_k
    own = 2.0 * 0.25 * (fs[0].B @ fs[0].A + fs[1].B @ fs[1].A)
    torch.testing.assert_close(fedavg, own + cross, rtol=1e-5, atol=1e-4)
    assert (fedavg - exact).norm() > 0.1 * exact.norm()


def test_fedavg_refuses_mixed_ranks_with_a_clear_error():
    with pytest.raises(ConfigError, match="needs one rank"):
        FedAvg().aggregate({"m": _factors([(1.0, 2), (1.0, 4)])})


def test_merge_into_base_applies_the_exact_update(tiny_dir):
    for family in ("llama", "gpt2"):
        path = tiny_dir if family == "llama" else save_tiny_model(tiny_dir.parent / "g", "gpt2")
        lm = load_lm(str(path), progress=False)
        mod = lm.profile.module_name(1, lm.profile.family.modules[0])
        bank = AdapterBank(lm.model, lm.profile.family, 2.0, 0.0)
        bank.add("c0", {mod: 4})
        w0 = bank.base_weight(mod).detach().clone()
        d_out, d_in = w0.shape
        b, a = torch.randn(d_out, 6), torch.randn(6, d_in)
        bank.merge_into_base(mod, b, a)
        torch.testing.assert_close(bank.base_weight(mod), w0 + b @ a)


def test_an_unknown_model_name_says_what_to_give_instead():
    from hsplit.planner.errors import ConfigError
    from hsplit.runtime.models.causal_lm import load_lm
    with pytest.raises(ConfigError) as e:
        load_lm("no-such-model-xyz", progress=False)
    assert "'no-such-model-xyz' is not a shipped model" in str(e.value)
    assert "nor a local folder with config.json, nor a Hugging Face hub id" in str(e.value)
