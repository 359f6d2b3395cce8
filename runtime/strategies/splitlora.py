"""splitlora (SplitLoRA, Lin et al. 2024): one split, one rank, FedAvg of A and of B separately.

A = sum_k p_k A_k and B = sum_k p_k B_k (one rank per module across its holders), which is
(sum p B)(sum p A) = sum p B A + cross terms B_k A_l: the aggregation noise hsplitlora removes. The
averaged factors are the global adapter (the aggregated model) and every holder continues from them.
"""
from __future__ import annotations

import torch

from hsplit.planner.errors import ConfigError
from hsplit.runtime.common import GLOBAL
from hsplit.runtime.strategies.base import ClientFactors, RoundUpdate, Strategy, normalised


def _one_rank_problem(module: str, ranks) -> str:
    return (f"{module}: splitlora averages A and B separately and needs one rank on every client (client or "
            f"server side), got {sorted(ranks)}; use strategy hsplitlora")


class SplitLoRA(Strategy):
    name = "splitlora"

    def global_ranks(self) -> dict[str, int]:
        sim = self.sim
        ranks: dict[str, set[int]] = {}
        for p in sim.parties:
            for m, r in p.ranks.items():
                if r > 0:
                    ranks.setdefault(m, set()).add(r)
        problems = [_one_rank_problem(m, rs) for m, rs in sorted(ranks.items()) if len(rs) > 1]
        if problems:
            raise ConfigError(sim.plan.source, problems)
        return {m: next(iter(rs)) for m, rs in ranks.items()}

    def aggregate(self, updates: dict[str, list[ClientFactors]]) -> RoundUpdate:
        out = RoundUpdate()
        problems = []
        for module, fs in updates.items():
            ranks = {f.A.shape[0] for f in fs}
            if len(ranks) > 1:
                problems.append(_one_rank_problem(module, ranks))
                continue
            p = normalised([f.weight for f in fs])
            a = sum(pk * f.A.detach().float() for pk, f in zip(p, fs))
            b = sum(pk * f.B.detach().float() for pk, f in zip(p, fs))
            out.assign[module] = (a, b)
        if problems:
            raise ConfigError("strategy splitlora", problems)
        return out

    @torch.no_grad()
    def enter(self, p, r: int) -> None:
        """The averaged factors (the global adapter); its AdamW moments are its own."""
        g = self.sim.bank.factors(GLOBAL)
        for m, (a, b) in self.sim.bank.factors(p.adapter).items():
            a.copy_(g[m][0])
            b.copy_(g[m][1])

    @torch.no_grad()
    def apply(self, update: RoundUpdate, r: int, parties) -> None:
        sim = self.sim
        sim.merge_update(update)           # residuals of a re-plan that lowered a rank
        names = [p.adapter for p in parties] + ([GLOBAL] if sim.global_ranks else [])
        for m, (a, b) in update.assign.items():
            for name in names:
                f = sim.bank.factors(name).get(m)
                if f is not None:
                    f[0].copy_(a)
                    f[1].copy_(b)
