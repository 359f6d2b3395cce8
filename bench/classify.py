"""HAFL's comparison on classification: hafl-truncation, hafl-freezing, hetlora and hsplitlora fine-tune a
sequence classifier on one heterogeneous fleet, data split by Dirichlet over the labels, over several seeds.

    python bench/classify.py --train PATH/testset_w_refs.csv --label eatType --seeds 0,1,2 \
        [--rounds 3 --local-steps 4 --batch-size 4 --seq-len 48 --alpha 0.5 --model smollm2-135m]
    # -> bench/results/classify/{results/<strategy>-seed<s>.json, summary.md, plans/, runs/}
    python bench/classify.py --train SetFit/20_newsgroups --text-column text --label label_text ...
    # (machines with network: 20 Newsgroups, HAFL's own data set; --train takes any hsplit data.path)

Data: E2E references (`ref`) labelled by one attribute of their meaning representation (`--label eatType`:
pub / restaurant / coffee shop), `data.task: classification`, `partition: dirichlet` with `partition_by:
label` (per label, client shares ~ Dirichlet(alpha): the standard non-IID classification split) and the
held-out split taken per label. The fleet is bench/strategies.py's: the example fleet with its round
budgets scaled to the benchmark's tokens per round, so that the planner gives clients different splits
and ranks. Every strategy gets the same model, data, partition, seeds, schedule, rounds and local steps.
After training, `hsplit eval`'s evaluation (runtime/outputs/evaluate.py evaluate_run: predictions saved in the run
folder, accuracy and macro-F1 by scikit-learn) scores the held-out split. Each finished run is written to
results/<run>.json at once; the same command again skips finished runs and resumes an interrupted one
from its last checkpoint; `--summarise-only` rewrites the summary (and, with --docs, docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL = ["hafl-truncation", "hafl-freezing", "hetlora", "hsplitlora"]
STRATEGIES = list(ALL)      # --strategies
HEADING = "## Classification: HAFL's comparison (bench/classify.py)"


def make_plan_for(args, strategy: str, seed: int, out: Path) -> Path:
    """The plan of one run (an existing plan file is used as it is: a resumed run sees the plan it started with)."""
    path = out / "plans" / f"{strategy}-seed{seed}.yaml"
    if path.is_file():
        return path
    sys.path.insert(0, str(REPO / "bench"))
    from strategies import bench_fleet                      # the scaled example fleet (bench/strategies.py)

    from hsplit.planner.api import make_plan
    from hsplit.planner.plan import DataSpec, Training
    from hsplit.runtime.data.source import check_classification, split_data_ref

    training = Training(batch_size=args.batch_size, seq_len=args.seq_len, local_steps=args.local_steps,
                        rounds=args.rounds, learning_rate=args.lr, seed=seed, lr_schedule="cosine")
    ref, fmt = split_data_ref(args.train)
    if not ref.startswith(("/", "~")) and Path(ref).exists():
        ref = str(Path(ref).resolve())
    data = DataSpec(path=ref, format=fmt if fmt != "e2e" else "auto", partition="dirichlet", partition_by="label",
                    alpha=args.alpha, eval_fraction=args.eval_fraction, task="classification",
                    text_column=args.text_column, label_column=args.label)
    data.labels = check_classification(data, seed, None, args.seq_len)        # what `hsplit plan` writes
    plan = make_plan(bench_fleet(args), args.model, ranks=tuple(int(x) for x in args.ranks.split(",")),
                     strategy=strategy, training=training, data=data, server_rank=args.server_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return path


def run_one(strategy: str, seed: int, args, out: Path) -> dict:
    from hsplit.planner.plan import Plan
    from hsplit.runtime.outputs.evaluate import evaluate_run
    from hsplit.runtime.train.loop import run
    from hsplit.runtime.train.options import RunOptions
    from hsplit.runtime.outputs.rundir import RunFinished, RunResult

    plan_path = make_plan_for(args, strategy, seed, out)
    runs, name = out / "runs", plan_path.stem
    t0 = time.perf_counter()
    opts = RunOptions(name=name, runs_dir=runs, eval_max_seqs=args.eval_seqs, progress=False, threads=args.threads,
                      resume=(runs / name / "config.yaml").exists())
    try:
        res = run(plan_path, opts)
    except RunFinished:                       # trained before the benchmark was interrupted
        res = RunResult.of_run(runs / name)
    train_s = time.perf_counter() - t0
    ev = evaluate_run(res.run_dir, per_class=True)
    plan = Plan.load(plan_path)
    curve = [{"round": r["round"], "eval_loss": r["eval_loss"], "fleet_s": r["fleet_total_s"],
              "bytes": r["bytes_up"] + r["bytes_down"]} for r in res.rows if r["client"] == "all"]
    support = [c["support"] for c in ev["per_class"]]
    return {"strategy": strategy, "seed": seed, "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
            "eval_loss": ev["eval_loss"], "examples": ev["examples"], "labels": ev["labels"], "per_class": ev["per_class"],
            "majority_accuracy": max(support) / max(1, sum(support)), "curve": curve, "train_wall_s": train_s,
            "fleet_s": curve[-1]["fleet_s"] if curve else None, "bytes": sum(c["bytes"] for c in curve),
            "splits": [c.split_layer for c in plan.clients],
            "ranks": [sorted({r for r in c.ranks.values() if r}) for c in plan.clients]}


def _stat(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _train_wall(r: dict, out: Path) -> float:
    """Training wall seconds of a run from its metrics.csv (rounds' wall_s; a resumed run's own figure is not)."""
    import csv
    f = out / "runs" / f"{r['strategy']}-seed{r['seed']}" / "metrics.csv"
    if not f.is_file():
        return r["train_wall_s"]
    with open(f, newline="") as fh:
        return sum(float(row["wall_s"] or 0) for row in csv.DictReader(fh) if row["client"] == "all")


def summarise(results: list[dict], args, command: str) -> list[str]:
    out = Path(args.out)
    for r in results:
        r["train_wall_s"] = _train_wall(r, out)
    seeds = sorted({r["seed"] for r in results})
    lines = [HEADING, "",
             f"E2E references labelled by the MR attribute `{args.label}` ({args.train}; "
             f"{', '.join(results[0]['labels']) if results else ''}), task classification (label-word head on the last "
             f"token, runtime/models/task.py), Dirichlet over labels (alpha {args.alpha:g}), held-out split per label "
             f"({args.eval_fraction:g}), {args.model}, {args.rounds} rounds x {args.local_steps} local steps, batch "
             f"{args.batch_size}, seq_len {args.seq_len}, lr {args.lr:g} (cosine), the scaled example fleet (5 clients), "
             f"seeds {', '.join(map(str, seeds))}. Mean ± sd over seeds; accuracy and macro-F1 of the saved held-out "
             "predictions (`hsplit eval`, scikit-learn). Measured on the shared 2-core CPU machine.", "",
             "```", command, "```", "",
             "| strategy | runs | accuracy | macro-F1 | held-out loss | fleet s | MB moved | round wall s (sum) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in STRATEGIES:
        rs = [r for r in results if r["strategy"] == s]
        if not rs:
            lines.append(f"| {s} | 0 | not run | | | | | |")
            continue
        lines.append(f"| {s} | {len(rs)} | {_stat([r['accuracy'] for r in rs])} | {_stat([r['macro_f1'] for r in rs])} "
                     f"| {_stat([r['eval_loss'] for r in rs])} | {_stat([r['fleet_s'] for r in rs])} "
                     f"| {statistics.mean(r['bytes'] for r in rs) / 1e6:.1f} "
                     f"| {statistics.mean(r['train_wall_s'] for r in rs):.0f} |")
    if results:
        lines += ["", f"Majority-class accuracy of the held-out split: {_stat([r['majority_accuracy'] for r in results])}; "
                  f"held-out examples per run: {results[0]['examples']}."]
    missing = [(s, k) for s in STRATEGIES for k in args.seed_list
               if not any(r["strategy"] == s and r["seed"] == k for r in results)]
    if missing:
        lines += ["", f"**Partial:** {len(missing)} of {len(STRATEGIES) * len(args.seed_list)} runs did not finish "
                  f"within the time budget ({', '.join(f'{s} seed {k}' for s, k in missing)})."]
    lines += ["", "20 Newsgroups (HAFL's data set; needs network once):", "", "```",
              "python bench/classify.py --train SetFit/20_newsgroups --text-column text --label label_text "
              "--seq-len 256 --rounds 10 --local-steps 10 --out bench/results/classify-20ng", "```", ""]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="hsplit data.path: an E2E CSV, or any classification data")
    ap.add_argument("--label", default="eatType", help="label column, or E2E MR attribute")
    ap.add_argument("--text-column", default="auto")
    ap.add_argument("--strategies", default=",".join(ALL))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences the loss is tracked on per round")
    ap.add_argument("--ranks", default="0,2,4,8")
    ap.add_argument("--server-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "classify"))
    ap.add_argument("--docs", action="store_true", help="write the summary into docs/benchmarks.md")
    ap.add_argument("--summarise-only", action="store_true")
    args = ap.parse_args(argv)
    args.seed_list = [int(x) for x in args.seeds.split(",")]
    global STRATEGIES
    STRATEGIES = args.strategies.split(",")
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    command = "nice -n 15 python bench/classify.py " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--summarise-only")
    if not args.summarise_only:
        for seed in args.seed_list:                 # seed-major: a cut-short benchmark has every strategy at seed 0
            for s in STRATEGIES:
                f = out / "results" / f"{s}-seed{seed}.json"
                if f.is_file():
                    continue
                res = run_one(s, seed, args, out)
                f.write_text(json.dumps(res, indent=1))
                print(f"{s} seed {seed}: accuracy {res['accuracy']:.3f}, macro-F1 {res['macro_f1']:.3f}, "
                      f"{res['train_wall_s']:.0f} s", flush=True)
    results = [json.loads(f.read_text()) for f in sorted((out / "results").glob("*.json"))]
    lines = summarise([r for r in results if r["strategy"] in STRATEGIES], args, command)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.docs:
        sys.path.insert(0, str(REPO / "bench"))
        from runtime import write_docs_section
        write_docs_section(HEADING, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
