"""Generation metrics of a run: `hsplit eval RUN --data e2e:PATH --generate [--beams 4]`.

    rep = generate_run("runs/demo", "e2e:/data/e2e/testset_w_refs.csv", beams=1, max_mrs=100)
    # runs/demo/generate-testset_w_refs.jsonl  one line per MR: mr, hypothesis, references
    # runs/demo/generate-testset_w_refs.json   the report: bleu, rouge_l, perplexity, settings

Every distinct MR of the file (in file order, the first `max_mrs`) is decoded from the training
prompt "MR\\n" with the run's aggregated model (greedy, or beam search with `beams` > 1; at most
`max_new_tokens`; the text is cut at EOS or the first newline). Metrics are against ALL references
of that MR: corpus BLEU from sacrebleu (default 13a tokenisation, a variable number of references per
MR) and ROUGE-L F1 from rouge-score (stemming on; max over an MR's references, averaged over MRs),
both x100. Perplexity is exp(mean next-token loss) over every reference of the selected MRs (loss on
the reference only, as in training).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.yamlio import atomic_write_text
from hsplit.runtime import rundir
from hsplit.runtime.data import check_data_ref


def e2e_path(data: str) -> str:
    """The path of an E2E --data argument for --generate (checked: exists, E2E or unnamed format)."""
    path, fmt = check_data_ref(data)
    if fmt not in ("e2e", "auto"):
        raise ConfigError("--data", [f"--generate needs E2E data (e2e:PATH), got format {fmt}"])
    return path


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


@torch.no_grad()
def generate_texts(sim, prompts: list[str], max_new_tokens: int = 64, beams: int = 1,
                   batch_size: int = 16) -> list[str]:
    """Decode every prompt with the simulation's aggregated model (left-padded batches)."""
    tok, model = sim.lm.tokenizer, sim.lm.model
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    model.eval()
    sim.bank.activate(sim.eval_adapter())
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            width = max(len(ids[i]) for i in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for row, i in enumerate(chunk):
                x[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            with sim.autocast():
                gen = model.generate(input_ids=x.to(sim.device), attention_mask=mask.to(sim.device),
                                     max_new_tokens=max_new_tokens, num_beams=beams, do_sample=False,
                                     eos_token_id=eos, pad_token_id=pad, use_cache=True)
            for row, i in enumerate(chunk):
                text = tok.decode(gen[row, width:], skip_special_tokens=True)
                out[i] = text.strip().split("\n")[0].strip()     # first non-empty line
    finally:
        sim.bank.activate(None)
    return out


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


def reference_perplexity(sim, groups: list[tuple[str, list[str]]], max_refs: int | None = None) -> tuple[float, int]:
    """Loss over the references of `groups` (prompt = MR + newline, as in training): all of them, or
    `max_refs` evenly spread; returns (loss, references used)."""
    from hsplit.runtime.data import TokenSet, _tokenise
    from hsplit.runtime.evaluate import evaluate

    records = [("e2e", mr + "\n", ref) for mr, refs in groups for ref in refs]
    sets = _tokenise(records, "e2e", sim.lm.tokenizer, sim.training.seq_len)
    data = TokenSet.cat(list(sets.values()), sim.training.seq_len)
    return evaluate(sim, data, max_refs), min(len(data), max_refs or len(data))


def generate_on(sim, data: str, max_mrs: int | None = None, beams: int = 1, max_new_tokens: int = 64,
                batch_size: int = 16, ppl_max_refs: int | None = None) -> tuple[dict, list[dict]]:
    """(report, per-MR rows) of the simulation's aggregated model on an E2E file."""
    path = e2e_path(data)
    groups = read_mr_groups(path)[:max_mrs] if max_mrs else read_mr_groups(path)
    hyps = generate_texts(sim, [mr + "\n" for mr, _ in groups], max_new_tokens, beams, batch_size)
    metrics = text_metrics(hyps, [refs for _, refs in groups])
    loss, n_refs = reference_perplexity(sim, groups, ppl_max_refs)
    report = {"data": str(path), "mrs": len(groups), "references": n_refs, "decoding": "greedy" if beams == 1
              else f"beam {beams}", "max_new_tokens": max_new_tokens, **metrics, "eval_loss": loss,
              "perplexity": math.exp(loss) if loss == loss else None}
    rows = [{"mr": mr, "hypothesis": h, "references": refs} for (mr, refs), h in zip(groups, hyps)]
    return report, rows


def generate_run(run_dir: str | Path, data: str, max_mrs: int | None = None, beams: int = 1,
                 max_new_tokens: int = 64, batch_size: int = 16, device: str = "cpu") -> dict:
    """Generation metrics of a run's latest aggregated model; writes generate-<stem>.{jsonl,json} there."""
    run_dir = Path(run_dir)
    path = e2e_path(data)                       # a bad --data fails before the model loads
    read_mr_groups(path)
    sim, _, r = rundir.load_run(run_dir, device=device)   # --device is checked first thing (common.pick_device)
    report, rows = generate_on(sim, data, max_mrs, beams, max_new_tokens, batch_size)
    report = {"run": str(run_dir), "round": r, "device": str(sim.device), **report}
    stem = f"generate-{Path(path).stem}" + ("" if beams == 1 else f"-beam{beams}")
    atomic_write_text(run_dir / f"{stem}.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
    atomic_write_text(run_dir / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    report["outputs"] = [str(run_dir / f"{stem}.jsonl"), str(run_dir / f"{stem}.json")]
    return report
