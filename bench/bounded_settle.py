"""hsplitlora bounded's download truncation, before/after in one process, on one real round.

Usage: python bench/bounded_settle.py [--clients 10] [--owed-rank 64]
Builds bench/runtime.py's plan (smollm2-135m, every client split at half the blocks, rank 8 on all modules,
aggregation bounded), trains one round of 1 local step, then settles every client twice from the same state:
"full" truncates each client's D from its whole stack (QR of the merge's and its own factors together, one
per client and matrix: the algorithm before fastagg), "shared" factors the merge once per matrix and extends
it per client (runtime/strategies/hsplitlora.py, basis/truncated). Prints both times and the largest
difference of the products (T and the owed part) between the two. Prints JSON; no docs are written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from runtime import _expand_all, _model_ref, _plan  # noqa: E402  (bench/runtime.py: the same plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--owed-rank", type=int, default=None, help="download.owed_rank (default: the runtime's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from hsplit.planner.model import load_model_profile
    from hsplit.runtime.train.loop import InProcess, Silent
    from hsplit.runtime.train.simulation import build
    from hsplit.runtime.strategies import hsplitlora as hs

    model = _model_ref(args)
    profile = load_model_profile(model)
    plan = _plan(model, args.clients, profile.layers // 2, 8, 2, 128, aggregation="bounded")
    if args.owed_rank is not None:
        plan.download = {"owed_rank": args.owed_rank}
    plan = _expand_all(plan, profile)
    sim = build(plan, progress=False, device="cpu")
    ex = InProcess(sim, None)
    ex.train_round(0, Silent())
    st, parties = sim.strategy, ex.current
    update = st.combine(parties)
    sim.merge_update(update)
    offsets = {p.adapter: {m: (a.clone(), b.clone()) for m, (a, b) in sim.bank.factors(st.offset(p)).items()}
               for p in parties}

    def settle(shared: bool) -> tuple[float, dict]:
        for p in parties:
            for m, (a, b) in sim.bank.factors(st.offset(p)).items():
                a.copy_(offsets[p.adapter][m][0])
                b.copy_(offsets[p.adapter][m][1])
        update.download = {p.adapter: {} for p in parties}
        real = hs.truncated
        if not shared:     # the former algorithm: one QR of the whole stack per client and matrix
            def full(bs, as_, keep, owed, base=None):
                db, da = base
                return real(torch.cat([db.double(), bs], 1), torch.cat([da.double(), as_], 0), keep, owed)
            hs.truncated = full
            bases = {m: (b, a) for m, (b, a) in update.merge.items()}
        else:
            bases = {}
        t0 = time.perf_counter()
        try:
            for p in parties:
                st.settle(p, update, 0, bases)
        finally:
            hs.truncated = real
        out = {(p.adapter, m): (t[0].double() @ t[1].double()) for p in parties
               for m, t in update.download[p.adapter].items()}
        for p in parties:
            for m, (a, b) in sim.bank.factors(st.offset(p)).items():
                out[(p.adapter, m, "offset")] = b.double() @ a.double()
        return time.perf_counter() - t0, out

    t_full, full = settle(False)
    t_shared, shared = settle(True)
    diff = max(float((full[k] - shared[k]).abs().max()) for k in full)
    scale = max(float(full[k].abs().max()) for k in full)
    print(json.dumps({"clients": args.clients, "owed_rank": st.owed_rank, "full_s": round(t_full, 3),
                      "shared_s": round(t_shared, 3), "speedup": round(t_full / t_shared, 2),
                      "max_abs_diff": diff, "max_abs": scale}))


if __name__ == "__main__":
    main()
