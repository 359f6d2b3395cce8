"""Flower runs (a real SuperLink and real SuperNodes on loopback, `flwr run`, the hsplit Flower app) equal the
in-process simulation; TLS and SuperNode authentication; the activation stream refuses wrong and expired
tokens; a device killed mid-round is named and comes back; client sampling.

One module-scoped fleet (a SuperLink + SuperNodes a, b, c, d, ka, kb) serves every run; the runs start
together (`flwr run` processes in parallel) so that their Flower polls and ClientApp start-ups overlap.
Every process is stopped by the fixture (LocalFleet kills each process group); waits end on events
(a line in a log, a process exit), with generous deadlines only against a hang.
"""
import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_runtime_env

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from hsplit.planner.plan import Plan
from hsplit.planner.strategies import NAMES as STRATEGIES
from hsplit.runtime.train import checkpoint
from hsplit.runtime.distributed.wire import Refused
from hsplit.runtime.flower.certs import write_certs, write_node_key
from hsplit.runtime.flower.fleet import LocalFleet, write_app
from hsplit.runtime.train.loop import run
from hsplit.runtime.train.options import RunOptions

SPLIT_STRATEGIES = [s for s in STRATEGIES if s != "centralized"]
HANG_S = 900            # only against a hang: every wait below ends on an event


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_runtime_env(tmp_path_factory, "flower")


def make_plan(env, name, strategy="hsplitlora", clients=None, sampling=None, extra=None, **training):
    root, model, text = env
    t = {"batch_size": 2, "seq_len": 32, "local_steps": 2, "rounds": 2, "dtype": "fp32", "learning_rate": 5e-3,
         "lr_schedule": "cosine", "warmup_steps": 1, "seed": 0, "lora_dropout": 0.1, "max_grad_norm": 0.5}
    t.update(training)
    ids = clients or ["a", "b"]
    if strategy == "splitlora":
        cs = [{"id": c, "device": "d", "split_layer": 2, "ranks": {"q_proj": 4, "v_proj": 4, "down_proj": 4},
               "data_weight": 1.0 + i} for i, c in enumerate(ids)]
    else:
        shapes = [("pi", 1, {"q_proj": 2}), ("jetson", 3, {"q_proj": 8, "model.layers.1.mlp.down_proj": 4})]
        cs = [{"id": c, "device": shapes[i % 2][0], "split_layer": shapes[i % 2][1], "ranks": shapes[i % 2][2],
               "data_weight": 1.0 + i} for i, c in enumerate(ids)]
    d = {"model": str(model), "strategy": strategy, "server_rank": 4, "modules": ["q_proj", "v_proj", "down_proj"],
         "training": t, "data": {"path": str(text), "partition": "iid" if len(ids) > 3 else "by-source",
                                 "eval_fraction": 0.1}, "clients": cs}
    if sampling:
        d["sampling"] = sampling
    d.update(extra or {})
    path = root / name
    Plan.from_dict(d, name).save(path)
    return path


def app_for(env, plan, name, **config):
    root = env[0]
    return write_app(root / "apps" / name, plan, name=name, runs_dir=root / "runs-flower", eval_seqs=8,
                     timeout=600.0, connect_timeout=600.0, threads=1, **config)


def start_run(fleet, app, run_config=None):
    """`flwr run APP local --stream` in the background; (process, its output file)."""
    out = fleet.root / f"flwr-run-{app.name}.log"
    args = [str(Path(os.sys.executable).parent / "flwr"), "run", str(app), "local", "--stream"]
    if run_config:
        args += ["--run-config", " ".join(f"{k}={v}" for k, v in run_config.items())]
    return subprocess.Popen(args, env=fleet.env, stdout=open(out, "w"), stderr=subprocess.STDOUT), out


def wait_for_line(path: Path, text: str, proc=None) -> None:
    """Until `text` appears in the file (or the process that writes it ended, or a hang)."""
    end = time.monotonic() + HANG_S
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{path.name}: the process ended before printing {text!r}:\n"
                                 f"{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{path.name}: no {text!r}")


def rows_of(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def assert_equals_in_process(env, plan, run_dir, name, tol=1e-5, rounds=2):
    """Adapters (both sides), merges, server-side moments and metrics as the in-process run's. Client-side
    AdamW moments stay on the devices (never uploaded): the server's checkpoint has none."""
    ref = run(plan, RunOptions(runs_dir=env[0] / "runs-ref", name=name, progress=False, eval_max_seqs=8))
    assert checkpoint.complete_rounds(run_dir) == list(range(rounds + 1))
    _, a = checkpoint.load(ref.run_dir, rounds)
    _, b = checkpoint.load(run_dir, rounds)
    for f in checkpoint.FILES:
        want = {k: v for k, v in a[f].items() if "/client/" not in k} if f == "optimizer.safetensors" else a[f]
        assert want.keys() == b[f].keys(), f
        for k in want:
            torch.testing.assert_close(b[f][k], want[k], rtol=0, atol=tol, msg=lambda m: f"{f} {k}: {m}")
    got = rows_of(run_dir)
    assert [(r["round"], r["client"]) for r in got] == [(str(r["round"]), r["client"]) for r in ref.rows]
    for g, w in zip(got, ref.rows):
        for key in ("train_loss", "eval_loss", "tokens", "bytes_up", "bytes_down", "owed_dropped"):
            if w.get(key) is not None:
                assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-5, abs=1e-6), (key, g, w)


@pytest.fixture(scope="module")
def fleet_runs(env):
    """Every run of this module on one fleet, started together: each split strategy (a, b), client sampling
    2 of 4 (a, b, c, d), hsplitlora's bounded download with sampling 2 of 3 (a, b, c), and the fault run
    (ka, kb: kb is killed in round 1 and restarted)."""
    root = env[0]
    plans = {s: make_plan(env, f"fl-{s}.yaml", s) for s in SPLIT_STRATEGIES}
    plans["sampled"] = make_plan(env, "fl-sampled.yaml", "hsplitlora", clients=["a", "b", "c", "d"],
                                 sampling={"clients_per_round": 2})
    # bounded (the hand-written plans above have no aggregation: warm): seed 1 samples a c | a b | b c, so b
    # joins late (it owes round 1's merge) and c sits round 2 out and comes back; owed_rank 64 drops nothing on
    # the tiny matrices, so the devices' own copies of their blocks can equal the in-process run exactly
    plans["bounded"] = make_plan(env, "fl-bounded.yaml", "hsplitlora", clients=["a", "b", "c"],
                                 sampling={"clients_per_round": 2}, rounds=3, seed=1,
                                 extra={"aggregation": "bounded", "download": {"floor_rank": 2, "owed_rank": 64}})
    plans["kill"] = make_plan(env, "fl-kill.yaml", "hsplitlora", clients=["ka", "kb"], local_steps=300)
    with LocalFleet(root / "fleet") as fleet:
        fleet.start_link()
        for c in ("a", "b", "c", "d", "ka", "kb"):
            fleet.add_node(c, client=c, store=str(root / "stores" / c))
        runs = {}
        for key, plan in plans.items():
            extra = {"min_clients": 1, "rejoin_timeout": 600.0} if key == "kill" else {}
            runs[key] = start_run(fleet, app_for(env, plan, f"fl-{key}", **extra))
        # the fault: kill kb's SuperNode (and its ClientApp) once its round-1 stream is open, start it again
        wait_for_line(fleet.logs["kb"], "[hsplit client kb] round 1: stream open", runs["kill"][0])
        fleet.stop("kb")
        fleet.add_node("kb", client="kb", store=str(root / "stores" / "kb"))
        codes = {key: (p.wait(timeout=HANG_S), out.read_text(errors="replace")) for key, (p, out) in runs.items()}
        yield codes, plans, fleet


@pytest.mark.parametrize("strategy", SPLIT_STRATEGIES)
def test_flower_run_equals_the_in_process_simulation(env, fleet_runs, strategy):
    codes, plans, _ = fleet_runs
    code, out = codes[strategy]
    assert code == 0 and "done: 2 rounds" in out, out[-4000:]
    assert_equals_in_process(env, plans[strategy], env[0] / "runs-flower" / f"fl-{strategy}", f"ref-{strategy}")


def test_flower_sampling_2_of_4_equals_the_in_process_sampled_run(env, fleet_runs):
    codes, plans, _ = fleet_runs
    code, out = codes["sampled"]
    assert code == 0 and "done: 2 rounds" in out, out[-4000:]
    run_dir = env[0] / "runs-flower" / "fl-sampled"
    assert_equals_in_process(env, plans["sampled"], run_dir, "ref-sampled")
    sampled = (run_dir / "sampled.csv").read_text().splitlines()[1:]
    assert all(len(line.split(",")[1].split()) == 2 for line in sampled)


def test_flower_bounded_download_with_sampling_equals_the_in_process_run(env, fleet_runs):
    """hsplitlora `aggregation: bounded`: each device is sent only its truncated download (strategy.download) and
    applies it to its own copy of its blocks, kept in its store between messages; a device that joins late or
    sat a round out trains on its own copy while the server tracks what it owes. Any error in a device's copy
    shows in its losses and uploaded factors; the server evaluates the exact global model itself."""
    codes, plans, _ = fleet_runs
    code, out = codes["bounded"]
    assert code == 0 and "done: 3 rounds" in out, out[-4000:]
    run_dir = env[0] / "runs-flower" / "fl-bounded"
    assert Plan.load(plans["bounded"]).aggregation == "bounded"
    assert (run_dir / "sampled.csv").read_text().split() == ["round,clients", "1,a", "c", "2,a", "b", "3,b", "c"]
    assert_equals_in_process(env, plans["bounded"], run_dir, "ref-bounded", rounds=3)
    shipped = json.loads((run_dir / "traffic.json").read_text())["train_messages"]
    assert len(shipped) == 6 and {(m["round"], m["updates_bytes"] > 0) for m in shipped} == {
        (1, False), (2, True), (3, True)}        # round 1: nothing to apply yet


def test_a_device_killed_mid_round_is_named_and_rejoins_the_next_round(env, fleet_runs):
    codes, plans, fleet = fleet_runs
    code, out = codes["kill"]
    assert code == 0 and "done: 2 rounds" in out, out[-4000:]
    assert "error: client kb (rank 2, jetson) was lost in round 1: its stream" in out
    assert "continuing round 1 with 1 client(s) (--min-clients 1)" in out
    run_dir = env[0] / "runs-flower" / "fl-kill"
    faults = json.loads((run_dir / "faults.json").read_text())
    assert [(f["round"], f["client"], f["remaining"]) for f in faults] == [(1, "kb", ["ka"])]
    rows = rows_of(run_dir)
    assert [(r["round"], r["client"]) for r in rows if r["round"] != "0"] == [
        ("1", "ka"), ("1", "all"), ("2", "ka"), ("2", "kb"), ("2", "all")]     # the lost one, then back
    assert checkpoint.read_state(run_dir, 1)["live_clients"] == ["ka"]
    assert checkpoint.read_state(run_dir, 2)["live_clients"] == ["ka", "kb"]


# ---------------------------------------------------------------- TLS, node authentication, tokens

def test_tls_run_with_registered_nodes_equals_in_process_and_an_unregistered_node_is_refused(env):
    root = env[0] / "tls"
    certs = write_certs(root / "certs", ["127.0.0.1", "localhost"])
    plan = make_plan(env, "tls.yaml", "hsplitlora", rounds=2)
    with LocalFleet(root / "fleet", certs=root / "certs") as fleet:
        fleet.start_link()
        keys = {c: write_node_key(root / "keys", c) for c in ("a", "b", "intruder")}
        for c in ("a", "b"):
            r = fleet.register(keys[c][1])
            assert r.returncode == 0, r.stdout + r.stderr
        for c in ("a", "b"):
            fleet.add_node(c, key=keys[c][0], client=c, store=str(root / "stores" / c))
        intruder = fleet.add_node("intruder", key=keys["intruder"][0], max_retries=0, client="a",
                                  store=str(root / "stores" / "x"))
        app = app_for(env, plan, "tls", ssl_certfile=certs["server.pem"], ssl_keyfile=certs["server.key"],
                      ssl_ca_certfile=certs["ca.crt"], stream_bind="127.0.0.1:0")
        code, out = fleet.run(app, timeout_s=HANG_S)
        assert code == 0 and "done: 2 rounds" in out and "(TLS)" in out, out[-4000:]
        assert intruder.wait(timeout=HANG_S) != 0
        assert "Failed to activate SuperNode" in fleet.logs["intruder"].read_text()
    assert_equals_in_process(env, plan, env[0] / "runs-flower" / "tls", "ref-tls")


@pytest.mark.parametrize("tls", [False, True])
def test_the_stream_refuses_a_wrong_an_expired_and_another_clients_token(env, tls):
    """The ServerApp's admission (FlowerServer.check_hello/issue/expire) behind a real gRPC stream."""
    from types import SimpleNamespace
    from hsplit.runtime.flower.server import FlowerServer
    from hsplit.runtime.flower.stream import Hub, Stream, serve
    srv = FlowerServer.__new__(FlowerServer)
    srv.tokens, srv.expired = {}, {}
    srv.sim = SimpleNamespace(parties=[SimpleNamespace(id="a"), SimpleNamespace(id="b")])
    hub = Hub(srv.check_hello, timeout_s=60)
    certs = write_certs(env[0] / f"stream-certs-{tls}", ["127.0.0.1"]) if tls else None
    server, port = serve(hub, "127.0.0.1:0", certs["server.pem"].read_bytes() if tls else None,
                         certs["server.key"].read_bytes() if tls else None)
    ca = certs["ca.crt"].read_bytes() if tls else None
    addr = f"127.0.0.1:{port}"
    try:
        token = srv.issue(1, "client a's round 1")
        with pytest.raises(Refused, match="wrong token"):
            Stream.open(addr, ca, "not-a-token", "a", timeout_s=60)
        with pytest.raises(Refused, match="the token is client a's, not b's"):
            Stream.open(addr, ca, token, "b", timeout_s=60)
        s = Stream.open(addr, ca, token, "a", timeout_s=60)        # admitted
        from hsplit.runtime.distributed.wire import ACT
        s.send(0, ACT, [0, 0], [torch.ones(3)])
        m = hub.next(time.monotonic() + 60, {1})
        assert m.kind == ACT and m.ints == [0, 0] and torch.equal(m.tensors[0], torch.ones(3))
        s.close()
        srv.expire()                                                # the round is over
        with pytest.raises(Refused, match=r"token expired \(it admitted client a's round 1"):
            Stream.open(addr, ca, token, "a", timeout_s=60)
    finally:
        server.stop(grace=None)
