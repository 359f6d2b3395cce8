"""Paths in a plan: a local `--model` folder is written relative to the plan file (as data.path), absolute
paths stay absolute, and `hsplit run PLAN` / `hsplit eval RUN` work from any folder; `hsplit plan --check
PLAN` checks against the plan's own fleet."""
from __future__ import annotations

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsplit.cli import app  # noqa: E402
from hsplit.planner.plan import Plan  # noqa: E402
from hsplit.planner.plan_refs import resolve_model_ref, written_model_ref  # noqa: E402

runner = CliRunner()


def _tiny(root):
    from hsplit.runtime.models.tiny import save_tiny_model
    model = save_tiny_model(root / "models" / "tiny", "llama", layers=2)
    data = root / "data" / "pc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i % 7}"}) + "\n"
                            for i in range(40)))
    return model, data


PLAN_ARGS = ["--fleet", "example", "--strategy", "hetlora", "--ranks", "0,2", "--server-rank", "2",
             "--seq-len", "16", "--batch-size", "2", "--local-steps", "1", "--rounds", "1", "--eval-fraction", "0.2"]


def test_model_folder_is_written_relative_to_the_plan_and_runs_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("HSPLIT_CACHE", str(tmp_path / "cache"))
    model, _ = _tiny(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    r = runner.invoke(app, ["plan", "--model", "../models/tiny", "--data", "../data/pc.jsonl", *PLAN_ARGS,
                            "-o", "plans/p.yaml"])
    assert r.exit_code == 0, r.output
    written = yaml.safe_load((tmp_path / "work" / "plans" / "p.yaml").read_text())
    assert written["model"] == "../../models/tiny" and written["inputs"]["model"] == "../../models/tiny"
    assert written["data"]["path"] == "../../data/pc.jsonl"
    assert Plan.load(tmp_path / "work" / "plans" / "p.yaml").model == str(model)

    monkeypatch.chdir(tmp_path / "elsewhere")              # run and evaluate from another folder
    r = runner.invoke(app, ["run", str(tmp_path / "work" / "plans" / "p.yaml"), "--runs-dir", "runs", "--name", "r",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    config = yaml.safe_load((tmp_path / "elsewhere" / "runs" / "r" / "config.yaml").read_text())
    assert config["run"]["model_path"] == str(model)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["eval", "elsewhere/runs/r", "--format", "json"])
    assert r.exit_code == 0, r.output

    # a run whose config.yaml holds a cwd-relative model (written before this fix): eval uses run.model_path
    cfg = tmp_path / "elsewhere" / "runs" / "r" / "config.yaml"
    config["plan"]["model"] = "../models/tiny"
    cfg.write_text(yaml.safe_dump(config))
    r = runner.invoke(app, ["eval", "elsewhere/runs/r", "--format", "json"])
    assert r.exit_code == 0, r.output


def test_absolute_model_paths_names_and_hub_ids_are_written_as_given(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "sub" / "plan.yaml"
    assert written_model_ref(str(model), plan) == str(model)
    assert written_model_ref("m", plan) == "../m"
    assert written_model_ref("smollm2-135m", plan) == "smollm2-135m"
    assert written_model_ref("Qwen/Qwen2.5-0.5B", plan) == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_ref("../m", tmp_path / "sub") == str(model)
    assert resolve_model_ref(str(model), tmp_path / "elsewhere") == str(model)
    assert resolve_model_ref("smollm2-135m", tmp_path / "sub") == "smollm2-135m"
    assert resolve_model_ref("m", tmp_path / "sub") == "m"      # an older plan's cwd-relative path: as written


def test_a_missing_model_folder_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    from hsplit.planner.errors import ConfigError
    from hsplit.runtime.models.causal_lm import locate_model
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        locate_model("../no-such-model")
    text = str(e.value)
    assert f"no model folder {tmp_path.parent / 'no-such-model'}" in text, text
    assert "folder with config.json" in text and "ORG/NAME" in text
    assert "Repo id" not in text and "alphanumeric" not in text


FLEET3 = """name: three
server: {device: a100-80gb, count: 1}
clients:
  - device: rtx-3060-12gb
    count: 3
"""


def test_check_uses_the_plans_own_fleet_unless_fleet_is_given(tmp_path, monkeypatch):
    (tmp_path / "fleets").mkdir()
    (tmp_path / "fleets" / "three.yaml").write_text(FLEET3)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["plan", "--fleet", "fleets/three.yaml", "-o", "plans/p.yaml"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "plans" / "p.yaml").read_text())["inputs"]["fleet"] == "../fleets/three.yaml"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = runner.invoke(app, ["plan", "--check", "../plans/p.yaml"])
    assert r.exit_code == 0 and "all constraints satisfied" in r.output, r.output
    assert "three.yaml" in r.output and "example" not in r.output
    r = runner.invoke(app, ["plan", "--check", "../plans/p.yaml", "--fleet", "example"])     # --fleet wins
    assert r.exit_code == 2 and "the plan has 3 clients" in r.output, r.output

    # a plan that names no fleet (hand-written): example, with a note
    p = yaml.safe_load((tmp_path / "plans" / "p.yaml").read_text())
    del p["inputs"]["fleet"]
    (tmp_path / "plans" / "hand.yaml").write_text(yaml.safe_dump(p))
    r = runner.invoke(app, ["plan", "--check", "../plans/hand.yaml"])
    assert r.exit_code == 2 and "records no fleet" in r.output and "pass --fleet" in r.output, r.output
    # a fleet that is gone: one error naming inputs.fleet and the fix
    (tmp_path / "fleets" / "three.yaml").unlink()
    r = runner.invoke(app, ["plan", "--check", "../plans/p.yaml"])
    assert r.exit_code == 2 and "inputs.fleet" in r.output and "--fleet" in r.output, r.output
