"""Client sampling per round (the plan's `sampling:`): the same seed samples the same clients, aggregation
is re-weighted over them, unsampled clients keep their state exactly, a resumed run samples what the
uninterrupted one did, and sampling every client is the run without sampling."""
import csv
import os

import numpy as np
import pytest
import torch
from conftest import tiny_runtime_env

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.planner.sampling import Sampling, sample_clients, sampled_round_times
from hsplit.planner.strategies import NAMES as STRATEGIES
from hsplit.runtime.train import checkpoint
from hsplit.runtime.train.loop import run
from hsplit.runtime.train.options import RunOptions
from hsplit.runtime.train.partystore import PartyStore

pytestmark = pytest.mark.usefixtures("one_thread")
SPLIT_STRATEGIES = [s for s in STRATEGIES if s != "centralized"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_runtime_env(tmp_path_factory, "sampling")


def make_plan(env, name, strategy="hsplitlora", sampling=None, clients=5, **training):
    root, model, text = env
    t = {"batch_size": 2, "seq_len": 32, "local_steps": 2, "rounds": 3, "dtype": "fp32", "learning_rate": 5e-3,
         "lr_schedule": "cosine", "warmup_steps": 1, "seed": 0, "lora_dropout": 0.1, "max_grad_norm": 0.5}
    t.update(training)
    cs = []
    for i in range(clients):
        if strategy == "splitlora":
            cs.append({"id": f"c{i}", "device": "d", "split_layer": 2, "ranks": {"q_proj": 4, "v_proj": 4},
                       "data_weight": 1.0 + i})
        else:
            cs.append({"id": f"c{i}", "device": "d", "split_layer": 1 + i % 3,
                       "ranks": {"q_proj": 2 + 2 * (i % 2)}, "data_weight": 1.0 + i,
                       "predicted": {"round_s": 1.0 + i, "server_step_s": 0.01}})
    plan = {"model": str(model), "strategy": strategy, "server_rank": 4, "modules": ["q_proj", "v_proj"],
            "training": t, "data": {"path": str(text), "partition": "iid", "eval_fraction": 0.1}, "clients": cs}
    if sampling is not None:
        plan["sampling"] = sampling
    path = root / name
    Plan.from_dict(plan, name).save(path)
    return path


def opts(env, name, **kw):
    return RunOptions(runs_dir=env[0] / "runs", name=name, progress=False, eval_max_seqs=8, **kw)


def trained(run_dir) -> dict[int, list[str]]:
    with open(run_dir / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["client"] != "all"]
    out: dict[int, list[str]] = {}
    for r in rows:
        out.setdefault(int(r["round"]), []).append(r["client"])
    return out


# ---- the sampler ----

def test_the_same_seed_samples_the_same_clients_and_another_seed_others():
    w = [1.0 + (i % 7) for i in range(1000)]
    a = [sample_clients(0, r, w, 10) for r in range(20)]
    assert a == [sample_clients(0, r, w, 10) for r in range(20)]
    assert all(len(s) == len(set(s)) == 10 and s == sorted(s) for s in a)
    assert a != [sample_clients(1, r, w, 10) for r in range(20)]
    assert len({tuple(s) for s in a}) == 20            # rounds differ too


def test_weighted_sampling_draws_heavy_clients_more_often_and_uniform_does_not():
    w = [1.0] * 50 + [9.0] * 50
    heavy = sum(i >= 50 for r in range(400) for i in sample_clients(3, r, w, 5))
    assert heavy / 2000 > 0.8                           # successive sampling: ~0.9 of the draws
    uni = sum(i >= 50 for r in range(400) for i in sample_clients(3, r, w, 5, "uniform"))
    assert 0.4 < uni / 2000 < 0.6


def test_count_and_fraction_with_a_minimum():
    assert Sampling(clients_per_round=10).count(1000) == 10
    assert Sampling(clients_per_round=10).count(4) == 4
    assert Sampling(fraction=0.01, min_clients=2).count(1000) == 10
    assert Sampling(fraction=0.01, min_clients=2).count(100) == 2
    assert Sampling(fraction=0.29).count(100) == 29      # no float truncation to 28


def test_bad_sampling_fields_are_refused_with_field_and_fix(env):
    base = {"model": "smollm2-135m", "clients": [{"split_layer": 2}] * 3}
    with pytest.raises(ConfigError, match=r"sampling.clients_per_round: 4 is more than the plan's 3 clients"):
        Plan.from_dict({**base, "sampling": {"clients_per_round": 4}}, "p.yaml")
    with pytest.raises(ConfigError, match=r"sampling.fraction: must be in \(0, 1\]"):
        Plan.from_dict({**base, "sampling": {"fraction": 1.5}}, "p.yaml")
    with pytest.raises(ConfigError, match="sampling: give exactly one of clients_per_round"):
        Plan.from_dict({**base, "sampling": {"min_clients": 2}}, "p.yaml")
    with pytest.raises(ConfigError, match="no clients to sample"):
        Plan.from_dict({**base, "strategy": "centralized", "sampling": {"clients_per_round": 2}}, "p.yaml")
    with pytest.raises(ConfigError, match="replan"):
        Plan.from_dict({**base, "replan": {"every": 1}, "sampling": {"clients_per_round": 2}}, "p.yaml")
    p = Plan.from_dict({**base, "sampling": {"fraction": 0.5, "min_clients": 2, "by": "uniform"}}, "p.yaml")
    assert Plan.from_dict(p.to_dict(), "again").sampling == p.sampling


# ---- runs ----

def test_a_run_trains_only_the_sampled_clients_and_records_them(env):
    path = make_plan(env, "two-of-five.yaml", sampling={"clients_per_round": 2})
    res = run(path, opts(env, "two-of-five"))
    plan = Plan.load(path)
    w = [c.data_weight for c in plan.clients]
    want = {r + 1: [f"c{i}" for i in sample_clients(0, r, w, 2)] for r in range(3)}
    assert trained(res.run_dir) == want
    lines = (res.run_dir / "sampled.csv").read_text().splitlines()
    assert lines[1:] == [f"{r},{' '.join(ids)}" for r, ids in want.items()]
    # fleet time: the slowest sampled client each round (the planner's figure for the same rounds)
    g = [r for r in res.rows if r["client"] == "all"][1:]
    planned = sampled_round_times(plan.clients, plan.sampling, 0, 3, 2)
    assert [r["fleet_s"] for r in g] == pytest.approx([t for t, _, _ in planned])
    assert g[-1]["fleet_total_s"] == pytest.approx(sum(t for t, _, _ in planned))
    # only the sampled clients' state is written, once per round they trained
    store = PartyStore(res.run_dir / "clients")
    assert {k: v for k, v in store.versions.items()} == {
        f"k{i}": [r for r, ids in want.items() if f"c{i}" in ids] for i in range(5) if any(
            f"c{i}" in ids for ids in want.values())}


@pytest.mark.parametrize("strategy", ["hsplitlora", "hetlora"])
def test_a_sampled_run_reloads_for_eval_and_export_with_its_last_eval_loss(env, strategy):
    from hsplit.runtime.outputs.evaluate import evaluate
    from hsplit.runtime.outputs.rundir import load_run
    res = run(make_plan(env, f"reload-{strategy}.yaml", strategy, sampling={"clients_per_round": 2}, rounds=2),
              opts(env, f"reload-{strategy}", keep_checkpoints=1))
    sim, _, r = load_run(res.run_dir)
    assert r == 2 and not sim.active          # the aggregated model alone: no client is loaded
    assert evaluate(sim, sim.data.eval, 8) == pytest.approx(res.eval_after, rel=1e-6)
    store = PartyStore(res.run_dir / "clients")     # --keep-checkpoints 1: each client's newest state only
    assert all(len(v) == 1 for v in store.versions.values())


@pytest.mark.parametrize("strategy", SPLIT_STRATEGIES + ["hsplitlora-restart", "hsplitlora-bounded"])
def test_sampling_every_client_is_the_run_without_sampling(env, strategy):
    name = strategy.removesuffix("-restart").removesuffix("-bounded")
    extra = {"aggregation": strategy.rsplit("-", 1)[1]} if strategy.endswith(("-restart", "-bounded")) else {}
    a = make_plan(env, f"all-{strategy}.yaml", name, clients=3)
    b = make_plan(env, f"all-s-{strategy}.yaml", name, sampling={"clients_per_round": 3}, clients=3)
    for p in (a, b):
        if extra:
            plan = Plan.load(p)
            plan.aggregation = extra["aggregation"]
            plan.save(p)
    ra = run(a, opts(env, f"all-{strategy}"))
    rb = run(b, opts(env, f"all-s-{strategy}"))
    for x, y in zip(ra.rows, rb.rows):
        assert (x["round"], x["client"]) == (y["round"], y["client"])
        for key in ("train_loss", "eval_loss"):
            if x[key] is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (key, x, y)


def _party_after(run_dir, adapter):
    return PartyStore(run_dir / "clients").load(adapter)


def test_unsampled_clients_keep_their_state_exactly_hsplitlora_warm(env):
    path = make_plan(env, "keep.yaml", sampling={"clients_per_round": 2}, rounds=4)
    res = run(path, opts(env, "keep"))
    store = PartyStore(res.run_dir / "clients")
    sat_out = [(name, vs) for name, vs in store.versions.items() if len(vs) >= 2]
    assert sat_out
    # a client that trained in rounds v1 < v2: it starts v2 from its own factors and moments of v1
    # (its base offset reset to them): in round v2 it continues, so its AdamW step count grows
    for name, vs in sat_out:
        first = store.load(name, vs[0])
        second = store.load(name, vs[1])
        steps = [k for k in first if k.endswith("/step")]
        assert steps and all(float(second[k]) == float(first[k]) + 2 for k in steps)   # 2 local steps more
    # a client that sat a round out is the same in the store before and after that round
    plan = Plan.load(path)
    w = [c.data_weight for c in plan.clients]
    rounds = [sample_clients(0, r, w, 2) for r in range(4)]
    i = next(i for i in range(5) if any(i in s for s in rounds[:2]) and i not in rounds[2])
    v = max(r + 1 for r in range(2) if i in rounds[r])
    assert store.latest(f"k{i}", 3) == v          # nothing written while it sat out
    # drawn again, it starts from exactly what it left: factors, AdamW moments (its base offset reset to them)
    from hsplit.runtime.train.simulation import build, optimizer_tensors
    sim = build(plan, progress=False, device="cpu")
    sim.store = store
    p = sim.parties[i]
    sim.materialise([p], 4)                    # after the run: from its newest file
    saved = store.load(f"k{i}")
    for k, t in sim.bank.state(p.adapter).items():
        assert torch.equal(t, saved[f"adapter/{k}"])
    for side, opt in (("client", p.opt_client), ("server", p.opt_server)):
        for k, t in optimizer_tensors(opt).items():
            assert torch.equal(t, saved[f"{side}/{k}"])
    for m, (a, b) in sim.bank.factors(f"{p.adapter}_base").items():
        own = sim.bank.factors(p.adapter)[m]
        assert torch.equal(a, own[0]) and torch.equal(b, -own[1])


def test_aggregation_is_reweighted_over_the_sampled_clients(env):
    from hsplit.runtime.train.simulation import build
    plan = Plan.load(make_plan(env, "weights.yaml", sampling={"clients_per_round": 2}))
    sim = build(plan, progress=False, device="cpu")
    parties = sim.round_parties(0)
    sim.materialise(parties, 0)
    for p in parties:          # distinct factors per party
        for a, b in sim.bank.factors(p.adapter).values():
            torch.manual_seed(p.index)
            with torch.no_grad():
                b.copy_(torch.randn_like(b))
    update = sim.strategy.combine(parties)
    m = next(iter(update.merge))
    holders = [p for p in parties if m in p.ranks]
    w = np.array([p.weight for p in holders]) / sum(p.weight for p in holders)
    s = sim.training.lora_alpha_over_rank
    fs = [sim.bank.factors(p.adapter)[m] for p in holders]
    offs = [sim.bank.factors(f"{p.adapter}_base")[m] for p in holders]
    want = sum(wk * s * (b @ a + ob @ oa) for wk, (a, b), (oa, ob) in zip(w, fs, offs))
    b_cat, a_cat = update.merge[m]
    torch.testing.assert_close(b_cat @ a_cat, want.detach(), rtol=1e-5, atol=1e-6)


def test_a_resumed_run_samples_and_ends_as_the_uninterrupted_one(env, monkeypatch):
    from conftest import at_step
    path = make_plan(env, "resume.yaml", "hafl-truncation", sampling={"fraction": 0.4, "min_clients": 2}, rounds=4)
    full = run(path, opts(env, "resume-full"))

    def boom(r, i, s):
        if r == 2 and s == 1:
            raise KeyboardInterrupt
    with monkeypatch.context() as mp:
        at_step(mp, boom)
        with pytest.raises(KeyboardInterrupt):
            run(path, opts(env, "resume-cut"))
    cut = env[0] / "runs" / "resume-cut"
    assert checkpoint.complete_rounds(cut) == [0, 1, 2]
    res = run(path, opts(env, "resume-cut", resume=True))
    assert trained(res.run_dir) == trained(full.run_dir)
    _, a = checkpoint.load(full.run_dir, 4)
    _, b = checkpoint.load(res.run_dir, 4)
    for f in checkpoint.FILES:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=0, atol=0)
    sa, sb = PartyStore(full.run_dir / "clients"), PartyStore(res.run_dir / "clients")
    assert sa.versions == sb.versions
    for name in sa.versions:
        x, y = sa.load(name), sb.load(name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- distributed ----

DIST = SPLIT_STRATEGIES + ["hsplitlora-restart", "hsplitlora-bounded"]


@pytest.fixture(scope="module")
def dist_runs(env):
    """Every split strategy with 2 of 3 clients per round, distributed, in ONE launch of 4 processes."""
    from hsplit.runtime.distributed.launcher import launch_local
    from hsplit.runtime.train.options import DistOptions
    paths = []
    for s in DIST:
        # seed 1 samples c0 c2 | c0 c1 | c1 c2: c1 joins late, c2 sits round 2 out and comes back
        path = make_plan(env, f"dist-{s}.yaml", s.removesuffix("-restart").removesuffix("-bounded"),
                         sampling={"clients_per_round": 2}, clients=3, seed=1)
        if s.endswith(("-restart", "-bounded")):
            plan = Plan.load(path)
            plan.aggregation = s.rsplit("-", 1)[1]
            plan.save(path)
        paths.append(path)
    root = env[0]
    logs = root / "logs" / "dist"
    logs.mkdir(parents=True, exist_ok=True)
    o = RunOptions(runs_dir=root / "runs-dist", progress=False, threads=1, eval_max_seqs=8)
    code = launch_local(paths, o, DistOptions(timeout_s=60), env=dict(os.environ, HSPLIT_TOKEN="s3cret",
                                                                      OMP_NUM_THREADS="1"),
                        logs=logs, deadline_s=300)
    return code, {f.stem: f.read_text() for f in sorted(logs.iterdir())}


def assert_same_state(ref_dir, run_dir, r: int) -> None:
    """Checkpoint r and every client's saved state (factors, AdamW moments on both sides, what its strategy
    keeps) agree within 1e-5 between two run folders."""
    _, a = checkpoint.load(ref_dir, r)
    _, b = checkpoint.load(run_dir, r)
    for f in checkpoint.FILES:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=0, atol=1e-5)
    sa, sb = PartyStore(ref_dir / "clients"), PartyStore(run_dir / "clients")
    assert sa.versions == sb.versions
    for name in sa.versions:
        x, y = sa.load(name), sb.load(name)
        assert x.keys() == y.keys()
        for k in x:
            if "offset/" in k and k.endswith(".lora_B"):
                continue
            if "offset/" in k:      # hsplitlora bounded: owed factors come from an SVD, equal up to rotation
                kb = k[:-len("lora_A")] + "lora_B"
                torch.testing.assert_close(x[kb] @ x[k], y[kb] @ y[k], rtol=0, atol=1e-5)
                continue
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", DIST)
def test_distributed_run_with_sampling_equals_the_in_process_one(env, dist_runs, strategy):
    code, logs = dist_runs
    assert code == 0, logs
    ref = run(env[0] / f"dist-{strategy}.yaml", opts(env, f"ref-{strategy}"))
    run_dir = env[0] / "runs-dist" / f"dist-{strategy}"
    assert trained(run_dir) == trained(ref.run_dir)
    assert trained(run_dir) == {1: ["c0", "c2"], 2: ["c0", "c1"], 3: ["c1", "c2"]}
    assert_same_state(ref.run_dir, run_dir, 3)
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for got, want in zip(rows, ref.rows):
        for key in ("train_loss", "eval_loss", "tokens", "bytes_up", "bytes_down", "fleet_s"):
            if want.get(key) is not None:
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), (key, got, want)


# ---- the planner ----

def test_the_planner_charges_the_sampled_straggler_not_the_fleets(tmp_path):
    from hsplit.planner.api import make_plan as plan_fleet
    from hsplit.planner.plan import Training
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("server: {device: a100-80gb}\nclients:\n"
                     "  - {device: raspberry-pi-5-8gb, count: 2, data_weight: 1.0}\n"
                     "  - {device: jetson-orin-nano-8gb, count: 18, data_weight: 1.0}\n")
    training = Training(rounds=20, seed=4)
    full = plan_fleet(fleet, "smollm2-135m", training=training)
    p = plan_fleet(fleet, "smollm2-135m", training=training, sampling=Sampling(clients_per_round=3))
    assert [c.ranks for c in p.clients] == [c.ranks for c in full.clients]      # the same configurations
    rounds = sampled_round_times(p.clients, p.sampling, 4, 20, training.local_steps)
    by_hand = []
    for r in range(20):        # the slowest of the round's 3 clients (or the server's busy time for them)
        ids = sample_clients(4, r, [1.0] * 20, 3)
        t = max(p.clients[i].predicted["round_s"] for i in ids)
        busy = training.local_steps * sum(p.clients[i].predicted["server_step_s"] for i in ids)
        by_hand.append(max(t, busy))
    assert [t for t, _, _ in rounds] == pytest.approx(by_hand)
    pr = p.predicted
    assert pr["fleet_time_s"] == pytest.approx(sum(by_hand), abs=1e-3)
    assert pr["round_s"] == pytest.approx(np.mean(by_hand), abs=1e-3)
    # the merge download is charged for the holders of one round (3 clients), not all 20: never more
    assert pr["round_s_all_clients"] <= full.predicted["round_s"]
    pis = {c.id for c in p.clients if c.device.startswith("raspberry")}
    slow_rounds = [t for t, _, ids in rounds if not pis & {p.clients[i].id for i in ids}]
    assert slow_rounds and max(slow_rounds) < full.predicted["round_s"]      # rounds without a Pi are faster
    assert pr["round_s"] < full.predicted["round_s"]
    again = Plan.from_dict(p.to_dict(), "again")
    assert again.sampling == Sampling(clients_per_round=3)


def test_a_planned_sampled_run_reports_the_fleet_time_the_planner_predicted(env, tmp_path):
    """The solver charges the run's sampled rounds (planner/sampled.py); the run of that plan reports, round by
    round, the fleet time the plan predicts: worst round = round_s_max, mean = round_s, sum = fleet_time_s."""
    from hsplit.planner.api import make_plan as plan_fleet
    from hsplit.planner.plan import DataSpec, Training
    root, model, text = env
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("server: {device: a100-80gb}\nclients:\n"
                     "  - {device: raspberry-pi-5-8gb, count: 2, data_weight: 2.0}\n"
                     "  - {device: jetson-orin-nano-8gb, count: 4, data_weight: 1.0}\n")
    training = Training(batch_size=2, seq_len=32, local_steps=2, rounds=3, seed=0, learning_rate=5e-3)
    plan = plan_fleet(fleet, str(model), ranks=(0, 2, 4), modules=["q_proj", "v_proj"], server_rank=4,
                      training=training, sampling=Sampling(clients_per_round=2),
                      data=DataSpec(path=str(text), partition="iid", eval_fraction=0.1))
    path = root / "planned-sampled.yaml"
    plan.save(path)
    res = run(path, opts(env, "planned-sampled"))
    g = [r for r in res.rows if r["client"] == "all"][1:]
    assert len(g) == 3
    pr = Plan.load(path).predicted
    assert max(r["fleet_s"] for r in g) == pytest.approx(pr["round_s_max"], abs=2e-3)
    assert np.mean([r["fleet_s"] for r in g]) == pytest.approx(pr["round_s"], abs=2e-3)
    assert g[-1]["fleet_total_s"] == pytest.approx(pr["fleet_time_s"], abs=5e-3)


def test_the_solver_charges_the_server_for_the_sampled_clients_not_the_fleet(tmp_path):
    """A fleet whose round is the server's busy time for every client: sampled, the worst round is far shorter,
    and the solver's sampled objective is exactly the worst of the run's rounds."""
    from hsplit.planner.api import make_plan as plan_fleet
    from hsplit.planner.plan import Training
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("server: {device: rtx-3060-12gb}\nclients:\n  - {device: rtx-4090-24gb, count: 60}\n")
    training = Training(rounds=5, seed=1)
    full = plan_fleet(fleet, "smollm2-135m", training=training)
    assert full.predicted["straggler"] == "server"
    p = plan_fleet(fleet, "smollm2-135m", training=training, sampling=Sampling(clients_per_round=3))
    rounds = sampled_round_times(p.clients, p.sampling, 1, 5, training.local_steps)
    assert p.predicted["round_s_max"] == pytest.approx(max(t for t, _, _ in rounds), abs=1e-3)
    assert p.predicted["round_s_max"] < full.predicted["round_s"] / 2
    assert p.predicted["utility"] >= full.predicted["utility"] - 1e-9


def test_hsplit_plan_clients_per_round_writes_sampling_into_the_plan(tmp_path):
    from typer.testing import CliRunner
    from hsplit.cli import app
    out = tmp_path / "p.yaml"
    res = CliRunner().invoke(app, ["plan", "--fleet", "example", "--clients-per-round", "40%",
                                   "--min-clients-per-round", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    p = Plan.load(out)
    assert p.sampling == Sampling(fraction=0.4, min_clients=3) and p.sampling.count(len(p.clients)) == 3
    assert "3 of 5 clients per round" in res.output.replace("\n", " ")
    res = CliRunner().invoke(app, ["plan", "--fleet", "example", "--clients-per-round", "9", "-o", str(out)])
    assert res.exit_code == 2 and "--clients-per-round: 9 is more than the plan's 5 clients" in res.output


def test_a_resumed_distributed_run_with_sampling_equals_the_in_process_one(env):
    """Resume after round 2 (--rounds 3): c2 trained in round 1, sat round 2 out and trains in round 3 from
    the state the server sends it; the server's clients and checkpoints match the in-process run's."""
    from hsplit.runtime.distributed.launcher import launch_local
    from hsplit.runtime.train.options import DistOptions
    root = env[0]
    paths = [make_plan(env, f"dres-{s}.yaml", s, sampling={"clients_per_round": 2}, clients=3, seed=1)
             for s in ("hsplitlora", "hafl-truncation")]
    envv = dict(os.environ, HSPLIT_TOKEN="s3cret", OMP_NUM_THREADS="1")
    for rounds, resume in ((2, False), (3, True)):
        o = RunOptions(runs_dir=root / "runs-dres", progress=False, threads=1, eval_max_seqs=8, rounds=rounds,
                       resume=resume)
        logs = root / "logs" / f"dres-{rounds}"
        logs.mkdir(parents=True, exist_ok=True)
        code = launch_local(paths, o, DistOptions(timeout_s=60), env=envv, logs=logs, deadline_s=300)
        assert code == 0, {f.stem: f.read_text() for f in sorted(logs.iterdir())}
    for path in paths:
        name = path.stem
        run(path, opts(env, f"ires-{name}", rounds=2))
        ref = run(path, opts(env, f"ires-{name}", rounds=3, resume=True))
        run_dir = root / "runs-dres" / name
        assert trained(run_dir) == trained(ref.run_dir) == {1: ["c0", "c2"], 2: ["c0", "c1"], 3: ["c1", "c2"]}
        assert_same_state(ref.run_dir, run_dir, 3)


def test_hsplit_plan_check_reports_the_sampled_rounds(tmp_path):
    from typer.testing import CliRunner
    from hsplit.cli import app
    out = tmp_path / "p.yaml"
    assert CliRunner().invoke(app, ["plan", "--fleet", "example", "--clients-per-round", "2", "--rounds", "5",
                                    "-o", str(out)]).exit_code == 0
    res = CliRunner().invoke(app, ["plan", "--check", str(out), "--fleet", "example", "--format", "json"])
    assert res.exit_code == 0, res.output
    import json
    got = json.loads(res.stdout)["sampling"]
    pr = Plan.load(out).predicted
    # the plan's per-client round_s are written to 3 decimals: 5 rounds differ by up to 5 x 5e-4
    assert got["clients_per_round"] == 2 and got["fleet_time_s"] == pytest.approx(pr["fleet_time_s"], abs=3e-3)
    assert got["round_s_max"] == pytest.approx(pr["round_s_max"], abs=2e-3)
