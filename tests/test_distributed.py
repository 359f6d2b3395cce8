"""Distributed runs (server + 2 clients as processes on loopback) agree with the in-process simulation;
a killed client is named and handled; a process without the token or with another plan is refused.

Every test that starts processes goes through `launch_local(..., deadline_s=...)`, which kills every
process it started on the way out (no process outlives a test).
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import tiny_runtime_env
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from hsplit.planner.plan import Plan
from hsplit.runtime.train import checkpoint
from hsplit.planner.strategies import NAMES as STRATEGIES
from hsplit.runtime.distributed.launcher import launch_local
from hsplit.runtime.distributed.wire import EXIT_FAULT, EXIT_REFUSED, decode_tree, encode_tree
from hsplit.runtime.train.options import DistOptions
from hsplit.runtime.models.partial_load import held_bytes, load_part
from hsplit.runtime.train.loop import run
from hsplit.runtime.train.options import RunOptions

DEADLINE = 150


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_runtime_env(tmp_path_factory, "dist")


def make_plan(env, name, strategy="hsplitlora", **training):
    root, model, text = env
    t = {"batch_size": 2, "seq_len": 32, "local_steps": 3, "rounds": 2, "dtype": "fp32", "learning_rate": 5e-3,
         "lr_schedule": "cosine", "warmup_steps": 1, "seed": 0, "lora_dropout": 0.1, "max_grad_norm": 0.5}
    t.update(training)
    if strategy == "splitlora":      # one split, one rank everywhere
        clients = [{"id": c, "device": "d", "split_layer": 2, "ranks": {"q_proj": 4, "v_proj": 4, "down_proj": 4},
                    "data_weight": w} for c, w in (("a", 1.0), ("b", 2.0))]
    else:
        clients = [
            {"id": "a", "device": "pi", "split_layer": 1, "ranks": {"q_proj": 2}, "data_weight": 1.0,
             "predicted": {"round_s": 3.0}},
            {"id": "b", "device": "jetson", "split_layer": 3,
             "ranks": {"q_proj": 8, "model.layers.1.mlp.down_proj": 4}, "data_weight": 2.0,
             "predicted": {"round_s": 7.5}}]
    plan = Plan.from_dict({"model": str(model), "strategy": strategy, "server_rank": 4,
                           "modules": ["q_proj", "v_proj", "down_proj"], "training": t,
                           "data": {"path": str(text), "partition": "by-source", "eval_fraction": 0.1},
                           "clients": clients}, name)
    path = root / name
    plan.save(path)
    return path


def dist_run(env, path, name, token="s3cret", logs_name=None, dopts=None, **kw):
    root = env[0]
    logs = root / "logs" / (logs_name or name)
    logs.mkdir(parents=True, exist_ok=True)
    envv = dict(os.environ, HSPLIT_TOKEN=token, OMP_NUM_THREADS="1")
    if token is None:
        envv.pop("HSPLIT_TOKEN")
    opts = RunOptions(runs_dir=root / "runs", name=name, progress=False, threads=1, eval_max_seqs=8,
                      **{k: v for k, v in kw.items() if k in ("rounds", "resume")})
    code = launch_local(path, opts, dopts or DistOptions(timeout_s=60), env=envv, logs=logs,
                        deadline_s=DEADLINE, on_start=kw.get("on_start"))
    out = {f.stem: f.read_text() for f in sorted(logs.iterdir())}
    return code, out


def _after_round_0(run_dir, proc, sig, settle_s=0.5):
    """Once training has started (the server has written checkpoint 0), send `sig` to `proc`."""
    t0 = time.monotonic()
    while not checkpoint.complete_rounds(run_dir) and time.monotonic() - t0 < 90:
        time.sleep(0.05)
    time.sleep(settle_s)
    proc.send_signal(sig)


def _close(a: dict, b: dict, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=lambda m: f"{k}: {m}")


SPLIT_STRATEGIES = [s for s in STRATEGIES if s != "centralized"]     # whatever aggregate.py registers


RUNS = SPLIT_STRATEGIES + ["hsplitlora-bounded"]     # hsplitlora's bounded download as well as its default


def make_run_plan(env, name):
    if name == "hsplitlora-bounded":       # owed_rank 64: nothing dropped on the tiny matrices (exact equality)
        path = make_plan(env, f"eq-{name}.yaml", "hsplitlora")
        plan = Plan.load(path)
        plan.aggregation, plan.download = "bounded", {"floor_rank": 2, "owed_rank": 64}
        plan.save(path)
        return path
    return make_plan(env, f"eq-{name}.yaml", name)


@pytest.fixture(scope="module")
def dist_runs(env):
    """Every split strategy, distributed, in ONE launch of 3 processes (plans run one after the other)."""
    paths = [make_run_plan(env, s) for s in RUNS]
    root = env[0]
    logs = root / "logs" / "eq"
    logs.mkdir(parents=True, exist_ok=True)
    opts = RunOptions(runs_dir=root / "runs-dist", progress=False, threads=1, eval_max_seqs=8)
    code = launch_local(paths, opts, DistOptions(timeout_s=60), env=dict(os.environ, HSPLIT_TOKEN="s3cret"),
                        logs=logs, deadline_s=DEADLINE)
    return code, {f.stem: f.read_text() for f in sorted(logs.iterdir())}, paths


@pytest.mark.parametrize("strategy", RUNS)
def test_distributed_run_equals_the_in_process_simulation(env, dist_runs, strategy):
    code, logs, _ = dist_runs
    assert code == 0, logs
    path = env[0] / f"eq-{strategy}.yaml"
    ref = run(path, RunOptions(runs_dir=env[0] / "runs", name=f"ref-{strategy}", progress=False, eval_max_seqs=8))
    run_dir = env[0] / "runs-dist" / f"eq-{strategy}"
    assert checkpoint.complete_rounds(run_dir) == [0, 1, 2]
    _, a = checkpoint.load(ref.run_dir, 2)
    _, b = checkpoint.load(run_dir, 2)
    for f in checkpoint.FILES:              # every party's adapters (both sides), AdamW moments, merges
        _close(a[f], b[f])
    assert a["merged.safetensors"] or a["optimizer.safetensors"] or any(
        k.startswith("global/") for k in a["adapters.safetensors"])
    import csv
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], r["client"]) for r in rows] == [(str(r["round"]), r["client"]) for r in ref.rows]
    for got, want in zip(rows, ref.rows):
        for key in ("train_loss", "eval_loss", "tokens", "bytes_up", "bytes_down"):
            if want.get(key) is not None:
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), (key, got, want)


@pytest.mark.parametrize("aggregation", ["restart", "warm", pytest.param("bounded", marks=pytest.mark.slow)])
def test_a_killed_client_is_named_and_the_round_finishes_without_it(env, aggregation):
    # 400 local steps: round 1 lasts seconds even on an idle machine, and b is killed within 50 ms of the
    # round-0 checkpoint, so it is lost in round 1 whatever the machine's speed
    path = make_plan(env, f"kill-{aggregation}.yaml", "hsplitlora", rounds=2, local_steps=400)
    plan = Plan.load(path)
    plan.aggregation = aggregation
    plan.save(path)
    name = f"kill-{aggregation}"
    kill_client_2 = lambda procs: _after_round_0(env[0] / "runs" / name, procs[2], signal.SIGKILL,  # noqa: E731
                                                 settle_s=0.0)
    code, logs = dist_run(env, path, name, dopts=DistOptions(timeout_s=30, min_clients=1), on_start=kill_client_2)
    assert code == 0, logs
    assert "client b (rank 2, jetson) was lost in round 1" in logs["rank0"]
    faults = json.loads((env[0] / "runs" / name / "faults.json").read_text())
    assert faults[0]["client"] == "b" and faults[0]["remaining"] == ["a"]
    assert checkpoint.complete_rounds(env[0] / "runs" / name) == [0, 1, 2]
    state = checkpoint.read_state(env[0] / "runs" / name, 1)
    assert state["live_clients"] == ["a"]
    assert [r["client"] for r in state["metrics"]] == ["a", "all"]
    # the aggregate reached the lost client's state too. restart: every adapter is re-initialised after a
    # merge, so b's factors (trained for a few steps on the server side before the kill) are fresh again.
    # warm: b's offset is its own factors again, so its effective weights are the global model's
    _, t = checkpoint.load(env[0] / "runs" / name, 2)
    b_keys = [k for k in t["adapters.safetensors"] if k.startswith("k1/") and k.endswith("lora_B")]
    if aggregation == "restart":
        assert b_keys and all(not t["adapters.safetensors"][k].any() for k in b_keys)
    else:   # bounded: the own columns of its offset; what it missed (no download reached it) stays owed
        off = t["optimizer.safetensors"]
        assert b_keys and all(torch.equal(off["offset/" + k][:, :t["adapters.safetensors"][k].shape[1]],
                                          -t["adapters.safetensors"][k]) for k in b_keys)
        if aggregation == "bounded":
            owed = [off["offset/" + k][:, t["adapters.safetensors"][k].shape[1]:] for k in b_keys
                    if ".layers.0." in k or ".layers.1." in k or ".layers.2." in k]
            assert owed and max(float(o.abs().max()) for o in owed) > 0

    # --resume with one more round brings b back: both clients train round 3
    code, logs = dist_run(env, path, name, logs_name=f"{name}-resume", rounds=3, resume=True,
                          dopts=DistOptions(timeout_s=30, min_clients=1))
    assert code == 0, logs
    state = checkpoint.read_state(env[0] / "runs" / name, 3)
    assert state["live_clients"] == ["a", "b"]
    assert [r["client"] for r in state["metrics"]] == ["a", "b", "all"]


def test_lost_client_gets_the_global_adapter_for_every_strategy_that_keeps_one(env):
    """splitlora/hetlora/flexlora: a holder left out of the aggregation still receives the aggregate at its rank."""
    from hsplit.runtime.common import GLOBAL
    from hsplit.runtime.train.loop import InProcess, Silent
    from hsplit.runtime.train.simulation import build
    for strategy in ("splitlora", "hetlora", "flexlora"):
        sim = build(Plan.load(make_plan(env, f"lost-{strategy}.yaml", strategy)), progress=False, device="cpu")
        InProcess(sim, None).train_round(0, Silent())
        live = [sim.parties[0]]
        update = sim.strategy.combine(live)
        sim.apply(update, 0)
        a, b = sim.bank.factors("k0"), sim.bank.factors("k1")
        for m, (a1, b1) in b.items():
            ref = sim.bank.factors(GLOBAL)[m] if sim.global_ranks else a[m]
            r = a1.shape[0]
            torch.testing.assert_close(a1, ref[0][:r], rtol=0, atol=0)
            torch.testing.assert_close(b1, ref[1][:, :r], rtol=0, atol=0)


def test_a_lost_client_below_min_clients_stops_with_the_resume_command(env):
    path = make_plan(env, "stop.yaml", "hsplitlora", rounds=2, local_steps=400)     # a round of seconds

    kill_client_1 = lambda procs: _after_round_0(env[0] / "runs" / "stop", procs[1], signal.SIGKILL,  # noqa: E731
                                                 settle_s=0.0)
    code, logs = dist_run(env, path, "stop", dopts=DistOptions(timeout_s=30), on_start=kill_client_1)
    assert code == EXIT_FAULT, logs
    assert "client a (rank 1, pi) was lost in round 1" in logs["rank0"]
    assert "--resume" in logs["rank0"] and "hsplit.runtime.distributed.worker" in logs["rank0"]
    assert checkpoint.complete_rounds(env[0] / "runs" / "stop") == [0]
    assert "the server stopped the run" in logs["rank2"]

    # the printed --resume: every process starts again, and the run ends where an uninterrupted one does
    code, logs = dist_run(env, path, "stop", logs_name="stop-resume", resume=True, dopts=DistOptions(timeout_s=30))
    assert code == 0, logs
    assert checkpoint.complete_rounds(env[0] / "runs" / "stop") == [0, 1, 2]
    ref = run(path, RunOptions(runs_dir=env[0] / "runs", name="stop-ref", progress=False, eval_max_seqs=8))
    _, a = checkpoint.load(ref.run_dir, 2)
    _, b = checkpoint.load(env[0] / "runs" / "stop", 2)
    for f in checkpoint.FILES:
        _close(a[f], b[f])


def test_a_hung_client_is_named_after_the_timeout_and_exits_itself(env):
    """SIGSTOP (a client that stops answering without closing its connection): the server names it after
    --timeout and finishes the run with the other; once the client runs again it times out too and exits."""
    path = make_plan(env, "hung.yaml", "splitlora", rounds=2, local_steps=200)
    run_dir = env[0] / "runs" / "hung"

    def stop_client_2(procs):
        _after_round_0(run_dir, procs[2], signal.SIGSTOP, settle_s=0.0)
        t0 = time.monotonic()
        while not (run_dir / "faults.json").exists() and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        procs[2].send_signal(signal.SIGCONT)

    code, logs = dist_run(env, path, "hung", dopts=DistOptions(timeout_s=6, min_clients=1), on_start=stop_client_2)
    assert code == 0, logs
    assert "client b (rank 2, d) was lost in round 1: no answer within 6 s" in logs["rank0"]
    assert json.loads((run_dir / "faults.json").read_text())[0]["client"] == "b"
    assert checkpoint.complete_rounds(run_dir) == [0, 1, 2]
    assert "client b (rank 2)" in logs["rank2"] and "error:" in logs["rank2"]


def test_a_fast_client_waits_for_a_slow_one_longer_than_the_timeout(env):
    """A heterogeneous fleet: client a finishes its round and waits for b's (slowed down by being stopped
    1 s in every 1.25 s, like a throttled phone) for longer than --timeout in all. b answers every step in
    time, and a is not taken for lost nor takes the server for dead: the server's PINGs show it is alive.
    Behaviour only (nobody lost, both finish, PINGs sent): no wall-clock margin decides the outcome."""
    path = make_plan(env, "slow.yaml", "splitlora", rounds=1, local_steps=40)
    run_dir = env[0] / "runs" / "slow"
    timeout = 4

    def throttle_client_2(procs):
        _after_round_0(run_dir, procs[2], signal.SIGCONT, settle_s=0.0)
        t0 = time.monotonic()
        while 1 not in checkpoint.complete_rounds(run_dir) and procs[2].poll() is None and time.monotonic() - t0 < 120:
            procs[2].send_signal(signal.SIGSTOP)
            time.sleep(1.0)
            procs[2].send_signal(signal.SIGCONT)
            time.sleep(0.25)

    code, logs = dist_run(env, path, "slow", dopts=DistOptions(timeout_s=timeout, min_clients=1),
                          on_start=throttle_client_2)
    assert code == 0, logs
    assert not (run_dir / "faults.json").exists(), logs                    # nobody was taken for lost
    assert "was lost" not in logs["rank0"], logs
    assert checkpoint.complete_rounds(run_dir) == [0, 1]
    state = checkpoint.read_state(run_dir, 1)
    assert state["live_clients"] == ["a", "b"]                              # both finished the round
    traffic = json.loads((run_dir / "traffic.json").read_text())
    assert traffic["bytes_by_message"].get("PING", 0) > 0                  # the server told a it is alive


def test_processes_without_the_token_or_with_another_plan_are_refused(env):
    path = make_plan(env, "tok.yaml", rounds=1)
    other = make_plan(env, "tok-other.yaml", rounds=1, learning_rate=1e-3)     # same clients, another plan
    root = env[0]
    logs = root / "logs" / "tok"
    logs.mkdir(parents=True, exist_ok=True)
    opts = RunOptions(runs_dir=root / "runs", name="tok", progress=False, threads=1)
    code = launch_local(path, opts, DistOptions(timeout_s=60), env=dict(os.environ, HSPLIT_TOKEN="s3cret"),
                        logs=logs, deadline_s=DEADLINE, rank_env={1: {"HSPLIT_TOKEN": None}},
                        rank_plans={2: other})
    out = {f.stem: f.read_text() for f in sorted(logs.iterdir())}
    assert code == EXIT_REFUSED, out
    assert "client a (rank 1, pi) presented no token: set HSPLIT_TOKEN" in out["rank0"]
    assert "client b (rank 2, jetson) runs a different plan" in out["rank0"]
    assert "the server refused rank 1: client a (rank 1, pi) presented no token" in out["rank1"]
    assert "the server refused rank 2: client b (rank 2, jetson) runs a different plan" in out["rank2"]
    assert not (root / "runs" / "tok").exists()


def test_a_wrong_token_gives_another_mac():
    from hsplit.runtime.distributed.auth import token_mac
    assert token_mac("s3cret", "h", 1) == token_mac("s3cret", "h", 1)
    assert token_mac("s3cret", "h", 1) != token_mac("guess", "h", 1) != token_mac("s3cret", "h", 2)


def test_update_messages_round_trip_without_pickle():
    from hsplit.runtime.strategies import RoundUpdate
    u = RoundUpdate(merge={"m.q": (torch.ones(3, 2), torch.zeros(2, 4))}, reinit=True,
                    assign_party={"k0": {"m.q": (torch.ones(1, 4), torch.ones(3, 1))}})
    v = decode_tree(encode_tree(u), RoundUpdate)
    assert v.reinit is True and torch.equal(v.merge["m.q"][0], torch.ones(3, 2))
    assert torch.equal(v.assign_party["k0"]["m.q"][1], torch.ones(3, 1)) and v.assign == {}


def test_a_client_process_loads_only_its_part_of_the_model(env):
    model = env[1]
    whole = load_part(str(model), range(0, 4), embeddings=True, head=True)
    client = load_part(str(model), range(0, 1), embeddings=True, head=False)
    server = load_part(str(model), range(1, 4), embeddings=False, head=True)
    w, c, s = held_bytes(whole.model), held_bytes(client.model), held_bytes(server.model)
    cfg = whole.model.config
    emb, norm = cfg.vocab_size * cfg.hidden_size * 4, cfg.hidden_size * 4
    block = (w - emb - norm) // 4
    assert c == emb + block                       # embeddings + exactly one of the four blocks
    assert s == emb + 3 * block + norm            # tied head (the embedding tensor) + three blocks + norm


def test_hsplit_run_distributed_launches_the_processes_itself(env):
    """The user-facing command: `hsplit run plan.yaml --distributed` (no token set: it makes one)."""
    import subprocess
    import sys
    path = make_plan(env, "cli.yaml", "hsplitlora", rounds=1)
    runs = env[0] / "runs-cli"
    e = {k: v for k, v in os.environ.items() if k != "HSPLIT_TOKEN"}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # --rounds 2 on a 1-round plan: every process follows the server's horizon (the cosine LR schedule)
    out = subprocess.run([sys.executable, "-m", "hsplit.cli", "run", str(path), "--distributed", "--runs-dir",
                          str(runs), "--eval-seqs", "8", "--threads", "1", "--timeout", "60", "--keep-checkpoints", "1",
                          "--rounds", "2", "--format", "json"],
                         env=e, capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)                  # the in-process run's summary, plus what is distributed
    assert summary["run"] == str(runs / "cli") and summary["rounds"] == 2 and summary["lost_clients"] == []
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert checkpoint.complete_rounds(runs / "cli") == [0, 1, 2]
    assert not (checkpoint.round_dir(runs / "cli", 1) / "adapters.safetensors").exists()     # --keep-checkpoints 1
    ref = run(path, RunOptions(runs_dir=env[0] / "runs", name="cli-ref", progress=False, eval_max_seqs=8, rounds=2))
    assert summary["eval_loss_after"] == pytest.approx(ref.eval_after, abs=1e-6)
    _, a = checkpoint.load(ref.run_dir, 2)
    _, b = checkpoint.load(runs / "cli", 2)
    for f in checkpoint.FILES:
        _close(a[f], b[f])
    # bad input is refused before any process starts: an existing run, --min-clients above the plan's clients
    for extra, why in (([], "a run with this name exists: pass --resume"),
                       (["--name", "other", "--min-clients", "3"], "--min-clients 3: the plan has 2 clients; give 1..2"),
                       (["--name", "other", "--device", "cuda"], "--device cuda: CUDA is not available")):
        out = subprocess.run([sys.executable, "-m", "hsplit.cli", "run", str(path), "--distributed", "--runs-dir",
                              str(runs)] + extra, env=e, capture_output=True, text=True, timeout=DEADLINE)
        assert out.returncode == 2 and why in out.stderr and "rank" not in out.stderr, out.stderr
    assert not (runs / "other").exists()


def test_a_timeout_close_to_the_planned_step_time_is_warned_about(env):
    from hsplit.runtime.distributed.server import Server
    plan = Plan.load(make_plan(env, "steps.yaml", "splitlora"))
    plan.clients[1].predicted["step_s"] = 90.0
    plan.save(env[0] / "steps.yaml")
    said = []
    for timeout in (600, 200):
        Server(env[0] / "steps.yaml", RunOptions(), DistOptions(timeout_s=timeout), None, None, 3, said.append).warn_timeout()
    assert said == ["warning: the plan predicts steps of 90 s for client b; with --timeout 200 s a slow step may be "
                    "taken for a lost client: use --timeout 450 or more"]


def test_the_local_launcher_resume_command_keeps_every_option(env, monkeypatch):
    from hsplit.runtime.distributed import launcher as distributed
    path = make_plan(env, "rcmd.yaml", "splitlora")
    seen = {}
    monkeypatch.setattr(distributed, "launch_local", lambda *a, resume_cmd=None, **k: seen.update(cmd=resume_cmd) or 1)
    opts = RunOptions(runs_dir=env[0] / "runs-rcmd", name="x", eval_max_seqs=8, rounds=3, keep_checkpoints=1)
    assert distributed.run_local_cli(path, opts, DistOptions(min_clients=1, timeout_s=30)) == (1, None)
    assert seen["cmd"] == (f"hsplit run {path} --name x --resume --runs-dir {env[0] / 'runs-rcmd'} --rounds 3 "
                           "--keep-checkpoints 1 --eval-seqs 8 --distributed --timeout 30 --min-clients 1")


def test_the_readme_multi_machine_torchrun_commands_run_as_written(env):
    """README "Multi-machine runs", pulled out of the README: one `torchrun --nnodes 3 --node-rank i` per
    machine (here: three on loopback). Every process reports; the result equals the in-process run."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from hsplit.runtime.distributed.launcher import free_port
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Multi-machine runs", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    token_cmd = next(line for line in block.splitlines() if "run.token" in line and "secrets" in line)
    cmd = re.search(r"^HSPLIT_TOKEN=.*?torchrun .*?(?:\n(?! *#).*?)*$", block, re.M).group(0)
    cmd = cmd.replace("\\\n", " ")
    assert "--node-rank i" in cmd and "-m hsplit.runtime.distributed.worker plan.yaml" in cmd, cmd
    root = env[0] / "readme"
    root.mkdir()
    make_plan(env, "readme/plan.yaml", "hetlora", rounds=1)
    subprocess.run(["bash", "-c", token_cmd.split("#")[0].replace("python", sys.executable, 1)], cwd=root, check=True)
    cmd = (cmd.replace("torchrun", f"{sys.executable} -m torch.distributed.run", 1).replace("10.0.0.1", "127.0.0.1")
           .replace("29500", str(free_port())).replace("<this machine's address>", "127.0.0.1"))
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen(["bash", "-c", cmd.replace("--node-rank i", f"--node-rank {i}")], cwd=root, env=e,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for i in range(3)]
    try:
        out = [p.communicate(timeout=DEADLINE)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0, 0], out
    assert "2 client(s) joined with the run's token and plan" in out[0] and "done: 1 rounds" in out[0], out[0]
    for i, cid in ((1, "a"), (2, "b")):
        assert f"joined as client {cid}" in out[i] and "round 1: 3 step(s)" in out[i] and "done: 1 round(s)" in out[i], out[i]
    ref = run(root / "plan.yaml", RunOptions(runs_dir=root / "ref", name="ref", progress=False, eval_max_seqs=64))
    _, a = checkpoint.load(ref.run_dir, 1)
    _, b = checkpoint.load(root / "runs" / "fleet1", 1)
    for f in checkpoint.FILES:
        _close(a[f], b[f])


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launcher_stops_every_process(env, sig):
    """Ctrl-C (SIGINT) or SIGTERM to `hsplit run --distributed`: every process stops, the last checkpoint
    and the exact --resume command are printed (exit 130). SIGKILL: the orphaned processes end themselves."""
    import subprocess
    import sys
    path = make_plan(env, f"sig{sig}.yaml", "splitlora", rounds=200)
    runs = env[0] / "runs-sig"
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "hsplit.cli", "run", str(path), "--distributed", "--runs-dir",
                             str(runs), "--eval-seqs", "8", "--threads", "1", "--timeout", "60"], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = []
    try:
        _after_round_0(runs / f"sig{sig}", proc, 0)           # signal 0: only waits for checkpoint 0
        kids = _children(proc.pid)
        assert len(kids) == 3, kids
        status = [x for x in open(f"/proc/{proc.pid}/status").read().splitlines() if x.startswith(("SigBlk", "SigIgn"))]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        t0 = time.monotonic()
        while any(_alive(k) for k in kids) and time.monotonic() - t0 < 20:
            time.sleep(0.2)
        assert not [k for k in kids if _alive(k)], "worker processes outlived the launcher"
    finally:
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    if sig != signal.SIGKILL:
        assert proc.returncode == 130, (status, err)
        last = checkpoint.complete_rounds(runs / f"sig{sig}")[-1]
        assert (f"the last complete checkpoint is round {last} in {runs / f'sig{sig}'}; resume with: hsplit run {path} "
                f"--name sig{sig} --resume --runs-dir {runs} --eval-seqs 8 --distributed --timeout 60") in err, err


def test_the_worker_checks_its_flags_and_its_launcher():
    """Bad flags are one argparse line, not a traceback; without torchrun's environment it says to use torchrun."""
    import subprocess
    import sys
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for args, why in ((["p.yaml", "--timeout", "0"], "argument --timeout: must be >= 1, got 0"),
                      (["p.yaml", "--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
                      (["p.yaml", "--min-clients", "x"], "argument --min-clients: not a number: 'x'"),
                      (["p.yaml"], "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: start every process with torchrun")):
        out = subprocess.run([sys.executable, "-m", "hsplit.runtime.distributed.worker", *args], env=e, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "hsplit.cli", "run", "p.yaml", "--min-clients", "1"], env=e,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--min-clients applies to --distributed runs only" in out.stderr, out.stderr


def test_the_printed_resume_command_fits_how_the_processes_were_started():
    from hsplit.runtime.distributed.launcher import resume_command
    argv = ["plan.yaml", "--name", "f1", "--bind", "10.0.0.1", "--timeout", "600"]
    one = {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert resume_command(argv, one) == ("torchrun --nnodes 1 --nproc-per-node 3 -m hsplit.runtime.distributed.worker plan.yaml "
                                         "--name f1 --bind 10.0.0.1 --timeout 600 --resume", "resume with")
    three = {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    cmd, where = resume_command(argv + ["--resume"], three)
    assert cmd == ("torchrun --nnodes 3 --nproc-per-node 1 --node-rank <i> --master-addr 10.0.0.1 --master-port 29500 "
                   "-m hsplit.runtime.distributed.worker plan.yaml --name f1 --bind <this machine's address> --timeout 600 --resume")
    assert where == "resume on every machine i (node rank i; --bind its own address) with"


def test_the_cli_summary_names_a_client_lost_under_min_clients(env):
    """`hsplit run --distributed --min-clients 1`: a run that finished without a client says so at the end."""
    import subprocess
    import sys
    path = make_plan(env, "cli-kill.yaml", "hsplitlora", rounds=1, local_steps=400)   # a round of seconds
    runs = env[0] / "runs-cli-kill"
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "hsplit.cli", "run", str(path), "--distributed", "--runs-dir",
                             str(runs), "--eval-seqs", "8", "--threads", "1", "--timeout", "30", "--min-clients", "1"],
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _after_round_0(runs / "cli-kill", proc, 0, settle_s=0.0)          # b dies early in round 1
        rank2 = [k for k in _children(proc.pid) if b"RANK=2" in Path(f"/proc/{k}/environ").read_bytes().split(b"\0")]
        assert len(rank2) == 1
        os.kill(rank2[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "client b (rank 2, jetson) was lost in round 1" in err
    assert f"finished without b (round 1): see {runs / 'cli-kill' / 'faults.json'}" in out, out
    assert "held-out perplexity" in out


def test_a_client_receives_only_its_blocks_and_its_own_entries():
    from hsplit.runtime.strategies import RoundUpdate
    t = torch.zeros(2, 2)
    b, a = torch.zeros(8, 1), torch.zeros(1, 8)        # rank 1 of an 8 x 8 matrix: the stacked form is smaller
    mods = [f"model.layers.{l}.self_attn.q_proj" for l in (0, 1, 2, 12)]
    u = RoundUpdate(merge={m: (b, a) for m in mods}, assign={m: (t, t) for m in mods}, reinit=True,
                    global_factors={m: (t, t) for m in mods},
                    assign_party={"k0": {m: (t, t) for m in mods}, "k1": {m: (t, t) for m in mods}},
                    global_scores={m: t[0] for m in mods}, local_scores={"k1": {m: t[0] for m in mods}})
    mine = u.for_client("k1", 2)             # blocks 0 and 1 (not 12: "layers.1" is not "layers.12")
    want = mods[:2]
    assert list(mine.merge) == list(mine.assign) == list(mine.global_factors) == list(mine.global_scores) == want
    assert list(mine.assign_party) == ["k1"] and list(mine.assign_party["k1"]) == want
    assert list(mine.local_scores) == ["k1"] and list(mine.local_scores["k1"]) == want and mine.reinit
    assert u.for_client("k0", 2).local_scores == {}
    assert len(encode_tree(mine)) < len(encode_tree(u)) / 2


@pytest.mark.parametrize("aggregation", ["warm", "restart", "bounded"])
def test_the_planned_merge_download_is_what_a_client_receives(env, aggregation):
    """hsplitlora: the planner's merge download per client (api.merge_download_bytes, reported as
    predicted.merge_download_mb) = the bytes of the merge the server sends that client (RoundUpdate.for_client:
    per matrix the stacked factors or the dense update, whichever is smaller) after a round, exactly; clients with different splits, so that one
    downloads the other's server-side adapters on its blocks too."""
    import numpy as np
    from conftest import random_instance

    from hsplit.planner.api import merge_download_bytes
    from hsplit.planner.evaluate import Config
    from hsplit.planner.instance import build_instance
    from hsplit.planner.model import load_model_profile
    from hsplit.runtime.train.simulation import build
    root, model, text = env
    kw = random_instance(0, two_clients=True)
    inst = build_instance(kw["fleet"], load_model_profile(str(model)), ranks=(0, 2, 4, 8),
                          modules=["q_proj", "v_proj"], training=kw["training"], server_rank=2,
                          aggregation=aggregation)
    r0 = np.zeros((inst.L, 2), dtype=np.int64)
    r0[0] = (2, 4)
    r1 = np.zeros((inst.L, 2), dtype=np.int64)
    r1[:3, 0] = 8
    configs = [Config(1, r0), Config(3, r1)]
    want = merge_download_bytes(inst, configs)
    mods = [f"self_attn.{m}" for m in ("q_proj", "v_proj")]
    clients = [{"id": f"c{k}", "device": "d", "split_layer": cfg.split,
                "ranks": {f"model.layers.{l}.{mods[j]}": int(cfg.ranks[l, j]) for l, j in zip(*np.nonzero(cfg.ranks))}}
               for k, cfg in enumerate(configs)]
    plan = Plan.from_dict({"model": str(model), "strategy": "hsplitlora", "server_rank": 2, "modules": mods,
                           "aggregation": aggregation, "training": {"batch_size": 2, "seq_len": 32, "local_steps": 1},
                           "data": {"path": str(text), "eval_fraction": 0.1}, "clients": clients}, "merge.yaml")
    if aggregation == "bounded":
        plan.download = {"floor_rank": inst.floor_rank}
    sim = build(plan, progress=False)
    update = sim.strategy.combine(sim.parties)
    sim.apply(update, 0)            # bounded: each client's download is computed as the round is applied
    for k, p in enumerate(sim.parties):
        got = update.for_client(p.adapter, p.split)
        sent = (sum(4 * (b.numel() + a.numel()) for b, a in got.merge.values())     # stacked factors
                + sum(4 * d.numel() for d in got.dense.values())                      # dense updates
                + sum(4 * (b.numel() + a.numel()) for b, a in got.download.get(p.adapter, {}).values()))
        assert sent == want[k] == sim.strategy.traffic(p, update)[1] > 0, (k, sent, want[k])
    if aggregation == "bounded":     # rank max(q, floor) per matrix: c1 gets rank 8 on q of blocks 0-2, not more
        assert want[1] <= 4 * (8 * 3 * 128 + 2 * 3 * 96)
        return
    assert want[1] > want[0] + 4 * 2 * 2 * inst.widths.sum()     # c1 gets c0's server-side adapters of blocks 1-2
