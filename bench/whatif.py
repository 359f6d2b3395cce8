"""What-if sweep benchmark: 50 scenarios over the 1,000-device fleet (profiles/fleets/edge-1000.yaml).

    .venv/bin/python bench/whatif.py [--model qwen2.5-0.5b]

5 uplink bandwidths x 5 memory budgets x 2 sequence lengths, planned with the decomposed method
(frontier tables shared across scenarios), each timed for a budget of 1,000,000 examples (fleet hours,
MB per client; client groups that cannot take part are left out and counted). Target: under 60 s on
a 2-core machine. Writes
bench/results/whatif/ (table and plots) and prints the timing line used in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.progress import Progress

from hsplit.planner.plots import write_plots
from hsplit.planner.whatif import run_whatif, write_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--out", default="bench/results/whatif")
    args = ap.parse_args()
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
