"""Held-out evaluation of the aggregated model: `hsplit eval RUN [--data PATH]`.

    loss = evaluate(sim, sim.data.eval, max_seqs=64)          # used by the round loop
    report = evaluate_run("runs/demo")                       # {"eval_loss", "perplexity", ...}
    report = evaluate_run("runs/demo", data="e2e/test.csv")  # the whole file as evaluation data

The aggregated model is the base weights with every merged round applied plus, for strategies
that keep adapters (splitlora, centralized), the global adapter. Loss is the mean next-token
cross-entropy over labelled tokens; perplexity = exp(loss).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hsplit.runtime.data import TokenSet, load_eval_data
from hsplit.runtime.model import lm_loss


@torch.no_grad()
def evaluate(sim, data: TokenSet, max_seqs: int | None = None, batch_size: int | None = None) -> float:
    """Mean next-token loss of the simulation's aggregated model on `data` (max_seqs evenly spread)."""
    if max_seqs and len(data) > max_seqs:
        data = data.subset(np.linspace(0, len(data) - 1, max_seqs).round().astype(int))
    if len(data) == 0:
        return float("nan")
    sim.lm.model.eval()
    sim.bank.activate(sim.eval_adapter())
    bs = batch_size or max(1, sim.t.batch_size)
    total, n = 0.0, 0
    for i in range(0, len(data), bs):
        ids = data.input_ids[i:i + bs].to(sim.device)
        mask = data.attention_mask[i:i + bs].to(sim.device)
        labels = data.labels[i:i + bs].to(sim.device)
        with sim._autocast():
            logits = sim.split.forward(ids, mask)
        loss, k = lm_loss(logits, labels)
        total += float(loss) * k
        n += k
    sim.bank.activate(None)
    return total / n if n else float("nan")     # no token scored (e.g. every target cut off): no loss


def evaluate_run(run_dir: str | Path, data: str | None = None, max_seqs: int | None = None,
                 progress: bool = False, device: str = "cpu") -> dict:
    """Held-out (or --data) perplexity of a run's latest aggregated model on `device` (auto | cpu | cuda)."""
    from hsplit.runtime.generate import check_data_ref
    from hsplit.runtime import train

    if data:
        path, fmt = check_data_ref(data)        # `e2e:PATH` names the format; checked before the model loads
    sim, config, r = train.load_run(run_dir, progress=progress, device=device)   # --device checked first
    if data:
        eval_set = load_eval_data(path, sim.lm.tokenizer, sim.t.seq_len, fmt)
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
