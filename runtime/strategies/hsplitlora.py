"""hsplitlora (HSplitLoRA, Lin et al. 2025): noise-free aggregation of heterogeneous ranks and split points.

The global model is exactly W = W_0 + the p-weighted aggregate of every holder's update (no cross
terms, any mix of ranks), whether a client or the server's copy for a client held the adapter. It
lives at the server (in-process: the shared base weights); evaluation, checkpoints and export use it.

warm holders (`aggregation: bounded`, and `warm`): every holder h keeps its factors (A_h, B_h) and their
AdamW moments from round to round; only its frozen base moves. Its base is the shared base weights plus
a frozen offset adapter of its own (no copy of the weights: memory stays O(adapters) per holder). After
a round, with (A_h^0, B_h^0) its factors at the round's start:
    W' = W + sum_h p_h (s B_h' A_h' - s B_h^0 A_h^0)       merged into the shared base, exactly, as the
         stacked factors [p_1 s B_1', -p_1 s B_1^0, ...], [A_1'; A_1^0; ...]  (2 r_h rows per holder)

warm (the full download, an ablation): every holder's base is W' - s B_h' A_h' exactly (offset -s B_h' A_h'),
so a client downloads the update of every matrix on its blocks (stacked factors or dense, the cheaper).

bounded (the bounded download): a client's base on its own blocks [0, split) is W' - s B' A' - owed: after
the round what its blocks lack is
    D = W' - s B' A' - base = (W' - W) - s B' A' + s B^0 A^0 + owed
(the server's copies for it, blocks >= split, need nothing: exact as in warm). The server sends the rank-R
truncation T of D (exact SVD of D's stacked factors: QR of both, the merge's part once per matrix, SVD of
the small core) with R = max(q, floor_rank) on a matrix the client adapts at rank q and R = floor_rank on a matrix of its blocks
that only others adapt (a matrix nobody adapted this round: nothing); the client adds T to its copy; owed' = D - T (error feedback: the next round's
D contains it again). owed is kept as factors of rank owed_rank (R_o); components of D beyond R + R_o
are dropped from what the server tracks (their Frobenius norm is metrics.csv `owed_dropped`; in-process
the simulated client's base is W' - s B' A' - owed, i.e. it receives them for free; a distributed client
keeps lacking them). The offset adapter holds both parts, rows [0, r): (A^0, -B^0), rows [r, r + R_o):
(A_o, -B_o) with owed = s B_o A_o. A client that sat rounds out (sampling) owes the rounds' merged
updates it missed (read back from the run folder's checkpoints, which keep every round's merge): on its
return they are added to its owed part (re-truncated to R_o) and it downloads as usual after the round it
trains. A distributed client holds its own copy of its blocks: it adds T and
its own s (B' A' - B^0 A^0) to its weights (update.own_base) and keeps the owed rows at 0; to evaluate the
global model it is sent its owed factors (eval_state).

restart (`aggregation: restart`, the ablation; what FLoRA-style stacking does): the stacked factors
[p_1 s B_1 | ... | p_K s B_K], [A_1; ...; A_K] are merged and every adapter restarts from a fresh
LoRA init (seeded by the round), its optimizer re-created.
AdamW's weight decay pulls each warm holder's factors towards 0, i.e. its effective weights towards its
own base, as in any LoRA fine-tuning that carries adapters over.
"""
from __future__ import annotations

import torch

from hsplit.runtime.common import derive_seed
from hsplit.runtime.strategies.base import (ClientFactors, RoundUpdate, Strategy, adapter_bytes, merge_bytes_for,
                                            normalised, on_blocks)

OWED_RANK_FACTOR = 4      # default owed_rank: 4 x the largest rank of ranks_allowed
TINY = 1e-7               # singular values below TINY x the largest are zero (their vectors are arbitrary)


def basis(bs: torch.Tensor, as_: torch.Tensor):
    """D = bs @ as_ as orthonormal bases and coefficients, in float64: bs = QB RB, as_.T = QA RA, so that
    D = QB (RB RA^T) QA^T. The round's merge has the same basis for every client: settle computes it once per
    matrix and truncated() extends it with each client's own columns."""
    qb, rb = torch.linalg.qr(bs.double())
    qa, ra = torch.linalg.qr(as_.double().T)
    return qb, rb, qa, ra


def _extend(q: torch.Tensor, r: torch.Tensor, x: torch.Tensor):
    """[q r | x] = [q qz] [[r, p], [0, rz]]: q (d, n) orthonormal, x (d, k) new columns (block Gram-Schmidt, two
    passes, then a QR of the small remainder); costs O(d n k + d k^2), not a QR of all n + k columns."""
    if not x.shape[1]:
        return q, r
    p = q.T @ x
    if q.shape[1] >= q.shape[0]:                # q already spans the whole space
        return q, torch.cat([r, p], 1)
    z = x - q @ p
    p2 = q.T @ z
    z -= q @ p2
    qz, rz = torch.linalg.qr(z)
    top = torch.cat([r, p + p2], 1)
    bottom = torch.cat([rz.new_zeros(rz.shape[0], r.shape[1]), rz], 1)
    return torch.cat([q, qz], 1), torch.cat([top, bottom], 0)


def truncated(bs: torch.Tensor, as_: torch.Tensor, keep: int, owed: int, shared=None):
    """D = bs @ as_ ((d_out, K) @ (K, d_in)) split by its SVD into T (components [0, keep)), O ([keep, keep + owed))
    and the rest: returns (B_T (d_out, keep), A_T (keep, d_in)), (B_O, A_O) and the rest's squared Frobenius norm.
    Exact SVD of the stacked form (QR of both factors, SVD of the K x K core), in float64; fewer components than
    asked are padded with zeros (what is sent has exactly `keep` columns). shared: basis() of further leading
    factors (B0, A0), D = B0 A0 + bs @ as_ (the round's merge, factored once for every client)."""
    if shared is None:
        qb, rb, qa, ra = basis(bs, as_)
    else:
        qb, rb = _extend(shared[0], shared[1], bs.double())
        qa, ra = _extend(shared[2], shared[3], as_.double().T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    n = min(keep + owed, len(sv))                # only the components kept are formed (d x n, not d x K)
    left, right = qb @ u[:, :n], vh[:n] @ qa.T
    if len(sv):
        sv = torch.where(sv > TINY * sv[0], sv, torch.zeros_like(sv))
    if n:
        # a sign per component (the largest entry of its right vector positive): the same factors every time
        idx = right.abs().argmax(dim=1)
        sign = torch.sign(right[torch.arange(n), idx])
        sign[sign == 0] = 1
        left, right = left * sign, right * sign[:, None]

    def part(lo, k):
        pb, pa = qb.new_zeros(qb.shape[0], k), qa.new_zeros(k, qa.shape[0])
        c = max(0, min(k, n - lo))
        live = sv[lo:lo + c] > 0
        pb[:, :c] = left[:, lo:lo + c] * sv[lo:lo + c]
        pa[:c] = right[lo:lo + c] * live[:, None]
        return pb.float(), pa.float()

    return part(0, keep), part(keep, owed), float((sv[keep + owed:] ** 2).sum())


class HSplitLoRA(Strategy):
    name = "hsplitlora"
    clears_moments = True       # restart: the adapters restart after aggregation, moments die with them
    warm = False
    bounded = False

    def setup(self, sim) -> None:
        super().setup(sim)
        plan = sim.plan
        self.bounded = plan.aggregation == "bounded"
        self.warm = plan.aggregation in ("warm", "bounded")
        self.clears_moments = not self.warm
        positive = [q for q in plan.ranks_allowed if q > 0] or [1]
        self.floor_rank = plan.download.get("floor_rank", min(positive))
        self.owed_rank = plan.download.get("owed_rank", OWED_RANK_FACTOR * max(positive))
        self.dropped: dict[str, float] = {}        # party -> Frobenius norm of what its owed part dropped
        self.history: dict[int, dict] = {}         # round -> its merge (sampling without a run folder: merge_of)
        self.synced: dict[str, int] = {}           # party -> rounds its base has followed (sampling)

    # ---- the holders' frozen base offsets (warm, bounded) ----
    def offset(self, p) -> str | None:
        return f"{p.adapter}_base" if self.warm else None

    def adapted(self) -> set[str]:
        """Every matrix some holder adapts (a client, or the server's copy for a client)."""
        return {m for p in self.sim.parties for m, r in p.ranks.items() if r > 0}

    def offset_ranks(self, p) -> dict[str, int]:
        """warm: its own ranks. bounded: + owed_rank rows on its client-side matrices, and an owed part of rank
        owed_rank on every matrix of its blocks that only others adapt."""
        out = {m: r for m, r in p.ranks.items() if r > 0}
        if self.bounded and self.owed_rank > 0:
            for m in out:
                if m in p.client_modules:
                    out[m] += self.owed_rank
            for m in self.adapted():
                if m not in out and on_blocks(m, p.split):
                    out[m] = self.owed_rank
        return out

    def start(self) -> None:
        for p in self.sim.active:
            self.add_party(p)

    def add_party(self, p) -> None:
        if self.warm:
            self.sim.bank.add(self.offset(p), self.offset_ranks(p), dropout=0.0)
            self.reset_offset(p)
            self.synced.setdefault(p.adapter, 0)

    def drop_party(self, p) -> None:
        if self.warm:
            self.sim.bank.delete(self.offset(p))

    @torch.no_grad()
    def enter(self, p, r: int) -> None:
        """warm: its factors and moments are its own; its base is the global model again (offset reset).
        bounded: its base is what it was; at the server (in-process, the server process) it now also owes the
        merged updates of the rounds it missed (re-truncated to owed_rank). restart: the fresh init of round r."""
        if self.bounded:
            if self.sim.holds_global:
                self.owe_missed(p, r)
        elif self.warm:
            self.reset_offset(p)
        else:
            self.sim.bank.reinit(p.adapter, derive_seed(self.sim.training.seed, 2, r))
            self.sim.new_optimizers(p)

    @torch.no_grad()
    def reset_offset(self, p) -> None:
        """offset_p = -s B_p A_p (owed part 0): party p's effective weights are the shared base weights again."""
        off = self.sim.bank.factors(self.offset(p))
        own = self.sim.bank.factors(p.adapter)
        for m, (oa, ob) in off.items():
            oa.zero_()
            ob.zero_()
            if m in own:
                a, b = own[m]
                oa[:a.shape[0]].copy_(a)
                ob[:, :a.shape[0]].copy_(-b)

    # ---- aggregation ----
    def combine(self, parties) -> RoundUpdate:
        updates = self.collect(parties)
        if not self.warm:
            return self.aggregate(updates)
        offsets = {}
        for p in parties:
            for m, (a, b) in self.sim.bank.factors(self.offset(p)).items():
                r = p.ranks.get(m, 0)
                if r > 0:          # its own rows: -B^0 A^0 (the owed rows are no holder's update)
                    offsets.setdefault(m, []).append((a[:r], b[:, :r]))
        out = self.aggregate(updates, offsets)
        if self.bounded:
            out.download = {p.adapter: {} for p in parties}     # filled by apply (what each one is sent)
        return out

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
        if self.bounded and update.own_base:        # a client process: its own copy of its blocks
            self.apply_own(update, parties)
            return
        sim.merge_update(update)
        self.rounds_done = r + 1
        if self.bounded and sim.sampling:       # kept until its checkpoint is written (no run folder: kept)
            self.history[r] = {m: (b.detach().clone(), a.detach().clone()) for m, (b, a) in update.merge.items()}
            if sim.store is not None:
                self.history = {r: self.history[r]}
        bases = {}          # bounded: module -> basis() of the round's merge, shared by every party
        for p in parties:
            if self.bounded:
                self.settle(p, update, r, bases)
            elif self.warm:
                self.reset_offset(p)
            elif update.reinit:
                sim.bank.reinit(p.adapter, derive_seed(sim.training.seed, 2, r + 1))
                sim.new_optimizers(p)
        if self.bounded:
            self.prune_history()

    @torch.no_grad()
    def settle(self, p, update: RoundUpdate, r: int, bases: dict | None = None) -> None:
        """bounded, at the server: party p's download T (into update.download[p], when it was aggregated) and its
        new offset: own rows (A', -B'), owed rows the truncation of D - T (module by module). bases: module ->
        basis() of the merge, filled on first use (the same for every party of the round)."""
        s = self.sim.training.lora_alpha_over_rank
        own = self.sim.bank.factors(p.adapter)
        sends = update.download.get(p.adapter)
        dropped = 0.0
        for m, (oa, ob) in self.sim.bank.factors(self.offset(p)).items():
            q = p.ranks.get(m, 0)
            a, b = own[m] if q > 0 else (None, None)
            if not on_blocks(m, p.split) or m not in update.merge:
                if q > 0:       # a server-held copy (exact, as warm), or a matrix nobody updated this round
                    if not on_blocks(m, p.split):
                        oa[:q].copy_(a)
                        ob[:, :q].copy_(-b)
                continue
            if bases is None:
                bases = {}
            if m not in bases:
                bases[m] = basis(*update.merge[m])
            bs = [-s * ob.double()]
            as_ = [oa.double()]
            if q > 0:
                bs.append(-s * b.double())
                as_.append(a.double())
            keep = max(q, self.floor_rank) if sends is not None else 0
            (tb, ta), (wb, wa), rest = truncated(torch.cat(bs, 1), torch.cat(as_, 0), keep, oa.shape[0] - q,
                                                 bases[m])
            if keep:
                sends[m] = (tb, ta)
            if q > 0:
                oa[:q].copy_(a)
                ob[:, :q].copy_(-b)
            oa[q:].copy_(wa)
            ob[:, q:].copy_(-wb / s)
            dropped += rest
        self.dropped[p.adapter] = dropped ** 0.5
        self.synced[p.adapter] = r + 1

    @torch.no_grad()
    def owe_missed(self, p, r: int, off=None) -> None:
        """bounded: party p's base followed the global model up to round synced[p]; it also owes the merged
        updates of rounds synced[p] .. r-1 (client-side matrices), re-truncated to its owed rows (of `off`,
        module -> (A_off, B_off), default its offset adapter; given: nothing else changes)."""
        s = self.sim.training.lora_alpha_over_rank
        missed = [m for m in map(self.merge_of, range(self.synced.get(p.adapter, 0), r)) if m]
        if not missed:
            return
        dropped = 0.0
        given = off is not None
        for m, (oa, ob) in (off if given else self.sim.bank.factors(self.offset(p))).items():
            q = p.ranks.get(m, 0)
            parts = [h[m] for h in missed if m in h]
            if not on_blocks(m, p.split) or not parts or oa.shape[0] == q:
                continue
            bs = [b.double() for b, _ in parts] + [-s * ob[:, q:].double()]
            as_ = [a.double() for _, a in parts] + [oa[q:].double()]
            _, (wb, wa), rest = truncated(torch.cat(bs, 1), torch.cat(as_, 0), 0, oa.shape[0] - q)
            oa[q:].copy_(wa)
            ob[:, q:].copy_(-wb / s)
            dropped += rest
        if not given:
            self.dropped[p.adapter] = dropped ** 0.5
            self.synced[p.adapter] = r

    def merge_of(self, i: int) -> dict:
        """Round i's merge (0-based): the run folder's checkpoint of round i + 1 keeps every round's merged factors
        (--keep-checkpoints prunes only adapters and moments), so nothing grows in memory; without a run folder
        (a bare Simulation) the in-memory history."""
        if i in self.history:
            return self.history[i]
        if self.sim.store is None:
            return {}
        from hsplit.runtime.train import checkpoint
        _, t = checkpoint.load(self.sim.store.root.parent, i + 1, ("merged.safetensors",))
        merged = t["merged.safetensors"]
        return {m: (merged[f"{m}.B"], merged[f"{m}.A"]) for m in {k[:-2] for k in merged}}

    def prune_history(self) -> None:
        """Keep the merges some party has not followed yet (sampling); every party follows every round without."""
        oldest = min((self.synced.get(p.adapter, 0) for p in self.sim.parties), default=0)
        for i in [i for i in self.history if i < oldest]:
            del self.history[i]

    @torch.no_grad()
    def apply_own(self, update: RoundUpdate, parties) -> None:
        """bounded, a client process: its blocks += T + s (B' A' - B^0 A^0); own offset rows (A', -B')."""
        s = self.sim.training.lora_alpha_over_rank
        bank = self.sim.bank
        for p in parties:
            for m, (tb, ta) in update.download.get(p.adapter, {}).items():
                bank.merge_into_base(m, tb, ta)
            own = bank.factors(p.adapter)
            for m, (oa, ob) in bank.factors(self.offset(p)).items():
                q = p.ranks.get(m, 0)
                if q == 0:
                    continue
                a, b = own[m]
                if on_blocks(m, p.split):
                    bank.merge_into_base(m, torch.cat([s * b.float(), s * ob[:, :q].float()], 1),
                                         torch.cat([a.float(), oa[:q].float()], 0))
                oa[:q].copy_(a)
                ob[:, :q].copy_(-b)

    def traffic(self, p, update: RoundUpdate) -> tuple[int, int]:
        """Up: its client-side factors; down: bounded: its truncations T (fp32 factors); warm/restart: the update
        of every matrix on its blocks, in the cheaper of the stacked and the dense form."""
        own = self.sim.bank.factors(p.adapter)
        up = adapter_bytes(own, p.client_modules)
        if self.bounded:
            return up, sum(4 * (b.numel() + a.numel()) for b, a in update.download.get(p.adapter, {}).values())
        return up, merge_bytes_for(update, p.split)

    def round_metrics(self, p) -> dict:
        return {"owed_dropped": self.dropped.get(p.adapter)} if self.bounded else {}

    # ---- a distributed client's evaluation of the global model ----
    rounds_done = 0

    def eval_state(self, p) -> dict:
        """bounded: its owed factors (B_o, A_o) on its blocks (owed = s B_o A_o), which its copy lacks (a client
        that sat the last rounds out: its saved owed part plus the merges it missed, truncated as on its return)."""
        if not self.bounded:
            return {}
        if p in self.sim.active:
            off = self.sim.bank.factors(self.offset(p))
        else:
            saved = self.sim.store.load(p.adapter) if self.sim.store is not None else None
            pre = "strategy/offset/"
            off = {m: (saved[f"{pre}{m}.lora_A"].clone(), saved[f"{pre}{m}.lora_B"].clone())
                   for m in self.offset_ranks(p)} if saved else {}
            if not saved:         # it never trained: it owes every merge so far
                shapes = {m: (a.shape[1], b.shape[0]) for i in range(self.rounds_done)
                          for m, (b, a) in self.merge_of(i).items()}
                off = {m: (torch.zeros(r, shapes[m][0]), torch.zeros(shapes[m][1], r))
                       for m, r in self.offset_ranks(p).items() if on_blocks(m, p.split) and m in shapes}
            self.owe_missed(p, self.rounds_done, off)
        out = {}
        for m, (oa, ob) in off.items():
            q = p.ranks.get(m, 0)
            if on_blocks(m, p.split) and oa.shape[0] > q:
                out[m] = (-ob[:, q:].detach().clone(), oa[q:].detach().clone())
        return out

    @torch.no_grad()
    def load_eval_state(self, p, data: dict) -> None:
        """Its offset becomes +owed alone (its copy + owed = the global model on its blocks)."""
        if not self.bounded:
            return
        for m, (oa, ob) in self.sim.bank.factors(self.offset(p)).items():
            q = p.ranks.get(m, 0)
            oa.zero_()
            ob.zero_()
            if m in data:
                b, a = data[m]
                oa[q:].copy_(a)
                ob[:, q:].copy_(b)
        self._eval = p

    @torch.no_grad()
    def clear_eval_state(self, p) -> None:
        if self.bounded:
            self._eval = None
            self.reset_offset(p)

    _eval = None

    def eval_adapter(self) -> str | None:
        return self.offset(self._eval) if self._eval is not None else None

    @torch.no_grad()
    def restored(self, p) -> None:
        """bounded, a client process after --resume: its replayed blocks are the global model; take its owed part
        out of them (its copy lacks it) and zero the owed rows."""
        if not self.bounded:
            return
        s = self.sim.training.lora_alpha_over_rank
        for m, (oa, ob) in self.sim.bank.factors(self.offset(p)).items():
            q = p.ranks.get(m, 0)
            if on_blocks(m, p.split) and oa.shape[0] > q:
                self.sim.bank.merge_into_base(m, s * ob[:, q:].float(), oa[q:].float())
                oa[q:].zero_()
                ob[:, q:].zero_()

    # ---- state ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.warm:
            return {}
        out = {f"offset/{p.adapter}/{k}": v for p in self.sim.active
               for k, v in self.sim.bank.state(self.offset(p), copy=False).items()}
        if self.bounded:
            out.update({f"synced/{k}": torch.tensor(v) for k, v in self.synced.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.warm:
            for p in self.sim.active:
                prefix = f"offset/{p.adapter}/"
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if state or not self.sim.sampling:      # sampling: reset when the party trains (enter)
                    self.sim.bank.load_state(self.offset(p), state)
        if self.bounded:
            self.synced.update({k[len("synced/"):]: int(v) for k, v in tensors.items() if k.startswith("synced/")})

    def party_state(self, p) -> dict[str, torch.Tensor]:
        """bounded (sampling): its offset, owed part included, while it sits rounds out."""
        if not self.bounded:
            return {}
        return {f"offset/{k}": v for k, v in self.sim.bank.state(self.offset(p), copy=False).items()}

    def load_party_state(self, p, tensors: dict[str, torch.Tensor]) -> None:
        if self.bounded and tensors:
            self.sim.bank.load_state(self.offset(p), {k[len("offset/"):]: v for k, v in tensors.items()})


    # ---- re-planning ----
    def before_move(self):
        """warm: keep every party's factors (bounded: and its owed part); its offset adapter goes (rebuilt at the
        new ranks)."""
        if not self.warm:
            return None
        carried = {}
        for p in self.sim.active:
            off = self.sim.bank.factors(self.offset(p))
            carried[p.adapter] = {
                m: (a.detach().clone(), b.detach().clone(),
                    *((off[m][0][p.ranks.get(m, 0):].detach().clone(), off[m][1][:, p.ranks.get(m, 0):].detach().clone())
                      if m in off else (None, None)))
                for m, (a, b) in self.sim.bank.factors(p.adapter).items()}
            for m, (oa, ob) in off.items():
                if m not in carried[p.adapter]:
                    carried[p.adapter][m] = (None, None, oa.detach().clone(), ob.detach().clone())
        for p in self.sim.active:
            self.sim.bank.delete(self.offset(p))
        return carried

    @torch.no_grad()
    def after_move(self, carried) -> None:
        """warm: each adapter keeps its first min(old, new rank) components (a new matrix, or new rows:
        fresh A, B = 0); the offsets are its own factors again (bounded: with the owed part it still has on
        matrices that stay on its blocks), so every holder's effective weights are the global model's (bounded:
        less what it owes), exactly: the move does not change the model."""
        if carried is None:
            return
        for p in self.sim.active:
            for m, (a, b) in self.sim.bank.factors(p.adapter).items():
                if m in carried[p.adapter] and carried[p.adapter][m][0] is not None:
                    oa, ob = carried[p.adapter][m][:2]
                    k = min(a.shape[0], oa.shape[0])
                    a[:k] = oa[:k]
                    b[:, :k] = ob[:, :k]
        self.start()
        if not self.bounded:
            return
        for p in self.sim.active:
            for m, (oa, ob) in self.sim.bank.factors(self.offset(p)).items():
                q = p.ranks.get(m, 0)
                was = carried[p.adapter].get(m)
                if was is None or was[2] is None or not on_blocks(m, p.split) or was[2].shape[0] == 0:
                    continue
                n = min(oa.shape[0] - q, was[2].shape[0])
                oa[q:q + n] = was[2][:n]
                ob[:, q:q + n] = was[3][:, :n]


def update_delta(update: RoundUpdate, module: str) -> torch.Tensor:
    """The dense (d_out, d_in) weight update a RoundUpdate merges into `module` (for tests/reports)."""
    b, a = update.merge[module]
    return b @ a
