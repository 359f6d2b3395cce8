"""hsplitlora (HSplitLoRA, Lin et al. 2025): noise-free aggregation of heterogeneous ranks, merged into the base.

sum_k p_k s B_k A_k, exactly, for any mix of ranks, by stacking the factors along the rank axis:
B_cat = [p_1 s B_1 | ... | p_K s B_K], A_cat = [A_1; ...; A_K]. The base weights get W += B_cat A_cat
and every adapter restarts from a fresh LoRA init (seeded by the round), its optimizer re-created.
"""
from __future__ import annotations

import torch

from hsplit.runtime.common import derive_seed
from hsplit.runtime.strategies.base import ClientFactors, RoundUpdate, Strategy, normalised


class HSplitLoRA(Strategy):
    name = "hsplitlora"
    clears_moments = True       # the adapters restart after aggregation: moments need not outlive the round

    def aggregate(self, updates: dict[str, list[ClientFactors]]) -> RoundUpdate:
        out = RoundUpdate(reinit=True)
        for module, fs in updates.items():
            p = normalised([f.weight for f in fs])
            b_cat = torch.cat([pk * f.scaling * f.B.detach().float() for pk, f in zip(p, fs)], dim=1)
            a_cat = torch.cat([f.A.detach().float() for f in fs], dim=0)
            out.merge[module] = (b_cat, a_cat)
        return out

    @torch.no_grad()
    def apply(self, update: RoundUpdate, r: int) -> None:
        sim = self.sim
        sim.merge(update.merge)
        if update.reinit:
            for p in sim.parties:
                sim.bank.reinit(p.adapter, derive_seed(sim.training.seed, 2, r + 1))
                sim.new_optimizers(p)


def update_delta(update: RoundUpdate, module: str) -> torch.Tensor:
    """The dense (d_out, d_in) weight update a RoundUpdate merges into `module` (for tests/reports)."""
    b, a = update.merge[module]
    return b @ a
