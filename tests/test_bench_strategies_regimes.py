"""bench/strategies.py's regime 2 and its generic ablations, planned without training (no torch):
`--variants aggregation=NAME` plans and records that aggregation, and the drift fleet's scaled budgets bind.

    .venv/bin/python -m pytest -q tests/test_bench_strategies_regimes.py
"""
import argparse
import importlib.util
from pathlib import Path

import pytest

from hsplit.planner.plan import Plan

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_strategies", ROOT / "bench" / "strategies.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(mod, tmp_path, variants):
    d = dict(mod.REGIMES["drift"])
    args = argparse.Namespace(model="smollm2-135m", train=str(tmp_path / "devset.csv"), importance_files={},
                              ranks="0,2,4,8,16", server_rank=8, modules=None, lr=1e-3, warmup=4, dtype="fp32",
                              eval_fraction=0.05, **{k: v for k, v in d.items() if k not in ("seeds", "out")})
    args.variant_changes = dict(mod.parse_variant(v) for v in variants)
    return args


def test_an_aggregation_variant_is_planned_and_recorded_under_its_own_label(tmp_path):
    mod = _bench()
    args = _args(mod, tmp_path, ["aggregation=restart", "replan=3:0.05"])
    assert set(args.variant_changes) == {"hsplitlora-restart", "hsplitlora-replan-3-0.05"}
    plan = Plan.load(mod.make_plan_for(args, "hsplitlora-restart", "hsplitlora", 0, tmp_path))
    assert plan.aggregation == "restart"
    assert plan.data.partition == "dirichlet" and plan.training.local_steps == 10
    replanned = Plan.load(mod.make_plan_for(args, "hsplitlora-replan-3-0.05", "hsplitlora", 0, tmp_path))
    assert replanned.replan["every"] == 3 and replanned.replan["threshold"] == 0.05


def test_an_unknown_variant_is_refused_with_the_accepted_forms():
    with pytest.raises(SystemExit, match="aggregation=NAME"):
        _bench().parse_variant("warmer")


def test_the_drift_fleet_has_ten_clients_of_several_kinds_whose_budgets_bind(tmp_path):
    mod = _bench()
    args = _args(mod, tmp_path, [])
    plan = Plan.load(mod.make_plan_for(args, "hetlora", "hetlora", 0, tmp_path))
    assert len(plan.clients) >= 10 and len({c.device for c in plan.clients}) >= 3
    assert len({c.split_layer for c in plan.clients}) > 1      # the kinds get different splits
