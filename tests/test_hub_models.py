"""Shipped model names map to Hugging Face hub ids, load offline from the hub cache, and exported adapters
name that hub id and reload with plain PEFT by it (tiny models stored in a temporary hub cache; no network)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.device import PROFILE_DIR
from hsplit.planner.errors import ConfigError
from hsplit.planner.model import SHIPPED_MODELS, HUB_ID, load_model_profile, shipped_hub_id
from hsplit.planner.plan import Plan
from hsplit.runtime.models.tiny import save_tiny_model_in_hub_cache

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline: HF_HUB_CACHE for this process's huggingface_hub (its
    constants are read at import) and for subprocesses and the planner (the environment)."""
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HSPLIT_CACHE", str(tmp_path / "hsplit-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_every_shipped_model_name_resolves_to_a_hub_id_whose_config_it_ships(name):
    from hsplit.runtime.models.hub import hub_id_for
    hub_id = shipped_hub_id(name)
    assert hub_id and HUB_ID.match(hub_id) and hub_id_for(name) == hub_id
    raw = json.loads((PROFILE_DIR / "models" / f"{name}.json").read_text())
    # the shipped facts are that repository's config.json
    assert raw["_source"] == f"https://huggingface.co/{hub_id}/blob/main/config.json"
    assert load_model_profile(name).total_params() > 0


def test_a_shipped_name_loads_offline_from_the_hub_cache(hub_cache):
    from hsplit.runtime.models.causal_lm import load_lm, resolve_model_path
    snap = save_tiny_model_in_hub_cache(hub_cache, "Qwen/Qwen2.5-0.5B", family="qwen2", layers=2)
    lm = load_lm("qwen2.5-0.5b", progress=False)
    assert lm.hub_id == "Qwen/Qwen2.5-0.5B" and lm.origin == "cache"
    assert Path(lm.path) == snap.resolve() and lm.profile.layers == 2 and lm.model.config.model_type == "qwen2"
    # a hub id itself, and the snapshot folder (which knows its hub id), work as well
    assert resolve_model_path("Qwen/Qwen2.5-0.5B", progress=False) == lm.path
    assert load_lm(str(snap), progress=False).hub_id == "Qwen/Qwen2.5-0.5B"


def test_offline_and_not_cached_is_one_error_naming_the_hub_id_and_how_to_fetch_it(hub_cache):
    from hsplit.runtime.models.causal_lm import load_lm
    with pytest.raises(ConfigError) as e:
        load_lm("llama-2-7b", progress=False)
    text = str(e.value)
    assert "llama-2-7b (hub id meta-llama/Llama-2-7b-hf) is not in the local Hugging Face cache" in text
    assert "`hf download meta-llama/Llama-2-7b-hf`" in text and "HF_HOME" in text
    assert "use the embedded smollm2-135m" in text and len(e.value.problems) == 1
    with pytest.raises(ConfigError) as e:
        load_lm("nobody/no-such-model", progress=False)
    assert "nobody/no-such-model is not in the local Hugging Face cache" in str(e.value)


def test_hsplit_run_reports_a_missing_shipped_model_with_the_plan_and_the_fetch_command(hub_cache, tmp_path):
    plan = tmp_path / "plan.yaml"
    res = runner.invoke(app, ["plan", "--fleet", "example", "--model", "qwen2.5-0.5b", "--local-steps", "2",
                              "--seq-len", "64", "-o", str(plan)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", str(plan), "--runs-dir", str(tmp_path / "runs")])
    text = " ".join(res.output.split())           # rich wraps long lines
    assert res.exit_code == 2
    assert f"{plan}: model: qwen2.5-0.5b (hub id Qwen/Qwen2.5-0.5B)" in text
    assert "hf download Qwen/Qwen2.5-0.5B" in text and not (tmp_path / "runs").exists()


def test_the_planner_reads_a_cached_hub_id(hub_cache, tmp_path):
    save_tiny_model_in_hub_cache(hub_cache, "acme/tiny-chat", family="llama", layers=3)
    assert load_model_profile("acme/tiny-chat").layers == 3
    with pytest.raises(ConfigError) as e:
        load_model_profile("acme/not-cached")
    assert "not in the local Hugging Face cache" in str(e.value) and "hf download acme/not-cached" in str(e.value)


def _plan(root: Path, model: str) -> Path:
    data = root / "corpus.txt"
    data.write_text(" ".join(["To be, or not to be, that is the question.", "Now is the winter of our discontent."]
                             * 150))
    plan = Plan.from_dict({"model": model, "strategy": "hsplitlora", "server_rank": 2, "modules": ["q_proj", "v_proj"],
                           "training": {"batch_size": 2, "seq_len": 32, "local_steps": 2, "rounds": 2,
                                        "learning_rate": 1e-2},
                           "data": {"path": str(data), "partition": "iid", "eval_fraction": 0.1},
                           "clients": [{"id": "c0", "device": "a", "split_layer": 1, "ranks": {"q_proj": 2}},
                                       {"id": "c1", "device": "b", "split_layer": 2,
                                        "ranks": {"q_proj": 4, "v_proj": 4}}]}, "plan.yaml")
    plan.save(root / "plan.yaml")
    return root / "plan.yaml"


def test_an_exported_adapter_names_the_hub_id_has_a_model_card_and_reloads_by_hub_id(hub_cache, tmp_path):
    """Run a shipped name (a tiny Qwen2 cached as Qwen/Qwen2.5-0.5B), export it, and reload it in a fresh
    process with nothing but transformers + PEFT, by hub id, offline."""
    torch.set_num_threads(1)
    save_tiny_model_in_hub_cache(hub_cache, "Qwen/Qwen2.5-0.5B", family="qwen2", layers=2)
    plan = _plan(tmp_path, "qwen2.5-0.5b")
    res = runner.invoke(app, ["run", str(plan), "--runs-dir", str(tmp_path / "runs"), "--name", "q",
                              "--eval-seqs", "4", "--format", "json"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "q"
    exact = json.loads(runner.invoke(app, ["export", str(run_dir), "--adapter", str(tmp_path / "exact"),
                                           "--exact", "--format", "json"]).stdout)
    assert exact["base_model"] == "Qwen/Qwen2.5-0.5B" and exact["relative_error"] < 1e-6
    cfg = json.loads((tmp_path / "exact" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B"
    card = (tmp_path / "exact" / "README.md").read_text()
    assert card.startswith("---\nbase_model: Qwen/Qwen2.5-0.5B\n") and "library_name: peft" in card
    for fact in ("hsplitlora", "2 clients (1 x a, 1 x b)", "Rounds: 2 of 2", "corpus.txt", "Held-out perplexity",
                 'AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")', "at its full rank"):
        assert fact in card, fact
    # default: cut to the plan's largest rank (4); the update merged over 2 rounds x 2 clients has more
    cut = runner.invoke(app, ["export", str(run_dir), "--adapter", str(tmp_path / "cut")])
    assert cut.exit_code == 0, cut.output
    assert "rank 4, the plan's largest rank; --exact keeps all" in cut.stdout and "truncation error" in cut.stdout
    cut_rep = json.loads(runner.invoke(app, ["export", str(run_dir), "--adapter", str(tmp_path / "cut2"),
                                             "--format", "json"]).stdout)
    assert cut_rep["max_rank"] == 4 < cut_rep["exact_max_rank"] and 0 < cut_rep["relative_error"] < 1
    assert f"relative Frobenius error {cut_rep['relative_error']:.3g}" in (tmp_path / "cut" / "README.md").read_text()

    from hsplit.runtime.outputs.rundir import load_run
    sim, _, _ = load_run(run_dir)
    ids, mask = sim.data.eval.input_ids[:2], sim.data.eval.attention_mask[:2]
    with torch.no_grad():
        sim.bank.activate(sim.eval_adapter())
        want = sim.split.forward(ids, mask)
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "x = torch.load(sys.argv[1])\n"
        "base = AutoModelForCausalLM.from_pretrained('Qwen/Qwen2.5-0.5B')\n"
        "m = PeftModel.from_pretrained(base, sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    torch.save(m(input_ids=x['ids'], attention_mask=x['mask']).logits, sys.argv[3])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}      # plain transformers + peft, no hsplit
    env.update(HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "exact"),
                    str(tmp_path / "out.pt")], env=env, check=True, timeout=300, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt")
    assert (got - want).abs().max() < 1e-4


def test_export_flags_are_checked(hub_cache, tmp_path):
    res = runner.invoke(app, ["export", str(tmp_path), "--adapter", str(tmp_path / "a"), "--rank", "2", "--exact"])
    assert res.exit_code == 2 and "--rank and --exact exclude each other" in res.output
    res = runner.invoke(app, ["export", str(tmp_path), "--adapter", str(tmp_path / "a"), "--base-model", "./x"])
    assert res.exit_code == 2 and "--base-model: './x' is not a Hugging Face hub id" in res.output
