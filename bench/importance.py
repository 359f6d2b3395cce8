"""Importance benchmark: does a rank budget allocated with `hsplit importance` scores train better?

On the default model (SmolLM2-135M) and data (Shakespeare), one fixed adapter-parameter budget
(= uniform rank 2 on all 30 x 7 matrices) is spread three ways, then trained with plain
single-process peft LoRA for the same number of steps and evaluated on held-out data:

  importance   the planner's exact multiple-choice knapsack (hsplit.planner.frontier.FrontierTables,
               the DP behind `hsplit plan`) over all blocks, maximising sum v_lj * g(q_lj) with the
               sensitivity scores, subject to sum q_lj*(d_in+d_out) <= budget
  uniform      rank 2 on every matrix
  random       the same knapsack with random scores (Exponential(1) per matrix, seeded)

3 seeds each (seed = LoRA init + batch order (+ random scores)); mean and spread of the final
held-out loss. It also records the scorer's time and peak memory on the default model.

    nohup .venv/bin/python bench/importance.py > bench/results/importance.log 2>&1 &   # ~30 min, 2 loaded cores
    .venv/bin/python bench/importance.py --resume             # finish an interrupted run (skips done runs)
    .venv/bin/python bench/importance.py --steps 10 --seeds 1 # quick look

Writes bench/results/importance.json and bench/results/importance.md (the markdown table used in
docs/benchmarks.md) after EVERY run, so an interrupted benchmark leaves its partial table. One torch
thread by default: on a CPU shared with other jobs, more threads oversubscribe the cores (a step was
~45 s with 2 threads on the loaded 2-core machine, ~5 s with 1).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hsplit.planner.fleet import Fleet
from hsplit.planner.frontier import FrontierTables
from hsplit.planner.importance import Importance
from hsplit.planner.instance import build_instance
from hsplit.planner.plan import DataSpec, Training
from hsplit.runtime.data.federated import load_federated_data
from hsplit.runtime.measure.importance import ImportanceSettings, compute_importance
from hsplit.runtime.models.lora import lora_config
from hsplit.runtime.models.causal_lm import lm_loss, load_lm

RANKS = (0, 2, 4, 8, 16)
UNIFORM_RANK = 2


def allocate(profile, importance: Importance | None, budget_params: int) -> dict[str, int]:
    """The planner's knapsack over all L blocks: full module name -> rank (absent = 0)."""
    dev = {"name": "bench", "kind": "cpu", "memory_gib": 64, "flops": {"fp32": 1e11},
           "uplink_mbps": 1000, "downlink_mbps": 1000}
    fleet = Fleet.from_dict({"server": {"device": dev}, "clients": [{"device": dev, "count": 1}]}, "<bench>")
    inst = build_instance(fleet, profile, importance=importance, ranks=RANKS, training=Training())
    L = profile.layers
    tables = FrontierTables(inst, [L])
    cap = budget_params // tables.unit
    best = tables.tables[(L, 0)][min(cap, len(tables.tables[(L, 0)]) - 1)]
    p = int(tables.min_units(L, 0, np.array([best]))[0])
    ranks = tables.ranks(L, 0, p)
    return {profile.module_name(l, inst.modules[j]): int(ranks[l, j])
            for l in range(L) for j in range(len(inst.modules)) if ranks[l, j] > 0}


def train_eval(model_ref, ranks, train, eval_set, args, seed) -> tuple[float, list[float], float]:
    from peft import get_peft_model

    lm = load_lm(model_ref, progress=False)
    torch.manual_seed(seed)
    model = get_peft_model(lm.model, lora_config(ranks, 2.0, 0.0, lm.profile.family))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        b = train.batch(args.batch_size, seed, 0, 0, step)
        loss, _ = lm_loss(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    wall = time.perf_counter() - t0
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_set), 8):
            e = eval_set.subset(range(i, min(i + 8, len(eval_set))))
            l, k = lm_loss(model(input_ids=e.input_ids, attention_mask=e.attention_mask).logits, e.labels)
            tot += float(l) * k
            n += k
    return tot / n, losses, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--importance-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out, do the rest")
    ap.add_argument("--methods", default="importance,uniform,random")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "importance.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    imp_path = out.with_suffix(".importance.yaml")
    previous = json.loads(out.read_text()) if args.resume and out.is_file() else None
    if previous is not None and imp_path.is_file():
        info = previous["importance_info"]
    else:
        previous = None
        settings = ImportanceSettings(steps=args.importance_steps, batch_size=args.batch_size, seq_len=args.seq_len)
        imp, info = compute_importance(args.model, settings, data=args.data, progress=False)
        print(f"importance: {info}", file=sys.stderr)
        imp.save(imp_path)

    lm = load_lm(args.model, progress=False)
    profile = lm.profile
    fed = load_federated_data(DataSpec(path=args.data, partition="iid", eval_fraction=0.05), lm.tokenizer,
                              args.seq_len, weights=[1.0], seed=0)
    train = fed.clients[0]
    eval_set = fed.eval.subset(range(min(args.eval_seqs, len(fed.eval))))
    del lm
    widths = sum(a + b for a, b in profile.module_shapes().values())
    budget = UNIFORM_RANK * profile.layers * widths
    results = {"settings": vars(args), "budget_params": budget, "importance_info": info,
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}, "runs": previous["runs"] if previous else []}
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for seed in range(args.seeds):
        for method in names:
            if any(r["method"] == method and r["seed"] == seed for r in results["runs"]):
                continue
            if method == "importance":
                ranks = allocate(profile, Importance.load(imp_path), budget)
            elif method == "uniform":
                ranks = {profile.module_name(l, m): UNIFORM_RANK for l in range(profile.layers)
                         for m in profile.family.default_modules}
            elif method == "random":
                rng = np.random.default_rng([seed, 977])
                scores = {profile.module_name(l, m): float(rng.exponential()) for l in range(profile.layers)
                          for m in profile.family.default_modules}
                ranks = allocate(profile, Importance(scores=scores, method="random"), budget)
            else:
                raise SystemExit(f"unknown method {method}")
            used = sum(r * sum(profile.module_shapes()[n.split(".", 3)[3]]) for n, r in ranks.items())
            loss, curve, wall = train_eval(args.model, ranks, train, eval_set, args, seed)
            row = {"method": method, "seed": seed, "eval_loss": loss, "train_losses": curve, "wall_s": wall,
                   "adapter_params": used, "matrices_adapted": len(ranks),
                   "rank_histogram": {str(q): sum(1 for r in ranks.values() if r == q) for q in RANKS[1:]}}
            results["runs"].append(row)
            print(f"{method:>10} seed {seed}: eval loss {loss:.4f} ({used} params, {len(ranks)} matrices, "
                  f"{wall:.0f} s)", file=sys.stderr)
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out)
            write_table(results, names, args.seeds)
    print(write_table(results, names, args.seeds))


def write_table(results: dict, names: list[str], seeds: int) -> str:
    """Markdown table (mean ± sample sd over the seeds done so far); also written next to the json."""
    lines = ["| allocation | held-out loss (mean ± sd) | seeds done | per seed | adapted matrices | adapter params |",
             "|---|---|---|---|---|---|"]
    for method in names:
        rows = [r for r in results["runs"] if r["method"] == method]
        if not rows:
            lines.append(f"| {method} | pending | 0/{seeds} | | | |")
            continue
        losses = [r["eval_loss"] for r in rows]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        lines.append(f"| {method} | {statistics.mean(losses):.4f} ± {sd:.4f} | {len(rows)}/{seeds} | "
                     f"{', '.join(f'{x:.4f}' for x in losses)} | {rows[0]['matrices_adapted']} | "
                     f"{rows[0]['adapter_params']:,} |")
    text = "\n".join(lines) + "\n"
    Path(results["settings"]["out"]).with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
