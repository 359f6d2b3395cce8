"""A run folder: where a run's outputs live, how it is started, resumed and reloaded, and its metrics.

    run_dir, done, rounds = prepare_run_dir(plan, plan_path, opts)   # refuses what cannot be resumed
    sim, config, r = load_run("runs/demo")                           # evaluation, generation, export
    cmd = resume_command(plan_path, run_dir, opts)                   # what the user types to continue

runs/<name>/: config.yaml (the resolved run configuration), metrics.csv (one row per client per round
and one `all` row per round), tb/ (TensorBoard, logs.py), checkpoints/round-NNNN/ (checkpoint.py),
plan-round-N.yaml (re-plans); with client sampling also sampled.csv (who trained in each round) and
clients/ (partystore.py).
"""
from __future__ import annotations

import csv
import io
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan, _plain
from hsplit.planner.sampling import round_time
from hsplit.planner.yamlio import atomic_write_text, dump_yaml, read_yaml
from hsplit.runtime.train import checkpoint, replan
from hsplit.runtime.train.options import RunOptions
from hsplit.runtime.train.simulation import Simulation, build

METRIC_FIELDS = ["round", "client", "device", "split_layer", "train_loss", "eval_loss", "eval_ppl", "tokens",
                 "wall_s", "fleet_s", "fleet_total_s", "bytes_up", "bytes_down", "lr", "aggregate_s",
                 "replan_shift", "replan", "owed_dropped"]
CONFIG_HEADER = "# Resolved run configuration (hsplit run)."


@dataclass
class RunResult:
    run_dir: Path
    rounds_done: int
    rows: list[dict]
    eval_before: float
    eval_after: float

    @classmethod
    def from_rows(cls, run_dir: Path, rounds: int, rows: list[dict]) -> "RunResult":
        final = [r for r in rows if r["client"] == "all"]
        return cls(run_dir=run_dir, rounds_done=rounds, rows=rows, eval_before=final[0]["eval_loss"],
                   eval_after=final[-1]["eval_loss"])

    @classmethod
    def of_run(cls, run_dir: Path) -> "RunResult":
        """From a run folder's checkpoints (e.g. one a distributed server wrote)."""
        done = checkpoint.complete_rounds(run_dir)
        rows = [row for r in done for row in checkpoint.read_state(run_dir, r).get("metrics", [])]
        return cls.from_rows(run_dir, done[-1], rows)


def run_dir_of(plan_path: Path, opts: RunOptions) -> Path:
    return Path(opts.runs_dir) / (opts.name or plan_path.stem)


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                    for k in METRIC_FIELDS})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def write_sampled(run_dir: Path, rows: list[dict]) -> None:
    """sampled.csv: the clients that trained in each round (client sampling), ids space-separated."""
    by_round: dict[int, list[str]] = {}
    for row in rows:
        if row["client"] != "all" and int(row["round"]) > 0:
            by_round.setdefault(int(row["round"]), []).append(str(row["client"]))
    atomic_write_text(run_dir / "sampled.csv", "round,clients\n" + "".join(
        f"{r},{' '.join(ids)}\n" for r, ids in sorted(by_round.items())))


class RunFinished(ConfigError):
    """`--resume` of a run that has already trained all its rounds: nothing to do (the CLI says so
    and exits 0; raised before the model is loaded)."""

    def __init__(self, run_dir: Path, rounds: int):
        self.run_dir, self.rounds = run_dir, rounds
        problem = f"already finished its {rounds} rounds; pass --rounds N (N > {rounds}) to train more"
        self.message = f"{run_dir} {problem}"
        super().__init__(str(run_dir), [problem])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run`: `message` says where it stopped, the last complete checkpoint and the
    command that resumes it (the CLI prints it and exits 130)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def resume_command(plan_path: Path, run_dir: Path, opts: RunOptions, resume: bool = True, extra=()) -> str:
    """The `hsplit run ... --resume` that continues this run with the options it was started with
    (resume=False: the command that starts it again; extra: more options, e.g. --distributed ones)."""
    cmd = ["hsplit", "run", str(plan_path), "--name", run_dir.name] + (["--resume"] if resume else [])
    if Path(opts.runs_dir) != Path("runs"):
        cmd += ["--runs-dir", str(opts.runs_dir)]
    if opts.rounds:
        cmd += ["--rounds", str(opts.rounds)]
    if opts.keep_checkpoints is not None:
        cmd += ["--keep-checkpoints", str(opts.keep_checkpoints)]
    if opts.wandb:
        cmd += ["--wandb", opts.wandb]
    if opts.eval_max_seqs != RunOptions.eval_max_seqs:
        cmd += ["--eval-seqs", str(opts.eval_max_seqs)]
    return shlex.join(cmd + list(extra))


def interrupted(plan_path: Path, run_dir: Path, opts: RunOptions, round_no: int | None, extra=()) -> RunInterrupted:
    done = checkpoint.complete_rounds(run_dir)
    if round_no is None:
        where = "while starting"
    elif done and done[-1] >= round_no:          # between the round's checkpoint and the next round
        where = f"after round {round_no}"
    else:
        where = f"in round {round_no}"
    if not done:
        return RunInterrupted(f"interrupted {where}, before the first checkpoint; nothing was written; start "
                              f"again with: {resume_command(plan_path, run_dir, opts, False, extra)}")
    return RunInterrupted(f"interrupted {where}; the last complete checkpoint is round {done[-1]} in {run_dir}; "
                          f"resume with: {resume_command(plan_path, run_dir, opts, True, extra)}")


def prepare_run_dir(plan: Plan, plan_path: Path, opts: RunOptions) -> tuple[Path, list[int], int]:
    """The run folder, its complete rounds and the number of rounds to train. Refuses to resume a run
    that has no complete checkpoint or was started with another plan, and to overwrite a run."""
    run_dir = run_dir_of(plan_path, opts)
    done = checkpoint.complete_rounds(run_dir)
    if opts.resume:
        if not (run_dir / "config.yaml").is_file() or not done:
            raise ConfigError(str(run_dir), ["--resume: no run with a complete checkpoint here; "
                                             "start it without --resume"])
        config = read_yaml(run_dir / "config.yaml")
        if config.get("plan") != _plain(plan.to_dict()):
            raise ConfigError(str(plan_path), [f"--resume: the plan differs from the one {run_dir} was started "
                                               "with (config.yaml); resume with that plan or use a new --name"])
        rounds = opts.rounds or int(config["run"]["rounds"])
        last = done[-1]
        if rounds < last:
            raise ConfigError(f"--rounds {rounds}", [f"{run_dir} has already completed {last} rounds, more than "
                                                     f"{rounds}; pass --rounds N (N > {last}) to train more"])
        if rounds == last:
            raise RunFinished(run_dir, last)
        return run_dir, done, rounds
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(str(run_dir), ["a run with this name exists: pass --resume to continue it, "
                                         "or --name NEW to start another"])
    return run_dir, done, opts.rounds or plan.training.rounds


def run_config(sim: Simulation, plan_path: Path, run_dir: Path, rounds: int, opts: RunOptions, **extra) -> dict:
    """config.yaml of a new run: the plan as written, how it runs, the data it got."""
    import torch
    return {"plan": Plan.load(plan_path).to_dict(),
            "run": {"rounds": rounds, "name": run_dir.name, "model_path": sim.lm.path, "hub_id": sim.lm.hub_id,
                    "model_origin": sim.lm.origin,
                    "model_hash": sim.lm.profile.arch_hash(), "eval_max_seqs": opts.eval_max_seqs,
                    "device": str(sim.device), "torch": str(torch.__version__),
                    "compute_dtype": str(sim.autocast_dtype or torch.float32).removeprefix("torch."), **extra},
            "data": sim.data.summary}


def set_config_rounds(run_dir: Path, rounds: int) -> None:
    """--resume with --rounds: the run's configuration says how many rounds it now trains."""
    old = read_yaml(run_dir / "config.yaml")
    old["run"]["rounds"] = rounds
    atomic_write_text(run_dir / "config.yaml", dump_yaml(old, CONFIG_HEADER))


def fleet_round(sim: Simulation, rows: list[dict]) -> float | None:
    if sim.sampling:        # the round's straggler is among its sampled clients (planner/sampling.py)
        index = {c.id: i for i, c in enumerate(sim.plan.clients)}
        ids = [index[r["client"]] for r in rows if r["client"] in index]
        return round_time(sim.plan.clients, ids, sim.training.local_steps)[0] if ids else None
    planned = sim.plan.predicted.get("round_s")
    if isinstance(planned, (int, float)):
        return float(planned)
    times = [r["fleet_s"] for r in rows if r.get("fleet_s") is not None]
    return max(times) if times else None


def round_rows(sim: Simulation, r: int, client_rows: list[dict], eval_loss: float, wall: float, agg_s: float,
               fleet_total: float | None) -> tuple[list[dict], float | None]:
    """Round r's metrics rows (every client's, then the fleet's "all" row, last) and the new fleet total."""
    fleet = fleet_round(sim, client_rows)
    fleet_total = fleet_total + fleet if fleet is not None and fleet_total is not None else None
    g = global_row(r + 1, client_rows, eval_loss, wall, agg_s, fleet_total, fleet)
    for row in client_rows:
        row.update(eval_loss=None, eval_ppl=None, fleet_total_s=None, aggregate_s=None)
    return client_rows + [g], fleet_total


def global_row(r, client_rows, eval_loss, wall, agg_s, fleet_total, fleet) -> dict:
    toks = sum(c["tokens"] for c in client_rows)
    loss = (sum(c["train_loss"] * c["tokens"] for c in client_rows) / toks) if toks else None
    return {"round": r, "client": "all", "device": "", "split_layer": "", "train_loss": loss,
            "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss) if eval_loss == eval_loss else None,
            "tokens": toks, "wall_s": wall, "fleet_s": fleet, "fleet_total_s": fleet_total,
            "bytes_up": sum(c["bytes_up"] for c in client_rows),
            "bytes_down": sum(c["bytes_down"] for c in client_rows),
            "lr": client_rows[-1]["lr"] if client_rows else None, "aggregate_s": agg_s}


def restore(sim: Simulation, run_dir: Path, last: int) -> list[dict]:
    """Replay rounds 1..last onto the fresh simulation; returns the metrics rows so far."""
    rows = []
    for r in range(0, last + 1):
        files = ("merged.safetensors",) if r < last else checkpoint.FILES
        state, tensors = checkpoint.load(run_dir, r, files)
        if r > 0 and tensors["merged.safetensors"]:
            sim.replay_merge(tensors["merged.safetensors"])
        rows += state.get("metrics", [])
        if r == last:
            replan.restore(sim, run_dir, state, r)      # the plan in force after re-plans
            sim.load_tensors(tensors["adapters.safetensors"], tensors["optimizer.safetensors"])
    return rows


def run_model(config: dict, planned: str) -> str:
    """The model a run trained, for eval / generate / export: the absolute folder it recorded
    (run.model_path), else its hub id (the run was trained elsewhere), else the plan's `model:` as written."""
    run = config.get("run") or {}
    path = run.get("model_path")
    if path and Path(path).is_dir():
        return str(path)
    return run.get("hub_id") or planned


def load_run(run_dir: str | Path, progress: bool = False, device: str = "cpu") -> tuple[Simulation, dict, int]:
    """Rebuild a run's aggregated model from its latest checkpoint: (simulation, config, round)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(str(run_dir), ["not a run folder (no config.yaml); runs are under runs/<name>"])
    config = read_yaml(cfg_path)
    plan = Plan.from_dict(config["plan"], str(cfg_path))
    plan.training.rounds = int(config["run"]["rounds"])
    plan.model = run_model(config, plan.model)
    done = checkpoint.complete_rounds(run_dir)
    if not done:
        raise ConfigError(str(run_dir), ["the run has no complete checkpoint yet"])
    sim = build(plan, progress=progress, device=device)
    restore(sim, run_dir, done[-1])
    return sim, config, done[-1]
