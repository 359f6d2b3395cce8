"""The aggregation strategies of the runtime: one small class per file, each owning its state.

    from hsplit.runtime.strategies import make
    strategy = make(plan.strategy, plan.source)      # a fresh instance for one run

    base.py            the protocol (Strategy), ClientFactors, RoundUpdate
    hsplitlora.py      exact stacked aggregate merged into the base, adapters restart
    splitlora.py       FedAvg of A and of B (one split, one rank)
    global_adapter.py  the base of the strategies that keep a global adapter on the server
    hetlora.py         zero-padding, norm-weighted; truncation back to each rank
    flexlora.py        exact aggregate, truncated SVD back to each rank
    hafl.py            rank-1 importance-aware aggregation (truncation / freezing)
    centralized.py     the reference: one model on pooled data

Names and traits (what the planner and the rest of the runtime may ask) are registered once, in
hsplit.planner.strategies; a test checks that every registered name has exactly one class here.
"""
from __future__ import annotations

from hsplit.planner.strategies import traits
from hsplit.runtime.strategies.base import ClientFactors, RoundUpdate, Strategy
from hsplit.runtime.strategies.centralized import Centralized
from hsplit.runtime.strategies.flexlora import FlexLoRA
from hsplit.runtime.strategies.hafl import HAFLFreezing, HAFLTruncation
from hsplit.runtime.strategies.hetlora import HetLoRA
from hsplit.runtime.strategies.hsplitlora import HSplitLoRA
from hsplit.runtime.strategies.splitlora import SplitLoRA

CLASSES: dict[str, type[Strategy]] = {c.name: c for c in (HSplitLoRA, SplitLoRA, HetLoRA, FlexLoRA, HAFLTruncation,
                                                           HAFLFreezing, Centralized)}


def make(name: str, source: str = "<plan>") -> Strategy:
    """A fresh instance of the strategy `name` (a ConfigError naming the choices when it is unknown)."""
    traits(name, source)
    return CLASSES[name]()


__all__ = ["CLASSES", "ClientFactors", "RoundUpdate", "Strategy", "make"]
