"""What-if sweep benchmark: 50 scenarios over the 1,000-device fleet (profiles/fleets/edge-1000.yaml), or
(--distinct) 500 scenarios over a 10,000-device all-different fleet (issue 22).

    .venv/bin/python bench/whatif.py [--model qwen2.5-0.5b]
    .venv/bin/python bench/whatif.py --distinct [--scenarios 20]     # the first 20 of the 500 only

5 uplink bandwidths x 5 memory budgets x 2 sequence lengths, planned with the decomposed method
(frontier tables shared across scenarios), each timed for a budget of 1,000,000 examples (fleet hours,
MB per client; client groups that cannot take part are left out and counted). Target: under 60 s on
a 2-core machine. Writes
bench/results/whatif/ (table and plots) and prints the timing line used in docs/benchmarks.md.

--distinct: the 10,000 all-different devices of bench/planner.py (a Parquet inventory, Llama-2-7B, ranks
0..32, b=1, local steps 4), 500 scenarios = server.count 5 values x server.concurrency 5 x seq_len 4 x
local_steps 5; `--scenarios N` plans the first N of them (same order). Prints wall and CPU seconds (the
machine is shared; CPU seconds move less with load). Target: all 500 in under 60 s.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

from rich.progress import Progress

from hsplit.planner.plan import Training
from hsplit.planner.plots import write_plots
from hsplit.planner.whatif import run_whatif, write_table

DISTINCT_VARY = {"server.count": ["50", "100", "200", "400", "800"], "server.concurrency": ["1", "2", "4", "8", "16"],
                 "seq_len": ["256", "512", "1024", "2048"], "local_steps": ["1", "2", "4", "8", "16"]}


def distinct(n_scenarios: int, out: Path) -> None:
    """The first n_scenarios of the 500 over 10,000 all-different devices (module docstring)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from planner import RANKS, write_table_fleet      # bench/planner.py
    combos = list(itertools.product(*DISTINCT_VARY.values()))[:n_scenarios]
    vary = [f"{k}={'|'.join(c[i] for c in combos)}" for i, k in enumerate(DISTINCT_VARY)]   # walked in lockstep
    with tempfile.TemporaryDirectory() as tmp:
        fleet = write_table_fleet(10_000, Path(tmp))
        t0, c0 = time.perf_counter(), time.process_time()
        df = run_whatif([str(fleet)], vary, zip_vary=True, model="llama-2-7b", ranks=RANKS, solver="highs",
                        training=Training(batch_size=1, seq_len=512, local_steps=4, dtype="fp32"))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["fleet"]).to_csv(out / "distinct-scenarios.csv", index=False)
    print(f"{len(df)} scenarios x {df['clients'].iloc[0]:,} all-different clients (llama-2-7b): {wall:.1f} s wall, "
          f"{cpu:.1f} CPU s ({wall / len(df):.2f} s, {cpu / len(df):.2f} CPU s per scenario; first "
          f"{df['solve_s'].iloc[0]:.2f} s, median {df['solve_s'].median():.2f} s); 500 scenarios at this rate: "
          f"{wall / len(df) * 500:.0f} s wall, {cpu / len(df) * 500:.0f} CPU s; "
          f"{(df['status'] != 'infeasible').sum()} feasible; {out / 'distinct-scenarios.csv'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--out", default="bench/results/whatif")
    ap.add_argument("--distinct", action="store_true", help="500 scenarios of 10,000 all-different devices")
    ap.add_argument("--scenarios", type=int, default=500, help="with --distinct: plan the first N scenarios")
    args = ap.parse_args()
    if args.distinct:
        distinct(args.scenarios, Path(args.out))
        return
    vary = ["clients.*.uplink_mbps=5,10,20,50,100", "clients.*.budget.memory_gib=1,1.5,2,2.5,3", "seq_len=256,512"]
    t0 = time.perf_counter()
    with Progress() as progress:
        task = progress.add_task("scenarios", total=50)
        df = run_whatif(["edge-1000"], vary, model=args.model, examples=1_000_000,
                        progress=lambda i, n, name: progress.update(task, completed=i, total=n))
    wall = time.perf_counter() - t0
    files = write_table(df, Path(args.out)) + write_plots(df, Path(args.out))
    ok = df["status"] != "infeasible"
    partial = (ok & (df["fleet_share"] < 1)).sum()
    print(f"{len(df)} scenarios x {df['clients'].iloc[0]} clients ({args.model}): {wall:.1f} s total, "
          f"median {df['solve_s'].median():.2f} s per scenario, first {df['solve_s'].iloc[0]:.2f} s; "
          f"{ok.sum()} feasible, {partial} of them without some client groups; 1,000,000 examples take "
          f"{df['fleet_hours'].min():.1f}-{df['fleet_hours'].max():.1f} fleet hours, "
          f"{df['client_mb_per_run'].min() / 1e3:.0f}-{df['client_mb_per_run'].max() / 1e3:.0f} GB per client (mean); "
          f"files: {', '.join(str(f) for f in files)}")


if __name__ == "__main__":
    main()
