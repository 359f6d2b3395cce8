"""Build a planning instance: the fleet's clients grouped into classes of identical clients, with
the linear cost coefficients of each class (from hsplit.planner.cost), importance weights v[l, j]
and the rank utility g(q). All solvers read this object; none recomputes a cost.

A client's configuration is (s, zs, P, ranks): split s (client runs blocks [0, s)), zs = number of
client blocks that are back-propagated (from the lowest adapted block up to s-1), P = adapter
parameters. Every cost is linear in (s, zs, P) with the coefficients below, plus (hsplitlora) the
merge download charged per split, a constant of (class, s) (docs/formulation.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hsplit.planner.cost import (ADAPTER_STATE_BYTES, ADAPTER_WIRE_BYTES, DTYPE_BYTES, GIB, MERGE_RANK_FACTOR,
                                 Coefficients, coefficients, floor_download_bytes, link_seconds, merge_matrix_bytes,
                                 server_slot_bytes, server_step_flops)
from hsplit.planner.errors import ConfigError, InfeasibleError
from hsplit.planner.fleet import Client, Fleet
from hsplit.planner.importance import Importance, uniform
from hsplit.planner.model import ModelProfile
from hsplit.planner.plan import AGGREGATIONS, DEFAULT_AGGREGATION, Training
from hsplit.planner.strategies import traits


def rank_utility(ranks: tuple[int, ...]) -> np.ndarray:
    """g(q) = log2(1+q) / log2(1+max Q): concave, g(0) = 0, g(max) = 1."""
    q = np.array(ranks, dtype=float)
    return np.log2(1.0 + q) / np.log2(1.0 + q.max())


@dataclass
class ClientClass:
    """Identical clients (same device, budget, weight, allowed splits) and their cost coefficients."""
    index: int
    device: str
    members: list[int]
    weight: float                 # normalised data weight p_k of each member
    splits: list[int]             # allowed split points (server slot memory already checked)
    mem_cap: float                # bytes: min(device usable memory, budget)
    round_budget: float           # seconds for the client's own part of a round (inf if none)
    mem0: float                   # bytes: embeddings + fixed buffers
    mem_per_block: float          # bytes per client block (frozen weights)
    mem_per_zblock: float         # bytes per back-propagated client block (activations)
    step0: float                  # seconds per step whatever the split: link (link_s) + measured embedding time
    step_per_block: float         # seconds per client block forward
    step_per_zblock: float        # seconds per back-propagated client block
    step_per_param: float         # seconds per adapter parameter per step
    sync_per_param: float         # seconds per adapter parameter per round (upload + download; hsplitlora: upload)
    split_range: tuple[int, int] = (1, 1)
    link_s: float = 0.0           # seconds per step on the link: activations up + gradients down
    time_model: str = "flops"     # "flops" (FLOPs / throughput) or "measured" (profile block_times)
    # hsplitlora's merge download charged at split s ([L+1]; zeros for other strategies): an upper bound
    # U(s) on the exact download that depends on s only (docs/formulation.md, "Merge download")
    merge_bytes: np.ndarray | None = None
    merge_s: np.ndarray | None = None     # its seconds on the client's downlink

    @property
    def count(self) -> int:
        return len(self.members)

    def memory(self, s, zs, P):
        return self.mem0 + s * self.mem_per_block + zs * self.mem_per_zblock + ADAPTER_STATE_BYTES * P

    def step(self, s, zs, P):
        return self.step0 + s * self.step_per_block + zs * self.step_per_zblock + P * self.step_per_param


@dataclass
class Instance:
    model: ModelProfile
    modules: tuple[str, ...]
    ranks: tuple[int, ...]
    training: Training
    server_rank: int
    clients: list[Client]
    classes: list[ClientClass]
    v: np.ndarray                 # [L, J] importance, sums to 1
    g: np.ndarray                 # [|Q|] rank utility
    widths: np.ndarray            # [J] d_in + d_out
    coef: Coefficients
    server_step_s: np.ndarray     # [L+1] server seconds per step of a client split at s
    server_mem_free: float        # bytes of server memory left for client slots
    server_slot: np.ndarray       # [L+1] bytes one client in service occupies
    concurrency: int
    fleet: Fleet
    server_time_model: str = "flops"
    aggregation: str = DEFAULT_AGGREGATION   # hsplitlora's aggregation (plan `aggregation`): bounded | warm | restart
    merge_download: bool = False  # the strategy's clients download the round's merged update (hsplitlora)
    sampled: object = None        # planner/sampled.py SampledRounds: charge the run's sampled rounds, not the fleet
    floor_rank: int = 0           # aggregation bounded: the download rank on a matrix of its blocks it does not adapt

    @property
    def bounded(self) -> bool:
        """hsplitlora's bounded download: rank q + floor_rank per matrix of a client's blocks (q its own rank)."""
        return self.merge_download and self.aggregation == "bounded"

    @property
    def sync_bytes_per_param(self) -> int:
        """Adapter bytes per parameter a client moves per round: up and down (4 + 4), or with a merge
        download (hsplitlora warm/restart) only up (4): its own factors never come back, the merge replaces
        them. bounded: up and down (its rank-q part of the download is q (d_in + d_out) numbers per matrix)."""
        return ADAPTER_WIRE_BYTES * (1 if self.merge_download and not self.bounded else 2)

    @property
    def held_download_per_param(self) -> int:
        """bounded: download bytes per adapter parameter (the rank-q part, charged in sync_per_param); else 0."""
        return ADAPTER_WIRE_BYTES if self.bounded else 0

    @property
    def L(self) -> int:
        return self.model.layers

    @property
    def tau(self) -> int:
        return self.training.local_steps

    def busy(self, s):
        """Server seconds per round spent on one client split at s."""
        return self.tau * self.server_step_s[s]

    def client_round(self, cls: ClientClass, s, zs, P):
        """The client's own time per round: tau steps + adapter upload/download + the merge download
        charged at split s (hsplitlora; 0 otherwise)."""
        return self.tau * cls.step(s, zs, P) + cls.sync_per_param * P + cls.merge_s[s]

    def round_time(self, cls: ClientClass, s, zs, P):
        """Round time of one client when served alone: its steps, the server's share, the sync."""
        return self.client_round(cls, s, zs, P) + self.busy(s)

    def class_of(self) -> np.ndarray:
        out = np.zeros(len(self.clients), dtype=int)
        for c in self.classes:
            out[c.members] = c.index
        return out


def dtype_problem(dtype: str) -> str | None:
    """Why `dtype` is not a training dtype the cost model knows, or None (the one rule; whatif reports it
    per scenario)."""
    return None if dtype in DTYPE_BYTES else f"must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}"


def check_dtype(dtype: str) -> None:
    """The training dtype is one the cost model knows (plan, whatif and --check all pass here)."""
    if problem := dtype_problem(dtype):
        raise ConfigError("--dtype", [problem])


def check_ranks(ranks) -> tuple[int, ...]:
    """The allowed LoRA ranks: whole numbers >= 0 with at least one > 0. Returns them sorted, with 0."""
    ranks = list(ranks)
    bad = [q for q in ranks if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 0]
    if bad:
        raise ConfigError("--ranks", [f"{', '.join(str(q) for q in bad)}: ranks must be whole numbers >= 0 "
                                      "(0 = no adapter); e.g. 0,2,4,8,16"])
    out = tuple(sorted(set(int(q) for q in ranks) | {0}))
    if len(out) < 2:
        raise ConfigError("--ranks", ["give at least one rank > 0 (e.g. 0,2,4,8,16)"])
    return out


def check_splits(fleet: Fleet, model: ModelProfile) -> None:
    """Every group's `splits: [min, max]` lies in 1..L-1: the client runs at least one block and the
    server at least one (the fleet loader checks 1 <= min <= max; only here is L known)."""
    top = model.layers - 1
    problems = [f"clients[{i}].splits: {list(g.splits)} is outside 1..{top} for {model.name} ({model.layers} "
                "blocks; a client runs at least one block and the server at least one); "
                f"use [min, max] with max <= {top}"
                for i, g in enumerate(fleet.groups) if g.splits and g.splits[1] > top]
    if problems:
        raise ConfigError(fleet.source, problems)


def two_amounts(a: float, b: float, decimals: int) -> tuple[str, str]:
    """`a` and `b` with `decimals` decimals, or more (up to 9) when that rounding would print them equal."""
    while decimals < 9 and a != b and f"{a:.{decimals}f}" == f"{b:.{decimals}f}":
        decimals += 1
    return f"{a:.{decimals}f}", f"{b:.{decimals}f}"


def check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ConfigError("aggregation", [f"must be {' or '.join(AGGREGATIONS)}, got {aggregation!r}"])


def build_instance(fleet: Fleet, model: ModelProfile, *, importance: Importance | None = None,
                   ranks=(0, 2, 4, 8, 16), modules=None, training: Training | None = None,
                   server_rank: int = 8, strategy: str = "hsplitlora", aggregation: str = DEFAULT_AGGREGATION,
                   classes: int | None = None, floor_rank: int | None = None) -> Instance:
    """The instance of one planning problem. `strategy` decides whether the merge download is charged
    (its `merge_download` trait: hsplitlora), `aggregation` how large it is (warm: 2 x rank per holder,
    restart: 1 x; bounded: rank q + floor_rank per matrix of the client's blocks, floor_rank default the
    smallest positive rank)."""
    training = training or Training()
    check_dtype(training.dtype)
    check_aggregation(aggregation)
    if training.seq_len > model.max_positions:
        raise ConfigError("seq_len", [f"{training.seq_len} tokens is more than the model's context of "
                                      f"{model.max_positions:,} positions (max_position_embeddings); "
                                      f"use --seq-len {model.max_positions} or less"])
    merge = traits(strategy).merge_download
    ranks = check_ranks(ranks)
    bounded = merge and aggregation == "bounded"
    floor_rank = (min(q for q in ranks if q > 0) if floor_rank is None else int(floor_rank)) if bounded else 0
    if floor_rank < 0:
        raise ConfigError("--floor-rank", [f"must be a whole number >= 0, got {floor_rank}"])
    mods = model.resolve_modules(modules)
    check_splits(fleet, model)
    clients = fleet.clients()
    if not clients:
        raise ConfigError(fleet.source, ["clients: the fleet has no clients (all counts are 0)"])
    b, T = training.batch_size, training.seq_len
    coef = coefficients(model, mods, max(ranks), server_rank, b, T, training.dtype, classes)   # classes: task head
    v = (importance or uniform()).weights(model, mods)
    shapes = model.module_shapes()
    widths = np.array([shapes[m][0] + shapes[m][1] for m in mods], dtype=np.int64)

    server = fleet.server
    L = model.layers
    mhash = model.arch_hash()
    server_bt = server.device.block_times_for(mhash, training.dtype)
    if server_bt is not None:
        k = server_bt.scale(b, T) / server.count
        per_block = server_bt.forward_s + server_bt.backward_s \
            + server_bt.lora_s_per_param * coef.server_adapter_params_per_block
        server_step_s = np.array([k * ((L - s) * per_block + server_bt.head_s) for s in range(L + 1)])
    else:
        phi_s = server.device.throughput(training.dtype) * server.count
        server_step_s = np.array([server_step_flops(coef, L, s) / phi_s for s in range(L + 1)])
    server_slot = np.array([server_slot_bytes(coef, L, s) for s in range(L + 1)])
    server_mem_free = server.device.memory_gib * GIB * server.count - coef.server_frozen_bytes

    slot_fits = (server.concurrency * server_slot <= server_mem_free).tolist()   # per split: one check, not per class
    total_weight = sum(c.data_weight for c in clients)
    classes: dict[tuple, ClientClass] = {}
    first = 0
    for c in fleet.groups:        # a group's clients are alike: one class key per group, not per client
        members = range(first, first + c.count)
        first += c.count
        if not members:
            continue
        key = (repr(c.device.to_dict()), c.data_weight, c.budget, c.splits)
        if key in classes:
            classes[key].members.extend(members)
            continue
        dev = c.device
        lo, hi = c.splits or (1, L - 1)   # check_splits: hi <= L - 1
        allowed = [s for s in range(lo, hi + 1) if slot_fits[s]]
        mem_cap = min(dev.memory_gib, c.budget.memory_gib or math.inf) * GIB
        link = link_seconds(coef.cut_bytes, dev.uplink_mbps, dev.downlink_mbps)
        bt = dev.block_times_for(mhash, training.dtype)
        if bt is not None:  # measured seconds, scaled linearly in tokens (docs/formulation.md)
            k = bt.scale(b, T)
            times = dict(step0=link + k * bt.embed_s, step_per_block=k * bt.forward_s,
                         step_per_zblock=k * bt.backward_s, step_per_param=k * bt.lora_s_per_param,
                         time_model="measured")
        else:
            phi = dev.throughput(training.dtype)
            times = dict(step0=link, step_per_block=coef.forward_flops / phi,
                         step_per_zblock=coef.backward_flops / phi,
                         step_per_param=coef.lora_flops_per_param / phi, time_model="flops")
        classes[key] = ClientClass(
            index=len(classes), device=dev.name, members=list(members), weight=c.data_weight / total_weight,
            splits=allowed, mem_cap=mem_cap, round_budget=c.budget.round_s or math.inf,
            mem0=coef.embedding_bytes + coef.client_fixed_bytes,
            mem_per_block=coef.block_weight_bytes, mem_per_zblock=coef.block_act_bytes,
            sync_per_param=(8.0 * ADAPTER_WIRE_BYTES / (dev.uplink_mbps * 1e6) if merge and not bounded else
                            link_seconds(ADAPTER_WIRE_BYTES, dev.uplink_mbps, dev.downlink_mbps)),
            link_s=link, **times,
            split_range=(lo, hi))
    classes_list = list(classes.values())
    if bounded:         # the floor part on every planned matrix of blocks [0, s): an upper bound (docs/formulation.md)
        per_block = floor_download_bytes(floor_rank, [shapes[m] for m in mods])
        bounds = np.tile(per_block * np.arange(L + 1, dtype=float), (len(classes_list), 1))
    else:
        bounds = merge_bounds(classes_list, L, [shapes[m] for m in mods], max(ranks), server_rank,
                              MERGE_RANK_FACTOR[aggregation]) if merge else None
    for c in classes_list:
        c.merge_bytes = bounds[c.index] if merge else np.zeros(L + 1)
        down = clients[c.members[0]].device.downlink_mbps
        c.merge_s = c.merge_bytes * 8.0 / (down * 1e6)
    return Instance(model=model, modules=mods, ranks=ranks, training=training, server_rank=server_rank,
                    clients=clients, classes=classes_list, v=v, g=rank_utility(ranks),
                    widths=widths, coef=coef, server_step_s=server_step_s, server_mem_free=server_mem_free,
                    server_slot=server_slot, concurrency=server.concurrency, fleet=fleet,
                    server_time_model="measured" if server_bt is not None else "flops",
                    aggregation=aggregation, merge_download=merge, floor_rank=floor_rank)


def merge_bounds(classes: list[ClientClass], L: int, shapes: list[tuple[int, int]], max_rank: int,
                 server_rank: int, factor: int) -> np.ndarray:
    """[class, s]: U_c(s), the merge download charged to a client of class c split at s (bytes), an
    upper bound on its exact download D_k (api.merge_download_bytes) under every assignment of the
    other clients that their allowed splits permit (docs/formulation.md, "Merge download").

    Each client k' adds to K of matrix (l, j) either its own rank there (l < s_k', at most max Q, and
    only possible when l < max S_k') or the server's copy for it (l >= s_k', rank r_S, only possible when
    l >= min S_k'): at most c_k'(l) = max(max Q [l < max S_k'], r_S [l >= min S_k']). The client itself
    holds block l < s, so it adds at most max Q. K_c(l) = factor x (sum over the other clients of c_k'(l)
    + max Q), and U_c(s) = sum over l < s and planned j of 4 min(K_c(l) (d_in + d_out), d_in d_out)."""
    blocks = np.arange(L)
    contrib = np.zeros((len(classes), L))
    for c in classes:
        if c.splits:
            contrib[c.index] = np.maximum(np.where(blocks < max(c.splits), max_rank, 0),
                                          np.where(blocks >= min(c.splits), server_rank, 0))
    counts = np.array([c.count for c in classes], dtype=float)
    total = counts @ contrib                                           # [L]
    K = factor * (total[None, :] - contrib + max_rank)                 # [class, L]: every class at once
    per_block = sum(merge_matrix_bytes(K, d_in, d_out) for d_in, d_out in shapes)
    out = np.zeros((len(classes), L + 1))
    out[:, 1:] = np.cumsum(per_block, axis=1)
    return out


def infeasibility_reasons(inst: Instance) -> list[str]:
    """One line per client class that has no feasible configuration, naming the binding resource."""
    return [reason for _, reason in infeasible_classes(inst)]


def infeasible_classes(inst: Instance) -> list[tuple[int | None, str]]:
    """(class index, reason) per client class that has no feasible configuration, naming the binding
    resource; [(None, reason)] when the server cannot hold the frozen model (no client can take part)."""
    reasons: list[tuple[int | None, str]] = []
    server = inst.fleet.server
    if inst.server_mem_free < 0:
        total = server.device.memory_gib * server.count
        return [(None, f"server ({server.device.name} x{server.count}): memory: the frozen model needs "
                f"{inst.coef.server_frozen_bytes / GIB:.1f} GiB in {inst.training.dtype}, the server has "
                f"{total:.1f} GiB; use a larger server, more of them (server.count), or a smaller --dtype")]
    for cls in inst.classes:
        who = _who(inst, cls)
        lo, hi = cls.split_range
        if lo > hi:
            reasons.append((cls.index, f"{who}: allowed splits {cls.split_range} are empty for a "
                                       f"{inst.L}-block model"))
            continue
        if not cls.splits:
            need = inst.concurrency * inst.server_slot[hi] / GIB
            reasons.append((cls.index,
                f"{who}: server memory: even the deepest allowed split ({hi} blocks on the client) needs "
                f"{need:.1f} GiB per client in service, the server has {inst.server_mem_free / GIB:.1f} GiB "
                f"left after the frozen model"))
            continue
        s = cls.splits[0]
        mem = cls.memory(s, 0, 0)
        if mem > cls.mem_cap:
            need, cap = two_amounts(mem / GIB, cls.mem_cap / GIB, 2)
            reasons.append((cls.index,
                f"{who}: memory: even the smallest split ({s} block{'s' * (s > 1)}, no adapters) needs "
                f"{need} GiB, budget {cap} GiB"))
            continue
        t = inst.client_round(cls, s, 0, 0)
        if t > cls.round_budget:
            took, cap = two_amounts(t, cls.round_budget, 1)
            merge = float(cls.merge_s[s])
            what = f"{inst.tau} steps" + (f" + {merge:.3g} s of merge download, up to {_mb(cls.merge_bytes[s])}"
                                          if merge > 0 else "")
            reasons.append((cls.index,
                f"{who}: round time: even the smallest split ({s} block{'s' * (s > 1)}, no adapters) takes "
                f"{took} s per round ({what}), budget {cap} s"))
    return reasons


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:,.1f} kB"


def check_feasible(inst: Instance) -> None:
    reasons = infeasibility_reasons(inst)
    if reasons:
        raise InfeasibleError(reasons)


def _who(inst: Instance, cls: ClientClass) -> str:
    ids = [inst.clients[i].id for i in cls.members]
    names = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return f"{names} ({cls.device})"
