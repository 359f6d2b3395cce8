"""`hsplit eval RUN --data e2e:PATH --generate`: decoding, multi-reference BLEU / ROUGE-L, outputs."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.plan import Plan
from hsplit.runtime.generate import read_mr_groups, split_data_ref, text_metrics
from hsplit.runtime.tiny import save_tiny_model


def test_metrics_use_every_reference_of_an_mr():
    refs = [["the cat sat on the mat", "a cat is on the mat"], ["it rains today"]]
    exact = text_metrics(["a cat is on the mat", "it rains today"], refs)
    assert exact["bleu"] == pytest.approx(100.0) and exact["rouge_l"] == pytest.approx(100.0)
    only_first = text_metrics(["a cat is on the mat", "it rains today"], [[refs[0][0]], refs[1]])
    assert only_first["bleu"] < 100 and only_first["rouge_l"] < 100


def test_data_refs_name_their_format():
    assert split_data_ref("e2e:/x/test.csv") == ("/x/test.csv", "e2e")
    assert split_data_ref("/x/test.csv") == ("/x/test.csv", "auto")


def test_generate_through_the_cli_writes_outputs_next_to_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HSPLIT_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    data = tmp_path / "e2e.csv"
    rows = ["mr,ref"] + [f'"name[Place{i % 5}], food[French]","Place{i % 5} serves French food, take {i}."'
                         for i in range(60)]
    data.write_text("\n".join(rows) + "\n")
    plan = Plan.from_dict({"model": str(model), "strategy": "hetlora", "server_rank": 2, "modules": ["q_proj"],
                           "training": {"batch_size": 2, "seq_len": 32, "local_steps": 2, "rounds": 1,
                                        "dtype": "fp32", "learning_rate": 1e-2},
                           "data": {"path": str(data), "eval_fraction": 0.1},
                           "clients": [{"device": "a", "split_layer": 1, "ranks": {"q_proj": 2}},
                                       {"device": "b", "split_layer": 2, "ranks": {"q_proj": 4}}]}, "plan.yaml")
    plan.save(tmp_path / "plan.yaml")
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(tmp_path / "plan.yaml"), "--runs-dir", str(tmp_path / "runs"),
                              "--name", "r", "--format", "json"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "r"
    res = runner.invoke(app, ["eval", str(run_dir), "--data", f"e2e:{data}", "--generate", "--beams", "2",
                              "--max-new-tokens", "8", "--max-mrs", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["mrs"] == 3 and rep["references"] == 36 and rep["decoding"] == "beam 2"
    assert 0 <= rep["bleu"] <= 100 and 0 <= rep["rouge_l"] <= 100 and rep["perplexity"] > 1
    lines = (run_dir / "generate-e2e-beam2.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(json.loads(lines[0])["references"]) == 12
    assert json.loads((run_dir / "generate-e2e-beam2.json").read_text())["bleu"] == rep["bleu"]
    assert [mr for mr, _ in read_mr_groups(data)][:2] == ["name[Place0], food[French]", "name[Place1], food[French]"]
    # text output: the scores and the first outputs next to a reference
    res = runner.invoke(app, ["eval", str(run_dir), "--data", f"e2e:{data}", "--generate", "--max-new-tokens", "8",
                              "--max-mrs", "2"])
    assert res.exit_code == 0, res.output
    assert "first 2 outputs" in res.output and "name[Place0], food[French]" in res.output
    assert "BLEU" in res.output and "generate-e2e.jsonl" in res.output
    # without --data it is one clear error
    res = runner.invoke(app, ["eval", str(run_dir), "--generate"])
    assert res.exit_code == 2 and "--data" in res.output
