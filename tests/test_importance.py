"""hsplit importance: AdaLoRA-smoothed sensitivity and HSplitLoRA's rngwp scores per matrix, computed
group by group.

Tiny Llama built from a config, random tokens; no hub, no downloads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hsplit.planner.api import make_plan
from hsplit.planner.errors import ConfigError
from hsplit.planner.fleet import Fleet
from hsplit.planner.importance import Importance, finetune_bytes
from hsplit.planner.model import ModelProfile
from hsplit.planner.plan import Training
from hsplit.runtime.data.federated import TokenSet
from hsplit.runtime.measure.importance import (ImportanceSettings, auto_blocks_per_pass, build_importance, normalise,
                                       reference_scores, rngwp_scores, rngwp_step_score, sensitivity_scores)
from hsplit.cli import app


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    profile = ModelProfile.from_config(cfg.to_dict(), name="tiny-llama", source="<config>")
    return model, profile, cfg


def batches(seed: int, n: int = 4, b: int = 2, T: int = 16) -> list[TokenSet]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (b, T), generator=g)
        out.append(TokenSet(ids, torch.ones_like(ids), ids.clone()))
    return out


def all_names(profile):
    return {profile.module_name(l, m) for l in range(profile.layers) for m in profile.family.default_modules}


@pytest.mark.parametrize("bpp,spill", [(1, True), (2, True), (3, True), (2, False)])
def test_group_by_group_scores_equal_the_all_at_once_reference(tiny, bpp, spill):
    model, profile, _ = tiny
    mods = profile.family.default_modules
    ref = reference_scores(model, profile, batches(0), mods)
    got, info = sensitivity_scores(model, profile, batches(0), mods, blocks_per_pass=bpp, head_chunk_tokens=7,
                                   spill=spill)
    assert info["boundary_cache"] == ("disk" if spill else "memory")
    assert info["passes"] == -(-3 // bpp)
    assert set(got) == set(ref) == all_names(profile)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-12), k
    assert all(p.grad is None for p in model.parameters())          # nothing left behind


def test_auto_grouping_scores_block_by_block_when_states_would_not_fit(tiny):
    model, profile, _ = tiny
    # two fp32 states per weight of all 3 blocks exceed half of this model's weight bytes
    assert auto_blocks_per_pass(model, profile, profile.family.default_modules) < profile.layers


def test_scores_are_deterministic_for_a_seed_and_depend_on_the_data(tiny):
    model, profile, _ = tiny
    mods = profile.family.default_modules
    a, _ = sensitivity_scores(model, profile, batches(1), mods)
    b, _ = sensitivity_scores(model, profile, batches(1), mods)
    c, _ = sensitivity_scores(model, profile, batches(2), mods)
    assert a == b
    assert a != c
    assert all(v > 0 for v in a.values())


def test_smoothing_uses_the_uncertainty_term(tiny):
    model, profile, _ = tiny
    mods = ("self_attn.q_proj",)
    # beta = 0: Ibar = I_t and Ubar = |I_t - Ibar_t| = 0 -> every score 0; with smoothing they are > 0
    zero, _ = sensitivity_scores(model, profile, batches(0), mods, beta1=0.0, beta2=0.0)
    smooth, _ = sensitivity_scores(model, profile, batches(0), mods)
    assert all(v == 0 for v in zero.values())
    assert all(v > 0 for v in smooth.values())


def test_per_parameter_normalisation_divides_by_adapter_width(tiny):
    model, profile, _ = tiny
    raw, _ = sensitivity_scores(model, profile, batches(0), profile.family.default_modules)
    per = normalise(raw, profile, "per-parameter")
    shapes = profile.module_shapes()
    for name, v in raw.items():
        suffix = name.split(".", 3)[3]
        assert per[name] == pytest.approx(v / sum(shapes[suffix]))
    # q_proj (32+32) and k_proj (32+16) have different widths: the planner's weights change
    mods = profile.family.default_modules
    w_raw = Importance(scores=raw, method="sensitivity").weights(profile, mods)
    w_per = Importance(scores=per, method="sensitivity").weights(profile, mods)
    assert not np.allclose(w_raw, w_per)
    assert w_per[0, 1] / w_per[0, 0] == pytest.approx(w_raw[0, 1] / w_raw[0, 0] * 64 / 48)


def test_importance_file_loads_and_plan_accepts_it(tiny, tmp_path):
    model, profile, cfg = tiny
    settings = ImportanceSettings(steps=4, batch_size=2, seq_len=16, normalization="per-parameter")
    raw, _ = sensitivity_scores(model, profile, batches(0), profile.family.default_modules)
    path = tmp_path / "importance.yaml"
    build_importance(raw, profile, settings, {"data": {"path": "random"}}).save(path)
    imp = Importance.load(path)
    assert set(imp.scores) == all_names(profile)
    assert imp.model_hash == ModelProfile.from_config(cfg.to_dict(), "x", "y").arch_hash()
    assert imp.normalization == "per-parameter" and imp.settings["steps"] == 4
    dev = {"name": "d", "kind": "cpu", "memory_gib": 1.0, "flops": {"fp32": 1e9}, "uplink_mbps": 100, "downlink_mbps": 100}
    fleet = Fleet.from_dict({"server": {"device": dev}, "clients": [{"device": dev, "count": 1}]}, "<t>")
    plan = make_plan(fleet, profile, importance=path, training=Training(batch_size=2, seq_len=16, local_steps=1))
    assert plan.inputs["importance_method"] == "sensitivity (per-parameter)"
    other = ModelProfile.from_config({**cfg.to_dict(), "num_hidden_layers": 4}, "other", "<config>")
    with pytest.raises(ConfigError, match="model_hash"):
        make_plan(fleet, other, importance=path, training=Training(batch_size=2, seq_len=16, local_steps=1))


def test_cli_importance_writes_a_file_for_every_matrix(tmp_path):
    from hsplit.runtime.models.tiny import save_tiny_model
    folder = save_tiny_model(tmp_path / "tiny", layers=2)
    text = tmp_path / "data.txt"
    text.write_text(" ".join(f"To be or not to be, line {i}, that is the question." for i in range(200)))
    out = tmp_path / "imp.yaml"
    res = CliRunner().invoke(app, ["importance", "--model", str(folder), "--data", str(text), "--steps", "2",
                                   "--batch-size", "2", "--seq-len", "16", "-o", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    imp = Importance.load(out)
    assert info["matrices"] == len(imp.scores) == 2 * 7
    assert imp.settings["steps"] == 2 and imp.settings["data"]["path"] == str(text)
    bad = CliRunner().invoke(app, ["importance", "--model", str(folder), "--data", str(text), "--beta1", "1.5"])
    assert bad.exit_code == 2 and "beta1" in bad.output


# ---- rngwp: |sum w dL/dw| / C(W), smoothed over the steps (HSplitLoRA as summarised; docs/measurement.md) ----

def test_rngwp_step_score_is_the_absolute_sum_over_the_matrix_per_byte_of_adapter_state():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    g = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]])
    # |1 - 2 + 3 - 4 + 5 - 6| = 3 (the sum of absolute values would be 21); C = 16 (2 + 3) bytes
    assert rngwp_step_score(w, g) == pytest.approx(3 / 80)
    assert finetune_bytes(2, 3) == finetune_bytes(3, 2) == 16 * 5
    assert rngwp_step_score(w.T, g.T) == rngwp_step_score(w, g)       # storage layout does not matter


def hand_rngwp(model, profile, data, names, gamma):
    """Plain autograd, whole-model backward: per step |sum(W * dL/dW)| / (16 (d_in + d_out)), then the
    closed form of I_t = gamma I_{t-1} + (1 - gamma) s_t from I_0 = 0: (1 - gamma) sum_t gamma^(N-t) s_t."""
    from operator import attrgetter
    shapes = profile.module_shapes()
    weights = {n: attrgetter(n)(model).weight for n in names}
    steps = {n: [] for n in names}
    for batch in data:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 batch.labels[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, list(weights.values()))
        for (n, w), gr in zip(weights.items(), grads):
            d_in, d_out = shapes[n.split(".", 3)[3]]
            steps[n].append(abs(float((w.detach().double() * gr.double()).sum())) / (16 * (d_in + d_out)))
    N = len(data)
    return {n: (1 - gamma) * sum(gamma ** (N - t) * s for t, s in enumerate(steps[n], 1)) for n in names}, steps


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.85])
def test_rngwp_score_of_a_matrix_equals_a_hand_computation(tiny, gamma):
    model, profile, _ = tiny
    mods = profile.family.default_modules
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.2.mlp.down_proj"]
    data = batches(3)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    want, steps = hand_rngwp(model, profile, data, names, gamma)
    got, info = rngwp_scores(model, profile, data, mods, gamma=gamma)
    assert info["method"] == "rngwp" and info["passes"] == profile.layers      # one block per pass
    for n in names:
        assert got[n] == pytest.approx(want[n], rel=1e-4), n
    if gamma == 0.0:                                                   # no memory: the last step's score
        assert got[names[0]] == pytest.approx(steps[names[0]][-1], rel=1e-4)
    if gamma == 0.5:                                                   # I_0 = 0, not I_1 = s_1
        s = steps[names[0]]
        assert got[names[0]] == pytest.approx(s[0] / 16 + s[1] / 8 + s[2] / 4 + s[3] / 2, rel=1e-4)


@pytest.mark.parametrize("bpp,spill", [(1, True), (2, True), (3, True), (2, False), (None, False), (None, True)])
def test_rngwp_group_by_group_equals_the_all_at_once_reference(tiny, bpp, spill):
    model, profile, _ = tiny
    mods = profile.family.default_modules
    ref = reference_scores(model, profile, batches(0), mods, method="rngwp", gamma=0.7)
    got, info = rngwp_scores(model, profile, batches(0), mods, gamma=0.7, blocks_per_pass=bpp, head_chunk_tokens=7,
                             spill=spill)
    # default: one block per pass with the cache on disk; in memory, no per-weight state -> one group
    assert info["passes"] == (-(-3 // bpp) if bpp else 3 if spill else 1)
    assert set(got) == set(ref) == all_names(profile)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-15), k
    assert all(v > 0 for v in got.values())
    assert all(p.grad is None for p in model.parameters())
    sens = reference_scores(model, profile, batches(0), mods)
    assert sorted(ref, key=ref.get) != sorted(sens, key=sens.get)      # a different ranking than sensitivity


def test_rngwp_needs_no_per_weight_state(tiny):
    model, profile, _ = tiny
    mods = profile.family.default_modules
    assert auto_blocks_per_pass(model, profile, mods, state_bytes_per_weight=0) == profile.layers
    assert auto_blocks_per_pass(model, profile, mods) < profile.layers   # sensitivity: 8 bytes per weight


def test_rngwp_settings_and_file(tiny, tmp_path):
    model, profile, _ = tiny
    settings = ImportanceSettings(method="rngwp", gamma=0.6)
    assert settings.normalization == "per-byte"
    settings.check()
    assert ImportanceSettings().normalization == "raw"                 # sensitivity unchanged
    with pytest.raises(ConfigError, match="normalization"):
        ImportanceSettings(method="rngwp", normalization="per-parameter").check()
    with pytest.raises(ConfigError, match="method"):
        ImportanceSettings(method="fisher").check()
    raw, _ = rngwp_scores(model, profile, batches(0), profile.family.default_modules, gamma=0.6)
    path = tmp_path / "imp.yaml"
    build_importance(raw, profile, settings).save(path)
    imp = Importance.load(path)
    assert (imp.method, imp.normalization) == ("rngwp", "per-byte")
    assert imp.scores == pytest.approx(raw)                           # C(W) already applied per step
    assert imp.settings["gamma"] == 0.6 and "beta1" not in imp.settings and "method" not in imp.settings
    sens = Importance.load(_saved(build_importance(raw, profile, ImportanceSettings()), tmp_path / "s.yaml"))
    assert sens.method == "sensitivity" and "gamma" not in sens.settings and sens.settings["beta1"] == 0.85
    text = path.read_text().replace("normalization: per-byte", "normalization: raw")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match="normalization.*rngwp"):
        Importance.load(tmp_path / "bad.yaml")


def _saved(imp, path):
    imp.save(path)
    return path


def test_cli_importance_rngwp_writes_the_method_and_plan_reads_it(tmp_path):
    from hsplit.runtime.models.tiny import save_tiny_model
    folder = save_tiny_model(tmp_path / "tiny", layers=2)
    text = tmp_path / "data.txt"
    text.write_text(" ".join(f"To be or not to be, line {i}, that is the question." for i in range(200)))
    out = tmp_path / "imp.yaml"
    base = ["importance", "--model", str(folder), "--data", str(text), "--steps", "3", "--batch-size", "2",
            "--seq-len", "16"]
    res = CliRunner().invoke(app, base + ["--method", "rngwp", "--gamma", "0.5", "-o", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["method"] == "rngwp" and info["normalization"] == "per-byte"
    assert "method: rngwp" in out.read_text()
    imp = Importance.load(out)
    assert imp.method == "rngwp" and imp.settings["gamma"] == 0.5 and len(imp.scores) == 2 * 7
    plan_out = tmp_path / "plan.yaml"
    res = CliRunner().invoke(app, ["plan", "--fleet", "example", "--model", str(folder), "--importance", str(out),
                                   "-o", str(plan_out)])
    assert res.exit_code == 0, res.output
    from hsplit.planner.plan import Plan
    assert Plan.load(plan_out).inputs["importance_method"] == "rngwp (per-byte)"
    # options of the other method, and a normalization rngwp does not have: one error, before loading
    bad = CliRunner().invoke(app, base + ["--method", "rngwp", "--beta1", "0.5", "--normalization", "raw"])
    assert bad.exit_code == 2 and "--beta1" in bad.output and "--normalization" in bad.output
    bad = CliRunner().invoke(app, base + ["--gamma", "0.5"])
    assert bad.exit_code == 2 and "--gamma: applies to --method rngwp" in bad.output
