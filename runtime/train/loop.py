"""`hsplit run plan.yaml`: the round loop, written once for the in-process simulation and the distributed
server. What differs sits behind an executor: `InProcess` here, `Server` in runtime/distributed/server.py.

    result = run("plan.yaml", RunOptions(rounds=2, name="demo"))
    # runs/demo/{config.yaml, metrics.csv, tb/, checkpoints/round-NNNN/}

The recipe (DESIGN.md "Runtime semantics"):
    evaluate the starting model (round 0) and checkpoint it, or restore the last checkpoint (--resume)
    for every round r:
        executor.train_round(r)        every client's local steps (step.py: the split step)
        executor.aggregate(r, rows)    the strategy combines every holder's adapters, everyone continues
        executor.evaluate()            held-out loss of the aggregated model
        re-plan when importance drifted (replan.py), checkpoint (atomic), append metrics.csv,
        log the round to TensorBoard (runs/NAME/tb) and, when asked, W&B (logs.py)
Clients are independent within a round, so the in-process simulation runs them one after the other
and gets what parallel clients get. With `sampling:` in the plan only the round's sampled clients
train (sim.round_parties), and only they are in memory: the others' state waits in the run folder
(runtime/train/partystore.py). Fleet time is what the planned fleet would take: the plan's predicted round
time (the straggler sets it), or with sampling the slowest sampled client's (or the server's busy time). All randomness is derived from (seed, round, client,
step): a resumed run ends with exactly the adapters of an uninterrupted one.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Protocol

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.planner.yamlio import atomic_write_text, dump_yaml, read_yaml
from hsplit.runtime.train import checkpoint, replan
from hsplit.runtime.common import pick_device
from hsplit.runtime.data.summary import summary_line
from hsplit.runtime.outputs.evaluate import evaluate
from hsplit.runtime.outputs.logs import RunLogs, wandb_project
from hsplit.runtime.train.options import RunOptions
from hsplit.runtime.data.partition import draw_data_partition
from hsplit.runtime.train.partystore import PartyStore
from hsplit.runtime.outputs.rundir import (CONFIG_HEADER, RunResult, global_row, interrupted, prepare_run_dir, restore,
                                   round_rows, run_config, set_config_rounds, write_metrics,
                                   write_sampled)
from hsplit.runtime.train.simulation import build
from hsplit.runtime.train.step import LocalServer, ServerSide, client_round, count_update_traffic


class Reporter(Protocol):
    """What `run` tells about its progress, e.g. cliutil.RoundBars; run(..., reporter=None) is silent."""
    def start_rounds(self, total: int, done: int) -> None: ...
    def start_round(self, r: int, steps: int) -> None: ...      # r: 0-based round index; steps: all clients'
    def advance(self) -> None: ...                              # one client step done
    def end_round(self, row: dict) -> None: ...                 # the round's `client == "all"` metrics row


class Silent:
    """The reporter that shows nothing."""
    def start_rounds(self, total: int, done: int) -> None: ...
    def start_round(self, r: int, steps: int) -> None: ...
    def advance(self) -> None: ...
    def end_round(self, row: dict) -> None: ...


class InProcess:
    """The executor of the in-process simulation: every party's both halves in this process."""
    replans = True

    def __init__(self, sim, eval_max_seqs: int | None):
        self.sim, self.eval_max_seqs = sim, eval_max_seqs
        self.side = ServerSide(sim)
        self.server = LocalServer(self.side)
        self.current = list(sim.active)       # the parties of the round being trained (all without sampling)

    def restore(self, run_dir: Path, last: int) -> list[dict]:
        return restore(self.sim, run_dir, last)

    def train_round(self, r: int, reporter, on_step=None) -> list[dict]:
        sim = self.sim
        self.current = parties = sim.round_parties(r)      # client sampling: only these are in memory
        sim.materialise(parties, r)
        self.side.begin_round(parties)

        def step(rr, i, s):
            if on_step:
                on_step(rr, i, s)
            reporter.advance()
        for p in parties:          # one after the other: each party's wall time starts with its turn
            self.side.rounds[p.index].start = time.perf_counter()
            client_round(sim, p, r, self.server, step)
        return self.side.rows(r, parties)

    def aggregate(self, r: int, rows: list[dict]):
        sim, parties = self.sim, self.current
        update = sim.strategy.combine(parties)      # weights renormalised over the round's parties
        sim.apply(update, r)
        count_update_traffic(sim.strategy, parties, rows, update)
        if sim.sampling:
            sim.release(parties, r + 1)             # their state to the run folder's store; out of memory
        return update, rows

    def evaluate(self) -> float:
        return evaluate(self.sim, self.sim.data.eval, self.eval_max_seqs)

    def checkpoint_state(self) -> dict:
        return {}

    def round_done(self, row: dict) -> None:
        pass


def rounds_loop(ex, plan: Plan, plan_path: Path, opts: RunOptions, run_dir: Path, done: list[int], rounds: int,
                where: list, reporter=None, config_extra: dict | None = None) -> RunResult:
    """Train rounds done[-1]+1 .. rounds (or 1.. for a new run) with executor `ex`; the one round loop."""
    sim, reporter = ex.sim, reporter or Silent()
    if plan.replan and not ex.replans:
        raise ConfigError(plan.source, ["replan: re-planning runs in-process only (hsplit run without "
                                        "--distributed); remove replan from the plan to run it distributed"])
    replanner = replan.Replanner.start(sim, run_dir, done[-1] if opts.resume else None)  # None: no replan
    if sim.sampling:        # the state of the clients that sit a round out (runtime/train/partystore.py)
        sim.store = PartyStore(run_dir / "clients", upto=done[-1] if opts.resume else 0)
    if opts.resume:
        checkpoint.remove_stale(run_dir)
        start = done[-1]
        rows = ex.restore(run_dir, start)
        set_config_rounds(run_dir, rounds)
    else:
        start = 0
        rows = [global_row(0, [], ex.evaluate(), 0.0, 0.0, 0.0, None)]
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            config = run_config(sim, plan_path, run_dir, rounds, opts, **(config_extra or {}))
            atomic_write_text(run_dir / "config.yaml", dump_yaml(config, CONFIG_HEADER))
            draw_data_partition(sim, plan, run_dir / "partition.png")
            if getattr(sim.data, "note", None):             # e.g. sources no client trains on
                print(sim.data.note, file=sys.stderr, flush=True)
            checkpoint.save(run_dir, 0, sim.tensors(None), {"metrics": rows, "strategy": plan.strategy})
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)      # nothing half-written
            raise
    write_metrics(run_dir, rows)
    logs = RunLogs.open(run_dir, read_yaml(run_dir / "config.yaml"), start, wandb_project(opts.wandb),
                        len(sim.parties))
    try:
        logs.log([row for row in rows if row["round"] == start])     # round 0, or the round resumed from
        return _rounds(ex, plan, opts, run_dir, rows, start, rounds, where, reporter, replanner, logs)
    finally:
        logs.close()


def _rounds(ex, plan: Plan, opts: RunOptions, run_dir: Path, rows: list[dict], start: int, rounds: int, where: list,
            reporter, replanner, logs: RunLogs) -> RunResult:
    sim = ex.sim
    fleet_total = next((r["fleet_total_s"] for r in reversed(rows) if r.get("fleet_total_s") is not None), 0.0)
    reporter.start_rounds(rounds, start)
    for r in range(start, rounds):
        where[0] = r + 1
        t0 = time.perf_counter()
        reporter.start_round(r, len(sim.round_parties(r)) * sim.steps_per_round)
        client_rows = ex.train_round(r, reporter, replanner.begin_round(r) if replanner else None)
        t1 = time.perf_counter()
        update, client_rows = ex.aggregate(r, client_rows)
        agg_s = time.perf_counter() - t1
        new_rows, fleet_total = round_rows(sim, r, client_rows, ex.evaluate(), time.perf_counter() - t0, agg_s,
                                           fleet_total)
        g = new_rows[-1]
        if replanner:      # re-score importance, maybe re-plan (runtime/train/replan.py)
            replanner.end_round(r, update, g)
        checkpoint.save(run_dir, r + 1, sim.tensors(update),
                        {"metrics": new_rows, "strategy": plan.strategy, **(replanner.state() if replanner else {}),
                         **ex.checkpoint_state()}, keep=opts.keep_checkpoints)
        rows += new_rows
        write_metrics(run_dir, rows)
        if sim.sampling:
            write_sampled(run_dir, rows)
        if sim.sampling and sim.store is not None and opts.keep_checkpoints is not None:
            sim.store.prune(checkpoint.complete_rounds(run_dir)[-opts.keep_checkpoints:])
        logs.log(new_rows)
        reporter.end_round(g)
        ex.round_done(g)
    return RunResult.from_rows(run_dir, rounds, rows)


def run(plan_path: str | Path, opts: RunOptions | None = None, reporter: Reporter | None = None) -> RunResult:
    """Execute a plan in-process (or resume it) and return where the outputs are. `reporter`: progress
    (cliutil's bars; None: silent)."""
    opts = opts or RunOptions()
    wandb_project(opts.wandb)          # W&B asked for but not installed: an error before any work
    if opts.threads:
        torch.set_num_threads(opts.threads)
    plan_path = Path(plan_path)
    plan = Plan.load(plan_path)
    if (missing := plan.data_path_problem()) is not None:      # before the model loads
        raise ConfigError(str(plan_path), [missing])
    pick_device(opts.device)                    # a bad --device is an error before anything is loaded
    run_dir, done, rounds = prepare_run_dir(plan, plan_path, opts)
    plan.training.rounds = rounds
    if rounds < 1:
        raise ConfigError(str(plan_path), ["--rounds must be >= 1"])
    if opts.resume and opts.progress:
        print(f"resuming {run_dir} from round {done[-1]}", file=sys.stderr, flush=True)
    where: list[int | None] = [None]            # the round being trained, for the Ctrl-C message
    try:
        sim = build(plan, progress=opts.progress, device=opts.device, compute=opts.compute_dtype)  # all checks
        if opts.progress:
            print(summary_line(sim.data.summary), file=sys.stderr, flush=True)
        return rounds_loop(InProcess(sim, opts.eval_max_seqs), plan, plan_path, opts, run_dir, done, rounds, where,
                           reporter)
    except KeyboardInterrupt:
        raise interrupted(plan_path, run_dir, opts, where[0]) from None
