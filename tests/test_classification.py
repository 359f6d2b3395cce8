"""Classification (data.task classification): plan-time data checks, the label set in the plan, a tiny
classifier trained end to end with two strategies (accuracy from the saved predictions), the export
reloaded with AutoModelForSequenceClassification + PeftModel, and the planner's head costs."""
import csv
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.plan import Plan
from hsplit.runtime.models.tiny import save_tiny_model

runner = CliRunner()
WORDS = {"pos": "good great fine", "neg": "bad awful poor", "mid": "so so okay"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    old = os.environ.get("HSPLIT_CACHE")
    os.environ["HSPLIT_CACHE"] = str(root / "cache")
    model = save_tiny_model(root / "model", "llama", layers=4)
    yield root, model
    if old is None:
        os.environ.pop("HSPLIT_CACHE", None)
    else:
        os.environ["HSPLIT_CACHE"] = old


def _rows(n=90, labels=("pos", "neg", "mid")):
    return [(f"this is {WORDS[labels[i % len(labels)]].split()[i % 3]} number {i}", labels[i % len(labels)])
            for i in range(n)]


def _csv(path, rows, header=("sentence", "label")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _plan(root, model, data, *extra, out="plan.yaml"):
    return runner.invoke(app, [str(a) for a in (
        "plan", "--fleet", "example", "--model", model, "--seq-len", 32, "--batch-size", 4, "--local-steps", 3,
        "--rounds", 2, "--data", data, "--task", "classification", "--eval-fraction", 0.2, *extra,
        "-o", root / out)])


def test_label_set_is_read_once_into_the_plan_from_every_column_convention(env, tmp_path):
    root, model = env
    a = _csv(tmp_path / "a.csv", _rows())
    assert _plan(tmp_path, model, a).exit_code == 0
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.data.task == "classification" and plan.data.labels == ["mid", "neg", "pos"]
    # JSONL, integer labels, `text` + `label`: sorted numerically (2 < 10), written as text
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": f"item {i}", "label": [2, 10][i % 2]}) + "\n" for i in range(40)))
    assert _plan(tmp_path, model, b, out="b.yaml").exit_code == 0
    assert Plan.load(tmp_path / "b.yaml").data.labels == ["2", "10"]
    # Parquet with other column names, named on the command line
    import pandas as pd
    pd.DataFrame({"utterance": [t for t, _ in _rows()], "intent": [lab for _, lab in _rows()]}).to_parquet(
        tmp_path / "c.parquet")
    r = _plan(tmp_path, model, tmp_path / "c.parquet", "--text-column", "utterance", "--label-column", "intent",
              out="c.yaml")
    assert r.exit_code == 0, r.output
    assert Plan.load(tmp_path / "c.yaml").data.labels == ["mid", "neg", "pos"]


def test_e2e_references_are_labelled_by_an_mr_attribute(env, tmp_path):
    root, model = env
    rows = [(f"name[P{i % 9}], eatType[{['pub', 'restaurant'][i % 2]}], area[riverside]", f"P{i % 9} is a place {i}.")
            for i in range(60)]
    data = _csv(tmp_path / "e2e.csv", rows, header=("mr", "ref"))
    r = _plan(tmp_path, model, data, "--label-column", "eatType", "--partition-by", "label")
    assert r.exit_code == 0, r.output
    assert Plan.load(tmp_path / "plan.yaml").data.labels == ["pub", "restaurant"]


@pytest.mark.parametrize("rows,expect", [
    ([("a text", "pos"), ("b text", "")] * 20, "20 records without a label in label (records 2, 4, 6, 8, 10 ...)"),
    ([("a text", "pos")] * 40, "has one class only ('pos')"),
])
def test_plan_time_label_errors(env, tmp_path, rows, expect):
    root, model = env
    r = _plan(tmp_path, model, _csv(tmp_path / "d.csv", rows))
    assert r.exit_code != 0 and expect in r.output, r.output
    assert not (tmp_path / "plan.yaml").exists()


def test_plan_time_error_when_no_label_column(env, tmp_path):
    root, model = env
    r = _plan(tmp_path, model, _csv(tmp_path / "d.csv", _rows(), header=("sentence", "mood")))
    assert r.exit_code != 0 and "needs a label column" in r.output and "--label-column" in r.output
    r = runner.invoke(app, ["plan", "--fleet", "example", "--label-column", "mood", "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 2 and "--label-column: applies to --task classification only" in r.output, r.output


def test_plan_time_error_when_the_held_out_split_misses_a_class(env, tmp_path):
    root, model = env
    # one source (no partition_by label): 5 % of 40 records hold out 2, so 3 classes cannot all be there
    r = _plan(tmp_path, model, _csv(tmp_path / "d.csv", _rows(40)), "--eval-fraction", 0.05)
    assert r.exit_code != 0 and "held-out split (eval_fraction 0.05) has no record of class" in r.output, r.output
    assert "--partition-by label" in r.output
    # held out per class: every class is there
    assert _plan(tmp_path, model, tmp_path / "d.csv", "--eval-fraction", 0.05, "--partition-by", "label").exit_code == 0


def test_unknown_labels_are_refused_by_plan_check_and_eval_data(env, tmp_path):
    root, model = env
    assert _plan(tmp_path, model, _csv(tmp_path / "d.csv", _rows())).exit_code == 0
    plan = Plan.load(tmp_path / "plan.yaml")
    plan.data.labels = ["neg", "pos"]           # hand-edited: 'mid' is not in it
    plan.save(tmp_path / "plan.yaml")
    r = runner.invoke(app, ["plan", "--check", str(tmp_path / "plan.yaml")])
    assert r.exit_code != 0 and "label 'mid' in label not among the plan's data.labels (neg, pos)" in r.output


@pytest.mark.parametrize("strategy", ["hsplitlora", "hafl-freezing"])
def test_tiny_classifier_trains_two_rounds_and_eval_reads_saved_predictions(env, strategy):
    root, model = env
    d = root / strategy
    d.mkdir()
    data = _csv(d / "train.csv", _rows(120))
    r = _plan(d, model, data, "--strategy", strategy, "--partition", "dirichlet", "--partition-by", "label",
              "--lr", "5e-3")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", str(d / "plan.yaml"), "--runs-dir", str(d / "runs"), "--name", "r",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["rounds"] == 2 and out["eval_loss_after"] == out["eval_loss_after"]
    r = runner.invoke(app, ["eval", str(d / "runs" / "r"), "--per-class", "--format", "json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout[r.stdout.index("{"):])
    with open(ev["predictions"], newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == ev["sequences"] == 24          # 20 % of 120, held out per class
    assert {p["label"] for p in preds} == {"mid", "neg", "pos"}
    assert ev["accuracy"] == pytest.approx(sum(p["label"] == p["predicted"] for p in preds) / len(preds))
    from sklearn.metrics import f1_score
    assert ev["macro_f1"] == pytest.approx(f1_score([p["label"] for p in preds], [p["predicted"] for p in preds],
                                                    average="macro", labels=["mid", "neg", "pos"], zero_division=0))
    assert [c["label"] for c in ev["per_class"]] == ["mid", "neg", "pos"]
    assert sum(c["support"] for c in ev["per_class"]) == 24
    if strategy != "hsplitlora":
        return
    # export: AutoModelForSequenceClassification + PeftModel gives the run's own class scores
    r = runner.invoke(app, ["export", str(d / "runs" / "r"), "--adapter", str(d / "adapter"), "--exact",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hsplit.runtime.outputs.rundir import load_run
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=3)
    reloaded = PeftModel.from_pretrained(base, str(d / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(model)
    sim, _, _ = load_run(d / "runs" / "r")
    ev_set = sim.data.eval
    sim.bank.activate(sim.eval_adapter())
    with torch.no_grad():
        h = sim.split.client_forward(ev_set.input_ids, ev_set.attention_mask, sim.split.layers)
        ours, _ = sim.task.scores(sim.split, h, ev_set.attention_mask, sim.split.layers, ev_set.labels)
        texts = [tok.decode(ids[m.bool()]) for ids, m in zip(ev_set.input_ids, ev_set.attention_mask)]
        theirs = torch.stack([reloaded(**tok(t, return_tensors="pt")).logits[0] for t in texts])
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert [p["predicted"] for p in preds] == [["mid", "neg", "pos"][i] for i in ours.argmax(-1).tolist()]


def test_planner_charges_the_classification_head_instead_of_the_lm_head():
    from conftest import tiny_model

    from hsplit.planner.cost import coefficients
    m = tiny_model()
    lm = coefficients(m, m.family.default_modules, 8, 8, 4, 64, "fp32")
    cls = coefficients(m, m.family.default_modules, 8, 8, 4, 64, "fp32", classes=3)
    assert lm.head_flops == 4.0 * 4 * 64 * m.vocab * m.hidden
    assert cls.head_flops == 4.0 * 4 * 3 * m.hidden
    assert lm.server_frozen_bytes - cls.server_frozen_bytes == (m.vocab - 3) * m.hidden * 4
    assert cls.server_fixed_bytes < lm.server_fixed_bytes


def test_every_other_strategy_trains_a_classifier_for_a_round(env):
    """The task changes the server's loss only: every strategy runs it (one round, one local step each)."""
    from hsplit.planner.strategies import NAMES
    root, model = env
    d = root / "every"
    d.mkdir()
    data = _csv(d / "train.csv", _rows(60))
    for strategy in [s for s in NAMES if s not in ("hsplitlora", "hafl-freezing")]:
        r = runner.invoke(app, [str(a) for a in (
            "plan", "--fleet", "example", "--model", model, "--seq-len", 32, "--batch-size", 2, "--local-steps", 1,
            "--rounds", 1, "--data", data, "--task", "classification", "--partition-by", "label",
            "--eval-fraction", 0.2, "--strategy", strategy, "-o", d / f"{strategy}.yaml")])
        assert r.exit_code == 0, (strategy, r.output)
        r = runner.invoke(app, ["run", str(d / f"{strategy}.yaml"), "--runs-dir", str(d / "runs"), "--name", strategy,
                                "--format", "json"])
        assert r.exit_code == 0, (strategy, r.output)
        out = json.loads(r.stdout[r.stdout.index("{"):])
        assert out["eval_loss_after"] == out["eval_loss_after"] and out["eval_loss_after"] < 5, strategy
