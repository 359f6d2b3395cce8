"""hetlora, flexlora, hafl-*: each aggregation's defining property on small tensors, then in real runs."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from hsplit.runtime.strategies import CLASSES, ClientFactors
from hsplit.runtime.strategies.flexlora import svd_of_product
from hsplit.runtime.strategies.global_adapter import GlobalFactors
from hsplit.runtime.strategies.hafl import top_components

STRATEGIES = {name: cls() for name, cls in CLASSES.items()}

D_IN, D_OUT = 6, 5


def _f(party, weight, A, B, **kw):
    return ClientFactors(weight, A, B, 2.0, party=party, **kw)


def _glob(R, scores=None):
    return GlobalFactors(torch.zeros(R, D_IN), torch.zeros(D_OUT, R), scores)


def _rank1(u, v):
    """A rank-1 component: A row u (d_in), B column v (d_out)."""
    return u[None, :], v[:, None]


def test_hetlora_zero_padding_dilutes_a_component_held_by_one_client_of_two():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, D_IN, generator=g), torch.randn(D_OUT, 2, generator=g)
    a2, b2 = torch.randn(1, D_IN, generator=g), torch.randn(D_OUT, 1, generator=g)
    up = STRATEGIES["hetlora"].aggregate({"m": [_f("k0", 1.0, a1, b1), _f("k1", 1.0, a2, b2)]}, {"m": _glob(2)})
    a, b = up.global_factors["m"]
    n1, n2 = float(torch.linalg.matrix_norm(b1 @ a1)), float(torch.linalg.matrix_norm(b2 @ a2))
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)              # weights ~ ||B_k A_k||_F, not p_k
    torch.testing.assert_close(a[1], w1 * a1[1])          # only k0 holds component 1: scaled down by w1 < 1
    torch.testing.assert_close(b[:, 1], w1 * b1[:, 1])
    torch.testing.assert_close(a[0], w1 * a1[0] + w2 * a2[0])
    # each client continues from the global adapter truncated to its rank
    torch.testing.assert_close(up.assign_party["k1"]["m"][0], a[:1])
    torch.testing.assert_close(up.assign_party["k0"]["m"][1], b)


def test_hafl_rank1_aggregation_does_not_dilute_and_keeps_untouched_components():
    g = torch.Generator().manual_seed(1)
    old = _glob(3, torch.tensor([0.0, 0.0, 5.0]))
    old.A, old.B = torch.randn(3, D_IN, generator=g), torch.randn(D_OUT, 3, generator=g)
    a1, b1 = torch.randn(2, D_IN, generator=g), torch.randn(D_OUT, 2, generator=g)
    a2, b2 = torch.randn(1, D_IN, generator=g), torch.randn(D_OUT, 1, generator=g)
    # truncation: k0 holds components [0, 1], k1 holds [0]; component 2 nobody updated
    fs = [_f("k0", 1.0, a1, b1, components=[0, 1], updated=[0, 1], scores=torch.tensor([1.0, 2.0])),
          _f("k1", 3.0, a2, b2, components=[0], updated=[0], scores=torch.tensor([3.0]))]
    up = STRATEGIES["hafl-truncation"].aggregate({"m": fs}, {"m": old})
    a, b = up.global_factors["m"]
    torch.testing.assert_close(a[1], a1[1])                 # held by one client of two: NOT diluted
    torch.testing.assert_close(b[:, 1], b1[:, 1])
    torch.testing.assert_close(a[0], 0.25 * a1[0] + 0.75 * a2[0])   # p_k over the clients that updated it
    torch.testing.assert_close(a[2], old.A[2])              # untouched: keeps its value (and its score)
    torch.testing.assert_close(up.global_scores["m"], torch.tensor([0.25 * 1 + 0.75 * 3, 2.0, 5.0]))


def test_hafl_freezing_averages_only_the_components_each_client_updated():
    g = torch.Generator().manual_seed(2)
    old = _glob(2, torch.zeros(2))
    old.A, old.B = torch.randn(2, D_IN, generator=g), torch.randn(D_OUT, 2, generator=g)
    a1 = torch.stack([torch.randn(D_IN, generator=g), old.A[1]])      # k0 updated 0, froze 1
    a2 = torch.stack([old.A[0], torch.randn(D_IN, generator=g)])      # k1 froze 0, updated 1
    fs = [_f("k0", 1.0, a1, old.B.clone(), components=[0, 1], updated=[0], scores=torch.zeros(2)),
          _f("k1", 1.0, a2, old.B.clone(), components=[0, 1], updated=[1], scores=torch.zeros(2))]
    a, _ = STRATEGIES["hafl-freezing"].aggregate({"m": fs}, {"m": old}).global_factors["m"]
    torch.testing.assert_close(a, torch.stack([a1[0], a2[1]]))      # frozen copies do not pull back


def test_flexlora_gives_each_client_the_best_rank_r_approximation_of_the_weighted_sum():
    g = torch.Generator().manual_seed(3)
    fs = [_f(f"k{i}", w, torch.randn(r, D_IN, generator=g), torch.randn(D_OUT, r, generator=g))
          for i, (w, r) in enumerate([(1.0, 1), (2.0, 2), (1.0, 2)])]
    up = STRATEGIES["flexlora"].aggregate({"m": fs}, {"m": _glob(5)})
    target = sum(f.weight / 4.0 * f.B @ f.A for f in fs)
    a, b = up.global_factors["m"]
    torch.testing.assert_close(b @ a, target, rtol=1e-5, atol=1e-5)     # the global is exact (rank <= sum r_k)
    s = torch.linalg.svdvals(target)
    for f in fs:
        r = f.A.shape[0]
        ak, bk = up.assign_party[f.party]["m"]
        assert ak.shape == f.A.shape and bk.shape == f.B.shape
        err = torch.linalg.matrix_norm(target - bk @ ak)
        torch.testing.assert_close(err, s[r:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)  # Eckart-Young
        # and no other rank-r factorisation tried here does better (e.g. the client's own update)
        assert err <= torch.linalg.matrix_norm(target - f.B @ f.A) + 1e-6


def test_svd_of_product_matches_the_dense_svd():
    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    u, s, vh = svd_of_product(b, a)
    torch.testing.assert_close((u * s) @ vh, b @ a)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:3])


def test_top_components_breaks_ties_towards_lower_indices():
    assert top_components(torch.zeros(4), 2) == [0, 1]
    assert top_components(torch.tensor([0.1, 0.5, 0.0, 0.5]), 2) == [1, 3]


# ------------------------------------------------------------------ in a real (tiny) run

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import test_runtime_train as T
    gen = T.env.__wrapped__(tmp_path_factory)
    yield next(gen)
    next(gen, None)


def test_hafl_freezing_leaves_frozen_components_untouched_even_with_weight_decay(env):
    import test_runtime_train as T
    from hsplit.planner.plan import Plan
    from hsplit.runtime.train.simulation import build
    from hsplit.runtime.train.loop import InProcess, Silent
    sim = build(Plan.load(T.make_plan(env, "freeze.yaml", strategy="hafl-freezing", weight_decay=0.1)),
                progress=False, device="cpu")
    a_party = sim.parties[0]              # planned q_proj rank 2 on its client block; global rank 8
    m = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():                 # as after a round where others trained every component
        for _, bb in sim.bank.factors(a_party.adapter).values():
            bb.copy_(0.01 * torch.randn(bb.shape, generator=torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in sim.bank.state(a_party.adapter).items()}
    assert before[f"{m}.lora_A"].shape[0] == 8 and sim.strategy.selection[a_party.adapter][m] == [0, 1]
    InProcess(sim, None).train_round(0, Silent())
    after = sim.bank.state(a_party.adapter)
    assert torch.equal(after[f"{m}.lora_A"][2:], before[f"{m}.lora_A"][2:])
    assert torch.equal(after[f"{m}.lora_B"][:, 2:], before[f"{m}.lora_B"][:, 2:])
    assert not torch.equal(after[f"{m}.lora_A"][:2], before[f"{m}.lora_A"][:2])
    # importance was measured on every component, the frozen ones included
    assert float(sim.strategy.component_scores(a_party.adapter, m, 8)[2:].sum()) > 0


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "hafl-truncation", "hafl-freezing"])
def test_every_strategy_trains_evaluates_and_exports(env, strategy):
    import test_runtime_train as T
    from hsplit.runtime.outputs.export import total_update
    from hsplit.runtime.train.loop import run
    from hsplit.runtime.outputs.rundir import load_run
    res = run(T.make_plan(env, f"run-{strategy}.yaml", strategy=strategy, learning_rate=2e-2), T.opts(env))
    assert res.eval_after < res.eval_before
    total, _, _ = total_update(res.run_dir)
    assert total and all(float((b @ a).abs().sum()) > 0 for b, a in total.values())
    sim, _, r = load_run(res.run_dir)                 # the global adapter comes back with the checkpoint
    from hsplit.runtime.outputs.evaluate import evaluate
    assert r == 2 and evaluate(sim, sim.data.eval, 64) == pytest.approx(res.eval_after, rel=1e-5)
    if strategy == "hetlora":             # nothing scored (every target masked): no loss, not a perfect 0
        from hsplit.runtime.data.federated import TokenSet
        e = sim.data.eval
        masked = TokenSet(e.input_ids[:2], e.attention_mask[:2], torch.full_like(e.labels[:2], -100))
        assert math.isnan(evaluate(sim, masked))
