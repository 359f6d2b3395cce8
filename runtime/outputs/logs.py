"""The logs people already read, written beside metrics.csv: TensorBoard event files and (opt-in) W&B.

    logs = RunLogs.open(run_dir, config, start=0, wandb_project=None)   # start: the round the run starts from
    logs.log(rows)            # metrics rows of one or more rounds (rundir.METRIC_FIELDS), step = round
    logs.close()

TensorBoard (`tensorboard --logdir runs/NAME/tb`): the fleet's scalars in tb/ (train/loss, eval/loss,
eval/perplexity, fleet/round_s, fleet/total_s, wall/round_s, bytes/up_mb, bytes/down_mb, train/lr,
train/tokens) and one run per client in
tb/clients/<id>/ with the same tags (train/loss, fleet/round_s, wall/round_s, bytes/*, train/tokens), so
TensorBoard draws the clients on one chart. Fleets of more than MAX_CLIENT_RUNS clients are logged per
device kind instead (tb/devices/<device>: mean loss, summed bytes), to keep the open files bounded.
A resumed run purges what was logged from its restart round on (TensorBoard's purge_step) and logs that
round again from the checkpoint, so no step appears twice even if the run died while logging.
W&B (`hsplit run --wandb PROJECT`, or $HSPLIT_WANDB_PROJECT): the same keys, step = round; the run id is
kept in wandb-id so that --resume continues the same W&B run; only rounds after the restart are sent.
"""
from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from hsplit.planner.errors import ConfigError

MAX_CLIENT_RUNS = 64
WANDB_ENV = "HSPLIT_WANDB_PROJECT"


def wandb_project(flag: str | None) -> str | None:
    """The W&B project asked for (the flag, else $HSPLIT_WANDB_PROJECT); checks that wandb is installed."""
    project = flag or os.environ.get(WANDB_ENV) or None
    if project is None:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        where = "--wandb" if flag else f"${WANDB_ENV}"
        raise ConfigError(where, [f"logging to Weights & Biases project {project!r} needs the wandb package, which "
                                  "is not installed: pip install wandb (and `wandb login`), or leave it out "
                                  "(TensorBoard logs are always written to runs/NAME/tb)"]) from None
    return project


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fleet_scalars(g: dict) -> dict[str, float]:
    """The tags of a round's `all` row."""
    out = {"train/loss": g.get("train_loss"), "eval/loss": g.get("eval_loss"), "eval/perplexity": g.get("eval_ppl"),
           "fleet/round_s": g.get("fleet_s"), "fleet/total_s": g.get("fleet_total_s"), "wall/round_s": g.get("wall_s"),
           "bytes/up_mb": (g.get("bytes_up") or 0) / 1e6, "bytes/down_mb": (g.get("bytes_down") or 0) / 1e6,
           "train/lr": g.get("lr"), "train/tokens": g.get("tokens")}
    return {k: float(v) for k, v in out.items() if _ok(v)}


def party_scalars(rows: list[dict]) -> dict[str, float]:
    """The tags of one client's row (or the mean / sum over a device kind's rows)."""
    toks = sum(r.get("tokens") or 0 for r in rows)
    loss = sum((r.get("train_loss") or 0) * (r.get("tokens") or 0) for r in rows) / toks if toks else None
    out = {"train/loss": loss, "fleet/round_s": max((r["fleet_s"] for r in rows if _ok(r.get("fleet_s"))), default=None),
           "wall/round_s": sum(r.get("wall_s") or 0 for r in rows),
           "bytes/up_mb": sum(r.get("bytes_up") or 0 for r in rows) / 1e6,
           "bytes/down_mb": sum(r.get("bytes_down") or 0 for r in rows) / 1e6, "train/tokens": toks}
    return {k: float(v) for k, v in out.items() if _ok(v)}


class RunLogs:
    def __init__(self, run_dir: Path, tb, wandb_run, by_device: bool, start: int):
        self.run_dir, self.tb, self.wandb, self.by_device, self.start = run_dir, tb, wandb_run, by_device, start
        self.party_writers: dict[str, object] = {}

    @classmethod
    def open(cls, run_dir: Path, config: dict, start: int, wandb_project: str | None = None,
             clients: int = 0) -> "RunLogs":
        """start: 0 for a new run, else the round the run resumes from (its rows are logged again)."""
        tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(run_dir / "tb"), purge_step=start if start else None)
        except ImportError:       # torch's writer needs the tensorboard package (a dependency)
            print("note: tensorboard is not installed: no TensorBoard logs (pip install tensorboard)",
                  file=sys.stderr, flush=True)
        run = _wandb_init(run_dir, config, wandb_project) if wandb_project else None
        return cls(run_dir, tb, run, clients > MAX_CLIENT_RUNS, start)

    def _party_writer(self, kind: str, name: str):
        key = f"{kind}/{name}"
        if key not in self.party_writers:
            from torch.utils.tensorboard import SummaryWriter
            self.party_writers[key] = SummaryWriter(str(self.run_dir / "tb" / kind / name),
                                                    purge_step=self.start if self.start else None)
        return self.party_writers[key]

    def log(self, rows: list[dict]) -> None:
        """Log the metrics rows of whole rounds (each round: its client rows, then its `all` row)."""
        by_round: dict[int, list[dict]] = defaultdict(list)
        for row in rows:
            by_round[int(row["round"])].append(row)
        for r, rr in sorted(by_round.items()):
            g = next((x for x in rr if x.get("client") == "all"), None)
            parties: dict[str, list[dict]] = defaultdict(list)
            for x in rr:
                if x.get("client") != "all":
                    parties[str(x.get("device") if self.by_device else x.get("client"))].append(x)
            kind = "devices" if self.by_device else "clients"
            flat: dict[str, float] = {}
            if g is not None:
                flat.update(fleet_scalars(g))
            for name, xs in parties.items():
                flat.update({f"{kind}/{name}/{k}": v for k, v in party_scalars(xs).items()})
            if self.tb is not None:
                if g is not None:
                    for k, v in fleet_scalars(g).items():
                        self.tb.add_scalar(k, v, r)
                for name, xs in parties.items():
                    w = self._party_writer(kind, name)
                    for k, v in party_scalars(xs).items():
                        w.add_scalar(k, v, r)
            if self.wandb is not None and flat and (r > self.start or self.start == 0):
                self.wandb.log(flat, step=r)
        self.flush()

    def flush(self) -> None:
        for w in [self.tb, *self.party_writers.values()]:
            if w is not None:
                w.flush()

    def close(self) -> None:
        for w in [self.tb, *self.party_writers.values()]:
            if w is not None:
                w.close()
        self.party_writers.clear()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_init(run_dir: Path, config: dict, project: str):
    import wandb
    id_file = run_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if run_id is None:
        run_id = wandb.util.generate_id() if hasattr(wandb, "util") else os.urandom(4).hex()
        id_file.write_text(run_id + "\n")
    plan = config.get("plan", {})
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                      config={"strategy": plan.get("strategy"), "model": plan.get("model"),
                              "training": plan.get("training"), "data": config.get("data"),
                              "clients": len(plan.get("clients", [])), "run": config.get("run")},
                      tags=["hsplit", str(plan.get("strategy"))])
