"""One process of a distributed run: `torchrun ... -m hsplit.runtime.worker plan.yaml [options]`.

    HSPLIT_TOKEN=$(cat run.token) torchrun --nnodes 1 --nproc-per-node 3 -m hsplit.runtime.worker plan.yaml \\
        --name demo --timeout 120
    # rank 0: the server (writes runs/demo/); rank k: the plan's k-th client

The rank, world size and rendezvous address come from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Every process needs $HSPLIT_TOKEN (the run's shared secret) and the same
plan.yaml, model folder and data. Exit codes: 0 done, 2 refused / bad input, 3 a peer was lost (the
server prints the exact --resume command). See runtime/distributed.py and docs/runtime.md.
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
    ap = argparse.ArgumentParser(prog="python -m hsplit.runtime.worker",
                                 description="One process (server = rank 0, client k = rank k) of a distributed run; "
                                             "start every process with torchrun (docs/runtime.md, Distributed).")
    ap.add_argument("plan", nargs="+", help="plan.yaml (several: run one after the other, each in runs/<stem>/)")
    ap.add_argument("--name", help="run folder name under --runs-dir (default: the plan file's stem)")
    ap.add_argument("--runs-dir", default="runs", help="where the server writes run folders (default: runs)")
    ap.add_argument("--rounds", type=_at_least(1), help="rounds to train (default: the plan's)")
    ap.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint (every process)")
    ap.add_argument("--eval-seqs", type=_at_least(1), default=64, help="held-out sequences evaluated after each round")
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda (default: cpu)")
    ap.add_argument("--compute-dtype", default="auto", help="auto | fp32 | bf16 | fp16 (default: the plan's dtype)")
    ap.add_argument("--threads", type=_at_least(1), help="torch CPU threads of this process")
    ap.add_argument("--keep-checkpoints", type=_at_least(1), help="newest rounds that keep adapters + optimizer state")
    ap.add_argument("--timeout", type=_at_least(1, float), default=300.0,
                    help="seconds to wait for an answer (a client's next step, the server's reply) before naming "
                         "the silent peer lost (default: 300)")
    ap.add_argument("--connect-timeout", type=_at_least(1, float), default=120.0,
                    help="seconds for hsplit's rendezvous + handshake once torchrun has started the processes")
    ap.add_argument("--min-clients", type=_at_least(1), help="finish a round with this many clients (default: all)")
    ap.add_argument("--bind", default="127.0.0.1", help="address this process binds to (default loopback)")
    ap.add_argument("--quiet", action="store_true", help="a client prints errors only, not its rounds")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    missing = [v for v in TORCHRUN_ENV if not os.environ.get(v)]
    if missing:
        print(f"error: {', '.join(missing)} not set: start every process with torchrun (e.g. torchrun --nnodes 1 "
              f"--nproc-per-node K+1 -m hsplit.runtime.worker {' '.join(argv)}), or use `hsplit run PLAN "
              f"--distributed` on one machine", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hsplit.runtime.distributed import DistOptions, worker
    from hsplit.runtime.train import RunOptions

    opts = RunOptions(rounds=a.rounds, name=a.name, runs_dir=a.runs_dir, resume=a.resume, eval_max_seqs=a.eval_seqs,
                      progress=False, device=a.device, threads=a.threads, compute_dtype=a.compute_dtype,
                      keep_checkpoints=a.keep_checkpoints)
    dopts = DistOptions(timeout_s=a.timeout, min_clients=a.min_clients, bind=a.bind,
                        connect_timeout_s=a.connect_timeout, quiet=a.quiet)
    code = worker(a.plan, opts, dopts, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)          # never wait on gloo threads of a lost peer


if __name__ == "__main__":
    sys.exit(main())
