"""Every strategy on one heterogeneous fleet and one E2E partition: convergence in fleet time, BLEU/ROUGE-L.

    python bench/strategies.py --train PATH/devset.csv --test PATH/testset_w_refs.csv \\
        [--rounds 8 --local-steps 8 --batch-size 4 --seq-len 96 --test-mrs 0 --device auto]
    # -> bench/results/strategies/{results.json, summary.md, strategies.png, plans/, runs/}

The fleet is the embedded example fleet (2 Jetson Orin Nano, 2 Raspberry Pi 5, 1 RTX 3060; A100
server) with its round-time budgets scaled by (batch x seq_len x local_steps) / (4 x 256 x 10), the
settings they were written for, so that they bind at any size: the planner then gives the clients
different splits (and, for hsplitlora/hetlora/flexlora/hafl-*, different ranks). Every strategy gets
the same model, data partition (by restaurant name), seed, learning rate, rounds and local steps:
  centralized      LoRA on the pooled data (no split; reference), server_rank on every block
  splitlora        one split, one rank that fits the weakest client (FedAvg of A and B)
  hetlora, flexlora, hafl-truncation, hafl-freezing   per-client split, one rank per client
  hsplitlora       per-client split, per-matrix ranks, exact aggregation
After every round the runtime evaluates held-out perplexity (a slice of the training file no client
trains on); at the end each run is decoded on the test MRs (greedy unless --beams) and scored with
BLEU / ROUGE-L against all references, plus perplexity on the test references (runtime/generate.py).
Fleet time is the plan's predicted round time summed over rounds (no fleet time for centralized).
Nothing here reads a fixed data path: --train and --test are required.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ALL = ["centralized", "splitlora", "hetlora", "flexlora", "hafl-truncation", "hafl-freezing", "hsplitlora"]
BUDGET_WORK = 4 * 256 * 10          # batch x seq x local steps the example fleet's budgets were set for


def bench_fleet(batch: int, seq: int, steps: int) -> dict:
    fleet = yaml.safe_load((REPO / "profiles" / "fleets" / "example.yaml").read_text())
    scale = batch * seq * steps / BUDGET_WORK
    for c in fleet["clients"]:
        b = c.get("budget", {})
        if "round_s" in b:
            b["round_s"] = round(b["round_s"] * scale, 4)
    fleet["name"] = "example-scaled"
    fleet["description"] = f"example fleet, round budgets x {scale:.3g} (bench/strategies.py)"
    return fleet


def make_plans(args, out: Path) -> dict[str, Path]:
    from hsplit.planner.api import make_plan
    from hsplit.planner.fleet import Fleet
    from hsplit.planner.plan import DataSpec, Training

    fleet = Fleet.from_dict(bench_fleet(args.batch_size, args.seq_len, args.local_steps), "<bench fleet>")
    training = Training(batch_size=args.batch_size, seq_len=args.seq_len, local_steps=args.local_steps,
                        rounds=args.rounds, learning_rate=args.lr, warmup_steps=args.warmup, seed=args.seed,
                        lr_schedule="cosine", dtype=args.dtype)
    data = DataSpec(path=str(Path(args.train).resolve()), format="e2e", partition="by-source",
                    eval_fraction=args.eval_fraction)
    ranks = tuple(int(x) for x in args.ranks.split(","))
    paths = {}
    (out / "plans").mkdir(parents=True, exist_ok=True)
    for s in args.strategies:
        plan = make_plan(fleet, args.model, importance=args.importance, ranks=ranks, strategy=s, training=training,
                         data=data, server_rank=args.server_rank,
                         modules=args.modules.split(",") if args.modules else None)
        paths[s] = out / "plans" / f"{s}.yaml"
        plan.save(paths[s])
    return paths


def run_one(strategy: str, plan_path: Path, args, out: Path) -> dict:
    from hsplit.planner.plan import Plan
    from hsplit.runtime.generate import generate_on
    from hsplit.runtime.loop import run
    from hsplit.runtime.options import RunOptions
    from hsplit.runtime.rundir import load_run

    runs = out / "runs"
    t0 = time.perf_counter()
    res = run(plan_path, RunOptions(name=strategy, runs_dir=runs, eval_max_seqs=args.eval_seqs, progress=False,
                                    device=args.device, threads=args.threads, resume=(runs / strategy).exists()))
    train_s = time.perf_counter() - t0
    sim, _, _ = load_run(res.run_dir, device=args.device)
    gen, rows = generate_on(sim, f"e2e:{args.test}", max_mrs=args.test_mrs or None, beams=args.beams,
                            max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch,
                            ppl_max_refs=args.test_ppl_refs or None)
    (res.run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = Plan.load(plan_path)
    curve = [{"round": r["round"], "eval_ppl": r["eval_ppl"], "fleet_s": r["fleet_total_s"], "wall_s": r["wall_s"],
              "bytes": r["bytes_up"] + r["bytes_down"]} for r in res.rows if r["client"] == "all"]
    return {"strategy": strategy, "curve": curve, "generation": gen, "train_wall_s": train_s,
            "total_wall_s": time.perf_counter() - t0,
            "bytes": sum(c["bytes"] for c in curve),
            "splits": [c.split_layer for c in plan.clients],
            "ranks": [sorted({r for r in c.ranks.values() if r}) for c in plan.clients],
            "adapted_matrices": [sum(1 for r in c.ranks.values() if r) for c in plan.clients],
            "server_rank": plan.server_rank, "predicted_round_s": plan.predicted.get("round_s")}


def time_to(curve: list[dict], target: float):
    for c in curve:
        if c["eval_ppl"] is not None and c["eval_ppl"] <= target:
            return c["round"], c["fleet_s"]
    return None, None


def summarise(results: dict, args, out: Path) -> str:
    fed = [s for s in results if s != "centralized"]
    target = args.target_ppl or (results["splitlora"]["curve"][-1]["eval_ppl"] if "splitlora" in results
                                 else min(results[s]["curve"][-1]["eval_ppl"] for s in fed))
    lines = [f"Target held-out perplexity: {target:.3f}"
             + (" (what splitlora reaches after the last round)" if not args.target_ppl else ""), "",
             "| strategy | splits | ranks | held-out ppl r0 -> final | test ppl | BLEU | ROUGE-L | round to target "
             "| fleet s to target | fleet s total | MB exchanged | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in results.items():
        c = r["curve"]
        rnd, fs = time_to(c, target)
        g = r["generation"]
        ranks = "/".join(",".join(map(str, x)) or "-" for x in r["ranks"])
        fleet_total = c[-1]["fleet_s"]
        lines.append(
            f"| {s} | {','.join(map(str, r['splits']))} | {ranks} | {c[0]['eval_ppl']:.2f} -> {c[-1]['eval_ppl']:.2f} "
            f"| {g['perplexity']:.2f} | {g['bleu']:.2f} | {g['rouge_l']:.2f} | {rnd if rnd is not None else 'not reached'} "
            f"| {f'{fs:.1f}' if fs is not None else 'n/a'} | {f'{fleet_total:.1f}' if fleet_total else 'n/a'} "
            f"| {r['bytes'] / 1e6:.1f} | {r['total_wall_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    _plot(results, out / "strategies.png")
    return text


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip([s for s in ALL if s != "centralized"], plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for s, r in results.items():
        c = r["curve"]
        ppl = [x["eval_ppl"] for x in c]
        if s == "centralized":      # no fleet time: its final perplexity as a reference line
            ax[0].axhline(ppl[-1], color="k", ls=":", label=f"centralized (final, {len(c) - 1} rounds)")
            ax[1].plot([x["round"] for x in c], ppl, color="k", ls=":", marker=".", label=s)
            continue
        ax[0].plot([x["fleet_s"] or 0.0 for x in c], ppl, marker="o", color=colors.get(s), label=s)
        ax[1].plot([x["round"] for x in c], ppl, marker="o", color=colors.get(s), label=s)
    ax[0].set(xlabel="fleet time (s, predicted from device profiles)", ylabel="held-out perplexity", yscale="log")
    ax[1].set(xlabel="round", ylabel="held-out perplexity", yscale="log")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", help="E2E CSV the clients train on (e.g. devset.csv); required")
    ap.add_argument("--test", help="E2E CSV with all references (e.g. testset_w_refs.csv); required")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--strategies", default=",".join(ALL))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=96, help="96 covers 99%% of E2E examples with SmolLM2's tokenizer")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--ranks", default="0,2,4,8,16")
    ap.add_argument("--server-rank", type=int, default=8)
    ap.add_argument("--modules", default=None, help="comma list (default: the planner's: every adaptable matrix)")
    ap.add_argument("--importance", default=None, help="importance.yaml for hsplitlora (default: uniform)")
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences evaluated after each round")
    ap.add_argument("--test-mrs", type=int, default=0, help="decode only the first N test MRs (0 = all)")
    ap.add_argument("--test-ppl-refs", type=int, default=0,
                    help="test perplexity on at most N references of those MRs, evenly spread (0 = all)")
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--target-ppl", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "strategies"))
    ap.add_argument("--summarise-only", action="store_true",
                    help="rewrite summary.md and the plot from --out's results.json (no training)")
    args = ap.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    if args.summarise_only:
        saved = json.loads((out / "results.json").read_text())
        print(summarise(saved["results"], args, out))
        return 0
    if not (args.train and args.test):
        ap.error("--train and --test are required (the E2E devset and test set with references)")
    out.mkdir(parents=True, exist_ok=True)
    plans = make_plans(args, out)
    results = {}
    prev = out / "results.json"
    for s in args.strategies:
        t = time.perf_counter()
        results[s] = run_one(s, plans[s], args, out)
        print(f"{s}: held-out ppl {results[s]['curve'][0]['eval_ppl']:.2f} -> {results[s]['curve'][-1]['eval_ppl']:.2f}, "
              f"BLEU {results[s]['generation']['bleu']:.2f}, ROUGE-L {results[s]['generation']['rouge_l']:.2f} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        prev.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results}, indent=1))
    print(summarise(results, args, out))
    print(f"command: python bench/strategies.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
