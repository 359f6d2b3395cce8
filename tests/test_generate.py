"""`hsplit eval RUN --data e2e:PATH --generate`: decoding, multi-reference BLEU / ROUGE-L, outputs."""
import json
import os

import pytest
import yaml
from conftest import tiny_e2e_plan
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.runtime.data.federated import split_data_ref
from hsplit.runtime.outputs.generate import read_mr_groups, text_metrics


def read_mr_groups_pairs(path):
    return [(mr, ref) for mr, refs in read_mr_groups(path) for ref in refs]


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
    plan_path, data = tiny_e2e_plan(tmp_path, [(f"name[Place{i % 5}], food[French]",
                                                f"Place{i % 5} serves French food, take {i}.") for i in range(60)],
                                    local_steps=2, ranks=(2, 4))
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(plan_path), "--runs-dir", str(tmp_path / "runs"),
                              "--name", "r", "--format", "json"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "r"
    res = runner.invoke(app, ["eval", str(run_dir), "--data", f"e2e:{data}", "--generate", "--beams", "2",
                              "--max-new-tokens", "8", "--max-mrs", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["prompts"] == 3 and rep["references"] == 36 and rep["decoding"] == "beam 2" and rep["kind"] == "e2e"
    assert 0 <= rep["bleu"] <= 100 and 0 <= rep["rouge_l"] <= 100 and rep["perplexity"] > 1
    lines = (run_dir / "generate-e2e.csv-beam2.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(json.loads(lines[0])["references"]) == 12
    assert json.loads((run_dir / "generate-e2e.csv-beam2.json").read_text())["bleu"] == rep["bleu"]
    assert [mr for mr, _ in read_mr_groups(data)][:2] == ["name[Place0], food[French]", "name[Place1], food[French]"]
    # text output: the scores and the first outputs next to a reference
    res = runner.invoke(app, ["eval", str(run_dir), "--data", f"e2e:{data}", "--generate", "--max-new-tokens", "8",
                              "--max-mrs", "2"])
    assert res.exit_code == 0, res.output
    assert "first 2 outputs" in res.output and "name[Place0], food[French]" in res.output
    assert "BLEU" in res.output and "generate-e2e.csv.jsonl" in res.output
    # without --data: the run's held-out split, its MRs as trained, every held-out reference of an MR
    res = runner.invoke(app, ["eval", str(run_dir), "--generate", "--max-new-tokens", "8", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    held = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["eval_sequences"]
    assert rep["split"] == "held-out" and rep["kind"] == "e2e" and rep["references"] == held == 5   # 1 of 12 x 5
    assert rep["skipped_cut_at_seq_len"] == 0        # seq_len 32 cut them: the references come whole from the file
    rows = [json.loads(x) for x in (run_dir / "generate-heldout.jsonl").read_text().splitlines()]
    assert len(rows) == rep["prompts"] and sum(len(r["references"]) for r in rows) == 5
    pairs = set(read_mr_groups_pairs(data))
    assert all((r["prompt"], ref) in pairs for r in rows for ref in r["references"])


# ---------------------------------------------------------------- QA fixes: --data, markup, signature, --device, --format

BRACKET_MR = "name[Blue Spice], eatType[coffee shop], area[city centre]"


@pytest.fixture(scope="module")
def bracket_run(tmp_path_factory):
    """A one-round tiny run on E2E rows whose MRs look like rich markup (`eatType[coffee shop]`)."""
    root = tmp_path_factory.mktemp("gen-qa")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HSPLIT_CACHE", str(root / "cache"))
        plan_path, data = tiny_e2e_plan(root, [(BRACKET_MR, f"Blue Spice is a coffee shop in the city centre, take {i}.")
                                               for i in range(40)], seq_len=96)
        res = CliRunner().invoke(app, ["run", str(plan_path), "--runs-dir", str(root / "runs"),
                                       "--name", "r", "--format", "json"])
        assert res.exit_code == 0, res.output
        yield root / "runs" / "r", data


def _err(res):
    """Exit 2 with one `error:` and no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.output.startswith("error:") and "Traceback" not in res.output, res.output
    return res.output


@pytest.mark.parametrize("generate", [False, True])
def test_eval_data_that_does_not_exist_or_has_an_unknown_format_is_one_error(bracket_run, tmp_path, generate):
    run_dir, data = bracket_run
    extra = ["--generate"] if generate else []
    out = _err(CliRunner().invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "nope.csv"), *extra]))
    assert "--data" in out and "nope.csv" in out and "no such file" in out
    out = _err(CliRunner().invoke(app, ["eval", str(run_dir), "--data", f"xml:{data}", *extra]))
    assert "--data" in out and "'xml'" in out and all(f in out for f in ("e2e", "jsonl", "csv", "text"))
    out = _err(CliRunner().invoke(app, ["eval", str(run_dir), "--data", "e2e:", *extra]))
    assert "--data" in out


def test_split_data_ref_rejects_unknown_prefixes(tmp_path):
    from hsplit.planner.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown data format 'xml'"):
        split_data_ref("xml:/x/test.csv")
    odd = tmp_path / "xml:name.csv"           # a real file whose name has a colon is still a path
    odd.write_text("mr,ref\n")
    assert split_data_ref(str(odd)) == (str(odd), "auto")


def test_generate_table_prints_mrs_verbatim_not_as_markup(bracket_run):
    run_dir, data = bracket_run
    res = CliRunner().invoke(app, ["eval", str(run_dir), "--data", f"e2e:{data}", "--generate",
                                   "--max-new-tokens", "4", "--max-mrs", "1"])
    assert res.exit_code == 0, res.output
    assert BRACKET_MR in res.output.replace("│", " ").replace("\n", " ") or \
        all(part in res.output for part in ("eatType[coffee shop]", "area[city centre]")), res.output


def test_bleu_signature_is_sacrebleus():
    sig = text_metrics(["a cat is on the mat", "it rains"], [["a cat is on the mat", "a cat"], ["it rains"]])[
        "bleu_signature"]
    import sacrebleu
    fields = dict(part.split(":", 1) for part in sig.split("|"))
    assert fields["nrefs"] == "var" and fields["case"] == "mixed" and fields["tok"] == "13a"
    assert fields["smooth"] == "exp" and fields["version"] == sacrebleu.__version__, sig


def test_eval_device_is_checked_before_loading_and_applies_to_perplexity(bracket_run, monkeypatch):
    run_dir, data = bracket_run
    import hsplit.runtime.outputs.rundir as train
    seen = []
    real = train.load_run
    monkeypatch.setattr(train, "load_run", lambda *a, **k: seen.append(k.get("device")) or real(*a, **k))
    out = _err(CliRunner().invoke(app, ["eval", str(run_dir), "--device", "gpu"]))
    assert "--device gpu: use auto, cpu or cuda" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for extra in ([], ["--data", f"e2e:{data}", "--generate"]):
        out = _err(CliRunner().invoke(app, ["eval", str(run_dir), "--device", "cuda", *extra]))
        assert "--device cuda: CUDA is not available" in out and "use --device cpu or auto" in out
    assert seen == []                              # refused before any model was loaded
    res = CliRunner().invoke(app, ["eval", str(run_dir), "--device", "auto", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert seen == ["auto"] and json.loads(res.stdout)["device"] == "cpu"


def test_format_help_lists_what_the_check_accepts():
    import typer.main
    from hsplit.cliutil.console import FORMATS
    commands = typer.main.get_command(app).commands
    for name in ("eval", "export"):
        opt = next(p for p in commands[name].params if p.name == "fmt")
        assert all(f in opt.help for f in FORMATS), (name, opt.help)
    res = CliRunner().invoke(app, ["eval", "nowhere", "--format", "xml"])
    assert res.exit_code == 2 and all(f in res.output for f in FORMATS)


def test_a_missing_csv_data_path_is_a_config_error_not_a_traceback(tmp_path):
    from hsplit.planner.errors import ConfigError
    from hsplit.planner.plan import DataSpec
    from hsplit.runtime.data.source import resolve
    with pytest.raises(ConfigError, match="no such file"):
        resolve(DataSpec(path=str(tmp_path / "nope.csv")))


def test_generate_file_on_a_loaded_run_as_the_benchmark_calls_it(bracket_run):
    """bench/strategies.py: a loaded simulation, the first N MRs, perplexity over N references spread out."""
    from hsplit.runtime.outputs.generate import generate_file
    from hsplit.runtime.outputs.rundir import load_run
    run_dir, data = bracket_run
    sim, _, _ = load_run(run_dir)
    rep, rows = generate_file(sim, f"e2e:{data}", max_prompts=1, max_new_tokens=4, ppl_max_refs=3)
    assert rep["prompts"] == 1 == len(rows) and rep["references"] == 40 and rep["perplexity_references"] == 3
    assert rows[0]["prompt"] == BRACKET_MR and len(rows[0]["references"]) == 40
