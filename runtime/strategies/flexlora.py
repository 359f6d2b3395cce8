"""flexlora (Bai et al. 2024): exact sum_k p_k B_k A_k, truncated SVD back to every holder's rank.

dW = sum_k p_k s B_k A_k exactly; the global adapter is its SVD (rank <= sum r_k, computed from QR of
the stacked factors: the dense matrix is never formed); holder k continues from the top-r_k singular
triplets (the best rank-r_k approximation, Eckart-Young), sqrt(S) on each factor. Optimizer moments
are cleared every round (the basis changes). The global adapter starts at 0 (B = 0): holders keep
their own LoRA init until round 1.
"""
from __future__ import annotations

import torch

from hsplit.runtime.strategies.base import RoundUpdate
from hsplit.runtime.strategies.global_adapter import GlobalAdapterStrategy, weights


def svd_of_product(b_cat: torch.Tensor, a_cat: torch.Tensor):
    """U, S, Vh of b_cat @ a_cat (rank <= K = b_cat.shape[1]) without forming it: QR + K x K SVD."""
    qb, rb = torch.linalg.qr(b_cat)
    qa, ra = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


class FlexLoRA(GlobalAdapterStrategy):
    name = "flexlora"
    clears_moments = True       # new basis every round: AdamW moments are cleared after local steps

    def global_rank(self, module: str, ranks: list[int]) -> int:
        return min(sum(ranks), min(self.sim.lm.model.get_submodule(module).weight.shape))

    def setup(self, sim) -> None:
        super().setup(sim)
        self.aggregated: set[str] = set()      # modules aggregated at least once (their global is the model's)

    def start(self) -> None:
        pass

    def enter(self, p, r: int) -> None:
        """Its top components of the global adapter on every module aggregated so far; elsewhere it keeps
        its own LoRA init (as every holder does until the module's first aggregation)."""
        self.copy_global_into(p, self.aggregated)

    def apply(self, update: RoundUpdate, r: int, parties) -> None:
        self.aggregated |= set(update.global_factors)
        super().apply(update, r, parties)

    def state_tensors(self) -> dict[str, torch.Tensor]:     # client sampling only (the same run's state otherwise)
        return {f"flex/aggregated/{m}": torch.ones(1) for m in sorted(self.aggregated)} if self.sim.sampling else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.aggregated |= {k[len("flex/aggregated/"):] for k in tensors if k.startswith("flex/aggregated/")}

    def aggregate(self, updates, glob) -> RoundUpdate:
        out = RoundUpdate()
        for m, fs in updates.items():
            p = weights(fs)
            b_cat = torch.cat([pk * f.B.detach().float() for pk, f in zip(p, fs)], dim=1)
            a_cat = torch.cat([f.A.detach().float() for f in fs], dim=0)
            u, sv, vh = svd_of_product(b_cat, a_cat)    # b_cat @ a_cat = sum p_k B_k A_k (scaling s common)
            R = glob[m].A.shape[0]
            root = sv[:R].sqrt()
            a_g = torch.zeros_like(glob[m].A, dtype=torch.float32)
            b_g = torch.zeros_like(glob[m].B, dtype=torch.float32)
            k = min(R, len(sv))
            a_g[:k] = root[:k, None] * vh[:k]
            b_g[:, :k] = u[:, :k] * root[None, :k]
            out.global_factors[m] = (a_g, b_g)
            for f in fs:
                r = f.A.shape[0]
                out.assign_party.setdefault(f.party, {})[m] = (a_g[:r].clone(), b_g[:, :r].clone())
        return out
