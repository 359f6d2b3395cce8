"""Re-planning during a run (runtime/train/replan.py): a forced importance drift re-plans, moves the
adapters, is recorded, training goes on, and resume after a re-plan is exact; a plan made from rngwp
scores is re-scored with rngwp."""
import csv
import os

import pytest
from conftest import at_step, tiny_runtime_env
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from hsplit.planner.api import make_plan
from hsplit.planner.errors import ConfigError
from hsplit.planner.importance import Importance
from hsplit.planner.model import load_model_profile
from hsplit.planner.plan import DataSpec, Plan, Training
from hsplit.runtime.train import checkpoint
from hsplit.runtime.train import replan as replanning
from hsplit.runtime.outputs.evaluate import evaluate
from hsplit.runtime.train.loop import run
from hsplit.runtime.train.options import RunOptions
from hsplit.runtime.outputs.rundir import load_run

MODULES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    gen = tiny_runtime_env(tmp_path_factory, "replan", sources=("alpha", "beta"))
    root, model, text = next(gen)
    # slow devices + a round-time budget: only some adapters fit, so importance decides which
    dev = {"name": "slow", "kind": "cpu", "memory_gib": 1.0, "flops": {"fp32": 1e6},
           "uplink_mbps": 1000, "downlink_mbps": 1000}
    fleet = {"name": "tiny", "server": {"device": {**dev, "name": "srv", "flops": {"fp32": 1e12}}},
             "clients": [{"device": dev, "count": 1, "data_weight": 1.0, "budget": {"round_s": 20.0}},
                         {"device": {**dev, "name": "slow2", "flops": {"fp32": 2e6}}, "count": 1,
                          "data_weight": 2.0, "budget": {"round_s": 20.0}}]}
    (root / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    yield root, model, text
    next(gen, None)


def concentrated(prof, on_high: bool) -> dict[str, float]:
    mods = prof.resolve_modules(MODULES)
    return {prof.module_name(l, m): (1.0 if (l >= 2) == on_high else 1e-3) for l in range(prof.layers) for m in mods}


def plan_file(env, name, threshold=0.2, every=1, rounds=3, method="test"):
    root, model, text = env
    prof = load_model_profile(str(model))
    imp = Importance(scores=concentrated(prof, on_high=False), method=method, model_hash=prof.arch_hash(),
                     normalization="per-byte" if method == "rngwp" else "raw")
    plan = make_plan(root / "fleet.yaml", str(model), importance=imp, modules=MODULES, server_rank=4,
                     training=Training(batch_size=2, seq_len=32, local_steps=2, rounds=rounds, dtype="fp32",
                                       learning_rate=5e-3, warmup_steps=0, seed=0),
                     data=DataSpec(path=str(text), partition="by-source", eval_fraction=0.1))
    plan.replan = {"every": every, "threshold": threshold}
    path = root / f"{name}.yaml"
    plan.save(path)
    return path, prof


def measured_scores(monkeypatch, transform):
    """Replace what the runtime measures in each window: transform(round, scores) -> scores."""
    monkeypatch.setattr(replanning.Replanner, "window_scores", lambda self, r, scores: transform(r, scores))


@pytest.fixture
def drift(env, monkeypatch):
    """From round 2 on, the clients' importance concentrates on blocks 2-3 (the plan favours 0-1)."""
    prof = load_model_profile(str(env[1]))
    high = concentrated(prof, on_high=True)
    measured_scores(monkeypatch, lambda r, scores: scores if r < 2 else dict(high))


def opts(env, **kw):
    return RunOptions(runs_dir=env[0] / "runs", progress=False, **kw)


def global_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["client"] == "all"]


def test_drift_replans_moves_adapters_records_it_and_training_goes_on(env, drift):
    path, prof = plan_file(env, "drift")
    before = Plan.load(path)
    res = run(path, opts(env, name="drift"))
    g = global_rows(res.run_dir)
    assert [r["round"] for r in g] == ["0", "1", "2", "3"]
    assert g[1]["replan_shift"] == "" and g[1]["replan"] == ""      # round 1 sets the reference
    assert float(g[2]["replan_shift"]) > 0.2 and "split" in g[2]["replan"]
    new = Plan.load(res.run_dir / "plan-round-2.yaml")
    old_ranks = [before.client_ranks(c, prof) for c in before.clients]
    new_ranks = [new.client_ranks(c, prof) for c in new.clients]
    assert new_ranks != old_ranks
    assert any(int(n.split(".")[2]) >= 2 for r in new_ranks for n in r)        # adapters moved up
    assert new.inputs["importance_method"].startswith("runtime-sensitivity")
    assert new.replan == before.replan
    # round 3 trained with the new adapters: the checkpoint has their shapes
    state, t = checkpoint.load(res.run_dir, 3)
    assert state["replan"]["plan_file"] == "plan-round-2.yaml"
    keys = {k.split("/", 1)[1].rsplit(".", 1)[0] for k in t["adapters.safetensors"] if k.startswith("k0/")}
    assert keys == set(new.client_ranks(new.clients[0], prof)) | set(new.server_ranks(new.clients[0], prof))
    assert float(g[3]["train_loss"]) > 0 and g[3]["eval_loss"] != ""


@pytest.mark.parametrize("strategy", ["hsplitlora", "splitlora"])
def test_resume_after_a_replan_equals_an_uninterrupted_run(env, drift, strategy, monkeypatch):
    path, prof = plan_file(env, f"res-{strategy}", rounds=3)
    if strategy == "splitlora":
        plan = Plan.load(path)
        plan.strategy = "splitlora"
        # splitlora needs one rank per module everywhere: one split, rank 4 on every planned matrix
        for c in plan.clients:
            c.split_layer = 2
            c.ranks = {m: 4 for m in MODULES}
        plan.save(path)
        measured_scores(monkeypatch, lambda r, s: s if r < 2 else {n: (1.0 if ".layers.0." in n else 1e-3)
                                                                   for n in s})
    full = run(path, opts(env, name=f"full-{strategy}"))
    assert global_rows(full.run_dir)[2]["replan"] != ""         # re-planned at round 2

    class Stop(Exception):
        pass

    def kill(r, k, s):
        if r == 2:
            raise Stop
    with pytest.raises(Stop), monkeypatch.context() as m:
        at_step(m, kill)
        run(path, opts(env, name=f"cut-{strategy}"))
    assert checkpoint.complete_rounds(full.run_dir.parent / f"cut-{strategy}")[-1] == 2
    resumed = run(path, opts(env, name=f"cut-{strategy}", resume=True))
    _, a = checkpoint.load(full.run_dir, 3)
    _, b = checkpoint.load(resumed.run_dir, 3)
    for f in checkpoint.FILES:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    assert [r["eval_loss"] for r in global_rows(full.run_dir)] == [r["eval_loss"] for r in global_rows(resumed.run_dir)]
    # the run folder alone rebuilds the model in force after the re-plan (eval / export path)
    sim, _, last = load_run(resumed.run_dir)
    assert last == 3
    ev = evaluate(sim, sim.data.eval, 64)
    assert ev == pytest.approx(float(global_rows(full.run_dir)[3]["eval_loss"]), rel=1e-5)
    print(strategy, global_rows(full.run_dir)[2]["replan"])


def test_threshold_one_never_replans(env, drift):
    path, _ = plan_file(env, "never", threshold=1.0)
    res = run(path, opts(env, name="never"))
    g = global_rows(res.run_dir)
    assert float(g[2]["replan_shift"]) > 0.2 and all(r["replan"] == "" for r in g)
    assert not list(res.run_dir.glob("plan-round-*.yaml"))


def test_a_hand_written_plan_without_a_fleet_is_refused_at_start(env):
    path, _ = plan_file(env, "nofleet")
    plan = Plan.load(path)
    plan.inputs.pop("fleet")
    plan.save(path)
    with pytest.raises(ConfigError, match=r"replan.*inputs\.fleet"):
        run(path, opts(env, name="nofleet"))
    assert not (env[0] / "runs" / "nofleet").exists()


def test_splitlora_truncation_merges_the_cut_components_so_the_model_is_unchanged(env):
    from hsplit.runtime.strategies import RoundUpdate
    from hsplit.runtime.train.simulation import build
    from hsplit.runtime.train.loop import InProcess, Silent
    path, prof = plan_file(env, "trunc")
    plan = Plan.load(path)
    plan.strategy = "splitlora"
    for c in plan.clients:
        c.split_layer, c.ranks = 2, {m: 8 for m in MODULES}
    sim = build(plan, progress=False, device="cpu")
    ex = InProcess(sim, None)
    ex.aggregate(0, ex.train_round(0, Silent()))
    ids = sim.data.eval.input_ids[:2]

    def logits():
        sim.bank.activate(sim.eval_adapter())
        with torch.no_grad():
            out = sim.lm.model(input_ids=ids).logits
        sim.bank.activate(None)
        return out
    before = logits()
    new = Plan.from_dict(plan.to_dict(), "new")
    for c in new.clients:
        c.ranks = {m: 2 for m in MODULES}
    new.server_rank = 2
    update = RoundUpdate()
    replanning.apply_plan(sim, new, 0, update)
    assert all(a.shape[0] == 2 for a, _ in sim.bank.factors("global").values())
    # client side rank 8, server side rank 4 -> 2: the 6 / 2 cut components are merged
    assert update.merge and {a.shape[0] for _, a in update.merge.values()} == {6, 2}
    torch.testing.assert_close(logits(), before, rtol=1e-5, atol=1e-5)


def test_a_distributed_run_refuses_a_plan_that_replans(env, tmp_path):
    """Re-planning runs in-process only: the distributed server (an executor that cannot re-plan) refuses
    the plan before anything is written, instead of ignoring `replan:`."""
    from hsplit.planner.errors import ConfigError
    from hsplit.runtime.distributed.server import Server
    from hsplit.runtime.train.loop import rounds_loop

    class Executor:
        replans, sim = Server.replans, None
    path, _ = plan_file(env, "dist-replan")
    with pytest.raises(ConfigError, match="in-process only"):
        rounds_loop(Executor(), Plan.load(path), path, opts(env), tmp_path / "x", [], 1, [None])
    assert not (tmp_path / "x").exists()


def test_the_rescoring_method_follows_the_plans_importance(env):
    path, _ = plan_file(env, "which")
    plan = Plan.load(path)
    for made_with, method in [("rngwp (per-byte)", "rngwp"), ("runtime-rngwp (per-byte)", "rngwp"),
                              ("sensitivity (raw)", "sensitivity"), ("sensitivity (per-parameter)", "sensitivity"),
                              ("uniform", "sensitivity"), ("runtime-sensitivity (raw)", "sensitivity")]:
        plan.inputs["importance_method"] = made_with
        assert replanning.scoring_method(plan) == method, made_with


def test_an_rngwp_plan_is_rescored_with_rngwp_from_the_training_steps_and_drift_replans(env, monkeypatch):
    """The window is sum_k p_k mean over k's steps of |sum w dL/dw| / C(W) (rngwp_step_score, the
    function `hsplit importance --method rngwp` uses), smoothing starts from S = 0, and a drift re-plans."""
    path, prof = plan_file(env, "rngwp", method="rngwp")
    assert Plan.load(path).inputs["importance_method"] == "rngwp (per-byte)"
    high = concentrated(prof, on_high=True)
    real_score, real_begin = replanning.rngwp_step_score, replanning.Replanner.begin_round
    expected, measured, live = {}, [], {}

    def begin(self, r, on_step=None):
        live["rp"] = self
        live["names"] = {id(replanning._base_weight(self.sim.lm.model, n)): n for n in self.names}
        return real_begin(self, r, on_step)

    def spy(param, grad):                       # what the hook adds, recomputed from the same call
        v = real_score(param, grad)
        rp = live["rp"]
        k = rp._party.weight / sum(p.weight for p in rp.sim.parties) / rp.sim.steps_per_round
        name = live["names"][id(param)]
        expected[name] = expected.get(name, 0.0) + k * v
        return v

    def window(self, r, scores):
        measured.append((dict(scores), dict(expected)))
        expected.clear()
        return scores if r < 2 else dict(high)
    monkeypatch.setattr(replanning.Replanner, "begin_round", begin)
    monkeypatch.setattr(replanning, "rngwp_step_score", spy)
    monkeypatch.setattr(replanning.Replanner, "window_scores", window)
    res = run(path, opts(env, name="rngwp"))
    assert live["rp"].method == "rngwp"
    first, want = measured[0]
    assert set(first) == set(want) == set(live["rp"].names)      # every planned matrix, every step scored
    for n in first:
        assert first[n] == pytest.approx(want[n], rel=1e-12) and first[n] > 0
    state, _ = checkpoint.load(res.run_dir, 1)                     # S_1 = (1 - beta) * window_1 (S_0 = 0)
    total = sum(first.values())
    for n, v in state["replan"]["smoothed"].items():
        assert v == pytest.approx((1 - replanning.BETA) * first[n] / total, rel=1e-12)
    g = global_rows(res.run_dir)
    assert float(g[2]["replan_shift"]) > 0.2 and "split" in g[2]["replan"]
    new = Plan.load(res.run_dir / "plan-round-2.yaml")
    assert new.inputs["importance_method"] == "runtime-rngwp (per-byte)"
    assert replanning.scoring_method(new) == "rngwp"
    assert float(g[3]["train_loss"]) > 0
