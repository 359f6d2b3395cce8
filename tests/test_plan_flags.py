"""`hsplit plan --lr --lr-schedule --warmup --partition --dirichlet-alpha --eval-fraction ...`: the flags are
checked with the plan file's rules, written into plan.yaml, and `hsplit run` trains with them."""
from __future__ import annotations

import csv
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsplit.cli import app  # noqa: E402
from hsplit.planner.plan import PLAN_FLAGS, Plan, settings_from_flags  # noqa: E402

runner = CliRunner()


def test_every_plan_flag_is_a_plan_field_and_a_cli_option():
    import typer.main
    opts = {o for p in typer.main.get_command(app).commands["plan"].params for o in p.opts}
    assert set(PLAN_FLAGS) <= opts
    for flag in ("--lr", "--lr-schedule", "--warmup", "--partition", "--dirichlet-alpha", "--eval-fraction",
                 "--seed", "--local-steps", "--batch-size", "--seq-len", "--rounds"):
        assert flag in PLAN_FLAGS


def test_plan_flags_are_written_into_the_plan(tmp_path):
    out = tmp_path / "plan.yaml"
    r = runner.invoke(app, ["plan", "-o", str(out), "--lr", "5e-4", "--lr-schedule", "linear", "--warmup", "3",
                            "--weight-decay", "0.01", "--max-grad-norm", "0", "--lora-dropout", "0.1", "--seed", "7",
                            "--partition", "dirichlet", "--dirichlet-alpha", "0.3", "--eval-fraction", "0.1",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    raw = yaml.safe_load(out.read_text())
    assert {k: raw["training"][k] for k in ("learning_rate", "lr_schedule", "warmup_steps", "weight_decay",
                                            "max_grad_norm", "lora_dropout", "seed")} == {
        "learning_rate": 5e-4, "lr_schedule": "linear", "warmup_steps": 3, "weight_decay": 0.01,
        "max_grad_norm": 0.0, "lora_dropout": 0.1, "seed": 7}
    assert {k: raw["data"][k] for k in ("partition", "alpha", "eval_fraction")} == {
        "partition": "dirichlet", "alpha": 0.3, "eval_fraction": 0.1}
    assert json.loads(r.stdout)["training"]["learning_rate"] == 5e-4
    # not given: the plan's defaults
    r = runner.invoke(app, ["plan", "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    p = Plan.load(out)
    assert (p.training.learning_rate, p.training.lr_schedule, p.training.warmup_steps) == (2e-4, "cosine", 0)
    assert (p.data.partition, p.data.alpha, p.data.eval_fraction) == ("by-source", 0.5, 0.05)


@pytest.mark.parametrize("args, flag, words", [
    (["--lr", "0"], "--lr", "must be > 0"),
    (["--lr", "nan"], "--lr", "finite"),
    (["--lr-schedule", "cos"], "--lr-schedule", "constant, linear, cosine"),
    (["--warmup", "-1"], "--warmup", "whole number in 0.."),
    (["--partition", "random"], "--partition", "by-source, iid, dirichlet"),
    (["--partition", "dirichlet", "--dirichlet-alpha", "0"], "--dirichlet-alpha", "must be > 0"),
    (["--dirichlet-alpha", "0.3"], "--dirichlet-alpha", "add --partition dirichlet"),
    (["--sources-per-client", "2"], "--sources-per-client", "add --partition flower-pathological"),
    (["--partition", "flower-pathological", "--sources-per-client", "0"], "--sources-per-client", "whole number in 1.."),
    (["--eval-fraction", "1"], "--eval-fraction", "[0, 1)"),
    (["--lora-dropout", "1.5"], "--lora-dropout", "[0, 1)"),
    (["--dtype", "fp64"], "--dtype", "fp32, bf16, fp16"),
])
def test_a_bad_flag_is_one_error_naming_the_flag_and_the_rule(tmp_path, args, flag, words):
    out = tmp_path / "plan.yaml"
    r = runner.invoke(app, ["plan", "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and f"{flag}:" in r.output and words in r.output, r.output
    assert "training." not in r.output and "data." not in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_every_problem_of_the_flags_in_one_error():
    from hsplit.planner.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        settings_from_flags({"--lr": -1.0, "--warmup": -2, "--eval-fraction": 2.0})
    assert [x.split(":")[0] for x in e.value.problems] == ["--lr", "--warmup", "--eval-fraction"]


def test_a_warmup_as_long_as_the_run_is_a_note():
    _, _, notes = settings_from_flags({"--rounds": 2, "--local-steps": 3, "--warmup": 6})
    assert len(notes) == 1 and "never reaches" in notes[0]
    assert settings_from_flags({"--rounds": 2, "--local-steps": 3, "--warmup": 5})[2] == []


def test_the_run_follows_the_flags_written_into_the_plan(tmp_path, monkeypatch):
    """--lr / --lr-schedule / --warmup: the learning rate the run logs each round is the schedule's;
    --partition iid / --eval-fraction / --seed: the data split the run reports."""
    from hsplit.runtime.models.tiny import save_tiny_model
    monkeypatch.setenv("HSPLIT_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i % 7}", "source": f"s{i % 2}"})
                            + "\n" for i in range(60)))
    plan = tmp_path / "plan.yaml"
    r = runner.invoke(app, ["plan", "--fleet", "example", "--model", str(model), "--strategy", "hetlora",
                            "--ranks", "0,2", "--server-rank", "2", "--seq-len", "16", "--batch-size", "2",
                            "--local-steps", "2", "--rounds", "2", "--data", str(data), "--lr", "0.004",
                            "--lr-schedule", "linear", "--warmup", "2", "--partition", "iid", "--eval-fraction", "0.2",
                            "--seed", "3", "-o", str(plan), "--format", "json"])
    assert r.exit_code == 0, r.output
    p = Plan.load(plan)
    assert (p.training.learning_rate, p.training.lr_schedule, p.training.warmup_steps) == (0.004, "linear", 2)
    r = runner.invoke(app, ["run", str(plan), "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--format", "json"])
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "runs" / "r"
    with open(run_dir / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["client"] == "all" and row["round"] != "0"]
    # 4 steps in all, warm-up 2: step 1 (end of round 1) is at the full rate, step 3 halfway down the linear decay
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.004, 0.002])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["plan"]["training"]["seed"] == 3
    assert config["data"]["partition"] == "iid" and config["data"]["eval_sequences"] == 12     # 0.2 x 30 per source


def test_partition_flags_cover_every_partition_and_its_settings(tmp_path):
    import typer.main
    from hsplit.planner.plan import PARTITIONS
    out = tmp_path / "plan.yaml"
    r = runner.invoke(app, ["plan", "-o", str(out), "--partition", "flower-dirichlet", "--dirichlet-alpha", "0.3",
                            "--partition-by", "topic", "--format", "json"])
    assert r.exit_code == 0, r.output
    raw = yaml.safe_load(out.read_text())["data"]
    assert (raw["partition"], raw["alpha"], raw["partition_by"]) == ("flower-dirichlet", 0.3, "topic")
    r = runner.invoke(app, ["plan", "-o", str(out), "--partition", "flower-pathological", "--sources-per-client", "1",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(out.read_text())["data"]["sources_per_client"] == 1
    helps = {o: p.help for p in typer.main.get_command(app).commands["plan"].params for o in p.opts}
    assert all(name in helps["--partition"] for name in PARTITIONS)
    assert "flower-dirichlet" in helps["--dirichlet-alpha"]
