"""Starting the processes of a distributed run: the torchrun worker (one process, any rank) and the local
launcher behind `hsplit run plan.yaml --distributed` (every process on this machine, loopback).

    torchrun --nnodes 1 --nproc-per-node 3 -m hsplit.runtime.distributed.worker plan.yaml --name demo   # 2 clients
    code, result = run_local_cli("plan.yaml", RunOptions(name="demo"), DistOptions(min_clients=1))

Exit codes: 0 done, 2 refused / bad input, 3 a peer was lost (the server prints the --resume command).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.runtime.train import checkpoint
from hsplit.runtime.common import pick_device
from hsplit.runtime.distributed.auth import TOKEN_ENV
from hsplit.runtime.distributed.client import client_main
from hsplit.runtime.distributed.groups import connect
from hsplit.runtime.distributed.link import Link
from hsplit.runtime.distributed.server import Server, Stop, check_min_clients
from hsplit.runtime.distributed.wire import ABORT, EXIT_FAULT, EXIT_REFUSED, Refused, text_tensor
from hsplit.runtime.outputs.logs import wandb_project
from hsplit.runtime.train.options import DistOptions, RunOptions, worker_flags
from hsplit.runtime.outputs.rundir import RunResult, interrupted, prepare_run_dir, run_dir_of
from hsplit.runtime.outputs.rundir import resume_command as run_resume_command


def resume_command(worker_argv: list[str], env=None) -> tuple[str, str]:
    """(the torchrun command that resumes this run, where to run it), from torchrun's environment:
    one machine: the same `torchrun --nnodes 1 ...`; several: the machine's node rank and --bind
    address are left as placeholders, the rest is the server's command."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE") or 1)
    local = int(env.get("LOCAL_WORLD_SIZE") or world)
    nnodes = max(1, world // max(1, local))
    args = [a for a in worker_argv if a != "--resume"] + ["--resume"]
    if nnodes == 1:
        head = ["torchrun", "--nnodes", "1", "--nproc-per-node", str(world)]
        where = "resume with"
    else:
        head = ["torchrun", "--nnodes", str(nnodes), "--nproc-per-node", str(local), "--node-rank", "<i>",
                "--master-addr", env.get("MASTER_ADDR", "?"), "--master-port", env.get("MASTER_PORT", "?")]
        args = ["<this machine's address>" if i and args[i - 1] == "--bind" else
                "--bind=<this machine's address>" if a.startswith("--bind=") else a for i, a in enumerate(args)]
        where = "resume on every machine i (node rank i; --bind its own address) with"
    quoted = [a if a.startswith("<") else shlex.quote(a) for a in head + ["-m", "hsplit.runtime.distributed.worker"] + args]
    return " ".join(quoted), where


def _exit_with_parent(pid: int) -> None:
    """The launcher is gone (killed, even with SIGKILL): this process is orphaned, so it stops too."""
    while os.getppid() == pid:
        time.sleep(0.5)
    os._exit(EXIT_FAULT)


def worker(plan_paths, opts: RunOptions, dopts: DistOptions, argv: list[str] | None = None) -> int:
    """One process of a distributed run (rank from torchrun's environment). Returns the exit code.

    Several plans run one after the other on the same processes (each in runs/<plan stem>/ unless
    --name is given for a single plan): start-up (imports, rendezvous) is paid once, e.g. to compare
    strategies on one fleet."""
    rank = int(os.environ.get("RANK", "0"))
    say = lambda s: print(f"[hsplit rank {rank}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if os.environ.get("HSPLIT_PARENT_PID"):         # started by `hsplit run --distributed`: end with it
        threading.Thread(target=_exit_with_parent, args=(int(os.environ["HSPLIT_PARENT_PID"]),), daemon=True,
                         name="hsplit-parent-watch").start()
    if isinstance(plan_paths, (str, Path)):
        plan_paths = [plan_paths]
    if opts.threads:
        torch.set_num_threads(opts.threads)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if rank == 0 or not dopts.quiet:
        say(f"joining the run at {where} as {'the server' if rank == 0 else 'rank ' + str(rank)} "
            f"({os.environ.get('WORLD_SIZE', '?')} processes; waiting up to {dopts.connect_timeout_s:g} s for all)")
    try:
        store, pg, rank, world = connect(dopts.bind, dopts.connect_timeout_s)
    except Exception as e:
        say(f"error: cannot join the run (rendezvous at {where}): {str(e).splitlines()[0][:300]}")
        return EXIT_FAULT
    link = Link(pg, rank, [0] if rank else list(range(1, world)), dopts.timeout_s)
    for seq, plan_path in enumerate(plan_paths):
        o = opts if len(plan_paths) == 1 else dataclasses.replace(opts, name=None)
        code = _one_plan(Path(plan_path), o, dopts, link, store, rank, world, say, argv, seq)
        if code != 0:
            return code
    return 0


def _one_plan(plan_path: Path, opts: RunOptions, dopts: DistOptions, link: Link, store, rank: int, world: int,
              say, argv, seq: int) -> int:
    if rank != 0:
        try:
            return client_main(plan_path, link, store, rank, dopts, opts.device, opts.compute_dtype, say, seq)
        except ConfigError as e:
            say(f"error: {e}")
            return EXIT_REFUSED
    server = Server(plan_path, opts, dopts, link, store, world, say, seq)
    try:
        res = server.run()
        say(f"done: {res.rounds_done} rounds, held-out loss {res.eval_before:.4f} -> {res.eval_after:.4f}; "
            f"outputs in {res.run_dir}/")
        return 0
    except Refused as e:
        say(f"error: refused: {e}")
        return EXIT_REFUSED
    except ConfigError as e:
        say(f"error: {e}")
        for k in server.live:
            server.try_send(k, ABORT, [], [text_tensor(str(e))])
        server.link.flush(server.live, 10.0)
        return EXIT_REFUSED
    except Stop as e:
        done = checkpoint.complete_rounds(run_dir_of(plan_path, opts))
        if os.environ.get("HSPLIT_RESUME_CMD"):            # started by `hsplit run --distributed`
            cmd, where = os.environ["HSPLIT_RESUME_CMD"], "resume with"
        else:
            cmd, where = resume_command(argv or [])
            cmd = f"{TOKEN_ENV}=... {cmd}"
        say(f"error: stopping: {e.reason}. The last complete checkpoint is round {done[-1] if done else 0} "
            f"in {run_dir_of(plan_path, opts)}; {where}:\n    {cmd}")
        for k in server.live:
            server.try_send(k, ABORT, [], [text_tensor(e.reason)])
        server.link.flush(server.live, 10.0)
        time.sleep(0.5)           # let the clients read why before this process's sockets close
        return EXIT_FAULT


# ------------------------------------------------------------------ launching the local processes

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_args(plan_paths, opts: RunOptions, dopts: DistOptions) -> list[str]:
    """The worker command line that gives every process these options (options.worker_flags)."""
    args = [str(p) for p in ([plan_paths] if isinstance(plan_paths, (str, Path)) else plan_paths)]
    return args + worker_flags(opts) + worker_flags(dopts)


def launch_local(plan_paths, opts: RunOptions, dopts: DistOptions, nprocs: int | None = None,
                 env: dict | None = None, logs: Path | None = None, deadline_s: float | None = None,
                 on_start=None, resume_cmd: str | None = None, rank_env: dict | None = None,
                 rank_plans: dict | None = None) -> int:
    """Start the server and every client as local processes on `dopts.bind` (what `hsplit run
    --distributed` does); returns the server's exit code. Every process is killed on the way out.
    rank_env / rank_plans: per-rank environment changes (value None: unset) and plan files (tests)."""
    first = plan_paths if isinstance(plan_paths, (str, Path)) else plan_paths[0]
    n = nprocs or len(Plan.load(first).clients) + 1
    port = free_port(dopts.bind)
    base = dict(os.environ if env is None else env)
    base.setdefault(TOKEN_ENV, os.urandom(16).hex())
    base.update(MASTER_ADDR=dopts.bind, MASTER_PORT=str(port), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                HSPLIT_PARENT_PID=str(os.getpid()))
    if resume_cmd:
        base["HSPLIT_RESUME_CMD"] = resume_cmd
    procs = []
    args = worker_args(plan_paths, opts, dopts)
    handlers = {}
    if threading.current_thread() is threading.main_thread():     # SIGTERM / SIGHUP stop them all, as Ctrl-C
        handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for rank in range(n):
            e = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            for key, value in (rank_env or {}).get(rank, {}).items():
                if value is None:
                    e.pop(key, None)
                else:
                    e[key] = value
            a = args if rank not in (rank_plans or {}) else worker_args(rank_plans[rank], opts, dopts)
            a = a + (["--quiet"] if rank else [])         # the server reports for everyone
            out = open(logs / f"rank{rank}.log", "w") if logs else None
            # own session: a terminal's Ctrl-C reaches this process only, which stops them all (finally)
            procs.append(subprocess.Popen([sys.executable, "-m", "hsplit.runtime.distributed.worker", *a], env=e,
                                          stdout=out, stderr=subprocess.STDOUT if out else None,
                                          start_new_session=True))
        if on_start:
            on_start(procs)
        limit = None if deadline_s is None else time.monotonic() + deadline_s
        while procs[0].poll() is None:
            if limit is not None and time.monotonic() > limit:
                raise TimeoutError(f"the distributed run did not finish within {deadline_s:g} s")
            time.sleep(0.1)
        grace = time.monotonic() + 10            # FINISH was sent: the clients exit at once
        while any(p.poll() is None for p in procs) and time.monotonic() < grace:
            time.sleep(0.1)
        return procs[0].returncode
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_local_cli(plan_path, opts: RunOptions, dopts: DistOptions) -> tuple[int, RunResult | None]:
    """`hsplit run plan.yaml --distributed`: launch the server and every client locally. Returns the exit
    code and, when it is 0, the run's result; Ctrl-C or SIGTERM stops every process and raises
    rundir.RunInterrupted (where it stopped, the exact --resume command)."""
    plan = Plan.load(plan_path)                 # refuse bad input here, before starting any process
    if (missing := plan.data_path_problem()) is not None:
        raise ConfigError(str(plan_path), [missing])
    pick_device(opts.device)
    wandb_project(opts.wandb)                   # W&B asked for but not installed (the server logs to it)
    check_min_clients(plan, plan_path, dopts)
    run_dir, _, _ = prepare_run_dir(plan, Path(plan_path), opts)
    # the in-process run's --resume command (every option it was started with) plus the distributed ones
    extra = ["--distributed", "--timeout", f"{dopts.timeout_s:g}"] + (
        ["--min-clients", str(dopts.min_clients)] if dopts.min_clients else [])
    try:
        code = launch_local(plan_path, opts, dopts, resume_cmd=run_resume_command(Path(plan_path), run_dir, opts,
                                                                                 True, extra))
    except KeyboardInterrupt:
        done = checkpoint.complete_rounds(run_dir)
        if not done:
            shutil.rmtree(run_dir, ignore_errors=True)      # nothing half-written
        raise interrupted(Path(plan_path), run_dir, opts, done[-1] + 1 if done else None, extra) from None
    return code, (RunResult.of_run(run_dir) if code == 0 else None)
