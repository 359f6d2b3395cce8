"""End to end through the CLI: plan -> run (2 rounds, tiny model) -> eval -> export -> PEFT reload."""
import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_e2e_plan
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.plan import Plan
from hsplit.runtime.models.tiny import save_tiny_model

runner = CliRunner()


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    old = os.environ.get("HSPLIT_CACHE")
    os.environ["HSPLIT_CACHE"] = str(root / "cache")
    yield root
    if old is None:
        os.environ.pop("HSPLIT_CACHE", None)
    else:
        os.environ["HSPLIT_CACHE"] = old


@pytest.mark.parametrize("family,strategy", [("llama", "hsplitlora"), ("gpt2", "splitlora")])
def test_plan_run_eval_export_and_peft_reload(tiny, family, strategy):
    root = tiny / family
    model = save_tiny_model(root / "model", family, layers=4)
    data = root / "e2e.csv"
    rows = ["mr,ref"] + [f'"name[Place{i % 7}], food[French], area[riverside]","Place{i % 7} serves French food '
                         f'by the river, dish number {i}."' for i in range(120)]
    data.write_text("\n".join(rows) + "\n")
    # plan: the planner's own solver for this model config on the example fleet, then narrowed to a
    # tiny run; the CLI path is exercised for `hsplit plan` too
    _cli("plan", "--fleet", "example", "--model", model, "--seq-len", 48, "--batch-size", 2, "--local-steps", 2,
         "--rounds", 2, "--strategy", strategy, "--data", str(data), "--server-rank", 4, "--ranks", "0,2,4",
         "-o", root / "plan.yaml", "--format", "json")
    plan = Plan.load(root / "plan.yaml")
    plan.training.learning_rate = 5e-3
    plan.data.eval_fraction = 0.1
    plan.save(root / "plan.yaml")
    assert plan.inputs.get("model_hash")

    out = json.loads(_cli("run", root / "plan.yaml", "--runs-dir", root / "runs", "--name", "r", "--format", "json"))
    run_dir = root / "runs" / "r"
    assert out["rounds"] == 2 and (run_dir / "metrics.csv").is_file()
    assert out["eval_loss_after"] < out["eval_loss_before"]

    ev = json.loads(_cli("eval", run_dir, "--format", "json"))
    assert ev["round"] == 2 and ev["perplexity"] == pytest.approx(torch.tensor(ev["eval_loss"]).exp().item())
    ev2 = json.loads(_cli("eval", run_dir, "--data", data, "--max-seqs", 8, "--format", "json"))
    assert ev2["sequences"] == 8

    rep = json.loads(_cli("export", run_dir, "--adapter", root / "adapter", "--merged", root / "merged",
                          "--exact", "--format", "json"))
    assert rep["relative_error"] < 1e-6
    rep2 = json.loads(_cli("export", run_dir, "--adapter", root / "adapter-r1", "--rank", 1, "--format", "json"))
    assert rep2["max_rank"] == 1 and 0 < rep2["relative_error"] < 1

    # reload with plain PEFT in a fresh process-free way: base + adapter == the runtime's aggregated model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from hsplit.runtime.outputs.rundir import load_run
    sim, _, _ = load_run(run_dir)
    ids = sim.data.eval.input_ids[:2]
    mask = sim.data.eval.attention_mask[:2]
    with torch.no_grad():
        sim.bank.activate(sim.eval_adapter())
        ref = sim.split.forward(ids, mask)
        base = AutoModelForCausalLM.from_pretrained(model)
        plain = base(input_ids=ids, attention_mask=mask).logits
        peft = PeftModel.from_pretrained(base, root / "adapter")(input_ids=ids, attention_mask=mask).logits
        merged = AutoModelForCausalLM.from_pretrained(root / "merged")(input_ids=ids, attention_mask=mask).logits
    assert (plain - ref).abs().max() > 1e-3                 # training changed the model...
    torch.testing.assert_close(peft, ref, rtol=1e-4, atol=1e-4)  # ...and the adapter carries all of it
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)


def test_export_refuses_a_non_empty_target_and_runs_without_rounds(tmp_path):
    res = runner.invoke(app, ["export", str(tmp_path / "nope"), "--adapter", str(tmp_path / "a")])
    assert res.exit_code == 2 and "not a run folder" in res.output


def test_runtime_commands_are_registered_without_importing_torch():
    code = ("import sys; from hsplit.cli import app; import typer.main as m; "
            "names = [c.name for c in m.get_command(app).commands.values()]; "
            "print(all(n in names for n in ('run','eval','export','demo','importance','profile','calibrate')), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


@pytest.fixture(scope="module")
def small_run(tiny):
    """A one-round tiny run (2 layers, hetlora) for the export checks."""
    root = tiny / "small"
    plan_path, _ = tiny_e2e_plan(root, [(f"name[P{i % 3}]", f"P{i % 3} serves food, take {i}.") for i in range(40)])
    _cli("run", plan_path, "--runs-dir", root / "runs", "--name", "r", "--format", "json")
    return root / "runs" / "r"


def _export_error(*args):
    res = runner.invoke(app, ["export", *[str(a) for a in args]])
    assert res.exit_code == 2 and res.output.startswith("error:") and "Traceback" not in res.output, res.output
    return res.output


def test_export_checks_every_target_before_writing_anything(small_run, tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "MYFILE").write_text("")
    (out / "afile").write_text("x")
    text = _export_error(small_run, "--adapter", out / "new1", "--merged", out / "adapter")
    assert "--merged" in text and "not empty" in text
    text = _export_error(small_run, "--adapter", out / "same", "--merged", out / "same")
    assert "same folder" in text
    text = _export_error(small_run, "--adapter", out / "afile")
    assert "--adapter" in text and "existing file" in text
    text = _export_error(small_run, "--merged", out / "afile" / "sub")
    assert "--merged" in text and "is a file" in text
    text = _export_error(small_run, "--adapter", out / "a", "--merged", out / "a" / "m")
    assert "inside" in text
    # nothing was written: no new folder, no temp folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "afile"]
    assert [p.name for p in (out / "adapter").iterdir()] == ["MYFILE"]


def test_exported_folders_and_files_are_readable_by_others(small_run, tmp_path):
    old = os.umask(0o022)
    try:
        _cli("export", small_run, "--adapter", tmp_path / "ad", "--merged", tmp_path / "mg", "--format", "json")
    finally:
        os.umask(old)
    for folder in (tmp_path / "ad", tmp_path / "mg"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
        files = list(folder.iterdir())
        assert any(f.suffix == ".safetensors" for f in files)
        for f in files:
            assert f.stat().st_mode & 0o777 == 0o644, f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folders left
