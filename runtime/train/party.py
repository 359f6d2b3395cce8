"""A party: one client of the run and the server-side state kept for it (its adapter, optimizers, data).

    parties = client_parties(plan, profile, data)     # one per plan client (the default)

The adapter `p.adapter` lives in the shared AdapterBank (one copy of the base weights); its modules
are split at the client's cut into `client_modules` (blocks [0, split)) and `server_modules`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplit.runtime.common import predicted_round
from hsplit.runtime.data.federated import TokenSet


@dataclass
class Party:
    index: int
    id: str
    device: str
    adapter: str                      # peft adapter name in the shared model
    split: int
    ranks: dict[str, int]             # every adapter of this client: client side + server side
    client_modules: set[str]
    server_modules: set[str]
    data: TokenSet
    weight: float
    predicted_round_s: float | None
    opt_client: torch.optim.Optimizer | None = None
    opt_server: torch.optim.Optimizer | None = None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_client, self.opt_server) if o is not None]


def client_parties(plan, profile, data) -> list[Party]:
    """One party per client of the plan, with its split, ranks (both sides), data and weight."""
    out = []
    for i, c in enumerate(plan.clients):
        cr, sr = plan.client_ranks(c, profile), plan.server_ranks(c, profile)
        out.append(Party(i, c.id, c.device, f"k{i}", c.split_layer, {**cr, **sr}, set(cr), set(sr),
                         data.clients[i], c.data_weight, predicted_round(c)))
    return out


def move_party(p: Party, plan, c, profile) -> None:
    """Give party `p` the split and ranks of client `c` of a new plan (re-planning)."""
    cr, sr = plan.client_ranks(c, profile), plan.server_ranks(c, profile)
    p.split, p.ranks, p.client_modules, p.server_modules = c.split_layer, {**cr, **sr}, set(cr), set(sr)
    p.predicted_round_s = predicted_round(c)
