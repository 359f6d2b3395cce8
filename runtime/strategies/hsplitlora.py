"""hsplitlora (HSplitLoRA, Lin et al. 2025): noise-free aggregation of heterogeneous ranks and split points.

The global model is exactly W = W_0 + the p-weighted aggregate of every holder's update (no cross
terms, any mix of ranks), whether a client or the server's copy for a client held the adapter.

warm (the default, `aggregation: warm` in the plan): every holder h keeps its factors (A_h, B_h) and
their AdamW moments from round to round; only its frozen base moves. Its base is the shared base
weights plus a frozen offset adapter of its own rank (no copy of the weights: memory stays
O(adapters) per holder), offset = -s B_h^0 A_h^0 with (A_h^0, B_h^0) its factors at the round's
start, so that base_h + s B_h A_h = W at every round's start. After the round:
    W' = W + sum_h p_h (s B_h' A_h' - s B_h^0 A_h^0)       merged into the shared base, exactly, as the
         stacked factors [p_1 s B_1', -p_1 s B_1^0, ...], [A_1'; A_1^0; ...]  (2 r_h rows per holder)
    offset_h = -s B_h' A_h'                                  so base_h + s B_h' A_h' = W' again
In round 1 (B = 0 at the start) this is sum_k p_k s B_k A_k. The offset adapter has no dropout (the
holder's own adapter keeps the plan's). AdamW's weight decay pulls each holder's factors towards 0,
i.e. its effective weights towards its own base W - s B_h^0 A_h^0 (decoupled decay of the round's
update plus the carried adapter), as in any LoRA fine-tuning that carries adapters over.

restart (`aggregation: restart`, the ablation; what FLoRA-style stacking does): the stacked factors
[p_1 s B_1 | ... | p_K s B_K], [A_1; ...; A_K] are merged and every adapter restarts from a fresh
LoRA init (seeded by the round), its optimizer re-created.
"""
from __future__ import annotations

import torch

from hsplit.runtime.common import derive_seed
from hsplit.runtime.strategies.base import (ClientFactors, RoundUpdate, Strategy, adapter_bytes, merge_bytes_for,
                                            normalised)


class HSplitLoRA(Strategy):
    name = "hsplitlora"
    clears_moments = True       # restart: the adapters restart after aggregation, moments die with them
    warm = False

    def setup(self, sim) -> None:
        super().setup(sim)
        self.warm = sim.plan.aggregation == "warm"
        self.clears_moments = not self.warm

    # ---- the holders' frozen base offsets (warm) ----
    def offset(self, p) -> str | None:
        return f"{p.adapter}_base" if self.warm else None

    def start(self) -> None:
        for p in self.sim.active:
            self.add_party(p)

    def add_party(self, p) -> None:
        if self.warm:
            self.sim.bank.add(self.offset(p), self.held_ranks(p), dropout=0.0)
            self.reset_offset(p)

    def drop_party(self, p) -> None:
        if self.warm:
            self.sim.bank.delete(self.offset(p))

    @torch.no_grad()
    def enter(self, p, r: int) -> None:
        """warm: its factors and moments are its own; its base is the global model again (offset reset).
        restart: the fresh init of round r, as every holder after round r - 1."""
        if self.warm:
            self.reset_offset(p)
        else:
            self.sim.bank.reinit(p.adapter, derive_seed(self.sim.training.seed, 2, r))
            self.sim.new_optimizers(p)

    @torch.no_grad()
    def reset_offset(self, p) -> None:
        """offset_p = -s B_p A_p: party p's effective weights are the shared base weights again."""
        off = self.sim.bank.factors(self.offset(p))
        for m, (a, b) in self.sim.bank.factors(p.adapter).items():
            off[m][0].copy_(a)
            off[m][1].copy_(-b)

    # ---- aggregation ----
    def combine(self, parties) -> RoundUpdate:
        updates = self.collect(parties)
        if not self.warm:
            return self.aggregate(updates)
        offsets = {}
        for p in parties:
            for m, (a, b) in self.sim.bank.factors(self.offset(p)).items():
                offsets.setdefault(m, []).append((a, b))
        return self.aggregate(updates, offsets)

    def aggregate(self, updates: dict[str, list[ClientFactors]], offsets=None) -> RoundUpdate:
        """sum_k p_k s (B_k A_k + Boff_k Aoff_k) as stacked factors (offsets: module -> [(Aoff_k, Boff_k)]
        aligned with updates[module]; None: restart, no offsets)."""
        out = RoundUpdate(reinit=offsets is None)
        for module, fs in updates.items():
            p = normalised([f.weight for f in fs])
            bs, as_ = [], []
            for k, (pk, f) in enumerate(zip(p, fs)):
                bs.append(pk * f.scaling * f.B.detach().float())
                as_.append(f.A.detach().float())
                if offsets is not None:
                    oa, ob = offsets[module][k]
                    bs.append(pk * f.scaling * ob.detach().float())
                    as_.append(oa.detach().float())
            out.merge[module] = (torch.cat(bs, dim=1), torch.cat(as_, dim=0))
        return out

    @torch.no_grad()
    def apply(self, update: RoundUpdate, r: int, parties) -> None:
        sim = self.sim
        sim.merge_update(update)
        for p in parties:
            if self.warm:
                self.reset_offset(p)
            elif update.reinit:
                sim.bank.reinit(p.adapter, derive_seed(sim.training.seed, 2, r + 1))
                sim.new_optimizers(p)

    def traffic(self, p, update: RoundUpdate) -> tuple[int, int]:
        """Up: its client-side factors; down: the update of every matrix on its blocks, in the cheaper of
        the stacked and the dense form (what the distributed server sends it)."""
        own = self.sim.bank.factors(p.adapter)
        return adapter_bytes(own, p.client_modules), merge_bytes_for(update, p.split)

    # ---- state ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.warm:
            return {}
        return {f"offset/{p.adapter}/{k}": v for p in self.sim.active
                for k, v in self.sim.bank.state(self.offset(p), copy=False).items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.warm:
            for p in self.sim.active:
                prefix = f"offset/{p.adapter}/"
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if state or not self.sim.sampling:      # sampling: reset when the party trains (enter)
                    self.sim.bank.load_state(self.offset(p), state)

    # ---- re-planning ----
    def before_move(self):
        """warm: keep every party's factors; its offset adapter goes (rebuilt at the new ranks)."""
        if not self.warm:
            return None
        carried = {p.adapter: {m: (a.detach().clone(), b.detach().clone())
                               for m, (a, b) in self.sim.bank.factors(p.adapter).items()} for p in self.sim.active}
        for p in self.sim.active:
            self.sim.bank.delete(self.offset(p))
        return carried

    @torch.no_grad()
    def after_move(self, carried) -> None:
        """warm: each adapter keeps its first min(old, new rank) components (a new matrix, or new rows:
        fresh A, B = 0); the offsets are its own factors again, so every holder's effective weights are
        the global model's, exactly: the move does not change the model."""
        if carried is None:
            return
        for p in self.sim.active:
            for m, (a, b) in self.sim.bank.factors(p.adapter).items():
                if m in carried[p.adapter]:
                    oa, ob = carried[p.adapter][m]
                    k = min(a.shape[0], oa.shape[0])
                    a[:k] = oa[:k]
                    b[:, :k] = ob[:, :k]
        self.start()


def update_delta(update: RoundUpdate, module: str) -> torch.Tensor:
    """The dense (d_out, d_in) weight update a RoundUpdate merges into `module` (for tests/reports)."""
    b, a = update.merge[module]
    return b @ a
