"""Heterogeneous-rank strategies that keep a global adapter: hetlora, flexlora, hafl-truncation/-freezing.

    strategy = STRATEGIES["hetlora"]                   # registered in aggregate.py
    update = strategy.aggregate(updates, glob)         # glob: module -> GlobalFactors (server state)
    # update.global_factors: module -> (A_g, B_g)      the server's new global adapter (eval model)
    # update.assign_party:   party -> module -> (A, B) what each holder continues from
    state = HetState(sim)                              # the runtime side (train.py): ranks, selection,
                                                       # importance, freezing, checkpoint tensors

Every (block, module) is aggregated over its holders, client- or server-held alike (DESIGN.md).
Scaling alpha/r is one constant for every rank (lora.py), so zero-padding, truncating and
re-factoring never change it: the update of a holder is s * B_k @ A_k.

- hetlora (Cho et al. 2024): A_g = sum_k w_k pad(A_k), B_g = sum_k w_k pad(B_k), zero-padded to the
  largest holder rank R; w_k = ||B_k A_k||_F / sum_l ||B_l A_l||_F per module (p_k is not used; when
  every norm is 0, w_k = p_k). Holder k continues from A_g[:r_k], B_g[:, :r_k]. Left out: the rank
  self-pruning regulariser.
- flexlora (Bai et al. 2024): dW = sum_k p_k s B_k A_k exactly; the global adapter is its SVD (rank
  <= sum r_k, computed from QR of the stacked factors: the dense matrix is never formed); holder k
  continues from the top-r_k singular triplets (the best rank-r_k approximation, Eckart-Young),
  sqrt(S) on each factor. Optimizer moments are cleared every round (the basis changes).
- hafl-truncation / hafl-freezing (Su, Yan, Deng 2024): the global adapter has R = the largest
  holder rank; component i is row A_g[i] with column B_g[:, i]. Truncation: holder k holds and
  updates the top-r_k components by the server's importance score g. Freezing: holder k holds all
  R and updates only its top-r_k by its OWN latest scores (the others get no update, weight decay
  and Adam momentum included: restored after every optimizer step). Aggregation is rank-1: each
  component is the p_k-weighted mean over the holders that updated it; untouched components keep
  their value. Importance (AdaLoRA, Zhang et al. 2023) of every parameter w: I = |w * dL/dw|,
  Ibar = b1 Ibar + (1-b1) I, Ubar = b2 Ubar + (1-b2) |I - Ibar| (b1 = b2 = 0.85, pre-clipping
  gradients, every local step, EMAs restarted each round because the factors are replaced); a
  component's score = mean(Ibar*Ubar) over its A row + mean over its B column (AdaLoRA's third term,
  the singular value E_i, does not exist in plain LoRA). g[i] = p_k-weighted mean of the scores
  reported for i this round by its updaters; untouched components keep their score. Ties (round 1,
  all scores 0): lower index first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HETEROGENEOUS = ("hetlora", "flexlora", "hafl-truncation", "hafl-freezing")
BETA1 = BETA2 = 0.85


@dataclass
class GlobalFactors:
    A: torch.Tensor                  # (R, d_in)
    B: torch.Tensor                  # (d_out, R)
    scores: torch.Tensor | None = None   # hafl: (R,) importance per rank-1 component


def _p(fs) -> list[float]:
    total = sum(f.weight for f in fs)
    return [f.weight / total for f in fs]


def top_components(scores: torch.Tensor, r: int) -> list[int]:
    """The r highest-scoring component indices (ties: lower index first), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:r])


# ------------------------------------------------------------------ aggregation (pure functions)

class HetLoRA:
    """hetlora: zero-pad to the largest rank, weight by ||B_k A_k||_F, truncate on the way back."""
    name = "hetlora"
    resets_adapters = False
    needs_global = True

    def aggregate(self, updates, glob):
        from hsplit.runtime.aggregate import RoundUpdate

        out = RoundUpdate()
        for m, fs in updates.items():
            R = glob[m].A.shape[0]
            norms = [float(torch.linalg.matrix_norm(f.B.detach().float() @ f.A.detach().float())) for f in fs]
            w = [n / sum(norms) for n in norms] if sum(norms) > 0 else _p(fs)
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


def svd_of_product(b_cat: torch.Tensor, a_cat: torch.Tensor):
    """U, S, Vh of b_cat @ a_cat (rank <= K = b_cat.shape[1]) without forming it: QR + K x K SVD."""
    qb, rb = torch.linalg.qr(b_cat)
    qa, ra = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


class FlexLoRA:
    """flexlora: exact sum_k p_k B_k A_k, truncated SVD back to every holder's rank."""
    name = "flexlora"
    resets_adapters = True      # new basis every round: AdamW moments are cleared after local steps
    needs_global = True

    def aggregate(self, updates, glob):
        from hsplit.runtime.aggregate import RoundUpdate

        out = RoundUpdate()
        for m, fs in updates.items():
            p = _p(fs)
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


class HAFL:
    """hafl-truncation / hafl-freezing: rank-1 aggregation of the components each holder updated."""
    needs_global = True
    resets_adapters = False

    def __init__(self, freezing: bool):
        self.freezing = freezing
        self.name = "hafl-freezing" if freezing else "hafl-truncation"

    def aggregate(self, updates, glob):
        from hsplit.runtime.aggregate import RoundUpdate

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


# ------------------------------------------------------------------ the runtime side

class HetState:
    """Per-run state of a heterogeneous strategy inside train.Simulation (one instance per run)."""

    def __init__(self, sim, strategy_name: str):
        self.sim = sim
        self.name = strategy_name
        self.hafl = strategy_name.startswith("hafl")
        self.freezing = strategy_name == "hafl-freezing"
        parties = sim.parties
        holders: dict[str, list[int]] = {}
        for p in parties:
            for m, r in p.ranks.items():
                if r > 0:
                    holders.setdefault(m, []).append(r)
        if strategy_name == "flexlora":
            def cap(m):
                w = sim.lm.model.get_submodule(m).weight
                return min(w.shape)
            self.global_ranks = {m: min(sum(rs), cap(m)) for m, rs in holders.items()}
        else:
            self.global_ranks = {m: max(rs) for m, rs in holders.items()}
        # hafl: which global components each party holds (truncation) or updates (both), per module
        self.selection: dict[str, dict[str, list[int]]] = {
            p.adapter: {m: list(range(r)) for m, r in p.ranks.items() if r > 0} for p in parties}
        self.scores: dict[str, torch.Tensor] = {m: torch.zeros(R) for m, R in self.global_ranks.items()}
        self.local_scores: dict[str, dict[str, torch.Tensor]] = {}   # freezing: party -> module -> (R,)
        self._ema: dict[str, dict] = {}

    # ---- setup ----
    def held_ranks(self, p) -> dict[str, int]:
        """The rank of every adapter the party holds (freezing: the full global rank)."""
        if self.freezing:
            return {m: self.global_ranks[m] for m, r in p.ranks.items() if r > 0}
        return {m: r for m, r in p.ranks.items() if r > 0}

    @torch.no_grad()
    def start(self) -> None:
        """Every holder starts from its view of the (freshly initialised) global adapter."""
        if self.name == "flexlora":
            return      # the global is 0 (B = 0); holders keep their own LoRA init until round 1
        from hsplit.runtime.train import GLOBAL
        g = self.sim.bank.factors(GLOBAL)
        for p in self.sim.parties:
            for m, (a, b) in self.sim.bank.factors(p.adapter).items():
                idx = self._held(p.adapter, m, a.shape[0])
                a.copy_(g[m][0][idx])
                b.copy_(g[m][1][:, idx])

    def _held(self, party: str, m: str, r: int) -> list[int]:
        if self.name == "hafl-truncation":
            return self.selection[party][m]
        return list(range(r))

    def updated_ranks(self, p) -> dict[str, int]:
        return {m: len(s) for m, s in self.selection[p.adapter].items()}

    # ---- around every optimizer step ----
    @torch.no_grad()
    def before_step(self, p, step_idx: int):
        """Importance EMAs from the fresh gradients; freezing: zero frozen gradients, snapshot them."""
        if not self.hafl:
            return None
        ema = self._ema.setdefault(p.adapter, {})
        if step_idx == 0:
            ema.clear()         # a new round: the factors were replaced by the aggregate
        snap = {}
        for m, (a, b) in self.sim.bank.factors(p.adapter).items():
            for key, w in (("A", a), ("B", b)):
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
        ema = self._ema.get(party, {})
        if (m, "A") not in ema or (m, "B") not in ema:
            return torch.zeros(r)
        sa = (ema[(m, "A")][0] * ema[(m, "A")][1]).mean(dim=1)
        sb = (ema[(m, "B")][0] * ema[(m, "B")][1]).mean(dim=0)
        return (sa + sb).cpu()

    # ---- aggregation ----
    def global_state(self) -> dict[str, GlobalFactors]:
        from hsplit.runtime.train import GLOBAL
        g = self.sim.bank.factors(GLOBAL)
        return {m: GlobalFactors(a.detach(), b.detach(), self.scores.get(m)) for m, (a, b) in g.items()}

    def annotate(self, updates) -> None:
        """Attach to every holder's factors what hafl needs: components, updated slots, scores."""
        if not self.hafl:
            return
        for m, fs in updates.items():
            for f in fs:
                r = f.A.shape[0]
                sel = self.selection[f.party][m]
                f.scores = self.component_scores(f.party, m, r)
                if self.freezing:
                    f.components = list(range(r))
                    f.updated = list(sel)
                else:
                    f.components = list(sel)
                    f.updated = list(range(r))

    def aggregate(self, strategy, updates):
        self.annotate(updates)
        update = strategy.aggregate(updates, self.global_state())
        if self.hafl:        # what each holder continues from (selection for the next round)
            new_local = {}
            for p in self.sim.parties:
                for m, (a, _) in self.sim.bank.factors(p.adapter).items():
                    if self.freezing:
                        new_local.setdefault(p.adapter, {})[m] = self.component_scores(p.adapter, m, a.shape[0])
            update.local_scores = new_local
        return update

    @torch.no_grad()
    def apply(self, update) -> None:
        from hsplit.runtime.train import GLOBAL
        sim = self.sim
        g = sim.bank.factors(GLOBAL)
        for m, (a, b) in update.global_factors.items():
            g[m][0].copy_(a)
            g[m][1].copy_(b)
        if self.hafl:
            self.scores.update({m: s.clone() for m, s in update.global_scores.items()})
            for party, mods in getattr(update, "local_scores", {}).items():
                self.local_scores.setdefault(party, {}).update(mods)
            old = {k: {m: list(s) for m, s in v.items()} for k, v in self.selection.items()}
            self.reselect()
            for p in sim.parties:
                for m, (a, b) in sim.bank.factors(p.adapter).items():
                    idx = self._held(p.adapter, m, a.shape[0])
                    a.copy_(g[m][0][idx])
                    b.copy_(g[m][1][:, idx])
                    if self.name == "hafl-truncation":
                        changed = [j for j, (x, y) in enumerate(zip(old[p.adapter][m], idx)) if x != y]
                        if changed:
                            self._zero_moments(p, a, b, changed)
            return
        for p in sim.parties:
            f = sim.bank.factors(p.adapter)
            mods = update.assign_party.get(p.adapter)
            if mods is None:    # a holder that was not aggregated (a lost client): the global at its rank
                mods = {m: (g[m][0][:a.shape[0]], g[m][1][:, :a.shape[0]]) for m, (a, _) in f.items()
                        if m in update.global_factors}
            for m, (a, b) in mods.items():
                f[m][0].copy_(a)
                f[m][1].copy_(b)

    def reselect(self) -> None:
        """hafl: next round's components per party from the current scores."""
        for p in self.sim.parties:
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
        for opt in (p.opt_client, p.opt_server):
            if opt is None:
                continue
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

    # ---- checkpoint ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.hafl:
            for m, s in self.scores.items():
                out[f"het/scores/{m}"] = s
            for party, mods in self.local_scores.items():
                for m, s in mods.items():
                    out[f"het/local/{party}/{m}"] = s
        return out

    def load_state_tensors(self, optim: dict[str, torch.Tensor]) -> None:
        if not self.hafl:
            return
        for k, v in optim.items():
            if k.startswith("het/scores/"):
                self.scores[k[len("het/scores/"):]] = v.clone()
            elif k.startswith("het/local/"):
                party, m = k[len("het/local/"):].split("/", 1)
                self.local_scores.setdefault(party, {})[m] = v.clone()
        self.reselect()
