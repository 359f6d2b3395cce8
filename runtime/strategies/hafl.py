"""hafl-truncation / hafl-freezing (HAFL, Su, Yan, Deng 2024): importance-aware rank-1 aggregation.

The global adapter has R = the largest holder rank; component i is row A_g[i] with column B_g[:, i].
Truncation: holder k holds and updates the top-r_k components by the server's importance score g.
Freezing: holder k holds all R and updates only its top-r_k by its OWN latest scores (the others get
no update, weight decay and Adam momentum included: restored after every optimizer step).
Aggregation is rank-1: each component is the p_k-weighted mean over the holders that updated it;
untouched components keep their value. Importance (AdaLoRA, Zhang et al. 2023) of every parameter w:
I = |w * dL/dw|, Ibar = b1 Ibar + (1-b1) I, Ubar = b2 Ubar + (1-b2) |I - Ibar| (b1 = b2 = 0.85,
pre-clipping gradients, every local step, EMAs restarted each round because the factors are
replaced); a component's score = mean(Ibar*Ubar) over its A row + mean over its B column (AdaLoRA's
third term, the singular value E_i, does not exist in plain LoRA). g[i] = p_k-weighted mean of the
scores reported for i this round by its updaters; untouched components keep their score. Ties
(round 1, all scores 0): lower index first.
"""
from __future__ import annotations

import torch

from hsplit.runtime.common import GLOBAL
from hsplit.runtime.strategies.base import RoundUpdate
from hsplit.runtime.strategies.global_adapter import GlobalAdapterStrategy, GlobalFactors

BETA1 = BETA2 = 0.85


def top_components(scores: torch.Tensor, r: int) -> list[int]:
    """The r highest-scoring component indices (ties: lower index first), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:r])


class HAFL(GlobalAdapterStrategy):
    """Both HAFL variants; `freezing` tells them apart."""
    freezing = False

    def setup(self, sim) -> None:
        super().setup(sim)
        self.selection: dict[str, dict[str, list[int]]] = {}   # party -> module -> global components
        self.scores: dict[str, torch.Tensor] = {}              # module -> (R,) the server's scores g
        self.local_scores: dict[str, dict[str, torch.Tensor]] = {}   # freezing: party -> module -> (R,)
        self.ema: dict[str, dict] = {}                          # party -> (module, "A"|"B") -> [Ibar, Ubar]

    def start(self) -> None:
        sim = self.sim
        for p in sim.active:
            self.add_party(p)
        self.scores = {m: torch.zeros(R) for m, R in self.global_ranks().items()}
        super().start()

    # ---- client sampling: the state kept per party while it sits out ----
    def add_party(self, p) -> None:
        self.selection[p.adapter] = {m: list(range(r)) for m, r in p.ranks.items() if r > 0}

    def drop_party(self, p) -> None:
        for d in (self.selection, self.ema, self.local_scores):
            d.pop(p.adapter, None)

    def party_state(self, p) -> dict[str, torch.Tensor]:
        out = {f"sel/{m}": torch.tensor(s, dtype=torch.int64) for m, s in self.selection.get(p.adapter, {}).items()}
        out.update({f"local/{m}": s for m, s in self.local_scores.get(p.adapter, {}).items()})
        return out

    def load_party_state(self, p, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            kind_, m = k.split("/", 1)
            if kind_ == "sel":
                self.selection.setdefault(p.adapter, {})[m] = [int(i) for i in v.tolist()]
            elif kind_ == "local":
                self.local_scores.setdefault(p.adapter, {})[m] = v.clone()

    @torch.no_grad()
    def enter(self, p, r: int) -> None:
        """Next components from the current scores (truncation: the server's; freezing: its own), its
        factors from the global adapter; truncation: a slot whose component changed since the party last
        trained starts with zero AdamW moments (as after an aggregation it took part in)."""
        old = {m: list(s) for m, s in self.selection[p.adapter].items()}
        self.reselect([p])
        self.copy_global_into(p)
        if not self.freezing:
            for m, (a, b) in self.sim.bank.factors(p.adapter).items():
                changed = [j for j, (x, y) in enumerate(zip(old[m], self.selection[p.adapter][m])) if x != y]
                if changed:
                    self._zero_moments(p, a, b, changed)

    def held_ranks(self, p) -> dict[str, int]:
        if self.freezing:       # holds every component, updates its top r
            return {m: self.global_ranks()[m] for m, r in p.ranks.items() if r > 0}
        return {m: r for m, r in p.ranks.items() if r > 0}

    def held(self, party: str, m: str, r: int) -> list[int]:
        return list(range(r)) if self.freezing else self.selection[party][m]

    def updated_ranks(self, p) -> dict[str, int]:
        return {m: len(s) for m, s in self.selection[p.adapter].items()}

    # ---- around every optimizer step ----
    @torch.no_grad()
    def before_step(self, p, step_idx: int, modules):
        """Importance EMAs from the fresh gradients; freezing: zero frozen gradients, snapshot them."""
        ema = self.ema.setdefault(p.adapter, {})
        snap = {}
        for m, (a, b) in self.sim.bank.factors(p.adapter).items():
            if m not in modules:
                continue
            for key, w in (("A", a), ("B", b)):
                if step_idx == 0:
                    ema.pop((m, key), None)     # a new round: the factors were replaced by the aggregate
                if w.grad is None:
                    continue
                imp = (w.detach() * w.grad).abs().float()
                if (m, key) not in ema:
                    ema[(m, key)] = [torch.zeros_like(imp), torch.zeros_like(imp)]
                ibar, ubar = ema[(m, key)]
                ibar.mul_(BETA1).add_(imp, alpha=1 - BETA1)
                ubar.mul_(BETA2).add_((imp - ibar).abs(), alpha=1 - BETA2)
            if self.freezing:
                keep = set(self.selection[p.adapter][m])
                frozen = [i for i in range(a.shape[0]) if i not in keep]
                if frozen:
                    snap[m] = (frozen, a[frozen].clone(), b[:, frozen].clone())
                    if a.grad is not None:
                        a.grad[frozen] = 0
                    if b.grad is not None:
                        b.grad[:, frozen] = 0
        return snap

    @torch.no_grad()
    def after_step(self, p, snap) -> None:
        if not snap:
            return
        f = self.sim.bank.factors(p.adapter)
        for m, (frozen, a0, b0) in snap.items():
            f[m][0][frozen] = a0
            f[m][1][:, frozen] = b0

    def component_scores(self, party: str, m: str, r: int) -> torch.Tensor:
        ema = self.ema.get(party, {})
        if (m, "A") not in ema or (m, "B") not in ema:
            return torch.zeros(r)
        sa = (ema[(m, "A")][0] * ema[(m, "A")][1]).mean(dim=1)
        sb = (ema[(m, "B")][0] * ema[(m, "B")][1]).mean(dim=0)
        return (sa + sb).cpu()

    # ---- aggregation ----
    def global_state(self) -> dict[str, GlobalFactors]:
        g = self.sim.bank.factors(GLOBAL)
        return {m: GlobalFactors(a.detach(), b.detach(), self.scores.get(m)) for m, (a, b) in g.items()}

    def combine(self, parties) -> RoundUpdate:
        updates = self.collect(parties)
        for m, fs in updates.items():      # what rank-1 aggregation needs: components, updated slots, scores
            for f in fs:
                r = f.A.shape[0]
                sel = self.selection[f.party][m]
                f.scores = self.component_scores(f.party, m, r)
                f.components = list(range(r)) if self.freezing else list(sel)
                f.updated = list(sel) if self.freezing else list(range(r))
        update = self.aggregate(updates, self.global_state())
        if self.freezing:                  # each holder's own scores choose what it updates next round
            for p in parties:
                for m, (a, _) in self.sim.bank.factors(p.adapter).items():
                    update.local_scores.setdefault(p.adapter, {})[m] = self.component_scores(p.adapter, m, a.shape[0])
        return update

    def aggregate(self, updates, glob) -> RoundUpdate:
        out = RoundUpdate()
        for m, fs in updates.items():
            g = glob[m]
            a, b = g.A.detach().float().cpu().clone(), g.B.detach().float().cpu().clone()
            scores = g.scores.clone()
            num_a, num_b = torch.zeros_like(a), torch.zeros_like(b)
            num_s, den = torch.zeros_like(scores), torch.zeros_like(scores)
            for f in fs:
                slots = torch.as_tensor(f.updated, dtype=torch.long)
                if not len(slots):
                    continue
                comp = torch.as_tensor(f.components, dtype=torch.long)[slots]      # distinct per holder
                num_a.index_add_(0, comp, f.weight * f.A.detach().float().cpu()[slots])
                num_b.index_add_(1, comp, f.weight * f.B.detach().float().cpu()[:, slots])
                num_s.index_add_(0, comp, f.weight * f.scores.float()[slots])
                den.index_add_(0, comp, torch.full((len(slots),), float(f.weight)))
            hit = den > 0
            a[hit] = num_a[hit] / den[hit, None]
            b[:, hit] = num_b[:, hit] / den[hit][None, :]
            scores[hit] = num_s[hit] / den[hit]
            out.global_factors[m] = (a, b)
            out.global_scores[m] = scores
        return out

    def continue_from(self, update: RoundUpdate, g, parties) -> None:
        """New scores and selections; every holder continues from the components it holds (truncation: a
        component newly selected into a slot starts with zero AdamW moments there)."""
        sim = self.sim
        self.scores.update({m: s.clone() for m, s in update.global_scores.items()})
        for party, mods in update.local_scores.items():
            self.local_scores.setdefault(party, {}).update(mods)
        old = {k: {m: list(s) for m, s in v.items()} for k, v in self.selection.items()}
        self.reselect(parties)
        for p in parties:
            for m, (a, b) in sim.bank.factors(p.adapter).items():
                idx = self.held(p.adapter, m, a.shape[0])
                a.copy_(g[m][0][idx])
                b.copy_(g[m][1][:, idx])
                changed = [j for j, (x, y) in enumerate(zip(old[p.adapter][m], idx)) if x != y]
                if changed and not self.freezing:
                    self._zero_moments(p, a, b, changed)

    def reselect(self, parties=None) -> None:
        """Next round's components of `parties` (default: every party in the bank) from the current scores."""
        for p in self.sim.active if parties is None else parties:
            for m, r in p.ranks.items():
                if r <= 0:
                    continue
                if self.freezing:
                    local = self.local_scores.get(p.adapter, {}).get(m)
                    self.selection[p.adapter][m] = top_components(local, r) if local is not None else list(range(r))
                else:
                    self.selection[p.adapter][m] = top_components(self.scores[m], r)

    @staticmethod
    def _zero_moments(p, a, b, slots) -> None:
        for opt in p.optimizers():
            for w, cols in ((a, False), (b, True)):
                st = opt.state.get(w)
                if not st:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        if cols:
                            st[key][:, slots] = 0
                        else:
                            st[key][slots] = 0

    # ---- state ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"het/scores/{m}": s for m, s in self.scores.items()}
        for party, mods in self.local_scores.items():
            for m, s in mods.items():
                out[f"het/local/{party}/{m}"] = s
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            if k.startswith("het/scores/"):
                self.scores[k[len("het/scores/"):]] = v.clone()
            elif k.startswith("het/local/"):
                party, m = k[len("het/local/"):].split("/", 1)
                self.local_scores.setdefault(party, {})[m] = v.clone()
        self.reselect()

    def upload(self, p, modules) -> dict:
        """The client's importance EMAs of its modules (the server scores the components)."""
        out = {}
        for (m, key), pair in self.ema.get(p.adapter, {}).items():
            if m in modules:
                out.setdefault(m, {})[key] = list(pair)
        return out

    def absorb(self, p, data: dict) -> None:
        ema = self.ema.setdefault(p.adapter, {})
        for m, keys in data.items():
            for key, pair in keys.items():
                ema[(m, key)] = [x.to(self.sim.device) for x in pair]


class HAFLTruncation(HAFL):
    name = "hafl-truncation"


class HAFLFreezing(HAFL):
    name = "hafl-freezing"
    freezing = True
