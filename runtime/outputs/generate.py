"""Generation metrics of a run: `hsplit eval RUN --generate [--data [FORMAT:]PATH] [--beams 4]`.

    rep = generate_run("runs/demo")                                    # the run's held-out split
    rep = generate_run("runs/demo", "e2e:/data/e2e/testset_w_refs.csv", beams=4, max_prompts=100)
    rep = generate_run("runs/demo", "test.jsonl")                      # prompt/completion or chat JSONL
    # runs/demo/generate-<heldout | file name>[-beamN].jsonl  one line per prompt: prompt, generated, references
    # runs/demo/generate-<heldout | file name>[-beamN].json   the report: bleu, rouge_l, perplexity, settings

Data that can be generated from (anything else, e.g. plain text or Shakespeare, is refused, naming these):
- E2E CSV (`mr`, `ref`): prompt = the MR + newline (as trained); the output is cut at its first newline.
- prompt/completion: JSONL `{"prompt", "completion"}` or CSV columns `prompt`, `completion`.
- chat JSONL `{"messages": [{"role", "content"}, ...]}`: prompt = the tokenizer's chat template over every
  turn before the last assistant turn, with the generation prompt; reference = that turn's content.
  ShareGPT `conversations` ({from, value}) alike, roles mapped as training maps them (runtime/data/tokenise.py);
  TRL conversational prompt/completion (lists of messages): prompt = the template over the prompt's turns,
  reference = the completion's first assistant turn.
Without --data, the run's own held-out split is used, from its token sequences exactly as trained: the
tokens before the last labelled span are the prompt, the span (less EOS) the reference; sequences cut at
seq_len are skipped (their reference is incomplete).

Examples sharing a prompt are one prompt with several references (E2E: an MR's references). Each prompt
(first appearance order; `max_prompts`: the first N) is decoded with the run's aggregated model (greedy,
or beam search with `beams` > 1) until EOS (chat: or the template's end-of-turn token), at most
`max_new_tokens` (default: 1.5 x the longest reference in tokens, at least 16). Metrics are against ALL
references of a prompt: corpus BLEU from sacrebleu (default 13a tokenisation, a variable number of
references) and ROUGE-L F1 from rouge-score (stemming on; max over the references, averaged over
prompts), both x100. Perplexity is exp(mean next-token loss) over every reference of the selected
prompts (loss on the reference only, as in training).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.yamlio import atomic_write_text, read_yaml
from hsplit.runtime.outputs import rundir
from hsplit.planner.plan_refs import looks_like_hub_id
from hsplit.runtime.data.federated import TokenSet, check_data_ref
from hsplit.runtime.data.source import NO_HELD_OUT

KINDS = ("E2E CSV (mr, ref), prompt/completion JSONL or CSV, chat JSONL (messages, conversations, or TRL "
         "prompt/completion message lists); Parquet, Arrow, `datasets` folders and dataset ids with those columns")


@dataclass
class Example:
    """One record of a --data file: what to generate from and its reference."""
    kind: str                       # e2e | prompt-completion | chat
    prompt: str | list[dict]        # text (E2E: the MR), or chat turns before the last assistant turn
    reference: str


@dataclass
class Prompt:
    """A distinct prompt with every reference it has."""
    kind: str
    ids: list[int]                  # the tokens the model is given
    shown: str                      # what the outputs show (E2E: the MR; chat: the templated prompt)
    references: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)    # held-out split: its sequences (for the perplexity)


# ---------------------------------------------------------------- reading --data files

def read_mr_groups(path: str | Path) -> list[tuple[str, list[str]]]:
    """E2E CSV (mr, ref) -> [(mr, [ref, ...])] in order of first appearance."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(str(path), ["no such file (--generate needs an E2E CSV with columns mr, ref)"])
    groups: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"mr", "ref"} <= set(reader.fieldnames):
            raise ConfigError(str(path), ["--generate needs an E2E CSV with columns mr and ref"])
        for row in reader:
            groups.setdefault(row["mr"].strip(), []).append(row["ref"].strip())
    if not groups:
        raise ConfigError(str(path), ["no rows"])
    return list(groups.items())


def _record(obj, where: str, problems: list[str]) -> Example | None:
    """A JSONL object or CSV row as an Example (None and a problem when it has nothing to generate from).
    Chat records are read as training reads them (runtime/data/tokenise.py): `messages`, ShareGPT `conversations`
    ({from, value}; human/gpt as user/assistant) and TRL's conversational prompt/completion (lists of messages)."""
    from hsplit.runtime.data.tokenise import _messages
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object with prompt/completion or messages")
        return None
    field = next((k for k in ("messages", "conversations") if obj.get(k) is not None), None)
    conversational = isinstance(obj.get("prompt"), list)
    if field or conversational:
        try:
            if field:
                msgs, first = _messages(obj[field], where), 1
            else:
                prompt = _messages(obj["prompt"], f"{where}: prompt")
                msgs, first = prompt + _messages(obj.get("completion"), f"{where}: completion"), len(prompt)
        except ConfigError as e:
            problems.append(str(e))
            return None
        roles = ", ".join(dict.fromkeys(m["role"] for m in msgs)) or "none"
        if field:       # the last assistant turn is the reference, every turn before it the prompt
            at = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        else:           # TRL: the completion's first assistant turn is the reference
            at = next((i for i, m in enumerate(msgs) if i >= first and m["role"] == "assistant"), None)
        if at is None or at < first:
            what = (f"{field} need an assistant turn after at least one other turn (the last assistant turn is "
                    "the reference, the turns before it the prompt)" if field else
                    "the completion needs an assistant turn (its content is the reference)")
            problems.append(f"{where}: {what}; roles found: {roles} (expected system, user, assistant)")
            return None
        return Example("chat", msgs[:at], msgs[at]["content"].strip())
    if obj.get("prompt") is not None and obj.get("completion") is not None:
        return Example("prompt-completion", str(obj["prompt"]), str(obj["completion"]).strip())
    what = "a text record (nothing to generate from)" if obj.get("text") is not None else "no prompt"
    problems.append(f"{where}: {what}; --generate needs prompt and completion fields, or messages")
    return None


def _refuse(path: str, problems: list[str], shown: int = 5) -> None:
    """One ConfigError of at most `shown` problems and how many more (nothing when there are none)."""
    if problems:
        raise ConfigError(str(path), problems, shown=shown)


def _plain_text(data: str) -> ConfigError:
    return ConfigError("--data", [f"{data}: --generate cannot generate from plain text; it needs prompts "
                                  f"and references: {KINDS}"])


def _dataset_examples(data: str, path: str, fmt: str) -> list[Example]:
    """Records of a Parquet/Arrow file, a folder (data files, or saved by `datasets`) or a dataset id, read by
    the training data loader (runtime/data/source.py): E2E columns, prompt/completion or messages."""
    from hsplit.planner.plan import DataSpec
    from hsplit.runtime.data.source import open_dataset, resolve
    spec = DataSpec(path=path, format=fmt)
    src = resolve(spec)
    if src.reader in ("text", "shakespeare"):
        raise _plain_text(data)
    ds = open_dataset(src, spec)
    cols = set(ds.column_names)
    e2e = next(((m, r) for m, r in (("mr", "ref"), ("meaning_representation", "human_reference"))
                if {m, r} <= cols), None)
    problems: list[str] = []
    if e2e:
        out = [Example("e2e", str(row[e2e[0]]).strip(), str(row[e2e[1]]).strip()) for row in ds]
    else:
        out = [_record(row, f"record {i + 1}", problems) for i, row in enumerate(ds)]
    _refuse(path, problems)
    if not out:
        raise ConfigError(path, [f"no records; --generate needs {KINDS}"])
    return out


def read_examples(data: str) -> list[Example]:
    """The records of a --data argument ([FORMAT:]PATH) that --generate can score (ConfigError naming the
    file, the line and what works otherwise). Checked before any model is loaded."""
    path, fmt = check_data_ref(data)
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if fmt in ("parquet", "arrow") or suffix in (".parquet", ".arrow") or p.is_dir() or (
            not p.exists() and looks_like_hub_id(path)):
        return _dataset_examples(data, path, fmt)
    if fmt in ("text", "shakespeare") or suffix in (".txt", ".md"):
        raise _plain_text(data)
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ConfigError("--data", [f"{data}: --generate reads .csv and .jsonl files ({KINDS}); "
                                     f"convert {p.name} to one of those"])
    if fmt == "e2e" or (suffix == ".csv" and fmt in ("auto", "csv") and _csv_header(p) >= {"mr", "ref"}):
        return [Example("e2e", mr, ref) for mr, refs in read_mr_groups(p) for ref in refs]
    problems: list[str] = []
    out = []
    if suffix == ".csv" or fmt == "csv":
        if not _csv_header(p) >= {"prompt", "completion"}:
            raise ConfigError(str(path), [f"--generate needs columns prompt and completion (or mr and ref: E2E); "
                                          f"this CSV has {', '.join(sorted(_csv_header(p))) or 'no header'}"])
        with open(p, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                out.append(_record({"prompt": row.get("prompt"), "completion": row.get("completion"),
                                    "text": row.get("text")}, f"row {i + 2}", problems))
    else:
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(str(path), ["not UTF-8 text: --generate reads JSONL, one object per line"]) from None
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"line {i + 1}: not valid JSON: {e}")
                    continue
                out.append(_record(obj, f"line {i + 1}", problems))
    _refuse(str(path), problems)
    if not out:
        raise ConfigError(str(path), [f"no records; --generate needs {KINDS}"])
    return out


def _csv_header(path: Path) -> set[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return set(next(csv.reader(f), []))


# ---------------------------------------------------------------- prompts

def _render(tok, turns: list[dict], generation_prompt: bool = False) -> str | None:
    """The chat template applied to `turns`; None when the template cannot render them."""
    from jinja2 import TemplateError
    try:
        return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError):
        return None


def chat_end_ids(tok) -> list[int]:
    """The special token that ends an assistant turn in the tokenizer's chat template (e.g. <|im_end|>)."""
    text = _render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x07"}]) or ""
    tail = text[text.rfind("\x07") + 1:] if "\x07" in text else ""
    special = set(tok.all_special_ids)
    return [i for i in tok(tail, add_special_tokens=False)["input_ids"] if i in special][:1]


def generation_header(tok) -> str:
    """What the chat template adds for add_generation_prompt (e.g. `<|im_start|>assistant\\n`); '' without one."""
    if not getattr(tok, "chat_template", None):
        return ""
    turn = [{"role": "user", "content": "\x07"}]
    with_header, without = _render(tok, turn, True), _render(tok, turn)
    return with_header[len(without):] if with_header and without and with_header.startswith(without) else ""


def prompts_of(examples: list[Example], tok, source: str) -> list[Prompt]:
    """Group examples by prompt (first appearance order) and tokenise the prompts as training does."""
    groups: dict[str, Prompt] = {}
    if any(e.kind == "chat" for e in examples) and not getattr(tok, "chat_template", None):
        raise ConfigError(source, [f"chat records need the model's chat template, and its tokenizer "
                                   f"({tok.name_or_path}) has none: use a model that ships one (set "
                                   "chat_template in its tokenizer_config.json) or prompt/completion records"])
    for k, e in enumerate(examples):
        if e.kind == "chat":
            text = shown = _render(tok, e.prompt, True)
            if text is None:
                raise ConfigError(source, [f"record {k + 1}: the chat template of {tok.name_or_path} cannot render "
                                           "its turns (roles it does not accept, or their order)"])
        else:
            text = e.prompt + "\n" if e.kind == "e2e" else e.prompt
            shown = e.prompt
        g = groups.get(text)
        if g is None:
            g = groups[text] = Prompt(e.kind, tok(text, add_special_tokens=False)["input_ids"], shown)
        g.references.append(e.reference)
    return list(groups.values())


def _file_references(tok, data_ref: str) -> dict[tuple, list[tuple[list[int], str]]]:
    """{prompt ids: [(reference ids, reference)]} of a data file --generate can read ({} when it cannot)."""
    try:
        examples = read_examples(data_ref)
        prompts = prompts_of(examples, tok, data_ref)
    except (ConfigError, OSError, UnicodeDecodeError):
        return {}
    refs = [r for g in prompts for r in g.references]
    ids = iter(tok(refs, add_special_tokens=False)["input_ids"] if refs else [])
    return {tuple(g.ids): [(next(ids), r) for r in g.references] for g in prompts}


def heldout_prompts(sim, data: dict) -> tuple[list[Prompt], int]:
    """The run's held-out split as prompts (see the module docstring); (prompts, sequences skipped because
    seq_len cut their reference and the data file does not give it whole). data: config.yaml's `data`."""
    tok, ev = sim.lm.tokenizer, sim.data.eval
    fmt, width = str(data.get("format", "")), ev.input_ids.shape[1]
    recorded = str(data.get("kind", ""))     # the record kind the run's data summary names (runtime/data/federated.py)
    special = set(tok.all_special_ids)
    groups: dict[tuple, Prompt] = {}
    whole: dict | None = None
    cut = 0
    header = generation_header(tok)
    for i in range(len(ev)):
        n = int(ev.attention_mask[i].sum())
        ids, lab = ev.input_ids[i, :n].tolist(), ev.labels[i, :n].tolist()
        on = [j for j, x in enumerate(lab) if x != -100]
        if not on or on[0] == 0:             # no prompt (a text chunk), or a prompt that fills seq_len
            cut += bool(not on and n == width)
            continue
        start = on[-1]
        while lab[start - 1] != -100:        # the last labelled span
            start -= 1
        key, span = tuple(ids[:start]), ids[start:on[-1] + 1]
        if n == width and span[-1] not in special:      # seq_len cut the reference: take it whole from the file
            if whole is None:
                whole = _file_references(tok, f"{fmt}:{data.get('path')}" if fmt else str(data.get("path")))
            found = [r for r_ids, r in whole.get(key, []) if r_ids[:len(span)] == span]
            if not found:
                cut += 1
                continue
            ref = found[0]
        else:
            ref = tok.decode(span, skip_special_tokens=True).strip()
        g = groups.get(key)
        if g is None:
            shown = tok.decode(key)
            kind = ("e2e" if "e2e" in (fmt, recorded) else
                    "chat" if "chat" in (fmt, recorded) or (header and shown.endswith(header)) else "prompt-completion")
            shown = tok.decode(key, skip_special_tokens=True).strip() if kind == "e2e" else shown
            g = groups[key] = Prompt(kind, list(key), shown)
        g.references.append(ref)
        g.rows.append(i)
    if not groups:
        why = (f"all {cut} held-out sequences are cut at seq_len {width}" if cut else
               "its held-out sequences have no prompt (text data)")
        raise ConfigError("--generate", [f"nothing to generate from in the run's held-out split: {why}; "
                                         f"give --data FILE ({KINDS})"])
    return list(groups.values()), cut


# ---------------------------------------------------------------- decoding and scoring

@torch.no_grad()
def generate_ids(sim, prompts: list[list[int]], max_new_tokens: int, beams: int = 1, batch_size: int = 16,
                 stop_ids: list[int] = (), first_line: bool = False) -> list[str]:
    """Decode every prompt (token ids) with the simulation's aggregated model (left-padded batches)."""
    tok, model = sim.lm.tokenizer, sim.lm.model
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    stops = list(dict.fromkeys([eos, *stop_ids]))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    model.eval()
    sim.bank.activate(sim.eval_adapter())
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for row, i in enumerate(chunk):
                x[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            with sim.autocast():
                gen = model.generate(input_ids=x.to(sim.device), attention_mask=mask.to(sim.device),
                                     max_new_tokens=max_new_tokens, num_beams=beams, do_sample=False,
                                     eos_token_id=stops, pad_token_id=pad, use_cache=True)
            for row, i in enumerate(chunk):
                text = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
                out[i] = text.split("\n")[0].strip() if first_line else text
    finally:
        sim.bank.activate(None)
    return out


def generate_texts(sim, prompts: list[str], max_new_tokens: int = 64, beams: int = 1, batch_size: int = 16) -> list[str]:
    """E2E-style: decode text prompts, keep each output's first line."""
    ids = sim.lm.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return generate_ids(sim, ids, max_new_tokens, beams, batch_size, first_line=True)


def text_metrics(hyps: list[str], refs: list[list[str]]) -> dict:
    """Corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score, max over references), both x100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    n = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n)]
    metric = sacrebleu.metrics.BLEU()          # defaults of corpus_bleu: 13a, exp smoothing, mixed case
    bleu = metric.corpus_score(hyps, streams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return {"bleu": bleu.score, "rouge_l": 100.0 * sum(rouge) / len(rouge), "bleu_signature": str(metric.get_signature())}


def reference_set(tok, prompts: list[Prompt], seq_len: int, end_ids: list[int]) -> TokenSet:
    """Every (prompt, reference) pair as training tokenises it: prompt + reference + end, loss on the reference."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pairs = [(g.ids, r) for g in prompts for r in g.references]
    refs = tok([r for _, r in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    ids = torch.full((len(pairs), seq_len), pad, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, ((p, _), c) in enumerate(zip(pairs, refs)):
        seq = (p + c + end_ids)[:seq_len]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = ids[i, len(p):len(seq)]
    return TokenSet(ids, mask, labels)


def auto_max_new_tokens(tok, prompts: list[Prompt]) -> int:
    """1.5 x the longest reference in tokens, at least 16."""
    longest = max(len(x) for x in tok([r for g in prompts for r in g.references], add_special_tokens=False)["input_ids"])
    return max(16, math.ceil(1.5 * longest))


def generate_on(sim, prompts: list[Prompt], *, beams: int = 1, max_new_tokens: int | None = None,
                batch_size: int = 16, heldout: bool = False, ppl_max_refs: int | None = None) -> tuple[dict, list[dict]]:
    """(report, one row per prompt) of the simulation's aggregated model on `prompts` (perplexity over all
    their references, or `ppl_max_refs` evenly spread)."""
    from hsplit.runtime.outputs.evaluate import evaluate

    tok = sim.lm.tokenizer
    end = chat_end_ids(tok) if any(g.kind == "chat" for g in prompts) else []
    new = max_new_tokens or auto_max_new_tokens(tok, prompts)
    hyps = generate_ids(sim, [g.ids for g in prompts], new, beams, batch_size, end,
                        first_line=prompts[0].kind == "e2e")
    refs = [g.references for g in prompts]
    metrics = text_metrics(hyps, refs)
    data = (sim.data.eval.subset([i for g in prompts for i in g.rows]) if heldout
            else reference_set(tok, prompts, sim.training.seq_len, end or [tok.eos_token_id]))
    loss = evaluate(sim, data, ppl_max_refs)
    report = {"prompts": len(prompts), "references": sum(map(len, refs)),
              "perplexity_references": min(len(data), ppl_max_refs or len(data)),
              "decoding": "greedy" if beams == 1 else f"beam {beams}", "max_new_tokens": new, **metrics,
              "eval_loss": loss, "perplexity": math.exp(loss) if loss == loss else None}
    rows = [{"prompt": g.shown, "generated": h, "references": g.references} for g, h in zip(prompts, hyps)]
    return report, rows


def generate_file(sim, data: str, max_prompts: int | None = None, **kw) -> tuple[dict, list[dict]]:
    """(report, rows) of a loaded simulation on a --data file (bench/strategies.py); kw: generate_on's."""
    prompts = prompts_of(read_examples(data), sim.lm.tokenizer, check_data_ref(data)[0])
    return generate_on(sim, prompts[:max_prompts] if max_prompts else prompts, **kw)


def generate_run(run_dir: str | Path, data: str | None = None, max_prompts: int | None = None, beams: int = 1,
                 max_new_tokens: int | None = None, batch_size: int = 16, device: str = "cpu") -> dict:
    """Generation metrics of a run's latest aggregated model on its held-out split (data None) or a --data
    file; writes generate-<heldout | file name>[-beamN].{jsonl,json} into the run folder (the name with its
    extension: pc.jsonl and pc.parquet do not overwrite each other)."""
    run_dir = Path(run_dir)
    examples = read_examples(data) if data else None     # a bad --data fails before the model loads
    if data is None:
        cfg = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
        fmt = (cfg.get("data") or {}).get("format")
        if ((cfg.get("plan") or {}).get("data") or {}).get("eval_fraction", 1) == 0 or \
                (cfg.get("data") or {}).get("eval_sequences", 1) == 0:
            raise ConfigError("--generate", [f"{NO_HELD_OUT}; give --data FILE ({KINDS})"])
        if fmt in ("text", "shakespeare"):
            raise ConfigError("--generate", [f"the run's data is {fmt}: nothing to generate from; --generate needs "
                                             f"prompts and references: give --data FILE ({KINDS})"])
    sim, config, r = rundir.load_run(run_dir, device=device)   # --device is checked first thing (common.pick_device)
    cut = 0
    if examples is not None:
        prompts = prompts_of(examples, sim.lm.tokenizer, check_data_ref(data)[0])
    else:
        prompts, cut = heldout_prompts(sim, config.get("data") or {})
    prompts = prompts[:max_prompts] if max_prompts else prompts
    report, rows = generate_on(sim, prompts, beams=beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               heldout=examples is None)
    source = check_data_ref(data)[0] if data else (config.get("data") or {}).get("path")
    report = {"run": str(run_dir), "round": r, "device": str(sim.device), "split": "held-out" if data is None else
              "file", "data": str(source), "kind": prompts[0].kind,
              "seq_len": sim.training.seq_len, **report, **({"skipped_cut_at_seq_len": cut} if examples is None else {})}
    stem = ("generate-heldout" if data is None else f"generate-{Path(source).name}") + (
        "" if beams == 1 else f"-beam{beams}")
    atomic_write_text(run_dir / f"{stem}.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
    atomic_write_text(run_dir / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    report["outputs"] = [str(run_dir / f"{stem}.jsonl"), str(run_dir / f"{stem}.json")]
    return report
