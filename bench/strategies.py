"""Every strategy on one heterogeneous fleet and one E2E partition, over several seeds: convergence in fleet
time, held-out and test perplexity, BLEU/ROUGE-L, bytes up and down, paired differences against hsplitlora.

    python bench/strategies.py --train PATH/devset.csv --test PATH/testset_w_refs.csv --seeds 0,1,2 \
        [--regime seeds|drift --rounds 8 --local-steps 4 --batch-size 4 --seq-len 96 \
         --variants aggregation=warm,aggregation=restart,replan \
         --importance sensitivity=imp.yaml,rngwp=imp-rngwp.yaml --device auto]
    # -> bench/results/strategies[-drift]/{results/<run>.json, summary.md, strategies.png, plans/, runs/}

Two regimes (--regime; docs/benchmarks.md has both):
  seeds (regime 1): the embedded example fleet (2 Jetson Orin Nano, 2 Raspberry Pi 5, 1 RTX 3060; A100
      server), E2E partitioned by restaurant name (by-source); few local steps, so little client drift.
  drift (regime 2): bench/fleets/drift-10.yaml (4 Raspberry Pi 5, 3 Jetson Orin Nano, 2 laptops, 1 RTX
      3060), hsplit's default of 10 local steps per round, every restaurant's references spread over the
      10 clients by Dirichlet(0.5) shares (data.partition dirichlet, runtime/data/partition.py), 8 rounds,
      3 seeds, batch 1 x 64 tokens: where client drift, and so aggregation noise, matters.
The fleet's round-time budgets are scaled by (batch x seq_len x local_steps) / (4 x 256 x 10), the
settings they were written for, plus hsplitlora's merge download at the full-size plan's splits
(which does not shrink with the tokens; runtime/demo.py, scaled_fleet), so that they bind at any size:
the planner then gives the clients different splits (and, for hsplitlora/hetlora/flexlora/hafl-*,
different ranks). Every strategy is planned by the planner on its own (the product's behaviour) and
gets the same model, data partition, seeds, learning-rate schedule, rounds and local steps:
  centralized      LoRA on the pooled data (no split; reference), server_rank on every block
  splitlora        one split, one rank that fits the weakest client (FedAvg of A and B)
  hetlora, flexlora, hafl-truncation, hafl-freezing   per-client split, one rank per client
  hsplitlora       per-client split, per-matrix ranks, its default aggregation
Ablations of hsplitlora (--variants / --importance; parse_variant): `aggregation=NAME` for any
aggregation the plan accepts (planned with it, so the planner charges its download; run label
hsplitlora-NAME; `restart` is aggregation=restart), `replan` (replan: {every: 2, threshold: 0.02}) or
`replan=N:T`, and importance files (`NAME=PATH`, e.g. from `hsplit importance --method
sensitivity|rngwp`) instead of uniform importance. Paired differences are against --reference
(hsplitlora, else hsplitlora-warm when the default was not run).
After every round the runtime evaluates held-out perplexity (a slice of the training file no client
trains on); at the end each run is decoded on the test MRs (greedy unless --beams) and scored with
BLEU / ROUGE-L against all references, plus perplexity on the test references (runtime/outputs/generate.py).
Fleet time is the plan's predicted round time summed over rounds (no fleet time for centralized).
Bytes come from metrics.csv's per-client rows (bytes_up, bytes_down): per run the mean per client per
round up and down, the largest one client moved in one round, and every client's per-round counts.
Each finished run is written to results/<run>.json at once; running the same command again skips
finished runs and resumes an interrupted one from its last checkpoint (`--summarise-only` redraws).
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


def bench_fleet(args):
    """--fleet (the example fleet, or the drift regime's) with its round budgets scaled to the benchmark's
    tokens per round (the demo's scaling: runtime/demo.py, scaled_fleet; the merge download kept unscaled),
    so that they bind."""
    from hsplit.planner.plan import Training
    from hsplit.runtime.demo import scaled_fleet
    fleet = scaled_fleet(args.fleet, Training(batch_size=args.batch_size, seq_len=args.seq_len,
                                              local_steps=args.local_steps), args.model)
    return fleet


def parse_variant(v: str) -> tuple[str, dict]:
    """One hsplitlora ablation of --variants -> (run label, changes to its plan). Generic, so that a new
    aggregation needs no code here:
      aggregation=NAME  -> hsplitlora-NAME (planned and run with `aggregation: NAME`; make_plan charges its download)
      restart           -> hsplitlora-restart (the same as aggregation=restart; regime 1's name)
      replan            -> hsplitlora-replan (replan: {every: 2, threshold: 0.02})
      replan=N:T        -> hsplitlora-replan-N-T (replan: {every: N, threshold: T})"""
    key, _, value = v.partition("=")
    if key == "aggregation" and value:
        return f"hsplitlora-{value}", {"aggregation": value}
    if key == "restart" and not value:
        return "hsplitlora-restart", {"aggregation": "restart"}
    if key == "replan":
        every, _, thr = (value or "2:0.02").partition(":")
        label = "hsplitlora-replan" if not value else f"hsplitlora-replan-{every}-{thr}"
        return label, {"replan": {"every": int(every), "threshold": float(thr or 0.02)}}
    raise SystemExit(f"--variants: unknown ablation {v!r}; use aggregation=NAME, restart, replan or replan=N:T")


def make_plan_for(args, label: str, strategy: str, seed: int, out: Path) -> Path:
    """The plan of one run: `strategy` on the scaled fleet, with the run variant's changes. An existing plan
    file is used as it is (a resumed run must see the plan it started with; solve times differ)."""
    path = out / "plans" / f"{label}-seed{seed}.yaml"
    if path.is_file():
        return path
    from hsplit.planner.api import make_plan
    from hsplit.planner.plan import DataSpec, Training

    fleet = bench_fleet(args)
    training = Training(batch_size=args.batch_size, seq_len=args.seq_len, local_steps=args.local_steps,
                        rounds=args.rounds, learning_rate=args.lr, warmup_steps=args.warmup, seed=seed,
                        lr_schedule="cosine", dtype=args.dtype)
    data = DataSpec(path=str(Path(args.train).resolve()), format="e2e", partition=args.partition,
                    alpha=args.alpha, eval_fraction=args.eval_fraction)
    variant = label.removeprefix(strategy).lstrip("-")
    importance = args.importance_files.get(variant.removeprefix("importance-")) if variant.startswith("importance-") else None
    changes = args.variant_changes.get(label, {})
    extra = {"aggregation": changes["aggregation"]} if "aggregation" in changes else {}
    plan = make_plan(fleet, args.model, importance=importance, ranks=tuple(int(x) for x in args.ranks.split(",")),
                     strategy=strategy, training=training, data=data, server_rank=args.server_rank,
                     modules=args.modules.split(",") if args.modules else None, **extra)
    if "aggregation" in changes:
        plan.aggregation = changes["aggregation"]
    if "replan" in changes:
        plan.replan = changes["replan"]
        plan.inputs["fleet"] = str(_fleet_file(args, out))
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return path


def _fleet_file(args, out: Path) -> Path:
    """The scaled fleet as a file (re-planning during a run re-solves on the plan's inputs.fleet)."""
    path = out / "plans" / "fleet.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(bench_fleet(args).to_dict()))
    return path


def run_one(label: str, plan_path: Path, args, out: Path) -> dict:
    from hsplit.planner.plan import Plan
    from hsplit.runtime.outputs.generate import generate_file
    from hsplit.runtime.train.loop import run
    from hsplit.runtime.train.options import RunOptions
    from hsplit.runtime.outputs.rundir import RunFinished, RunResult, load_run

    runs = out / "runs"
    name = plan_path.stem
    t0 = time.perf_counter()
    opts = RunOptions(name=name, runs_dir=runs, eval_max_seqs=args.eval_seqs, progress=False, device=args.device,
                      threads=args.threads, resume=(runs / name / "config.yaml").exists())
    try:
        res = run(plan_path, opts)
    except RunFinished:                       # trained before the benchmark was interrupted
        res = RunResult.of_run(runs / name)
    train_s = time.perf_counter() - t0
    sim, _, _ = load_run(res.run_dir, device=args.device)
    gen, rows = generate_file(sim, f"e2e:{args.test}", max_prompts=args.test_mrs or None, beams=args.beams,
                              max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch,
                              ppl_max_refs=args.test_ppl_refs or None)
    (res.run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = Plan.load(plan_path)
    curve = [{"round": r["round"], "eval_ppl": r["eval_ppl"], "fleet_s": r["fleet_total_s"], "wall_s": r["wall_s"],
              "bytes": r["bytes_up"] + r["bytes_down"], "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"]}
             for r in res.rows if r["client"] == "all"]
    # metrics.csv's per-client rows: bytes up and down of every client in every round
    per_client = {}
    for r in res.rows:
        if r["client"] != "all":
            per_client.setdefault(str(r["client"]), []).append([r["round"], r["bytes_up"], r["bytes_down"]])
    clients = len(plan.clients) if plan.strategy != "centralized" else 1
    trained = max(1, len(curve) - 1)
    return {"label": label, "strategy": plan.strategy, "aggregation": plan.aggregation, "curve": curve,
            "generation": gen, "train_wall_s": train_s,
            "total_wall_s": time.perf_counter() - t0, "bytes": sum(c["bytes"] for c in curve),
            "bytes_per_client_round": sum(c["bytes"] for c in curve) / trained / clients,
            "bytes_up_per_client_round": sum(c["bytes_up"] for c in curve) / trained / clients,
            "bytes_down_per_client_round": sum(c["bytes_down"] for c in curve) / trained / clients,
            "max_client_bytes_per_round": max((u + d for rows in per_client.values() for _, u, d in rows), default=0),
            "client_bytes": per_client,
            "splits": [c.split_layer for c in plan.clients],
            "ranks": [sorted({r for r in c.ranks.values() if r}) for c in plan.clients],
            "adapted_matrices": [sum(1 for r in c.ranks.values() if r) for c in plan.clients],
            "server_rank": plan.server_rank, "predicted_round_s": plan.predicted.get("round_s")}


def time_to(curve: list[dict], target: float):
    for c in curve:
        if c["eval_ppl"] is not None and c["eval_ppl"] <= target:
            return c["round"], c["fleet_s"]
    return None, None


def _stats(xs) -> str:
    import statistics
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _mb(by: dict, key: str) -> str:
    """Mean over seeds of a per-run byte count, in MB (n/a for runs written before the key existed)."""
    import statistics
    xs = [r[key] for r in by.values() if key in r]
    return f"{statistics.mean(xs) / 1e6:.1f}" if xs else "n/a"


def reference_label(results: dict, wanted: str) -> str:
    """The run the paired differences are taken against: --reference (hsplitlora, the product's default),
    else hsplitlora-warm when the default itself was not run."""
    if wanted in results:
        return wanted
    return "hsplitlora-warm" if "hsplitlora-warm" in results else wanted


def summarise(results: dict, args, out: Path) -> str:
    """results: run label -> seed -> result. The target perplexity is per seed (the seed also draws the
    held-out split): --target-ppl, or the worst final held-out perplexity among the federated strategies
    of that seed, which every one of them reaches; fleet time to it is compared per seed."""
    import statistics
    final = {lab: {sd: r["curve"][-1]["eval_ppl"] for sd, r in by.items()} for lab, by in results.items()}
    fed = [lab for lab, by in results.items() if next(iter(by.values()))["strategy"] != "centralized"]
    main = [lab for lab in fed if lab in ALL] or fed
    seeds = sorted({sd for by in results.values() for sd in by})
    target = {sd: args.target_ppl or max(final[lab][sd] for lab in main if sd in final[lab]) for sd in seeds}
    ref_label = reference_label(results, args.reference)
    lines = [f"Seeds {', '.join(map(str, seeds))}; target held-out perplexity per seed: "
             + ", ".join(f"{target[sd]:.3f}" for sd in seeds)
             + ("" if args.target_ppl else " (the worst final perplexity among the federated strategies)"),
             "", f"| run | seeds | splits | ranks | final held-out ppl | test ppl | BLEU (seed 0) | ROUGE-L (seed 0) "
             f"| BLEU mean | ROUGE-L mean | fleet s to target | MB per client per round (up / down) "
             f"| largest client MB in a round | vs {ref_label}: final ppl diff (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = final.get(ref_label, {})
    for lab, by in results.items():
        r0 = by.get(0) or next(iter(by.values()))
        ranks = "/".join(",".join(map(str, x)) or "-" for x in r0["ranks"])
        to = [time_to(r["curve"], target[sd])[1] for sd, r in by.items()]
        diffs = [final[lab][sd] - ref[sd] for sd in by if sd in ref] if lab != ref_label else []
        reached = sum(t is not None for t in to)
        lines.append(
            f"| {lab} | {len(by)} | {','.join(map(str, r0['splits']))} | {ranks} | {_stats(final[lab].values())} "
            f"| {_stats([r['generation']['perplexity'] for r in by.values()])} "
            f"| {r0['generation']['bleu']:.2f} | {r0['generation']['rouge_l']:.2f} "
            f"| {_stats([r['generation']['bleu'] for r in by.values()])} "
            f"| {_stats([r['generation']['rouge_l'] for r in by.values()])} "
            f"| {_stats(to) if reached == len(to) else f'{_stats(to)} ({reached}/{len(to)} seeds reach it)'} "
            f"| {_mb(by, 'bytes_per_client_round')} ({_mb(by, 'bytes_up_per_client_round')} / "
            f"{_mb(by, 'bytes_down_per_client_round')}) | {_mb(by, 'max_client_bytes_per_round')} "
            f"| {_stats(diffs) if diffs else ('(reference)' if lab == ref_label else 'n/a')} |")
    lines += ["", f"Paired final held-out perplexity per seed ({', '.join(map(str, seeds))}):", ""]
    for lab in results:
        lines.append(f"- {lab}: " + ", ".join(f"{final[lab][sd]:.3f}" if sd in final[lab] else "-" for sd in seeds))
    lines += ["", "Held-out perplexity per round, mean over seeds:", ""]
    for lab, by in results.items():
        n = min(len(r["curve"]) for r in by.values())
        per = [statistics.mean(r["curve"][i]["eval_ppl"] for r in by.values()) for i in range(n)]
        lines.append(f"- {lab}: " + " ".join(f"{x:.2f}" for x in per))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    _plot(results, out / "strategies.png")
    return text


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    most = max(len(by) for by in results.values())   # a run with fewer finished seeds says so in its label
    name = {lab: lab if len(by) == most else f"{lab} ({len(by)} of {most} seeds)" for lab, by in results.items()}
    colors = dict(zip([lab for lab in results if lab != "centralized"], plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for lab, by in results.items():
        n = min(len(r["curve"]) for r in by.values())
        ppl = np.array([[r["curve"][i]["eval_ppl"] for i in range(n)] for r in by.values()])
        rounds = [next(iter(by.values()))["curve"][i]["round"] for i in range(n)]
        lo, mid, hi = ppl.min(0), ppl.mean(0), ppl.max(0)
        if next(iter(by.values()))["strategy"] == "centralized":   # no fleet time: its final ppl as a line
            ax[0].axhline(mid[-1], color="k", ls=":", label=f"centralized (final, {n - 1} rounds)")
            ax[1].plot(rounds, mid, color="k", ls=":", marker=".", label=name[lab])
            ax[1].fill_between(rounds, lo, hi, color="k", alpha=0.1)
            continue
        fleet = [next(iter(by.values()))["curve"][i]["fleet_s"] or 0.0 for i in range(n)]
        for a, x in ((ax[0], fleet), (ax[1], rounds)):
            a.plot(x, mid, marker="o", ms=3, color=colors.get(lab), label=name[lab])
            a.fill_between(x, lo, hi, color=colors.get(lab), alpha=0.15)
    ax[0].set(xlabel="fleet time (s, predicted from device profiles)", ylabel="held-out perplexity", yscale="log",
              title=f"mean over {most} seed{'s' if most != 1 else ''} (band: min-max)")
    ax[1].set(xlabel="round", ylabel="held-out perplexity", yscale="log", title="per round")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_results(out: Path) -> dict:
    """Every finished run under out/results/, as label -> seed -> result."""
    results: dict = {}
    for f in sorted((out / "results").glob("*.json")):
        r = json.loads(f.read_text())
        results.setdefault(r["label"], {})[r["seed"]] = r
    order = {lab: i for i, lab in enumerate(ALL)}
    return dict(sorted(results.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# The two regimes (--regime sets these defaults; any flag given on the command line wins).
#   seeds: regime 1, the example fleet of 5 clients (docs/benchmarks.md, "Strategies over seeds"); its documented
#          command passes --local-steps 2 --batch-size 2 --seq-len 64 ... explicitly.
#   drift: regime 2, where client drift matters: 10 clients of 4 device kinds with binding budgets
#          (bench/fleets/drift-10.yaml), hsplit's default of 10 local steps per round, a Dirichlet(0.5)
#          partition of every restaurant's references over the clients, sized for this 2-core CPU: batch 1 x 64
#          tokens (an E2E MR alone is ~39 tokens, so 64 is the shortest that keeps part of every reference;
#          at batch 2 and 12 clients one run took ~26 CPU-minutes, the table ~9 h).
REGIMES = {
    "seeds": {"fleet": "example", "out": str(REPO / "bench" / "results" / "strategies")},
    "drift": {"fleet": str(REPO / "bench" / "fleets" / "drift-10.yaml"), "partition": "dirichlet", "alpha": 0.5,
              "local_steps": 10, "rounds": 8, "batch_size": 1, "seq_len": 64, "eval_seqs": 16, "test_mrs": 10,
              "test_ppl_refs": 24, "max_new_tokens": 32, "seeds": "0,1,2",
              "out": str(REPO / "bench" / "results" / "strategies-drift")},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=sorted(REGIMES), default="seeds",
                    help="defaults of regime 1 (seeds: example fleet) or regime 2 (drift: 12 clients, 10 local steps, "
                         "Dirichlet partition); explicit flags win")
    ap.add_argument("--fleet", default="example", help="fleet file or shipped name; its round budgets are scaled")
    ap.add_argument("--partition", default="by-source", help="data.partition (by-source, dirichlet, iid, flower-*)")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (data.alpha)")
    ap.add_argument("--reference", default="hsplitlora",
                    help="the run paired differences are taken against (falls back to hsplitlora-warm)")
    ap.add_argument("--train", help="E2E CSV the clients train on (e.g. devset.csv); required")
    ap.add_argument("--test", help="E2E CSV with all references (e.g. testset_w_refs.csv); required")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--strategies", default=",".join(ALL))
    ap.add_argument("--variants", default="",
                    help="hsplitlora ablations (comma list): aggregation=NAME (any plan aggregation), restart, "
                         "replan, replan=N:T")
    ap.add_argument("--importance", default="", help="hsplitlora ablations: NAME=importance.yaml (comma list)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=96, help="96 covers 99%% of E2E examples with SmolLM2's tokenizer")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--ranks", default="0,2,4,8,16")
    ap.add_argument("--server-rank", type=int, default=8)
    ap.add_argument("--modules", default=None, help="comma list (default: the planner's: every adaptable matrix)")
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
                    help="rewrite summary.md and the plot from --out's results/ (no training)")
    known, _ = ap.parse_known_args(argv)
    ap.set_defaults(**REGIMES[known.regime])
    args = ap.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.importance_files = dict(x.split("=", 1) for x in args.importance.split(",") if x.strip())
    seeds = [int(x) for x in args.seeds.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    if not args.summarise_only:
        if not (args.train and args.test):
            ap.error("--train and --test are required (the E2E devset and test set with references)")
        labels = [(s, s) for s in args.strategies]
        variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
        args.variant_changes = dict(variants)
        labels += [(label, "hsplitlora") for label, _ in variants]
        labels += [(f"hsplitlora-importance-{k}", "hsplitlora") for k in args.importance_files]
        (out / "results").mkdir(parents=True, exist_ok=True)
        for seed in seeds:                    # seed-major: every strategy of a seed before the next seed
            for label, strategy in labels:
                done = out / "results" / f"{label}-seed{seed}.json"
                if done.exists():
                    continue
                t = time.perf_counter()
                r = run_one(label, make_plan_for(args, label, strategy, seed, out), args, out)
                r["seed"] = seed
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(r, indent=1))
                tmp.replace(done)
                print(f"{label} seed {seed}: held-out ppl {r['curve'][0]['eval_ppl']:.2f} -> "
                      f"{r['curve'][-1]['eval_ppl']:.2f}, BLEU {r['generation']['bleu']:.2f} "
                      f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    results = load_results(out)
    if not results:
        print(f"no finished run under {out / 'results'}", file=sys.stderr)
        return 1
    print(summarise(results, args, out))
    print(f"command: python bench/strategies.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
