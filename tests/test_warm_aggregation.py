"""hsplitlora's warm exact aggregation: every holder keeps its adapter and AdamW moments, only its frozen base
moves, and the global model is exactly W_0 + the p-weighted aggregate of every holder's update; heterogeneous
ranks, clients split at different blocks (client- and server-held copies of one matrix), export, re-planning
and the cheaper exact form of a client's download. (Resume, distributed equality and lost clients run the
warm default through tests/test_runtime_train.py, test_distributed.py and test_golden_runs.py.)"""
from pathlib import Path

import pytest
import torch
from conftest import tiny_runtime_env

from hsplit.planner.plan import Plan
from hsplit.runtime.train.loop import InProcess, Silent, run
from hsplit.runtime.train.options import RunOptions
from hsplit.runtime.train.simulation import build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_runtime_env(tmp_path_factory, "warm")


def make_plan(env, name, aggregation="warm", rounds=2, **training):
    root, model, text = env
    t = {"batch_size": 2, "seq_len": 32, "local_steps": 3, "rounds": rounds, "dtype": "fp32", "learning_rate": 2e-2,
         "warmup_steps": 0, "seed": 0, "lora_dropout": 0.1, "max_grad_norm": 1.0, **training}
    clients = [{"id": "a", "device": "pi", "split_layer": 1, "ranks": {"q_proj": 2}, "data_weight": 1.0},
               {"id": "b", "device": "jetson", "split_layer": 3,
                "ranks": {"q_proj": 8, "model.layers.1.mlp.down_proj": 4}, "data_weight": 2.0},
               {"id": "c", "device": "laptop", "split_layer": 2, "ranks": {"v_proj": 4}, "data_weight": 0.5}]
    plan = Plan.from_dict({"model": str(model), "strategy": "hsplitlora", "server_rank": 4, "aggregation": aggregation,
                           "modules": ["q_proj", "v_proj", "down_proj"], "training": t,
                           "data": {"path": str(text), "partition": "by-source", "eval_fraction": 0.1},
                           "clients": clients}, name)
    plan.save(Path(root) / name)
    return Path(root) / name


def effective(sim, p) -> dict[str, torch.Tensor]:
    """Party p's effective weight of every matrix it adapts: shared base + s B A + its frozen offset (fp64)."""
    s = sim.training.lora_alpha_over_rank
    off = sim.bank.factors(sim.strategy.offset(p))
    out = {}
    for m, (a, b) in sim.bank.factors(p.adapter).items():
        oa, ob = off[m]
        out[m] = (sim.bank.base_weight(m).double() + s * (b.double() @ a.double())
                  + s * (ob.double() @ oa.double()))
    return out


def test_the_global_model_is_exactly_the_weighted_mean_of_every_holders_effective_weights(env):
    sim = build(Plan.load(make_plan(env, "exact.yaml")), progress=False, device="cpu")
    ex = InProcess(sim, None)
    for r in range(3):
        rows = ex.train_round(r, Silent())
        holders: dict[str, list[tuple[float, torch.Tensor]]] = {}
        for p in sim.parties:
            for m, w in effective(sim, p).items():
                holders.setdefault(m, []).append((p.weight, w))
        before = {m: (f[0].detach().clone(), f[1].detach().clone()) for m, f in sim.bank.factors("k1").items()}
        moments = {id(q): sim.parties[1].opt_client.state[q]["exp_avg"].clone()
                   for g in sim.parties[1].opt_client.param_groups for q in g["params"]}
        ex.aggregate(r, rows)
        for m, hs in holders.items():
            total = sum(w for w, _ in hs)
            mean = sum(w / total * x for w, x in hs)
            torch.testing.assert_close(sim.bank.base_weight(m).double(), mean, rtol=0, atol=2e-6)
        for p in sim.parties:                       # every holder's effective weights are the global ones again
            for m, w in effective(sim, p).items():
                torch.testing.assert_close(w, sim.bank.base_weight(m).double(), rtol=0, atol=1e-7)
        for m, (a, b) in sim.bank.factors("k1").items():      # adapters and moments carry on
            assert torch.equal(a, before[m][0]) and torch.equal(b, before[m][1])
        for g in sim.parties[1].opt_client.param_groups:
            for q in g["params"]:
                assert torch.equal(sim.parties[1].opt_client.state[q]["exp_avg"], moments[id(q)])
    assert len({p.split for p in sim.parties}) == 3
    shared = [m for m, hs in holders.items() if len(hs) > 1]
    assert shared, "a matrix held by several holders (client- and server-side copies)"


def test_round_one_equals_the_restart_aggregate_and_restart_stays_selectable(env):
    warm = build(Plan.load(make_plan(env, "w1.yaml")), progress=False, device="cpu")
    cold = build(Plan.load(make_plan(env, "r1.yaml", aggregation="restart")), progress=False, device="cpu")
    for sim in (warm, cold):
        ex = InProcess(sim, None)
        ex.aggregate(0, ex.train_round(0, Silent()))
    for m in warm.bank.factors("k1"):
        torch.testing.assert_close(warm.bank.base_weight(m), cold.bank.base_weight(m), rtol=0, atol=1e-6)
    # restart: fresh init (B = 0) and no moments; warm: the trained factors and their moments
    assert all(float(b.abs().sum()) == 0 for _, b in cold.bank.factors("k1").values())
    assert all(float(b.abs().sum()) > 0 for _, b in warm.bank.factors("k1").values())
    assert not cold.parties[1].opt_client.state and warm.parties[1].opt_client.state


def test_a_warm_run_trains_and_exports_its_global_model(env, tmp_path):
    """The exported merged model and the exported adapter (exact rank) are the run's global model."""
    from hsplit.runtime.outputs.export import export_run
    from hsplit.runtime.outputs.rundir import load_run
    res = run(make_plan(env, "export.yaml", rounds=3), RunOptions(runs_dir=env[0] / "runs", progress=False,
                                                                  eval_max_seqs=8))
    assert res.eval_after < res.eval_before
    sim, _, _ = load_run(res.run_dir)
    rep = export_run(res.run_dir, adapter=tmp_path / "adapter", merged=tmp_path / "merged", exact=True)
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(str(env[1]))
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    for m in sim.bank.layers():
        want = sim.bank.base_weight(m)
        torch.testing.assert_close(merged.get_submodule(m).weight, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(with_adapter.get_submodule(m).weight, want, rtol=0, atol=1e-5)
    assert rep["modules"] > 0


@pytest.mark.parametrize("move", ["rank-up", "rank-down", "dropped", "split-up", "split-down"])
def test_replanning_moves_adapters_without_changing_the_model(env, move):
    from hsplit.runtime.train.replan import apply_plan
    sim = build(Plan.load(make_plan(env, f"move-{move}.yaml")), progress=False, device="cpu")
    ex = InProcess(sim, None)
    update, _ = ex.aggregate(0, ex.train_round(0, Silent()))
    base = {m: sim.bank.base_weight(m).clone() for m in sim.bank.layers()}
    new = Plan.load(make_plan(env, f"move-{move}-new.yaml"))
    c = new.clients[1]
    if move == "rank-up":
        c.ranks["q_proj"] = 16
    elif move == "rank-down":
        c.ranks["q_proj"] = 2
    elif move == "dropped":
        c.ranks.pop("model.layers.1.mlp.down_proj")
    elif move == "split-up":
        c.split_layer = 4
    else:
        c.split_layer = 2
    apply_plan(sim, new, 0, update)
    for m, w in base.items():
        assert torch.equal(sim.bank.base_weight(m), w)
    for p in sim.parties:
        for m, w in effective(sim, p).items():
            torch.testing.assert_close(w, sim.bank.base_weight(m).double(), rtol=0, atol=1e-7)
    kept = sim.bank.factors("k1")["model.layers.0.self_attn.q_proj"]
    assert float(kept[1].abs().sum()) > 0          # carried over, not restarted
    ex.aggregate(1, ex.train_round(1, Silent()))      # and training goes on at the new ranks


def test_a_client_gets_the_cheaper_exact_form_of_each_matrix_update():
    from hsplit.runtime.strategies import RoundUpdate
    from hsplit.runtime.strategies.base import merge_bytes_for, update_bytes
    g = torch.Generator().manual_seed(0)
    thin = (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))      # 2 x 11 < 30: stacked
    wide = (torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g))      # 4 x 11 > 30: dense
    u = RoundUpdate(merge={"model.layers.0.self_attn.q_proj": thin, "model.layers.0.self_attn.v_proj": wide})
    mine = u.for_client("k0", 1)
    assert list(mine.merge) == ["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(mine.dense["model.layers.0.self_attn.v_proj"], wide[0] @ wide[1])
    assert update_bytes(mine) == merge_bytes_for(u, 1) == 4 * (2 * 11 + 30)
