"""Held-out evaluation of the aggregated model, written once: `hsplit eval RUN [--data PATH]`.

    loss = evaluate(sim, sim.data.eval, max_seqs=64)          # used by the round loop
    report = evaluate_run("runs/demo")                       # {"eval_loss", "perplexity", ...}
    report = evaluate_run("runs/demo", data="e2e/test.csv")  # the whole file as evaluation data
    report = evaluate_run("runs/cls", per_class=True)       # classification: accuracy, macro-F1, per class

The aggregated model is the base weights with every merged round applied plus, for strategies
that keep adapters (splitlora, centralized, ...), the adapter the strategy names. Loss is the mean
next-token cross-entropy over labelled tokens; perplexity = exp(loss). In a distributed run a client
computes the activations at its cut (`eval_batches`) and the server the rest (`hidden=`).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from hsplit.runtime.data.federated import TokenSet, check_data_ref, load_eval_data
from hsplit.runtime.data import classification
from hsplit.runtime.outputs import rundir


def eval_subset(data: TokenSet, max_seqs: int | None) -> TokenSet:
    """At most max_seqs sequences, evenly spread over `data` (the same ones every round)."""
    if max_seqs and len(data) > max_seqs:
        data = data.subset(np.linspace(0, len(data) - 1, max_seqs).round().astype(int))
    return data


def eval_batches(sim, data: TokenSet, batch_size: int | None = None):
    """(ids, mask, labels) batches of `data` on the simulation's device."""
    bs = batch_size or max(1, sim.training.batch_size)
    for i in range(0, len(data), bs):
        yield tuple(x[i:i + bs].to(sim.device) for x in (data.input_ids, data.attention_mask, data.labels))


@torch.no_grad()
def evaluate(sim, data: TokenSet, max_seqs: int | None = None, batch_size: int | None = None,
             hidden=None, split: int = 0) -> float:
    """Mean next-token loss of the simulation's aggregated model on `data` (max_seqs evenly spread).
    hidden: a function giving each batch's activations at the cut `split` (a client computed them);
    None: the whole forward here."""
    data = eval_subset(data, max_seqs)
    if len(data) == 0:
        return float("nan")
    sim.lm.model.eval()
    sim.bank.activate(sim.eval_adapter())
    total, n = 0.0, 0
    try:
        for ids, mask, labels in eval_batches(sim, data, batch_size):
            with sim.autocast():
                h, s = (sim.split.client_forward(ids, mask, sim.split.layers), sim.split.layers) if hidden is None \
                    else (hidden().to(sim.device), split)
                loss, k = sim.task.loss(sim.split, h, mask, s, labels)
            total += float(loss) * k
            n += k
    finally:
        sim.bank.activate(None)
    return total / n if n else float("nan")     # no token scored (e.g. every target cut off): no loss


@torch.no_grad()
def client_activations(sim, p, data: TokenSet, max_seqs: int | None):
    """A client's part of `evaluate`: the activations at its cut of every evaluation batch."""
    sim.lm.model.eval()
    sim.bank.activate(sim.eval_adapter())
    try:
        for ids, mask, _ in eval_batches(sim, eval_subset(data, max_seqs)):
            with sim.autocast():
                yield sim.split.client_forward(ids, mask, p.split)
    finally:
        sim.bank.activate(None)


@torch.no_grad()
def predict(sim, data: TokenSet, batch_size: int | None = None) -> tuple[list[int], list[int], float]:
    """Classification: (true class, predicted class) of every sequence of `data` by the aggregated model, and
    the mean cross-entropy over the classes (the loss `evaluate` gives), from the same forward."""
    sim.lm.model.eval()
    sim.bank.activate(sim.eval_adapter())
    true, pred, total = [], [], 0.0
    try:
        for ids, mask, labels in eval_batches(sim, data, batch_size):
            with sim.autocast():
                h = sim.split.client_forward(ids, mask, sim.split.layers)
                logits, targets = sim.task.scores(sim.split, h, mask, sim.split.layers, labels)
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            true += targets.tolist()
            pred += logits.argmax(-1).tolist()
    finally:
        sim.bank.activate(None)
    return true, pred, total / len(true) if true else float("nan")


def write_predictions(path: Path, true: list[int], pred: list[int], labels: list[str]) -> None:
    """predictions CSV: one row per evaluated sequence (index, label, predicted), written atomically."""
    from hsplit.planner.yamlio import atomic_write_text
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "label", "predicted"])
    w.writerows([i, labels[t], labels[p]] for i, (t, p) in enumerate(zip(true, pred)))
    atomic_write_text(path, buf.getvalue())


def read_predictions(path: Path, labels: list[str]) -> tuple[list[int], list[int]]:
    """(true, predicted) class indices from a predictions CSV (write_predictions)."""
    index = {lab: i for i, lab in enumerate(labels)}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [index[r["label"]] for r in rows], [index[r["predicted"]] for r in rows]


def evaluate_run(run_dir: str | Path, data: str | None = None, max_seqs: int | None = None,
                 progress: bool = False, device: str = "cpu", per_class: bool = False) -> dict:
    """Held-out (or --data) perplexity of a run's latest aggregated model on `device` (auto | cpu | cuda).
    A classification run: the loss over the classes, and accuracy and macro-F1 (per class: per_class) from
    the predictions, saved in the run folder (predictions-heldout.csv, predictions-<data file>.csv)."""
    if data:
        path, fmt = check_data_ref(data)        # `e2e:PATH` names the format; checked before the model loads
    sim, config, r = rundir.load_run(run_dir, progress=progress, device=device)   # --device checked first
    classify = sim.task.name == "classification"
    if data:
        eval_set = load_eval_data(path, sim.lm.tokenizer, sim.training.seq_len, fmt, like=sim.plan.data)
        source = data
    else:
        eval_set = sim.data.eval
        source = "held-out split"
        if max_seqs is None and not classify:   # the same sequences the run reported after each round
            max_seqs = config.get("run", {}).get("eval_max_seqs")
    out = {"run": str(run_dir), "round": r, "data": source, "device": str(sim.device),
           "sequences": min(len(eval_set), max_seqs or len(eval_set))}
    if not classify:
        loss = evaluate(sim, eval_set, max_seqs)
        return {**out, "eval_loss": loss, "perplexity": math.exp(loss) if loss == loss else None}
    labels = sim.task.labels
    true, pred, out["eval_loss"] = predict(sim, eval_subset(eval_set, max_seqs))
    target = Path(run_dir) / f"predictions-{Path(path).name if data else 'heldout'}.csv"
    write_predictions(target, true, pred, labels)
    true, pred = read_predictions(target, labels)       # the metrics are those of the saved predictions
    return {**out, "task": "classification", "labels": labels, "predictions": str(target),
            **classification.metrics(true, pred, labels, per_class)}
