"""One process of a distributed run: `torchrun ... -m hsplit.runtime.distributed.worker plan.yaml [options]`.

    HSPLIT_TOKEN=$(cat run.token) torchrun --nnodes 1 --nproc-per-node 3 -m hsplit.runtime.distributed.worker plan.yaml \\
        --name demo --timeout 120
    # rank 0: the server (writes runs/demo/); rank k: the plan's k-th client

The rank, world size and rendezvous address come from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Every process needs $HSPLIT_TOKEN (the run's shared secret) and the same
plan.yaml, model folder and data. Exit codes: 0 done, 2 refused / bad input, 3 a peer was lost (the
server prints the exact --resume command). See runtime/distributed/ and docs/runtime.md.
"""
from __future__ import annotations

import argparse
import os
import sys

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _at_least(lo: float, kind=int):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo:g}, got {text}")
        return v
    return parse


def parser() -> argparse.ArgumentParser:
    """The worker's flags, built from the fields of RunOptions and DistOptions (runtime/train/options.py)."""
    from dataclasses import MISSING

    from hsplit.runtime.train.options import DistOptions, RunOptions, flag, flags

    ap = argparse.ArgumentParser(prog="python -m hsplit.runtime.distributed.worker",
                                 description="One process (server = rank 0, client k = rank k) of a distributed run; "
                                             "start every process with torchrun (docs/runtime.md, Distributed).")
    ap.add_argument("plan", nargs="+", help="plan.yaml (several: run one after the other, each in runs/<stem>/)")
    for cls in (RunOptions, DistOptions):
        for f in flags(cls):
            default = None if f.default is MISSING else f.default
            help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, False) else "")
            if isinstance(default, bool):
                ap.add_argument(flag(f), dest=f.name, action="store_true", help=help_text)
                continue
            kind = float if isinstance(default, float) else int if "int" in str(f.type) else str
            parse = _at_least(f.metadata["min"], kind) if f.metadata.get("min") is not None else kind
            ap.add_argument(flag(f), dest=f.name, type=parse, default=default, help=help_text)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    missing = [v for v in TORCHRUN_ENV if not os.environ.get(v)]
    if missing:
        print(f"error: {', '.join(missing)} not set: start every process with torchrun (e.g. torchrun --nnodes 1 "
              f"--nproc-per-node K+1 -m hsplit.runtime.distributed.worker {' '.join(argv)}), or use `hsplit run PLAN "
              f"--distributed` on one machine", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hsplit.runtime.distributed.launcher import worker
    from hsplit.runtime.train.options import DistOptions, RunOptions, flags

    values = vars(a)
    opts = RunOptions(progress=False, **{f.name: values[f.name] for f in flags(RunOptions)})
    dopts = DistOptions(**{f.name: values[f.name] for f in flags(DistOptions)})
    code = worker(a.plan, opts, dopts, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)          # never wait on gloo threads of a lost peer


if __name__ == "__main__":
    sys.exit(main())
