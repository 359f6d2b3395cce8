"""centralized: the reference. One model, no split, LoRA on the pooled data of every client; nothing to
aggregate. Its one party holds the first client's ranks expanded over every block (or server_rank on
the plan's modules when it has none) and trains local_steps x clients steps a round."""
from __future__ import annotations

from hsplit.planner.plan import ClientPlan
from hsplit.runtime.data.federated import TokenSet
from hsplit.runtime.train.party import Party
from hsplit.runtime.strategies.base import ClientFactors, RoundUpdate, Strategy


class Centralized(Strategy):
    name = "centralized"

    def make_parties(self) -> list[Party]:
        sim = self.sim
        plan, prof = sim.plan, sim.lm.profile
        c = plan.clients[0]
        whole = ClientPlan(id="central", device=c.device, split_layer=prof.layers, ranks=dict(c.ranks))
        plan.clients.append(whole)
        try:
            ranks = plan.client_ranks(whole, prof)
        finally:
            plan.clients.remove(whole)
        if not ranks and plan.server_rank > 0:
            mods = prof.resolve_modules(plan.modules, f"{plan.source}: modules")
            ranks = {prof.module_name(l, m): plan.server_rank for l in range(prof.layers) for m in mods}
        pooled = TokenSet.cat(sim.data.clients, sim.training.seq_len)
        fleet = plan.predicted.get("round_s")
        return [Party(0, "central", c.device, "k0", prof.layers, ranks, set(ranks), set(), pooled, 1.0,
                      float(fleet) if isinstance(fleet, (int, float)) else None)]

    def steps_per_round(self) -> int:
        return self.sim.training.local_steps * len(self.sim.plan.clients)

    def aggregate(self, updates: dict[str, list[ClientFactors]]) -> RoundUpdate:
        return RoundUpdate()

    def traffic(self, p, update: RoundUpdate) -> tuple[int, int]:
        return 0, 0

    def eval_adapter(self) -> str | None:
        return self.sim.parties[0].adapter
