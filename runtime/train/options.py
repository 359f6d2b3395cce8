"""The options of `hsplit run`, declared once: in-process runs, `--distributed` and the torchrun worker.

    opts = RunOptions(rounds=2, name="demo")
    dopts = DistOptions(timeout_s=120, min_clients=1)

Every field's `help` is the flag's help text; the worker's argument parser (runtime/distributed/worker.py) is
built from these fields, and the launcher turns options back into worker flags with `worker_flags`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


def _opt(default, help: str, flag: str | None = None, minimum: float | None = None):
    return field(default=default, metadata={"help": help, "flag": flag, "min": minimum})


@dataclass
class RunOptions:
    rounds: int | None = _opt(None, "rounds to train (default: the plan's)", minimum=1)
    name: str | None = _opt(None, "run folder name under --runs-dir (default: the plan file's stem)")
    runs_dir: str | Path = _opt("runs", "where run folders are written")
    resume: bool = _opt(False, "continue a killed run from its last complete round")
    eval_max_seqs: int = _opt(64, "held-out sequences evaluated after each round", "--eval-seqs", 1)
    progress: bool = True               # messages while loading and resuming (not a flag)
    device: str = _opt("auto", "auto | cpu | cuda")
    threads: int | None = _opt(None, "torch CPU threads", minimum=1)
    compute_dtype: str = _opt("auto", "auto (the plan's dtype; fp32 on CPUs without fast bf16) | fp32 | bf16 | fp16")
    wandb: str | None = _opt(None, "also log to this Weights & Biases project (needs `pip install wandb`; "
                                   "or set $HSPLIT_WANDB_PROJECT); TensorBoard logs are always in runs/NAME/tb")
    keep_checkpoints: int | None = _opt(None, "newest rounds that keep adapters + optimizer state (merged factors "
                                              "and metrics of every round stay; default: all)", minimum=1)


@dataclass
class DistOptions:
    timeout_s: float = _opt(300.0, "seconds to wait for an answer (a client's next step, the server's reply) "
                                   "before naming the silent process lost", "--timeout", 1)
    min_clients: int | None = _opt(None, "finish a round with this many clients when one is lost (default: all)",
                                   minimum=1)
    bind: str = _opt("127.0.0.1", "address this process's gloo device binds to")
    connect_timeout_s: float = _opt(120.0, "seconds for hsplit's rendezvous + handshake once torchrun has started "
                                           "the processes", "--connect-timeout", 1)
    quiet: bool = _opt(False, "a client prints errors only, not its rounds")


def flag(f) -> str:
    """The command-line flag of an options field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flags(cls) -> list:
    """The fields of an options class that are command-line flags."""
    return [f for f in fields(cls) if "help" in f.metadata]


def worker_flags(opts) -> list[str]:
    """The flags that give a worker these options (defaults left out)."""
    out = []
    for f in flags(type(opts)):
        v = getattr(opts, f.name)
        if v is None or v is False or v == f.default:
            continue
        out += [flag(f)] if v is True else [flag(f), f"{v:g}" if isinstance(v, float) else str(v)]
    return out
