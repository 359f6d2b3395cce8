"""Planner benchmark: solve time and objective of the full MILP (CBC, HiGHS) and the decomposed
exact method on Llama-2-7B (32 blocks x 7 modules, 6 rank levels) for fleets of 10 to 100,000
clients of a dozen kinds, and 1,000 and 10,000 clients that are all different; for the decomposed
method also the time to write plan.yaml, its size, and the time to read it back.

    .venv/bin/python bench/planner.py                      # everything (about 20 minutes)
    .venv/bin/python bench/planner.py --quick --out bench/results/planner-scale.json   # decomposed only (~1 min)
    .venv/bin/python bench/planner.py --full-time-limit 120
    .venv/bin/python bench/planner.py --only-end-to-end --out bench/results/planner-e2e.json   # 100,000 distinct (~3 min)

End to end (issue 22): `hsplit plan` on a table fleet of 100,000 all-different devices, unsampled and with 100
clients per round over 100 rounds: wall time, solver time, plan size (target < 60 s and < 10 MB).
Targets (issue 14, 2 cores): 100,000 clients of a dozen kinds planned to proven optimality in < 10 s,
10,000 all-different clients in < 60 s, a 10,000-client plan.yaml < 1 MB written in < 1 s.
Writes bench/results/planner.json and prints the markdown table used in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.progress import Progress

from hsplit.planner.api import make_plan
from hsplit.planner.fleet import Fleet
from hsplit.planner.plan import Plan, Training

# A dozen client kinds with round budgets (s) sized for Llama-2-7B at b=1, T=512, tau=4, fp32.
KINDS = {
    "snapdragon-8-gen3-phone": 400, "pixel-8-pro-tensor-g3": 600, "iphone-15-pro-a17-pro": 400,
    "raspberry-pi-5-8gb": 1500, "jetson-orin-nano-8gb": 500, "jetson-orin-nx-16gb": 400,
    "jetson-agx-orin-64gb": 300, "macbook-air-m2-16gb": 300, "laptop-core-i7-1360p-16gb": 900,
    "rtx-3060-12gb": 60, "rtx-4090-24gb": 30, "l4-24gb": 60,
}
TRAINING = Training(batch_size=1, seq_len=512, local_steps=4, dtype="fp32")
RANKS = (0, 2, 4, 8, 16, 32)


def fleet_of_kinds(n: int) -> Fleet:
    kinds = list(KINDS)
    counts = [n // len(kinds) + (1 if i < n % len(kinds) else 0) for i in range(len(kinds))]
    clients = [{"device": k, "count": c, "budget": {"round_s": KINDS[k]}} for k, c in zip(kinds, counts) if c]
    server = {"device": "h100-80gb", "count": max(1, math.ceil(n / 100))}
    return Fleet.from_dict({"name": f"kinds-{n}", "server": server, "clients": clients}, f"<{n} clients of 12 kinds>")


def fleet_all_different(n: int, seed: int = 0) -> Fleet:
    """Every client its own profile: a shipped kind with flops, memory, links and budget perturbed."""
    from hsplit.planner.device import resolve_device
    rng = np.random.default_rng(seed)
    kinds = list(KINDS)
    clients = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        d = resolve_device(kind).to_dict()
        d["name"] = f"{kind}-{i}"
        d["peak_flops"] = {k: v * float(rng.uniform(0.7, 1.3)) for k, v in d["peak_flops"].items()}
        d["memory_gib"] = d["memory_gib"] * float(rng.uniform(0.6, 1.0))
        d["uplink_mbps"] *= float(rng.uniform(0.5, 2.0))
        d["downlink_mbps"] *= float(rng.uniform(0.5, 2.0))
        clients.append({"device": d, "data_weight": float(rng.uniform(0.5, 2.0)),
                        "budget": {"round_s": KINDS[kind] * float(rng.uniform(0.7, 1.3))}})
    server = {"device": "h100-80gb", "count": max(1, math.ceil(n / 100))}
    return Fleet.from_dict({"name": f"different-{n}", "server": server, "clients": clients}, f"<{n} different clients>")


def write_table_fleet(n: int, folder: Path, seed: int = 0) -> Path:
    """fleet_all_different(n) as an inventory: fleet.yaml naming devices.parquet (one row per device: its kind
    and its own flops, memory, links, budget and weight; docs/file-formats.md, "Fleet")."""
    import pandas as pd
    fleet = fleet_all_different(n, seed)
    rows = []
    for i, g in enumerate(fleet.groups):
        d = g.device
        row = {"id": f"dev{i}", "device": d.name.rsplit("-", 1)[0], "memory_gib": d.memory_gib,
               "uplink_mbps": d.uplink_mbps, "downlink_mbps": d.downlink_mbps, "budget.round_s": g.budget.round_s,
               "data_weight": g.data_weight}
        row.update({f"peak_flops.{k}": v for k, v in d.peak_flops.items()})
        rows.append(row)
    pd.DataFrame(rows).to_parquet(folder / "devices.parquet")
    path = folder / "fleet.yaml"
    path.write_text(f"# {n} all-different devices (bench/planner.py)\nname: inventory-{n}\n"
                    f"server: {{device: h100-80gb, count: {max(1, math.ceil(n / 100))}}}\n"
                    "clients:\n  - table: devices.parquet\n")
    return path


def end_to_end(n: int, clients_per_round: int | None = None) -> dict:
    """`hsplit plan` on a table fleet of n all-different devices, in a child process: wall time, the solver's
    share, the plan's size and allocations (and, sampled, its predicted rounds)."""
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        fleet = write_table_fleet(n, Path(tmp))
        out = Path(tmp) / "plan.yaml"
        cmd = [sys.executable, "-m", "hsplit.cli", "plan", "--fleet", str(fleet), "--model", "llama-2-7b",
               "--ranks", ",".join(map(str, RANKS)), "-b", "1", "-T", "512", "--local-steps", "4",
               "--solver", "highs", "-o", str(out)]
        if clients_per_round:
            cmd += ["--clients-per-round", str(clients_per_round), "--rounds", "100"]
        import resource
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)       # CPU seconds: less sensitive to a loaded machine
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        t1 = time.perf_counter()
        plan = Plan.load(out)
        read = time.perf_counter() - t1
        return {"clients": n, "clients_per_round": clients_per_round, "end_to_end_s": wall, "cpu_s": cpu,
                "solver_wall_s": plan.solver["wall_s"], "plan_bytes": out.stat().st_size, "read_s": read,
                "form": plan.entry_list, "allocations": len(set(plan.entries)),
                "round_s": plan.predicted["round_s"], "round_s_max": plan.predicted.get("round_s_max"),
                "round_s_all_clients": plan.predicted.get("round_s_all_clients"),
                "utility": plan.predicted["utility"]}


def run(fleet: Fleet, solver: str, method: str, time_limit: float | None) -> dict:
    t0 = time.perf_counter()
    try:
        plan = make_plan(fleet, "llama-2-7b", ranks=RANKS, training=TRAINING, solver=solver, method=method,
                         time_limit=time_limit)
    except RuntimeError as e:
        return {"status": "no solution", "wall_s": time.perf_counter() - t0, "note": str(e)[:200]}
    wall = time.perf_counter() - t0
    s = plan.solver
    splits = sorted({c.split_layer for c in plan.clients})
    with tempfile.TemporaryDirectory() as tmp:          # plan.yaml: written compactly, read back expanded
        path = Path(tmp) / "plan.yaml"
        t1 = time.perf_counter()
        plan.save(path)
        t2 = time.perf_counter()
        back = Plan.load(path)
        t3 = time.perf_counter()
        assert len(back.clients) == len(plan.clients)
        size = path.stat().st_size
    return {"status": s["status"], "wall_s": wall, "solver_wall_s": s["wall_s"],
            "utility": s["objective"]["utility"], "round_s": s["objective"]["round_s"], "gap": s.get("gap"),
            "distinct_splits": len(splits), "straggler": plan.predicted["straggler"],
            "write_s": t2 - t1, "plan_bytes": size, "read_s": t3 - t2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000,10000,100000", help="clients of a dozen kinds")
    ap.add_argument("--different", default="1000,10000", help="sizes of the all-different fleets")
    ap.add_argument("--full-up-to", type=int, default=100, help="largest fleet the full MILP is attempted on")
    ap.add_argument("--full-time-limit", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="decomposed method only")
    ap.add_argument("--out", default="bench/results/planner.json")
    ap.add_argument("--end-to-end", default="100000",
                    help="sizes of the all-different table fleets planned end to end with `hsplit plan` ('' = none)")
    ap.add_argument("--sampled", type=int, default=100, help="clients per round of the sampled end-to-end case")
    ap.add_argument("--only-end-to-end", action="store_true", help="skip the in-process cases")
    args = ap.parse_args()
    e2e = []
    for n in (int(x) for x in args.end_to_end.split(",") if x):
        for cpr in (None, args.sampled):
            e2e.append(end_to_end(n, cpr))
            r = e2e[-1]
            print(f"hsplit plan, {n:,} all-different clients (table fleet){f', {cpr} per round' if cpr else ''}: "
                  f"{r['end_to_end_s']:.1f} s end to end ({r['cpu_s']:.1f} CPU s), solver {r['solver_wall_s']:.1f} s, plan "
                  f"{r['plan_bytes'] / 1e6:.2f} MB ({r['form']}: {r['allocations']:,}), read back {r['read_s']:.1f} s; "
                  f"round {r['round_s']:.1f} s" + (f" (worst sampled {r['round_s_max']:.1f} s; all clients at once "
                                                   f"{r['round_s_all_clients']:.1f} s)" if cpr else ""))
    if args.only_end_to_end:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"end_to_end": e2e}, indent=2, default=float))
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    cases = [(f"{n} clients, 12 kinds", lambda n=n: fleet_of_kinds(n), n) for n in sizes]
    cases += [(f"{n} clients, all different", lambda n=n: fleet_all_different(n), n)
              for n in (int(x) for x in args.different.split(",") if x)]
    rows = []
    with Progress() as progress:
        task = progress.add_task("planning", total=len(cases) * 3)
        for label, make_fleet, n in cases:
            fleet = make_fleet()
            methods = [("decomposed", "highs", "decomposed")]
            if not args.quick and n <= args.full_up_to:
                methods += [("full MILP, CBC", "cbc", "full"), ("full MILP, HiGHS", "highs", "full")]
            for name, solver, method in methods:
                progress.update(task, description=f"{label}: {name}")
                res = run(fleet, solver, method, None if method == "decomposed" else args.full_time_limit)
                rows.append({"case": label, "clients": n, "method": name, **res})
                progress.advance(task)
            progress.advance(task, 3 - len(methods))
    meta = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {sys.version.split()[0]}",
            "model": "llama-2-7b", "ranks": RANKS, "training": TRAINING.__dict__,
            "full_time_limit_s": args.full_time_limit, "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "end_to_end": e2e}, indent=2, default=float))
    print("| case | method | status | wall s | utility | round s | proven gap | distinct splits | plan.yaml | write s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gap = "n/a" if r.get("gap") is None else f"{100 * r['gap']:.3g}%"
        util = f"{r['utility']:.6f}" if "utility" in r else "-"
        rnd = f"{r['round_s']:.2f}" if "round_s" in r else "-"
        size = f"{r['plan_bytes'] / 1e3:,.0f} kB" if "plan_bytes" in r else "-"
        write = f"{r['write_s']:.2f}" if "write_s" in r else "-"
        print(f"| {r['case']} | {r['method']} | {r['status']} | {r['wall_s']:.2f} | {util} | {rnd} | {gap} | "
              f"{r.get('distinct_splits', '-')} | {size} | {write} |")


if __name__ == "__main__":
    main()
