"""hsplitlora's merge download in the planner (docs/formulation.md, "Merge download"): the exact
download D_k of a plan, the bound U(s) the solvers charge in every round time, and the solvers'
optimality with that term where it binds."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import random_instance, tiny_model

from hsplit.planner.api import check_plan, make_plan, merge_download_bytes
from hsplit.planner.errors import InfeasibleError
from hsplit.planner.evaluate import Config
from hsplit.planner.fleet import Fleet
from hsplit.planner.instance import build_instance
from hsplit.planner.plan import Plan, Training

MODULES = ["q_proj", "v_proj"]   # tiny llama: q (64, 64), w 128, dense 4096; v (64, 32), w 96, dense 2048


def _device(name, down=10.0):
    return {"name": name, "kind": "gpu", "memory_gib": 1.0, "flops": {"fp32": 1e9}, "uplink_mbps": 100.0,
            "downlink_mbps": down}


def _fleet(groups, name="merge"):
    server = {"device": {"name": "srv", "kind": "gpu", "memory_gib": 1.0, "flops": {"fp32": 1e10},
                         "uplink_mbps": 1000, "downlink_mbps": 1000}}
    return Fleet.from_dict({"name": name, "server": server, "clients": groups}, f"<{name}>")


def _three_clients():
    """c0 split 1 (q 2, v 4 on block 0), c1 split 3 (q 16 on blocks 0-2), c2 split 2 (v 2 on block 1)."""
    L, J = 4, 2
    r0 = np.zeros((L, J), dtype=np.int64)
    r0[0] = (2, 4)
    r1 = np.zeros((L, J), dtype=np.int64)
    r1[:3, 0] = 16
    r2 = np.zeros((L, J), dtype=np.int64)
    r2[1, 1] = 2
    return [Config(1, r0), Config(3, r1), Config(2, r2)]


# By hand, server rank 2 (holders of block l: every client's own rank there when l < s_k', else the
# server's copy for it at rank 2). K = factor x sum of holders' ranks; bytes = 4 min(K w, dense).
#   warm (factor 2):   block 0: K_q 2(2+16) = 36 -> dense 16384, K_v 2*4 = 8 -> 4*768 = 3072: 19456
#                      block 1: K_q 2(2+16) = 36 -> 16384, K_v 2(2+2) = 8 -> 3072: 19456
#                      block 2: K_q 2(2+16+2) = 40 -> 16384, K_v 2(2+2) = 8 -> 3072: 19456
#   restart (1):       block 0: K_q 18 -> 4*2304 = 9216, K_v 4 -> 1536: 10752
#                      block 1: K_q 18 -> 9216, K_v 4 -> 1536: 10752
#                      block 2: K_q 20 -> 4*2560 = 10240, K_v 4 -> 1536: 11776
#   restart, server rank 0: block 0: K_q 18 -> 9216, K_v 4 -> 1536: 10752
#                      block 1: K_q 16 -> 8192, K_v 2 -> 768: 8960
#                      block 2: K_q 16 -> 8192, K_v 0 -> nothing to download: 8192
# bounded (floor rank 2): rank max(q, 2) on every matrix of its blocks some holder adapts, 4 r (d_in + d_out):
#   c0 (block 0): q 2*128 + v 4*96 = 640 -> 2560
#   c1 (blocks 0-2): q 16*128 + v 2*96 = 2240 per block -> 3 * 2240 * 4 = 26880; server rank 0: block 2's v
#                    has no holder (c0's server copy is rank 0, c2 adapts v on block 1 only) -> (2240*2 + 2048) * 4
#   c2 (blocks 0-1): q 2*128 + v 2*96 = 448 per block -> 3584
HAND = {("warm", 2): [19456, 3 * 19456, 2 * 19456], ("bounded", 2): [2560, 26880, 3584],
        ("bounded", 0): [2560, 26112, 3584],
        ("restart", 2): [10752, 10752 + 10752 + 11776, 2 * 10752],
        ("restart", 0): [10752, 10752 + 8960 + 8192, 10752 + 8960]}


@pytest.mark.parametrize("aggregation,server_rank", list(HAND))
def test_exact_download_of_clients_at_different_splits_matches_a_hand_computation(aggregation, server_rank):
    fleet = _fleet([{"device": _device(f"d{k}"), "count": 1} for k in range(3)])
    inst = build_instance(fleet, tiny_model(4), ranks=(0, 2, 4, 8, 16), modules=MODULES, server_rank=server_rank,
                          aggregation=aggregation)
    configs = _three_clients()
    assert merge_download_bytes(inst, configs) == HAND[aggregation, server_rank]
    other = "restart" if aggregation == "warm" else "warm"     # the mode can be given explicitly too
    assert merge_download_bytes(inst, configs, aggregation=other) == merge_download_bytes(
        build_instance(fleet, tiny_model(4), ranks=(0, 2, 4, 8, 16), modules=MODULES, server_rank=server_rank,
                       aggregation=other), configs)
    held = [inst.held_download_per_param * int((c.ranks * inst.widths[None, :]).sum()) for c in configs]
    # check_plan (hsplit plan --check) evaluates a hand-written plan the same way, and charges the bound
    plan = Plan.from_dict({"model": "tiny-llama", "strategy": "hsplitlora", "server_rank": server_rank,
                           "modules": [f"self_attn.{m}" for m in MODULES], "ranks_allowed": [0, 2, 4, 8, 16],
                           "aggregation": aggregation, "training": {"seq_len": 16},
                           "clients": [{"id": f"c{k}", "device": f"d{k}", "split_layer": c.split,
                                        "ranks": {f"model.layers.{l}.self_attn.{MODULES[j]}": int(c.ranks[l, j])
                                                  for l, j in zip(*np.nonzero(c.ranks))}}
                                       for k, c in enumerate(configs)]}, "hand.yaml")
    ev, inst2 = check_plan(plan, fleet, tiny_model(4))
    assert ev.merge_bytes == HAND[aggregation, server_rank]
    for e, d, cfg, h in zip(ev.clients, ev.merge_bytes, configs, held):
        assert d <= e.merge_charged_bytes == inst2.classes[0].merge_bytes[cfg.split] + h
        assert e.merge_charged_s == pytest.approx(e.merge_charged_bytes * 8 / 10e6)


def test_a_plan_reports_the_exact_download_and_charges_the_bound_in_its_round_times():
    """Three clients forced to splits 1, 3 and 2, every matrix at rank 2 (the only rank): the bound is
    exact here (each client's one split and one rank are what the bound assumes of it)."""
    fleet = _fleet([{"device": _device(f"d{k}", down=1.0), "count": 1, "splits": [s, s]}
                    for k, s in enumerate((1, 3, 2))])
    plan = make_plan(fleet, tiny_model(4), ranks=(0, 2), modules=MODULES, server_rank=2, aggregation="restart",
                     training=Training(batch_size=2, seq_len=16, local_steps=1))
    assert [c.split_layer for c in plan.clients] == [1, 3, 2] and plan.aggregation == "restart"
    # every block below 3 has three holders at rank 2: K = 6; q 4*6*128 = 3072 B, v 4*6*96 = 2304 B
    per_block = 3072 + 2304
    for c in plan.clients:
        pr = c.predicted
        want = per_block * c.split_layer
        assert pr["merge_download_mb"] == pr["merge_download_charged_mb"] == round(want / 1e6, 6)
        assert pr["merge_download_s"] == pr["merge_download_charged_s"] == round(want * 8 / 1e6, 3)
        # the round time contains the charged download; the adapter sync is the upload only
        sync = 4 * pr["adapter_params"] * 8 / 100e6
        steps = pr["step_s"]
        assert pr["client_round_s"] == pytest.approx(steps + sync + want * 8 / 1e6, abs=2e-3)
        assert pr["round_s"] == pytest.approx(pr["client_round_s"] + pr["server_step_s"], abs=2e-3)
    assert plan.predicted["round_s_exact_merge"] == plan.predicted["round_s"]


def _random_configs(inst, rng):
    """Any assignment the bound must cover: a split from each client's allowed set, any allowed rank
    on each of its blocks (budgets ignored)."""
    class_of = inst.class_of()
    configs = []
    for k in range(len(inst.clients)):
        cls = inst.classes[class_of[k]]
        s = int(rng.choice(cls.splits))
        ranks = np.zeros((inst.L, len(inst.modules)), dtype=np.int64)
        ranks[:s] = rng.choice(inst.ranks, size=(s, len(inst.modules)))
        configs.append(Config(s, ranks))
    return configs


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("aggregation", ["warm", "restart"])
def test_the_charged_bound_is_never_below_the_exact_download(seed, aggregation):
    kw = random_instance(seed, uniform=True)
    inst = build_instance(kw["fleet"], kw["model"], ranks=kw["ranks"], modules=kw["modules"],
                          training=kw["training"], aggregation=aggregation)
    rng = np.random.default_rng(100 + seed)
    class_of = inst.class_of()
    extreme = []
    for cls in inst.classes:     # every client at its deepest split with the largest rank everywhere
        ranks = np.zeros((inst.L, len(inst.modules)), dtype=np.int64)
        ranks[:max(cls.splits)] = max(inst.ranks)
        extreme.append(Config(max(cls.splits), ranks))
    trials = [_random_configs(inst, rng) for _ in range(50)] + [[extreme[c] for c in class_of]]
    for configs in trials:
        exact = merge_download_bytes(inst, configs)
        for k, (cfg, d) in enumerate(zip(configs, exact)):
            bound = inst.classes[class_of[k]].merge_bytes[cfg.split]
            assert 0 < d <= bound * (1 + 1e-12), (k, cfg.split, d, bound)
    # ...and the bound is tight when every client has one allowed split and takes the largest rank
    fixed = replace(kw["fleet"], groups=tuple(replace(g, splits=(2, 2)) for g in kw["fleet"].groups))
    inst = build_instance(fixed, kw["model"], ranks=kw["ranks"], modules=kw["modules"], training=kw["training"],
                          aggregation=aggregation)
    ranks = np.zeros((inst.L, len(inst.modules)), dtype=np.int64)
    ranks[:2] = max(inst.ranks)
    configs = [Config(2, ranks)] * len(inst.clients)
    assert merge_download_bytes(inst, configs) == [c.merge_bytes[2] for c in inst.classes for _ in c.members]


@pytest.mark.parametrize("seed", range(6))
def test_bounded_charges_its_own_rank_per_parameter_and_a_floor_bound_per_block(seed):
    """bounded: the charge 4 (P_k + floor W(s_k)) is never below the exact download 4 sum max(q, floor) (d_in +
    d_out) over the adapted matrices of its blocks, and equals it when every matrix is adapted at the floor rank."""
    kw = random_instance(seed, uniform=True)
    inst = build_instance(kw["fleet"], kw["model"], ranks=kw["ranks"], modules=kw["modules"],
                          training=kw["training"], aggregation="bounded")
    floor = min(q for q in inst.ranks if q > 0)
    assert inst.floor_rank == floor and inst.sync_bytes_per_param == 8 and inst.held_download_per_param == 4
    rng = np.random.default_rng(200 + seed)
    class_of = inst.class_of()
    for configs in [_random_configs(inst, rng) for _ in range(30)]:
        exact = merge_download_bytes(inst, configs)
        for k, (cfg, d) in enumerate(zip(configs, exact)):
            P = int((cfg.ranks * inst.widths[None, :]).sum())
            charged = inst.classes[class_of[k]].merge_bytes[cfg.split] + 4 * P
            assert d <= charged * (1 + 1e-12)
    ranks = np.zeros((inst.L, len(inst.modules)), dtype=np.int64)
    ranks[:2] = floor
    cfg = Config(2, ranks)
    assert merge_download_bytes(inst, [cfg] * len(inst.clients))[0] == 4 * floor * 2 * inst.widths.sum()
    assert inst.classes[0].merge_bytes[2] == 4 * floor * 2 * inst.widths.sum()


@pytest.mark.parametrize("seed", [0, 2, 5, 9])
def test_solvers_agree_with_exhaustive_enumeration_under_the_bounded_download(seed):
    kw = _slow_downlinks(random_instance(seed, uniform=seed % 4 == 0), 0.02)
    try:
        reference = make_plan(**kw, solver="exhaustive", aggregation="bounded")
    except InfeasibleError:
        return
    assert reference.download == {"floor_rank": min(q for q in reference.ranks_allowed if q > 0)}
    u_ref, r_ref = reference.solver["objective"]["utility"], reference.solver["objective"]["round_s"]
    for solver, method in (("cbc", "full"), ("highs", "decomposed")):
        plan = make_plan(**kw, solver=solver, method=method, aggregation="bounded")
        assert plan.solver["objective"]["utility"] == pytest.approx(u_ref, abs=1e-6), (solver, method)
        assert plan.solver["objective"]["round_s"] == pytest.approx(r_ref, rel=1e-6), (solver, method)
        ev, _ = check_plan(plan, kw["fleet"], kw["model"], kw["importance"])
        assert ev.violations == []
        for c, e, d in zip(plan.clients, ev.clients, ev.merge_bytes):
            assert c.predicted["merge_download_mb"] == round(d / 1e6, 6) and d <= e.merge_charged_bytes


def _slow_downlinks(kw, scale):
    """The instance with every client's downlink `scale` times slower, so that the merge download binds."""
    fleet = kw["fleet"]
    groups = tuple(replace(g, device=replace(g.device, downlink_mbps=g.device.downlink_mbps * scale))
                   for g in fleet.groups)
    return {**kw, "fleet": replace(fleet, groups=groups)}


SLOW_SEEDS = [0, 1, 2, 3, 5, 6, 9, 12, 17, 21]


@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_solvers_agree_with_exhaustive_enumeration_when_the_merge_download_binds(seed):
    kw = {**_slow_downlinks(random_instance(seed, uniform=seed % 4 == 0), 0.02), "aggregation": "warm"}   # U(s)
    try:
        reference = make_plan(**kw, solver="exhaustive")
    except InfeasibleError as e:
        assert any("merge download" in r or "memory" in r for r in e.reasons)
        with pytest.raises(InfeasibleError):
            make_plan(**kw, solver="cbc", method="full")
        with pytest.raises(InfeasibleError):
            make_plan(**kw, solver="highs")
        return
    u_ref, r_ref = reference.solver["objective"]["utility"], reference.solver["objective"]["round_s"]
    assert any(c.predicted["merge_download_charged_s"] > 0.02 * c.predicted["round_s"] for c in reference.clients)
    for solver, method in (("cbc", "full"), ("highs", "decomposed")):
        plan = make_plan(**kw, solver=solver, method=method)
        assert plan.solver["objective"]["utility"] == pytest.approx(u_ref, abs=1e-6), (solver, method)
        assert plan.solver["objective"]["round_s"] == pytest.approx(r_ref, rel=1e-6), (solver, method)
        ev, _ = check_plan(plan, kw["fleet"], kw["model"], kw["importance"])
        assert ev.violations == []
        for c, e, d in zip(plan.clients, ev.clients, ev.merge_bytes):
            assert c.predicted["merge_download_mb"] == round(d / 1e6, 6)
            assert d <= e.merge_charged_bytes


def test_the_merge_download_changes_the_plan_when_it_binds():
    """Slower downlinks only lengthen the merge download: some instance then picks shallower splits
    or a longer round, so the term reaches the objective (and not only the report)."""
    changed = 0
    for seed in SLOW_SEEDS:
        kw = random_instance(seed)
        try:
            fast = make_plan(**kw, solver="highs")
            slow = make_plan(**_slow_downlinks(kw, 0.02), solver="highs")
        except InfeasibleError:
            continue
        a = (fast.predicted["utility"], fast.predicted["round_s"], [c.split_layer for c in fast.clients])
        b = (slow.predicted["utility"], slow.predicted["round_s"], [c.split_layer for c in slow.clients])
        changed += a != b
    assert changed >= 3


def test_other_strategies_are_charged_no_merge_download():
    kw = random_instance(1)
    for strategy in ("splitlora", "hetlora"):
        plan = make_plan(**kw, strategy=strategy)
        assert all("merge_download_mb" not in c.predicted for c in plan.clients)
        assert "round_s_exact_merge" not in plan.predicted
    inst = build_instance(kw["fleet"], kw["model"], ranks=kw["ranks"], modules=kw["modules"], strategy="hetlora")
    assert all(not c.merge_bytes.any() for c in inst.classes) and not inst.merge_download


def test_restart_is_charged_less_than_warm_and_a_bad_mode_is_refused():
    kw = random_instance(2)
    args = dict(ranks=kw["ranks"], modules=kw["modules"], training=kw["training"])
    warm = build_instance(kw["fleet"], kw["model"], aggregation="warm", **args)
    restart = build_instance(kw["fleet"], kw["model"], aggregation="restart", **args)
    for a, b in zip(warm.classes, restart.classes):
        assert (b.merge_bytes <= a.merge_bytes).all() and (b.merge_bytes[1:] < a.merge_bytes[1:]).any()
    from hsplit.planner.errors import ConfigError
    with pytest.raises(ConfigError, match="bounded or warm or restart"):
        build_instance(kw["fleet"], kw["model"], aggregation="cold", **args)


@pytest.mark.parametrize("seed", [1, 3, 5])
def test_latency_objective_matches_exhaustive_when_the_merge_download_binds(seed):
    kw = _slow_downlinks(random_instance(seed, two_clients=True), 0.02)
    ref = make_plan(**kw, solver="exhaustive", objective="latency")
    r_ref = ref.solver["objective"]["round_s"]
    full = make_plan(**kw, solver="cbc", method="full", objective="latency")
    dec = make_plan(**kw, solver="highs", objective="latency")
    assert full.solver["objective"]["round_s"] == pytest.approx(r_ref, rel=1e-6)
    assert r_ref * (1 - 1e-9) <= dec.solver["objective"]["round_s"] <= r_ref * (1 + dec.solver["gap"] + 1e-9)
