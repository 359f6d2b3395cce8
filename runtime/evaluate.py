"""Held-out evaluation of the aggregated model, written once: `hsplit eval RUN [--data PATH]`.

    loss = evaluate(sim, sim.data.eval, max_seqs=64)          # used by the round loop
    report = evaluate_run("runs/demo")                       # {"eval_loss", "perplexity", ...}
    report = evaluate_run("runs/demo", data="e2e/test.csv")  # the whole file as evaluation data

The aggregated model is the base weights with every merged round applied plus, for strategies
that keep adapters (splitlora, centralized, ...), the adapter the strategy names. Loss is the mean
next-token cross-entropy over labelled tokens; perplexity = exp(loss). In a distributed run a client
computes the activations at its cut (`eval_batches`) and the server the rest (`hidden=`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hsplit.runtime.data import TokenSet, check_data_ref, load_eval_data
from hsplit.runtime.model import lm_loss
from hsplit.runtime import rundir


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
                logits = (sim.split.forward(ids, mask) if hidden is None
                          else sim.split.server_forward(hidden().to(sim.device), mask, split))
            loss, k = lm_loss(logits, labels)
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


def evaluate_run(run_dir: str | Path, data: str | None = None, max_seqs: int | None = None,
                 progress: bool = False, device: str = "cpu") -> dict:
    """Held-out (or --data) perplexity of a run's latest aggregated model on `device` (auto | cpu | cuda)."""
    if data:
        path, fmt = check_data_ref(data)        # `e2e:PATH` names the format; checked before the model loads
    sim, config, r = rundir.load_run(run_dir, progress=progress, device=device)   # --device checked first
    if data:
        eval_set = load_eval_data(path, sim.lm.tokenizer, sim.training.seq_len, fmt)
        source = data
    else:
        eval_set = sim.data.eval
        source = "held-out split"
        if max_seqs is None:                    # the same sequences the run reported after each round
            max_seqs = config.get("run", {}).get("eval_max_seqs")
    loss = evaluate(sim, eval_set, max_seqs)
    return {"run": str(run_dir), "round": r, "data": source, "device": str(sim.device),
            "sequences": min(len(eval_set), max_seqs or len(eval_set)),
            "eval_loss": loss, "perplexity": math.exp(loss) if loss == loss else None}
