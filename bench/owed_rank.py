"""What hsplitlora bounded's owed_rank drops: a few real rounds per owed_rank, the dropped share of D per round.

Usage: python bench/owed_rank.py [--owed-ranks 64,32,16,8] [--rounds 3] [--local-steps 4]
For each owed_rank: the same plan (smollm2-135m, 4 clients with ranks 4/8/16/8 and splits 10/15/20/15,
aggregation bounded, lr 1e-3), trained in-process; after each round, per client, the Frobenius norms of
what its blocks lack, D = T (sent) + owed' (kept) + dropped (metrics.csv owed_dropped), summed over its
matrices, and the aggregation time. Prints one JSON line per owed_rank; no docs are written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from runtime import _expand_all, _model_ref  # noqa: E402  (bench/runtime.py: the same plan helpers)


def sq(b: torch.Tensor, a: torch.Tensor) -> float:
    """||b @ a||_F^2 without forming it."""
    b, a = b.double(), a.double()
    return float(((b.T @ b) * (a @ a.T)).sum())


def one(args, owed: int) -> dict:
    from hsplit.planner.model import load_model_profile
    from hsplit.planner.plan import Plan
    from hsplit.runtime.train.loop import InProcess, Silent
    from hsplit.runtime.train.simulation import build

    model = _model_ref(args)
    profile = load_model_profile(model)
    clients = [(4, 10), (8, 15), (16, 20), (8, 15)]
    plan = Plan.from_dict({
        "model": model, "strategy": "hsplitlora", "server_rank": 8, "aggregation": "bounded",
        "download": {"owed_rank": owed},
        "training": {"batch_size": 2, "seq_len": 64, "local_steps": args.local_steps, "rounds": args.rounds,
                     "dtype": "fp32", "learning_rate": 1e-3, "max_grad_norm": 1.0},
        "data": {"path": "shakespeare", "partition": "iid"},
        "clients": [{"id": f"c{i}", "device": "bench", "split_layer": sp, "ranks": {"all_modules": q}}
                    for i, (q, sp) in enumerate(clients)]}, "<bench>")
    plan = _expand_all(plan, profile)
    sim = build(plan, progress=False, device="cpu")
    ex = InProcess(sim, None)
    st = sim.strategy
    s = sim.training.lora_alpha_over_rank
    out = {"owed_rank": owed, "rounds": []}
    for r in range(args.rounds):
        rows = ex.train_round(r, Silent())
        t0 = time.perf_counter()
        update, _ = ex.aggregate(r, rows)
        agg = time.perf_counter() - t0
        sent = kept = 0.0
        for p in sim.parties:
            for tb, ta in update.download.get(p.adapter, {}).values():
                sent += sq(tb, ta)
            for m, (oa, ob) in sim.bank.factors(st.offset(p)).items():
                q = p.ranks.get(m, 0)
                kept += sq(s * ob[:, q:], oa[q:])
        dropped = sum(v ** 2 for v in st.dropped.values())
        d = (sent + kept + dropped) ** 0.5
        out["rounds"].append({"round": r + 1, "aggregation_s": round(agg, 3), "D": d, "sent": sent ** 0.5,
                              "owed": kept ** 0.5, "dropped": dropped ** 0.5,
                              "dropped_share": dropped ** 0.5 / d if d else 0.0})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--owed-ranks", type=lambda v: [int(x) for x in v.split(",")], default=[64, 32, 16, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for owed in args.owed_ranks:
        print(json.dumps(one(args, owed)), flush=True)


if __name__ == "__main__":
    main()
