"""What one process of a run holds: ONE copy of the (part of the) base model, every party's adapters and
optimizers, the data, and the run's strategy.

    sim = build(plan, device="auto")                 # the whole model: the in-process simulation
    sim = build_part(plan, rank)                     # a distributed process: only its blocks (rank 0: server)
    sim.apply(update, r)                             # the strategy moves every adapter after round r
    tensors = sim.tensors(update)                    # what a checkpoint holds

The parties' adapters share the base weights (peft adapters in one AdapterBank, swapped in per
step); a strategy that keeps a global adapter adds it under the name GLOBAL. All randomness is
derived from (seed, purpose, ...): the same seed gives the same run, in-process or distributed.
"""
from __future__ import annotations

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.planner.sampling import sample_clients
from hsplit.planner.strategies import traits
from hsplit.runtime.common import GLOBAL, compute_dtype, derive_seed, pick_device
from hsplit.runtime.data.federated import FederatedData, load_federated_data
from hsplit.runtime.models.lora import AdapterBank
from hsplit.runtime.models.causal_lm import LoadedLM, SplitLM, load_lm
from hsplit.runtime.train.party import Party
from hsplit.runtime.train.partystore import PartyStore
from hsplit.runtime.strategies import RoundUpdate, make
from hsplit.runtime.models.task import make_task


class Simulation:
    def __init__(self, plan: Plan, lm: LoadedLM, data: FederatedData, device: torch.device,
                 compute: str = "auto"):
        self.plan, self.lm, self.data, self.device = plan, lm, data, device
        self.holds_global = True     # the base weights are the global model (False: a client process's own copy)
        self.training = t = plan.training
        self.autocast_dtype = compute_dtype(t.dtype, device, compute)
        self.split = SplitLM(lm.model, lm.profile.family)
        self.task = make_task(plan.data, lm.tokenizer)     # the server's loss: next-token or classification
        self.bank = AdapterBank(lm.model, lm.profile.family, t.lora_alpha_over_rank, t.lora_dropout, plan.source)
        self.strategy = make(plan.strategy, plan.source)
        self.strategy.setup(self)
        self.parties: list[Party] = self.strategy.make_parties()
        self.sampling = plan.sampling                # None: every party trains every round
        self.active: list[Party] = [] if self.sampling else list(self.parties)   # adapters in the bank
        self.store: PartyStore | None = None         # sampling: the other parties' state (set by the loop)
        self.steps_per_round = self.strategy.steps_per_round()
        self.total_rounds = t.rounds
        torch.manual_seed(derive_seed(t.seed, 1))
        self.global_ranks = self.strategy.global_ranks()
        for p in self.active:
            self.bank.add(p.adapter, self.strategy.held_ranks(p))
        if self.global_ranks is not None:
            self.bank.add(GLOBAL, self.global_ranks)
        for p in self.active:
            self.bank.reinit(p.adapter, derive_seed(t.seed, 2, 0))
            self.new_optimizers(p)
        if self.global_ranks:
            self.bank.reinit(GLOBAL, derive_seed(t.seed, 2, 0))
        self.strategy.start()

    # ---- client sampling (planner/sampling.py): only the round's parties are in memory ----
    def round_parties(self, r: int) -> list[Party]:
        """The parties that train in round r: every party, or the plan's sample of round r."""
        if not self.sampling:
            return list(self.parties)
        ids = sample_clients(self.training.seed, r, [p.weight for p in self.parties],
                             self.sampling.count(len(self.parties)), self.sampling.by)
        return [self.parties[i] for i in ids]

    def materialise(self, parties: list[Party], r: int, state=None) -> None:
        """Bring `parties` into the bank for round r: a fresh init, their saved state (self.store, or
        state(p) -> tensors), then the strategy catches each up with the global state (strategy.enter)."""
        for p in parties:
            if p in self.active:
                continue
            self.bank.add(p.adapter, self.strategy.held_ranks(p))
            self.bank.reinit(p.adapter, derive_seed(self.training.seed, 2, 0))
            self.new_optimizers(p)
            self.active.append(p)
            self.strategy.add_party(p)
            saved = state(p) if state is not None else (self.store.load(p.adapter) if self.store else None)
            if saved:
                self.load_party(p, saved)
            self.strategy.enter(p, r)
        self.active.sort(key=lambda q: q.index)

    def release(self, parties: list[Party], version: int) -> None:
        """Save `parties`' state as of the end of round `version` (1-based) to the store and drop them."""
        for p in parties:
            if p not in self.active:
                continue
            if self.store is not None:
                self.store.save(p.adapter, version, self.party_tensors(p))
            self.strategy.drop_party(p)
            self.bank.delete(p.adapter)
            p.opt_client = p.opt_server = None
            self.active.remove(p)

    def party_tensors(self, p: Party) -> dict[str, torch.Tensor]:
        """One party's whole state: adapter factors, AdamW moments (both sides), the strategy's per-client state."""
        out = {f"adapter/{k}": v for k, v in self.bank.state(p.adapter, copy=False).items()}
        for side, opt in (("client", p.opt_client), ("server", p.opt_server)):
            out.update({f"{side}/{k}": v for k, v in optimizer_tensors(opt).items()})
        out.update({f"strategy/{k}": v for k, v in self.strategy.party_state(p).items()})
        return out

    def load_party(self, p: Party, tensors: dict[str, torch.Tensor]) -> None:
        def part(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.bank.load_state(p.adapter, part("adapter/"))
        load_optimizer_tensors(p.opt_client, part("client/"))
        load_optimizer_tensors(p.opt_server, part("server/"))
        self.strategy.load_party_state(p, part("strategy/"))

    def new_optimizers(self, p: Party) -> None:
        t = self.training
        ps_c = self.bank.parameters(p.adapter, p.client_modules)
        ps_s = self.bank.parameters(p.adapter, p.server_modules)
        kw = dict(lr=t.learning_rate, weight_decay=t.weight_decay)
        p.opt_client = torch.optim.AdamW(ps_c, **kw) if ps_c else None
        p.opt_server = torch.optim.AdamW(ps_s, **kw) if ps_s else None

    def autocast(self):
        dt = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dt or torch.float32, enabled=dt is not None)

    # ---- the aggregated model ----
    def apply(self, update: RoundUpdate, r: int, parties: list[Party] | None = None) -> None:
        """The global state and `parties` (default: every party in the bank) continue from round r's update,
        as the strategy says; the same in a live run, a resumed run and every process of a distributed run."""
        self.strategy.apply(update, r, self.active if parties is None else parties)

    @torch.no_grad()
    def merge(self, merged: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """W += B_cat @ A_cat for every module (blocks this process does not hold are skipped)."""
        for m, (b_cat, a_cat) in merged.items():
            self.bank.merge_into_base(m, b_cat.to(self.device), a_cat.to(self.device))

    def merge_update(self, update: RoundUpdate) -> None:
        """A round's merges into the base weights, stacked or dense (a client's cheaper form)."""
        self.merge(update.merge)
        for m, delta in update.dense.items():
            self.bank.merge_dense(m, delta)

    def replay_merge(self, merged: dict[str, torch.Tensor]) -> None:
        """A checkpoint's merged.safetensors into the base weights (resume replays every round's)."""
        self.merge({m: (merged[f"{m}.B"], merged[f"{m}.A"]) for m in sorted({k[:-2] for k in merged})})

    def eval_adapter(self) -> str | None:
        return self.strategy.eval_adapter()

    # ---- state for checkpoints ----
    def _holders(self) -> list[tuple[str, Party | None]]:
        return [(p.adapter, p) for p in self.active] + ([(GLOBAL, None)] if self.global_ranks else [])

    def tensors(self, update: RoundUpdate | None) -> dict[str, dict[str, torch.Tensor]]:
        adapters, optim = {}, {}
        for name, p in self._holders():
            for k, v in self.bank.state(name, copy=False).items():
                adapters[f"{name}/{k}"] = v
            for side, opt in (("client", p and p.opt_client), ("server", p and p.opt_server)):
                for k, v in optimizer_tensors(opt).items():
                    optim[f"{name}/{side}/{k}"] = v
        merged = {}
        if update is not None:
            for m, (b, a) in update.merge.items():
                merged[f"{m}.B"] = b
                merged[f"{m}.A"] = a
        optim.update(self.strategy.state_tensors())
        return {"adapters.safetensors": adapters, "optimizer.safetensors": optim, "merged.safetensors": merged}

    def load_tensors(self, adapters: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None:
        for name, p in self._holders():
            state = {k[len(name) + 1:]: v for k, v in adapters.items() if k.startswith(name + "/")}
            if p is not None and self.sampling and not state:
                continue        # client sampling: a party's state is in the store (a client process's own)
            self.bank.load_state(name, state)
            if p is None:
                continue
            self.new_optimizers(p)
            for side, opt in (("client", p.opt_client), ("server", p.opt_server)):
                prefix = f"{name}/{side}/"
                load_optimizer_tensors(opt, {k[len(prefix):]: v for k, v in optim.items() if k.startswith(prefix)})
        self.strategy.load_state_tensors(optim)


def optimizer_tensors(opt) -> dict[str, torch.Tensor]:
    """An optimizer's state as flat tensors `<param index>/<key>` (checkpoints, a client's upload)."""
    if not opt:
        return {}
    return {f"{i}/{key}": torch.as_tensor(v) for i, st in opt.state_dict()["state"].items() for key, v in st.items()}


def load_optimizer_tensors(opt, flat: dict[str, torch.Tensor]) -> None:
    """The inverse of optimizer_tensors."""
    if opt is None:
        return
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for k, v in flat.items():
        i, key = k.split("/")
        state.setdefault(int(i), {})[key] = v
    sd["state"] = state
    opt.load_state_dict(sd)


# ------------------------------------------------------------------ building

def _data(plan: Plan, lm: LoadedLM) -> FederatedData:
    weights = [c.data_weight for c in plan.clients]
    return load_federated_data(plan.data, lm.tokenizer, plan.training.seq_len, weights, plan.training.seed)


def build(plan: Plan, progress: bool = True, device: str = "auto", compute: str = "auto") -> Simulation:
    """Load and check everything an in-process run needs (raises ConfigError before anything is written)."""
    dev = pick_device(device)                   # before the (slow) model load
    try:
        lm = load_lm(plan.model, progress=progress)
    except ConfigError as e:                    # the plan's `model:` could not be loaded: name the plan
        if e.source != plan.model:
            raise
        raise ConfigError(plan.source, [f"model: {x.removeprefix('model: ')}" for x in e.problems]) from None
    plan.validate_for(lm.profile)               # model hash, splits, ranks, seq_len (as `hsplit plan --check`)
    traits(plan.strategy, plan.source)
    lm.model.to(dev)
    lm.model.requires_grad_(False)
    return Simulation(plan, lm, _data(plan, lm), dev, compute)


def build_part(plan: Plan, rank: int, device: str = "cpu", compute: str = "auto") -> Simulation:
    """The Simulation of one distributed process, around only its part of the model (rank 0: the
    server: blocks from the lowest split up and the head; rank k: embeddings and client k's blocks)."""
    from transformers import AutoConfig
    from hsplit.runtime.models.causal_lm import resolve_model_path
    from hsplit.runtime.models.partial_load import load_part

    if not traits(plan.strategy, plan.source).split:
        raise ConfigError(plan.source, [f"strategy {plan.strategy} has no split: run it in-process (hsplit run)"])
    path = resolve_model_path(plan.model, progress=False)
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    if rank == 0:
        lo = min(c.split_layer for c in plan.clients)
        lm = load_part(path, range(lo, layers), embeddings=False, head=True, device=pick_device(device))
    else:
        s = plan.clients[rank - 1].split_layer
        lm = load_part(path, range(0, s), embeddings=True, head=False, device=pick_device(device))
    plan.validate_for(lm.profile)
    lm.model.requires_grad_(False)
    sim = Simulation(plan, lm, _data(plan, lm), pick_device(device), compute)
    sim.holds_global = rank == 0
    return sim
