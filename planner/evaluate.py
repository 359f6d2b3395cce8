"""Evaluate configurations with the cost model: per-client memory, times, utility, and every
violated constraint. Used to fill a plan's `predicted` fields, by `hsplit plan --check`, by the
exhaustive solver, and by tests that re-check every emitted plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsplit.planner.cost import ADAPTER_WIRE_BYTES, GIB, MERGE_RANK_FACTOR, merge_matrix_bytes
from hsplit.planner.instance import ClientClass, Instance, two_amounts

TOL = 1e-9  # relative slack when comparing a cost to its limit (float rounding only)


@dataclass
class Config:
    """One client's choice: split s and a rank per (block, module) (0 = no adapter)."""
    split: int
    ranks: np.ndarray  # [L, J] ints

    def lowest_adapted(self) -> int | None:
        rows = np.nonzero(self.ranks.any(axis=1))[0]
        return int(rows[0]) if len(rows) else None


@dataclass
class ClientEval:
    split: int
    zs: int
    params: int
    utility: float
    memory_bytes: float
    step_s: float
    client_round_s: float
    round_s: float
    server_step_s: float
    busy_s: float
    traffic_bytes: float          # activations and their gradients, adapter sync, merge download charged
    merge_charged_bytes: float = 0.0   # hsplitlora: the merge download charged (bound U(s)), in round_s
    merge_charged_s: float = 0.0       # ... its seconds on the client's downlink


def adapter_params(inst: Instance, ranks: np.ndarray) -> int:
    return int((ranks * inst.widths[None, :]).sum())


def utility_of(inst: Instance, ranks: np.ndarray) -> float:
    """sum_{l,j} v[l, j] * g(q[l, j]) with g(q) = log2(1+q) / log2(1+max Q) (hsplit.planner.instance)."""
    return float((inst.v * (np.log2(1.0 + ranks) / np.log2(1.0 + max(inst.ranks)))).sum())


def evaluate_client(inst: Instance, cls: ClientClass, cfg: Config) -> ClientEval:
    m = cfg.lowest_adapted()
    zs = 0 if m is None else cfg.split - m
    P = adapter_params(inst, cfg.ranks)
    step = cls.step(cfg.split, zs, P)
    per_step_traffic = 2 * inst.coef.cut_bytes
    return ClientEval(
        split=cfg.split, zs=zs, params=P, utility=utility_of(inst, cfg.ranks),
        memory_bytes=cls.memory(cfg.split, zs, P), step_s=step,
        client_round_s=inst.client_round(cls, cfg.split, zs, P), round_s=inst.round_time(cls, cfg.split, zs, P),
        server_step_s=float(inst.server_step_s[cfg.split]), busy_s=float(inst.busy(cfg.split)),
        traffic_bytes=inst.tau * per_step_traffic + inst.sync_bytes_per_param * P + float(cls.merge_bytes[cfg.split]),
        # bounded: the charged download is its rank-q part (in the sync term) + the floor part's bound
        merge_charged_bytes=float(cls.merge_bytes[cfg.split]) + inst.held_download_per_param * P,
        merge_charged_s=float(cls.merge_s[cfg.split]) + inst.held_download_per_param * P * 8.0 / (
            inst.clients[cls.members[0]].device.downlink_mbps * 1e6))


def merge_download_bytes(inst: Instance, configs: list[Config], aggregation: str | None = None) -> list[float]:
    """hsplitlora: the exact bytes each client downloads per round to bring its blocks [0, s_k) up to the
    round's exact aggregate (what the runtime sends, distributed.for_client, and counts, metrics.csv
    bytes_down). Holders of matrix m = (l, j): every client k' with a rank r > 0 on it (l < s_k'), and,
    when the server rank r_S > 0, the server's copy for every client k' with l >= s_k'. K_m = sum over
    holders of factor x rank (factor 2 under warm aggregation: old and new factors; 1 under restart).
    D_k = sum over planned m on blocks [0, s_k) of 4 min(K_m (d_in + d_out), d_in d_out) [K_m > 0]:
    the stacked factors or the dense update, whichever is smaller. bounded: D_k = sum over planned m on
    blocks [0, s_k) that some holder adapts (K_m > 0) of 4 max(q_k,m, floor_rank) (d_in + d_out): the rank-R
    truncation of what its blocks lack, as fp32 factors (charged as the bound 4 (P_k + floor_rank W(s_k))). `aggregation` defaults to the instance's."""
    aggregation = aggregation or inst.aggregation
    L = inst.L
    distinct: dict[int, list] = {}          # clients of a class share Config objects
    for cfg in configs:
        distinct.setdefault(id(cfg), [cfg, 0])[1] += 1
    K = np.zeros((L, len(inst.modules)))
    for cfg, n in distinct.values():
        s = min(int(cfg.split), L)
        K[:s] += n * cfg.ranks[:s]          # client-side holders (ranks above the split belong to the server)
        K[s:] += n * inst.server_rank       # the server's copies for this client
    shapes = inst.model.module_shapes()
    if aggregation == "bounded":            # rank max(q_k, floor) on every matrix of its blocks some holder adapts
        w = inst.widths.astype(float)
        adapted = K > 0
        out = []
        for cfg in configs:
            s = min(int(cfg.split), L)
            rank = np.maximum(cfg.ranks[:s], inst.floor_rank)
            out.append(float(ADAPTER_WIRE_BYTES * (rank * adapted[:s] * w).sum()))
        return out
    K *= MERGE_RANK_FACTOR[aggregation]
    per_block = sum(merge_matrix_bytes(K[:, j], *shapes[m]) for j, m in enumerate(inst.modules))
    below = np.concatenate([[0.0], np.cumsum(per_block)])
    return [float(below[min(int(cfg.split), L)]) for cfg in configs]


@dataclass
class FleetEval:
    clients: list[ClientEval]
    utility: float          # sum_k p_k U_k
    round_s: float          # R = max(max_k round_k, server busy)
    straggler: str          # client id, or "server"
    server_busy_s: float
    server_memory_bytes: float
    violations: list[str]
    merge_bytes: list[float] | None = None   # hsplitlora: each client's exact merge download D_k (not charged)


def evaluate_fleet(inst: Instance, configs: list[Config]) -> FleetEval:
    class_of = inst.class_of()
    evals, violations = [], []
    memo: dict[tuple[int, int], tuple[ClientEval, list[str]]] = {}  # clients of a class share configs
    rank_sets: dict[int, list[int]] = {}
    for k, cfg in enumerate(configs):
        cls = inst.classes[class_of[k]]
        key = (cls.index, id(cfg))
        if key in memo:
            e, problems = memo[key]
            evals.append(e)
            cid = f"{inst.clients[k].id} ({cls.device})"
            violations.extend(f"{cid}: {p}" for p in problems)
            continue
        first = len(violations)
        cid = f"{inst.clients[k].id} ({cls.device})"
        lo, hi = cls.split_range
        if inst.clients[k].splits is None:  # no `splits:` in the fleet: a given plan may also run every block
            hi = inst.L                     # on the client (split_layer L; hsplit plan chooses in 1..L-1)
        if not lo <= cfg.split <= hi:
            violations.append(f"{cid}: split_layer {cfg.split} outside the allowed range {lo}..{hi}")
        if id(cfg.ranks) not in rank_sets:      # classes that share a rank table: one check
            rank_sets[id(cfg.ranks)] = sorted(set(int(q) for q in np.unique(cfg.ranks)) - set(inst.ranks))
        bad = rank_sets[id(cfg.ranks)]
        if bad:
            violations.append(f"{cid}: ranks {bad} are not in the allowed set {list(inst.ranks)}")
        if cfg.split < inst.L and cfg.ranks[cfg.split:].any():
            violations.append(f"{cid}: adapters above split_layer {cfg.split} belong to the server")
        e = evaluate_client(inst, cls, cfg)
        evals.append(e)
        if e.memory_bytes > cls.mem_cap * (1 + TOL):
            got, cap = two_amounts(e.memory_bytes / GIB, cls.mem_cap / GIB, 2)
            violations.append(f"{cid}: memory {got} GiB exceeds budget {cap} GiB")
        if e.client_round_s > cls.round_budget * (1 + TOL):
            got, cap = two_amounts(e.client_round_s, cls.round_budget, 1)
            violations.append(f"{cid}: round time {got} s exceeds budget {cap} s")
        slot = inst.concurrency * inst.server_slot[min(cfg.split, inst.L)]
        if slot > inst.server_mem_free * (1 + TOL):
            got, cap = two_amounts(slot / GIB, inst.server_mem_free / GIB, 2)
            violations.append(f"{cid}: server memory {got} GiB per client in service exceeds the "
                              f"{cap} GiB the server has left")
        memo[key] = (e, [v.split(": ", 1)[1] for v in violations[first:]])
    busy = float(sum(e.busy_s for e in evals))
    worst = int(np.argmax([e.round_s for e in evals]))
    round_s = max(evals[worst].round_s, busy)
    straggler = "server" if busy >= evals[worst].round_s else inst.clients[worst].id
    utility = float(sum(inst.classes[c].weight * e.utility for c, e in zip(class_of, evals)))
    server_mem = inst.fleet.server.count * inst.fleet.server.device.memory_gib * GIB - inst.server_mem_free \
        + inst.concurrency * max(inst.server_slot[min(e.split, inst.L)] for e in evals)
    merge = merge_download_bytes(inst, configs) if inst.merge_download else None
    return FleetEval(evals, utility, round_s, straggler, busy, server_mem, violations, merge)
