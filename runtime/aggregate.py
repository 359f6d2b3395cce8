"""End-of-round aggregation strategies: pure functions of the clients' LoRA factors.

    update = STRATEGIES["hsplitlora"].aggregate({module: [ClientFactors(weight, A, B, scaling), ...]})
    # update.merge:  module -> (B_cat, A_cat) to add to the base weight (W += B_cat @ A_cat)
    # update.assign: module -> (A, B) every holder of the module continues from
    # update.reinit: True when every adapter restarts from a fresh LoRA init

Every (block, module) is aggregated over the clients that hold an adapter on it, whether the
client or the server held it; weights are the clients' data weights p_k renormalised over those
holders. Adding a strategy = one small class with `aggregate` (see DESIGN.md's strategy table).

- hsplitlora (ExactMerge): sum_k p_k s B_k A_k, exactly, for any mix of ranks, by stacking the
  factors along the rank axis: B_cat = [p_1 s B_1 | ... | p_K s B_K], A_cat = [A_1; ...; A_K].
  Merged into the base weights; adapters re-initialised.
- splitlora (FedAvg): A = sum_k p_k A_k and B = sum_k p_k B_k separately (needs one rank per
  module), which is (sum p B)(sum p A) = sum p B A + cross terms B_k A_l: the aggregation noise.
- centralized (NoAggregation): one model, nothing to aggregate.
- hetlora, flexlora, hafl-truncation, hafl-freezing: strategies_het.py (global adapter kept by the
  server, per-holder assignment in RoundUpdate.assign_party / global_factors).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hsplit.planner.errors import ConfigError


@dataclass
class ClientFactors:
    weight: float          # data weight p_k (renormalised per module by the strategy)
    A: torch.Tensor        # (r_k, d_in)
    B: torch.Tensor        # (d_out, r_k)
    scaling: float         # alpha / r
    party: str = ""        # the holder's adapter name (per-party strategies: strategies_het.py)
    components: list[int] | None = None   # hafl: global component index of each row of A / column of B
    updated: list[int] | None = None      # hafl: the slots (rows of A) this holder updated
    scores: torch.Tensor | None = None    # hafl: importance of each slot


@dataclass
class RoundUpdate:
    merge: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    assign: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    reinit: bool = False
    # strategies that keep a global adapter (strategies_het.py):
    global_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    assign_party: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    global_scores: dict[str, torch.Tensor] = field(default_factory=dict)       # hafl: module -> (R,)
    local_scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # hafl-freezing


def _normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


class ExactMerge:
    """hsplitlora: noise-free sum_k p_k B_k A_k (heterogeneous ranks), merged into the base."""
    name = "hsplitlora"
    resets_adapters = True      # optimizer state need not outlive a client's local steps

    def aggregate(self, updates: dict[str, list[ClientFactors]]) -> RoundUpdate:
        out = RoundUpdate(reinit=True)
        for module, fs in updates.items():
            p = _normalised([f.weight for f in fs])
            b_cat = torch.cat([pk * f.scaling * f.B.detach().float() for pk, f in zip(p, fs)], dim=1)
            a_cat = torch.cat([f.A.detach().float() for f in fs], dim=0)
            out.merge[module] = (b_cat, a_cat)
        return out


class FedAvg:
    """splitlora: average A and B separately (one rank per module across its holders)."""
    name = "splitlora"
    resets_adapters = False

    def aggregate(self, updates: dict[str, list[ClientFactors]]) -> RoundUpdate:
        out = RoundUpdate()
        problems = []
        for module, fs in updates.items():
            ranks = sorted({f.A.shape[0] for f in fs})
            if len(ranks) > 1:
                problems.append(f"{module}: splitlora averages A and B separately and needs one rank on every "
                                f"client (client or server side), got ranks {ranks}; use strategy hsplitlora")
                continue
            p = _normalised([f.weight for f in fs])
            a = sum(pk * f.A.detach().float() for pk, f in zip(p, fs))
            b = sum(pk * f.B.detach().float() for pk, f in zip(p, fs))
            out.assign[module] = (a, b)
        if problems:
            raise ConfigError("strategy splitlora", problems)
        return out


class NoAggregation:
    """centralized: a single model trained on pooled data; nothing to aggregate."""
    name = "centralized"
    resets_adapters = False

    def aggregate(self, updates: dict[str, list[ClientFactors]]) -> RoundUpdate:
        return RoundUpdate()


STRATEGIES = {"hsplitlora": ExactMerge(), "splitlora": FedAvg(), "centralized": NoAggregation()}
# hetlora, flexlora, hafl-truncation, hafl-freezing keep a global adapter between rounds
from hsplit.runtime.strategies_het import HAFL, FlexLoRA, HetLoRA  # noqa: E402

STRATEGIES.update({"hetlora": HetLoRA(), "flexlora": FlexLoRA(), "hafl-truncation": HAFL(freezing=False),
                   "hafl-freezing": HAFL(freezing=True)})


def strategy_for(name: str, source: str = "<plan>"):
    if name not in STRATEGIES:
        raise ConfigError(source, [f"strategy: {name!r} is not implemented by this runtime yet; "
                                   f"available: {', '.join(STRATEGIES)}"])
    return STRATEGIES[name]


def update_delta(update: RoundUpdate, module: str) -> torch.Tensor:
    """The dense (d_out, d_in) weight update a RoundUpdate merges into `module` (for tests/reports)."""
    b, a = update.merge[module]
    return b @ a
