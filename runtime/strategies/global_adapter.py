"""The base of the strategies that keep a global adapter on the server (hetlora, flexlora, hafl-*).

    update = strategy.aggregate(updates, glob)         # glob: module -> GlobalFactors (server state)
    # update.global_factors: module -> (A_g, B_g)      the server's new global adapter (eval model)
    # update.assign_party:   party -> module -> (A, B) what each holder continues from

Scaling alpha/r is one constant for every rank (lora.py), so zero-padding, truncating and
re-factoring never change it: the update of a holder is s * B_k @ A_k. The global adapter's rank per
module is the largest holder rank (flexlora: the sum, capped by the matrix); every holder starts
from its view of the freshly initialised global adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplit.runtime.common import GLOBAL
from hsplit.runtime.strategies.base import RoundUpdate, Strategy, adapter_bytes


@dataclass
class GlobalFactors:
    A: torch.Tensor                  # (R, d_in)
    B: torch.Tensor                  # (d_out, R)
    scores: torch.Tensor | None = None   # hafl: (R,) importance per rank-1 component


def weights(fs) -> list[float]:
    total = sum(f.weight for f in fs)
    return [f.weight / total for f in fs]


def holder_ranks(parties) -> dict[str, list[int]]:
    """Module -> the ranks of its holders."""
    holders: dict[str, list[int]] = {}
    for p in parties:
        for m, r in p.ranks.items():
            if r > 0:
                holders.setdefault(m, []).append(r)
    return holders


class GlobalAdapterStrategy(Strategy):
    """A global adapter kept by the server; every holder continues from its part of it."""

    _global_ranks: dict[str, int] | None = None

    def global_ranks(self) -> dict[str, int]:
        if self._global_ranks is None:          # fixed by the parties the run starts with
            self._global_ranks = {m: self.global_rank(m, rs) for m, rs in holder_ranks(self.sim.parties).items()}
        return self._global_ranks

    def global_rank(self, module: str, ranks: list[int]) -> int:
        return max(ranks)

    def held(self, party: str, m: str, r: int) -> list[int]:
        """The global components party holds in the r rows of its adapter on m."""
        return list(range(r))

    @torch.no_grad()
    def start(self) -> None:
        self.copy_global_into_holders()

    @torch.no_grad()
    def copy_global_into_holders(self) -> None:
        for p in self.sim.active:
            self.copy_global_into(p)

    @torch.no_grad()
    def copy_global_into(self, p, modules=None) -> None:
        """Party p's factors (on `modules`, default all) from the components of the global adapter it holds."""
        bank = self.sim.bank
        g = bank.factors(GLOBAL)
        for m, (a, b) in bank.factors(p.adapter).items():
            if modules is None or m in modules:
                idx = self.held(p.adapter, m, a.shape[0])
                a.copy_(g[m][0][idx])
                b.copy_(g[m][1][:, idx])

    def enter(self, p, r: int) -> None:
        """Its part of the global adapter (what every holder continues from); its AdamW moments are its own."""
        self.copy_global_into(p)

    def updated_ranks(self, p) -> dict[str, int]:
        """Rows of each of p's adapters that its client updated this round (and uploads)."""
        return {m: r for m, r in p.ranks.items() if r > 0}

    def global_state(self) -> dict[str, GlobalFactors]:
        g = self.sim.bank.factors(GLOBAL)
        return {m: GlobalFactors(a.detach(), b.detach()) for m, (a, b) in g.items()}

    def combine(self, parties) -> RoundUpdate:
        return self.aggregate(self.collect(parties), self.global_state())

    @torch.no_grad()
    def apply(self, update: RoundUpdate, r: int, parties) -> None:
        """The update's global adapter into the bank, then every holder continues from its part (nothing
        when the update has nothing for this process's blocks: a client process's part of it)."""
        if not (update.global_factors or update.assign_party):
            return
        g = self.sim.bank.factors(GLOBAL)
        for m, (a, b) in update.global_factors.items():
            g[m][0].copy_(a)
            g[m][1].copy_(b)
        self.continue_from(update, g, parties)

    def continue_from(self, update: RoundUpdate, g, parties) -> None:
        sim = self.sim
        for p in parties:
            f = sim.bank.factors(p.adapter)
            mods = update.assign_party.get(p.adapter)
            if mods is None:    # a holder that was not aggregated (a lost client): the global at its rank
                mods = {m: (g[m][0][:a.shape[0]], g[m][1][:, :a.shape[0]]) for m, (a, _) in f.items()
                        if m in update.global_factors}
            for m, (a, b) in mods.items():
                f[m][0].copy_(a)
                f[m][1].copy_(b)

    def traffic(self, p, update: RoundUpdate) -> tuple[int, int]:
        """Up: the components it updated; down: what it holds next round."""
        own = self.sim.bank.factors(p.adapter)
        up = self.updated_ranks(p)
        return (sum(4 * up[m] * (a.shape[1] + b.shape[0]) for m, (a, b) in own.items() if m in p.client_modules),
                adapter_bytes(own, p.client_modules))
