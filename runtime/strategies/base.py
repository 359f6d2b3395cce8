"""What every strategy is: the protocol the round loop and the split step call, and its data types.

    strategy = make("hetlora")            # runtime/strategies/__init__.py
    strategy.setup(sim)                   # once, by the Simulation (the strategy keeps `sim`)
    ... strategy.before_step(p, s, modules) / after_step(p, snap)        around every optimizer step
    update = strategy.combine(parties)    # end of round: collect every holder's factors, aggregate
    strategy.apply(update, r, parties)    # the global state and the round's parties continue from it
    strategy.enter(p, r)                  # client sampling: a party that sat rounds out catches up

Every (block, module) is aggregated over the parties that hold an adapter on it, whether the
client or the server held it; weights are the data weights p_k renormalised over those holders.
A strategy owns its server-side state (a global adapter, importance scores, selections) and says
what goes into checkpoints (`state_tensors`) and what a client process sends with its adapters
(`upload` / `absorb`). Defaults here are what a strategy that needs nothing more does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hsplit.planner.plan import block_of
from hsplit.planner.strategies import traits
from hsplit.runtime.common import GLOBAL
from hsplit.runtime.train.party import client_parties


@dataclass
class ClientFactors:
    weight: float          # data weight p_k (renormalised per module by the strategy)
    A: torch.Tensor        # (r_k, d_in)
    B: torch.Tensor        # (d_out, r_k)
    scaling: float         # alpha / r
    party: str = ""        # the holder's adapter name
    components: list[int] | None = None   # hafl: global component index of each row of A / column of B
    updated: list[int] | None = None      # hafl: the slots (rows of A) this holder updated
    scores: torch.Tensor | None = None    # hafl: importance of each slot


@dataclass
class RoundUpdate:
    merge: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)   # module -> (B_cat, A_cat)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)   # module -> B_cat @ A_cat, where that is smaller
    assign: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B) for all
    reinit: bool = False                                                                 # adapters restart
    # strategies that keep a global adapter:
    global_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    assign_party: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    global_scores: dict[str, torch.Tensor] = field(default_factory=dict)       # hafl: module -> (R,)
    local_scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # hafl-freezing
    # hsplitlora, aggregation bounded: party -> module -> (B_T, A_T), the rank-R truncation T = B_T @ A_T of what
    # that client's blocks lack, the ONLY thing it downloads (it adds T to its own copy of its blocks)
    download: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    own_base: bool = False      # the receiver holds its own copy of its blocks (a client process: for_client)

    def for_client(self, party: str, split: int) -> "RoundUpdate":
        """The part a client process uses: entries of the blocks it holds ([0, split)) and, of the
        per-party entries, its own. What it downloads grows with its own blocks, not with the fleet."""
        def keep(d: dict) -> dict:
            return {k: v for k, v in d.items() if on_blocks(k, split)}

        merge, dense = {}, {}
        for m, (b, a) in ({} if self.download else keep(self.merge)).items():   # bounded: its download instead
            if dense_is_smaller(b, a):
                dense[m] = b @ a
            else:
                merge[m] = (b, a)
        return RoundUpdate(merge=merge, dense=dense, assign=keep(self.assign), reinit=self.reinit,
                           global_factors=keep(self.global_factors),
                           assign_party={party: keep(self.assign_party[party])} if party in self.assign_party else {},
                           global_scores=keep(self.global_scores),
                           local_scores={party: keep(self.local_scores[party])} if party in self.local_scores else {},
                           download={party: keep(self.download[party])} if party in self.download else {},
                           own_base=True)


def on_blocks(module: str, split: int) -> bool:
    """The module is in blocks [0, split) (or outside the blocks: embeddings, head)."""
    block = block_of(module)
    return block is None or block < split


def dense_is_smaller(b: torch.Tensor, a: torch.Tensor) -> bool:
    """B (d_out, K) @ A (K, d_in): the dense update has fewer numbers than the stacked factors."""
    return b.shape[1] * (a.shape[1] + b.shape[0]) > a.shape[1] * b.shape[0]


def update_bytes(update: RoundUpdate) -> int:
    """fp32 bytes of an update's merges (stacked factors and dense updates): what a client downloads."""
    return (sum(4 * (b.numel() + a.numel()) for b, a in update.merge.values())
            + sum(4 * d.numel() for d in update.dense.values()))


def merge_bytes_for(update: RoundUpdate, split: int) -> int:
    """update_bytes(update.for_client(..., split)) from the shapes alone (nothing is multiplied)."""
    return sum(4 * (a.shape[1] * b.shape[0] if dense_is_smaller(b, a) else b.numel() + a.numel())
               for m, (b, a) in update.merge.items() if on_blocks(m, split))


def normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def adapter_bytes(factors, modules) -> int:
    """fp32 bytes of the (A, B) pairs of `factors` (module -> (A, B)) on `modules`."""
    return sum(4 * (a.numel() + b.numel()) for m, (a, b) in factors.items() if m in modules)


class Strategy:
    """The base of every strategy: each hook's default."""
    name = ""
    clears_moments = False      # AdamW moments are cleared after a party's local steps (adapters restart)

    def __init__(self):
        self.traits = traits(self.name)
        self.sim = None

    # ---- set-up (by the Simulation) ----
    def setup(self, sim) -> None:
        self.sim = sim

    def make_parties(self):
        sim = self.sim
        return client_parties(sim.plan, sim.lm.profile, sim.data)

    def steps_per_round(self) -> int:
        return self.sim.training.local_steps

    def held_ranks(self, p) -> dict[str, int]:
        """The rank of every adapter party p holds in the bank."""
        return p.ranks

    def global_ranks(self) -> dict[str, int] | None:
        """Ranks of the global adapter (the aggregated model's own), None when there is none."""
        return None

    def start(self) -> None:
        """After every adapter got its fresh init."""

    def offset(self, p) -> str | None:
        """A frozen adapter active with party p's own while it trains (hsplitlora warm: its base offset)."""
        return None

    def before_move(self):
        """Re-planning is about to rebuild every adapter at new splits and ranks: what to carry over."""
        return None

    def after_move(self, carried) -> None:
        """The adapters were rebuilt (fresh init, new optimizers): carry over what before_move kept."""

    # ---- around every optimizer step (modules: the side that steps) ----
    def before_step(self, p, step_idx: int, modules):
        return None

    def after_step(self, p, snap) -> None:
        pass

    # ---- aggregation ----
    def collect(self, parties) -> dict[str, list[ClientFactors]]:
        """Per (block, module): every holder's factors, client- or server-held alike."""
        sim = self.sim
        updates: dict[str, list[ClientFactors]] = {}
        for p in parties:
            for m, (a, b) in sim.bank.factors(p.adapter).items():
                updates.setdefault(m, []).append(ClientFactors(p.weight, a, b, sim.training.lora_alpha_over_rank,
                                                               party=p.adapter))
        return updates

    def combine(self, parties) -> RoundUpdate:
        """The aggregate of `parties`' factors (nothing is changed yet)."""
        return self.aggregate(self.collect(parties))

    def aggregate(self, updates: dict[str, list[ClientFactors]]) -> RoundUpdate:
        raise NotImplementedError

    def apply(self, update: RoundUpdate, r: int, parties) -> None:
        """The global state (merged base weights, global adapter, scores) and `parties` continue from the update
        of round r (0-based). The other parties keep their own state until they train again (enter)."""

    # ---- client sampling: parties enter and leave the bank ----
    def add_party(self, p) -> None:
        """Party p's adapter was just added to the bank (fresh init, before its saved state is loaded)."""

    def drop_party(self, p) -> None:
        """Party p's adapter is about to leave the bank (its state is saved): drop what is kept for it."""

    def enter(self, p, r: int) -> None:
        """Party p, whose own state is as of the end of the last round it trained, catches up with the global
        state at the start of round r (it sat rounds out). A party that continued from the update of round
        r - 1 is left exactly as it is."""

    def party_state(self, p) -> dict[str, torch.Tensor]:
        """What the strategy keeps for party p beyond its factors and AdamW moments (saved while p sits out)."""
        return {}

    def load_party_state(self, p, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # ---- a client process's part of evaluating the global model (distributed) ----
    def eval_state(self, p) -> dict:
        """Server side: what client p needs beyond its blocks to compute the GLOBAL model's activations at its
        cut (hsplitlora bounded: what its blocks still lack)."""
        return {}

    def load_eval_state(self, p, data: dict) -> None:
        """Client side: hold `data` (eval_state) while its evaluation activations are computed."""

    def clear_eval_state(self, p) -> None:
        """Client side: back to training after load_eval_state."""

    def restored(self, p) -> None:
        """Client side, after --resume replayed the checkpoints into its own copy of its blocks."""

    def round_metrics(self, p) -> dict:
        """Extra metrics.csv columns of party p's row after the round's aggregation."""
        return {}

    def download(self, p, update: RoundUpdate) -> RoundUpdate:
        """What the server ships to party p's client after the round (every transport sends this, the client
        applies it: sim.apply(..., [p]) when it trained): the entries of its blocks and its own (hsplitlora
        bounded: only its truncated download T, as factors, `download[p.adapter]`)."""
        return update.for_client(p.adapter, p.split)

    def traffic(self, p, update: RoundUpdate) -> tuple[int, int]:
        """Bytes party p's client uploads and downloads for the aggregation: its client-side adapters up,
        what the update gives its client-side modules down."""
        own = self.sim.bank.factors(p.adapter)
        got = update.merge if update.merge else update.assign
        return adapter_bytes(own, p.client_modules), adapter_bytes(got, p.client_modules)

    def eval_adapter(self) -> str | None:
        """The adapter that represents the aggregated model (None: everything is in the base weights)."""
        return GLOBAL if self.sim.global_ranks else None

    # ---- state ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Strategy state for checkpoints (beside every adapter and optimizer)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def upload(self, p, modules) -> dict:
        """What a client process sends with its adapters at the end of a round (beyond factors and moments)."""
        return {}

    def absorb(self, p, data: dict) -> None:
        """The server side of `upload`."""
