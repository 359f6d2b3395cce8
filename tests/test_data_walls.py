"""The data walls: hub datasets with a config (OWNER/NAME:CONFIG[:SPLIT], never the network), the one
data-summary line of `hsplit plan` and `hsplit run` (the plan's held-out split is the run's), and a
data.format that contradicts data.path."""
import os
import random
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.plan_refs import hub_parts, looks_like_hub_id

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from hsplit.runtime.models.tiny import save_tiny_model
    root = tmp_path_factory.mktemp("walls")
    old = os.environ.get("HSPLIT_CACHE")
    os.environ["HSPLIT_CACHE"] = str(root / "cache")
    yield save_tiny_model(root / "model", "llama", layers=2)
    if old is None:
        os.environ.pop("HSPLIT_CACHE", None)
    else:
        os.environ["HSPLIT_CACHE"] = old


def _plan(model, data, out, *extra):
    return runner.invoke(app, [str(a) for a in ("plan", "--fleet", "example", "--model", model, "--seq-len", 32,
                                                "--data", data, *extra, "-o", out)])


def _line(output: str) -> str:
    (line,) = [x for x in output.splitlines() if x.startswith("data: ")]
    return line


# ---------------------------------------------------------------- hub configs

def test_hub_ids_name_a_config_and_a_split():
    assert hub_parts("nyu-mll/glue:sst2") == ("nyu-mll/glue", "sst2", None)
    assert hub_parts("nyu-mll/glue:sst2:validation") == ("nyu-mll/glue", "sst2", "validation")
    assert hub_parts("SetFit/20_newsgroups") == ("SetFit/20_newsgroups", None, None)
    assert looks_like_hub_id("nyu-mll/glue:sst2:train") and not looks_like_hub_id("data/x.csv")


def test_a_config_without_an_owner_is_refused_with_the_syntax(model, tmp_path):
    r = _plan(model, "glue:sst2", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "unknown data format 'glue'" in r.output
    assert "OWNER/NAME:CONFIG[:SPLIT], e.g. nyu-mll/glue:sst2" in r.output


def test_a_dataset_that_needs_a_config_says_how_to_name_it(model, tmp_path, monkeypatch):
    import datasets
    asked = []

    def builder(name, config=None, *a, **k):
        asked.append((name, config))
        if config is None:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['cola', 'sst2']")
        info = types.SimpleNamespace(features=datasets.Features({"sentence": datasets.Value("string"),
                                                                 "label": datasets.Value("int64")}),
                                     splits={"train": types.SimpleNamespace(num_examples=10),
                                             "validation": types.SimpleNamespace(num_examples=4)})
        return types.SimpleNamespace(info=info)
    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    r = _plan(model, "nyu-mll/glue", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "needs a config name" in r.output and "nyu-mll/glue:CONFIG" in r.output, r.output
    r = _plan(model, "nyu-mll/glue:sst2:dev", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "has no split 'dev'; it has train, validation" in r.output, r.output
    assert asked[-1] == ("nyu-mll/glue", "sst2")


def test_an_uncached_dataset_offline_names_the_config_in_the_download_hint(model, tmp_path, monkeypatch):
    import datasets

    def builder(name, config=None, *a, **k):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from hsplit.planner.plan import DataSpec
    from hsplit.planner.errors import ConfigError
    from hsplit.runtime.data.source import check_data
    with pytest.raises(ConfigError) as e:
        check_data(DataSpec(path="nyu-mll/glue:sst2:validation"), 32)
    assert "load_dataset('nyu-mll/glue', 'sst2', split='validation').save_to_disk('glue_sst2_validation')" in str(e.value)


# ---------------------------------------------------------------- data.format against data.path

def test_a_format_that_contradicts_the_path_names_both(model, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello there"}\n' * 20)
    r = _plan(model, f"csv:{tmp_path / 'd.jsonl'}", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "data.format: csv contradicts data.path" in r.output and "d.jsonl" in r.output
    r = _plan(model, "parquet:shakespeare", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "parquet contradicts data.path shakespeare" in r.output, r.output
    r = _plan(model, f"shakespeare:{tmp_path / 'd.jsonl'}", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "shakespeare contradicts data.path" in r.output, r.output
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "x"}\n')
    r = _plan(model, f"csv:{folder}", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "csv contradicts data.path" in r.output and "no csv file" in r.output, r.output
    assert not (tmp_path / "p.yaml").exists()


# ---------------------------------------------------------------- the data-summary line

def test_plan_and_run_print_the_same_data_summary_for_text_files(model, tmp_path):
    random.seed(1)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, n in enumerate(("a", "b", "c")):
        words = ["to", "be", "or", "not", "the", "question", "whether", "nobler"]
        (folder / f"{n}.txt").write_text(" ".join(random.choice(words) for _ in range(600 * (i + 1))))
    r = _plan(model, folder, tmp_path / "p.yaml", "--eval-fraction", 0.1, "--local-steps", 1, "--rounds", 1)
    assert r.exit_code == 0, r.output
    planned = _line(r.output)
    assert planned.startswith(f"data: {folder} (format text, record kind documents): 3 records; training ")
    assert "about" not in planned       # the tokenizer is on disk: counted, not estimated
    r = runner.invoke(app, ["run", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs"), "--name", "r"])
    assert r.exit_code == 0, r.output
    assert _line(r.output) == planned


def test_the_plans_held_out_split_is_the_runs_per_source_hold_out(model, tmp_path):
    """Many small sources: the run holds out per source (pooling the small ones), not eval_fraction of the total."""
    from hsplit.planner.plan import DataSpec
    from hsplit.runtime.data.summary import data_summary
    from hsplit.runtime.data.federated import load_federated_data
    from transformers import AutoTokenizer
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(6):
        (folder / f"s{i}.txt").write_text("to be or not to be " * (40 + 37 * i))
    spec = DataSpec(path=str(folder), eval_fraction=0.3)
    planned = data_summary(spec, 16, [1, 1], 0, model)
    ran = load_federated_data(spec, AutoTokenizer.from_pretrained(model), 16, [1, 1], 0, use_cache=False).summary
    for key in ("records", "train_sequences", "eval_sequences", "train_tokens", "eval_tokens", "client_sequences"):
        assert planned[key] == ran[key], key
    estimated = data_summary(spec, 16, [1, 1], 0, None)          # no tokenizer: an estimate, said so
    assert estimated["estimated"] and not planned["estimated"]


def test_a_classification_plan_prints_records_sequences_and_clients(model, tmp_path):
    rows = "sentence,label\n" + "".join(f"text number {i},{['a', 'b'][i % 2]}\n" for i in range(40))
    (tmp_path / "c.csv").write_text(rows)
    r = _plan(model, tmp_path / "c.csv", tmp_path / "p.yaml", "--task", "classification", "--partition-by", "label",
              "--eval-fraction", 0.1)
    assert r.exit_code == 0, r.output
    line = _line(r.output)
    assert "(format csv, record kind classification): 40 records; training 36 sequences" in line
    assert "held out 4 sequences" in line and "per client" in line
