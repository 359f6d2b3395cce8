"""hetlora (Cho et al. 2024): zero-pad to the largest rank, weight by ||B_k A_k||_F, truncate on the way back.

A_g = sum_k w_k pad(A_k), B_g = sum_k w_k pad(B_k), zero-padded to the largest holder rank R;
w_k = ||B_k A_k||_F / sum_l ||B_l A_l||_F per module (p_k is not used; when every norm is 0, w_k = p_k).
Holder k continues from A_g[:r_k], B_g[:, :r_k]. Left out: the rank self-pruning regulariser.
"""
from __future__ import annotations

import torch

from hsplit.runtime.strategies.base import RoundUpdate
from hsplit.runtime.strategies.global_adapter import GlobalAdapterStrategy, weights


class HetLoRA(GlobalAdapterStrategy):
    name = "hetlora"

    def aggregate(self, updates, glob) -> RoundUpdate:
        out = RoundUpdate()
        for m, fs in updates.items():
            R = glob[m].A.shape[0]
            norms = [float(torch.linalg.matrix_norm(f.B.detach().float() @ f.A.detach().float())) for f in fs]
            w = [n / sum(norms) for n in norms] if sum(norms) > 0 else weights(fs)
            a = torch.zeros_like(glob[m].A, dtype=torch.float32)
            b = torch.zeros_like(glob[m].B, dtype=torch.float32)
            for wk, f in zip(w, fs):
                r = f.A.shape[0]
                a[:r] += wk * f.A.detach().float()
                b[:, :r] += wk * f.B.detach().float()
            assert all(f.A.shape[0] <= R for f in fs)
            out.global_factors[m] = (a, b)
            for f in fs:
                r = f.A.shape[0]
                out.assign_party.setdefault(f.party, {})[m] = (a[:r].clone(), b[:, :r].clone())
        return out
