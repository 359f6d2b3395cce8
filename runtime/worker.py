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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m hsplit.runtime.worker",
                                 description="One process (server = rank 0, client k = rank k) of a distributed run.")
    ap.add_argument("plan", nargs="+", help="plan.yaml (several: run one after the other, each in runs/<stem>/)")
    ap.add_argument("--name")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute-dtype", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--keep-checkpoints", type=int, help="newest rounds that keep adapters + optimizer state")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer (a client's next step, the server's reply) before naming the silent peer lost")
    ap.add_argument("--connect-timeout", type=float, default=120.0, help="seconds for rendezvous + handshake")
    ap.add_argument("--min-clients", type=int, help="finish a round with this many clients (default: all)")
    ap.add_argument("--bind", default="127.0.0.1", help="address this process binds to (default loopback)")
    ap.add_argument("--quiet", action="store_true", help="a client prints errors only, not its rounds")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hsplit.runtime.distributed import DistOptions, worker
    from hsplit.runtime.train import RunOptions

    opts = RunOptions(rounds=a.rounds, name=a.name, runs_dir=a.runs_dir, resume=a.resume, eval_max_seqs=a.eval_seqs,
                      progress=False, device=a.device, threads=a.threads, compute_dtype=a.compute_dtype,
                      keep_checkpoints=a.keep_checkpoints)
    dopts = DistOptions(timeout_s=a.timeout, min_clients=a.min_clients, bind=a.bind,
                        connect_timeout_s=a.connect_timeout, quiet=a.quiet)
    shown = ["torchrun", "--nnodes", "1", "--nproc-per-node", os.environ.get("WORLD_SIZE", "?"), "-m",
             "hsplit.runtime.worker", *argv]
    code = worker(a.plan, opts, dopts, shown)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)          # never wait on gloo threads of a lost peer


if __name__ == "__main__":
    main()
