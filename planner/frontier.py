"""The decomposed exact method: client-independent frontier tables + a small master problem.

Why it is exact (docs/formulation.md, "Decomposed method"): adapter memory and adapter time are
both linear in the adapter parameter count P = sum q*(d_in+d_out). For a split s and a lowest adapted
block m, every client's problem is therefore "maximise utility subject to P <= cap" where only the
cap depends on the client. The table F[s, m][p] = best utility of adapters in blocks [m, s) with
P <= p*unit is computed once for the model (a multiple-choice-knapsack dynamic programme over the
P lattice) and then read by every client in O(1). The only coupling between clients is the round
time R (a max over clients and the server's summed busy time), solved exactly by a sweep over
candidate round times (utility objective) or by bisection on R with an integer master problem
over (class, split) counts (latency objective, stated gap).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import reduce

import numpy as np
import pulp

from hsplit.planner.cost import ADAPTER_STATE_BYTES
from hsplit.planner.evaluate import Config
from hsplit.planner.instance import Instance
from hsplit.planner.solvers import solve_milp

UTILITY_TOL = 1e-7   # two utilities closer than this are a tie (stage 2 keeps each client within it)
MAX_LATTICE = 20_000_000


class FrontierTables:
    """F[s, m] for every split s in `splits` and lowest adapted block m < s (cumulative maxima)."""

    def __init__(self, inst: Instance, splits):
        self.inst = inst
        costs = [q * int(w) for w in inst.widths for q in inst.ranks if q > 0]
        self.unit = reduce(math.gcd, costs)
        self.cost = [[q * int(w) // self.unit for q in inst.ranks] for w in inst.widths]  # [J][Q]
        size = sum(row[-1] for row in self.cost) * inst.L
        if size > MAX_LATTICE:
            raise ValueError(f"the rank lattice has {size:,} points (ranks {list(inst.ranks)} share a small "
                             "common factor); use --method full, or ranks that are multiples of 2")
        self.tables: dict[tuple[int, int], np.ndarray] = {}
        self._ranks: dict[tuple[int, int, int], np.ndarray] = {}   # ranks_many's answers (shared tables re-use them)
        for s in sorted(set(splits)):
            for m, G in self._pass(s):
                self.tables[(s, m)] = np.maximum.accumulate(G)

    def _pass(self, s: int, stop: int = 0, record: list | None = None):
        """Add blocks s-1, s-2, ..., stop to the knapsack; yield (m, G) with G[p] = best utility at P = p."""
        inst = self.inst
        G = np.zeros(1)
        for l in range(s - 1, stop - 1, -1):
            for j in range(len(inst.widths)):
                costs = self.cost[j]
                new = np.full(len(G) + costs[-1], -np.inf)
                choice = np.zeros(len(new), dtype=np.int16) if record is not None else None
                for qi, c in enumerate(costs):
                    cand = G + inst.v[l, j] * inst.g[qi]
                    seg = new[c:c + len(G)]
                    if choice is not None:
                        choice[c:c + len(G)][cand > seg] = qi
                    np.maximum(seg, cand, out=seg)
                if record is not None:
                    record.append((l, j, choice))
                G = new
            yield l, G

    def lookup(self, s: int, m: int, cap_units: np.ndarray) -> np.ndarray:
        """Best utility with P <= cap (per entry of cap_units; -inf where cap < 0)."""
        if m == s:
            return np.where(cap_units >= 0, 0.0, -np.inf)
        t = self.tables[(s, m)]
        out = t[np.clip(cap_units, 0, len(t) - 1)]
        return np.where(cap_units >= 0, out, -np.inf)

    def min_units(self, s: int, m: int, target: np.ndarray) -> np.ndarray:
        """Smallest p with F[s, m][p] >= target (len(table) where unreachable)."""
        if m == s:
            return np.where(target <= 0, 0, 1)
        return np.searchsorted(self.tables[(s, m)], target, side="left")

    def ranks(self, s: int, m: int, p: int) -> np.ndarray:
        """Rank values [L, J] of a configuration achieving F[s, m] at exactly cost p (backtracking)."""
        return self.ranks_many([(s, m, p)])[(s, m, p)]

    def ranks_many(self, wanted) -> dict[tuple[int, int, int], np.ndarray]:
        """ranks(s, m, p) for every (s, m, p) in `wanted`, with one pass of the programme per split s (the
        choices recorded for blocks s-1 .. m do not depend on where the pass stops). Answers are kept: a
        what-if sweep sharing these tables asks again for most of them."""
        inst = self.inst
        wanted = set(wanted)
        out = {key: self._ranks[key] for key in wanted if key in self._ranks}
        by_split: dict[int, list] = {}
        for s, m, p in wanted - out.keys():
            by_split.setdefault(s, []).append((m, p))
        for s, todo in by_split.items():
            record: list = []
            for _ in self._pass(s, stop=min(m for m, _ in todo), record=record):
                pass
            for m, p in todo:
                ranks = np.zeros((inst.L, len(inst.widths)), dtype=np.int64)
                left = p
                for l, j, choice in reversed([r for r in record if r[0] >= m]):
                    qi = int(choice[left])
                    ranks[l, j] = inst.ranks[qi]
                    left -= self.cost[j][qi]
                assert left == 0, "backtracking did not return to cost 0"
                ranks.setflags(write=False)     # shared by every plan that picks (s, m, p)
                out[(s, m, p)] = self._ranks[(s, m, p)] = ranks
        return out


@dataclass
class DecomposedResult:
    configs: list[Config]
    status: str
    gap: float
    wall_s: float
    detail: dict


def _class_arrays(inst: Instance):
    cl = inst.classes
    a = {name: np.array([getattr(c, name) for c in cl], dtype=float)
         for name in ("mem_cap", "round_budget", "mem0", "mem_per_block", "mem_per_zblock", "step0",
                      "step_per_block", "step_per_zblock", "step_per_param", "sync_per_param", "weight")}
    a["count"] = np.array([c.count for c in cl], dtype=float)
    a["merge_s"] = np.array([c.merge_s for c in cl], dtype=float)    # [C, L+1]: merge download charged at s
    allowed = np.zeros((len(cl), inst.L + 1), dtype=bool)
    for i, c in enumerate(cl):
        allowed[i, c.splits] = True
    a["allowed"] = allowed
    return a


def _caps(inst: Instance, a, tables: FrontierTables, s: int, zs: int, round_cap: float | None):
    """Largest adapter-parameter lattice index each class can afford at (s, zs)."""
    tau = inst.tau
    mem_room = a["mem_cap"] - (a["mem0"] + s * a["mem_per_block"] + zs * a["mem_per_zblock"])
    step_base = a["step0"] + s * a["step_per_block"] + zs * a["step_per_zblock"]
    per_param_time = tau * a["step_per_param"] + a["sync_per_param"]
    fixed = tau * step_base + a["merge_s"][:, s]       # the round's time without adapters, merge download included
    time_room = a["round_budget"] - fixed
    cap = np.minimum(mem_room / ADAPTER_STATE_BYTES, time_room / per_param_time)
    if round_cap is not None:
        cap = np.minimum(cap, (round_cap - fixed - inst.busy(s)) / per_param_time)
    with np.errstate(invalid="ignore", over="ignore"):
        units = np.floor(cap / tables.unit * (1 + 1e-12) + 1e-9)
    units = np.where(np.isfinite(units), units, 2 ** 40)
    units = np.where(a["allowed"][:, s], units, -1)
    return units.astype(np.int64), fixed, per_param_time


def _best_per_split(inst, a, tables, round_cap=None):
    """U[c, s]: best utility of class c at split s (round time <= round_cap when given), with
    M[c, s] the lowest adapted block and P[c, s] the smallest lattice cost achieving it."""
    C = len(inst.classes)
    U = np.full((C, inst.L + 1), -np.inf)
    M = np.zeros((C, inst.L + 1), dtype=np.int64)
    P = np.zeros((C, inst.L + 1), dtype=np.int64)
    for s in range(1, inst.L):
        if not a["allowed"][:, s].any():
            continue
        for m in range(s, -1, -1):
            units, _, _ = _caps(inst, a, tables, s, s - m, round_cap)
            val = tables.lookup(s, m, units)
            better = val > U[:, s]
            U[better, s] = val[better]
            M[better, s] = m
            P[better, s] = np.minimum(tables.min_units(s, m, val), np.maximum(units, 0))[better]
    return U, M, P


def tables_for(inst: Instance, cache: dict | None = None) -> FrontierTables:
    """Frontier tables for the instance; with a cache, built once for every split and re-used by any
    instance with the same model, modules, ranks and importance (fleets and training may differ)."""
    if cache is None:
        return FrontierTables(inst, sorted({s for c in inst.classes for s in c.splits}))
    key = (inst.model.arch_hash(), inst.modules, inst.ranks, hash(inst.v.tobytes()))
    if key not in cache:
        cache[key] = FrontierTables(inst, range(1, inst.L))
    return cache[key]


def solve_decomposed(inst: Instance, objective: str = "utility", *, min_utility: float | None = None,
                     engine: str = "highs", time_limit: float | None = None, gap: float = 1e-4,
                     tables_cache: dict | None = None) -> DecomposedResult:
    t0 = time.perf_counter()
    a = _class_arrays(inst)
    tables = tables_for(inst, tables_cache)
    t_tables = time.perf_counter() - t0
    Ustar = _best_per_split(inst, a, tables)[0].max(axis=1)
    if np.isneginf(Ustar).any():
        raise RuntimeError("a class has no feasible configuration; check_feasible() should have caught it")
    if objective == "utility":
        choice, status, got_gap = _min_round_at_max_utility(inst, a, tables, Ustar), "optimal", 0.0
    else:
        best = float((a["weight"] * a["count"] * Ustar).sum())
        floor = 0.9 * best if min_utility is None else min_utility
        if floor > best + UTILITY_TOL:
            raise ValueError(f"--min-utility {floor:.4f} is above the best achievable utility {best:.4f}")
        choice, got_gap = _min_round_with_floor(inst, a, tables, floor, engine, time_limit, gap)
        status = "optimal" if got_gap <= gap else "gap"
    configs: list[Config | None] = [None] * len(inst.clients)
    ranks = tables.ranks_many([key for assigned in choice.values() for key, _ in assigned])
    shared = {key: Config(key[0], r) for key, r in ranks.items()}  # one Config object per distinct choice
    for c, assigned in choice.items():
        members = inst.classes[c].members
        at = 0
        for key, n in assigned:
            for k in members[at:at + n]:
                configs[k] = shared[key]
            at += n
    return DecomposedResult(configs, status, got_gap, time.perf_counter() - t0,
                            {"tables_s": t_tables, "lattice_unit": tables.unit, "tables": len(tables.tables)})


def _min_round_at_max_utility(inst, a, tables, Ustar):
    """Stage 2 of the utility objective: every client keeps its maximal utility; minimise R.
    Candidates: per class and split, the fastest configuration within UTILITY_TOL of the maximum."""
    C = len(inst.classes)
    target = Ustar - UTILITY_TOL
    cand = []  # (round_s, class, busy_s, (s, m, p))
    for s in range(1, inst.L):
        if not a["allowed"][:, s].any():
            continue
        best_t = np.full(C, np.inf)
        best_mp = np.zeros((C, 2), dtype=np.int64)
        for m in range(s, -1, -1):
            units, fixed, per_param = _caps(inst, a, tables, s, s - m, None)
            ok = tables.lookup(s, m, units) >= target
            p = np.minimum(tables.min_units(s, m, target), np.maximum(units, 0))
            t = fixed + inst.busy(s) + per_param * p * tables.unit
            better = ok & (t < best_t)
            best_t = np.where(better, t, best_t)
            best_mp[better] = np.stack([np.full(C, m), p], axis=1)[better]
        for c in np.nonzero(np.isfinite(best_t))[0]:
            cand.append((float(best_t[c]), int(c), float(inst.busy(s)), (s, int(best_mp[c, 0]), int(best_mp[c, 1]))))
    return min_round_sweep(inst, cand)


def min_round_sweep(inst: Instance, cand: list[tuple[float, int, float, object]]) -> dict:
    """Pick one candidate per class (all members alike) minimising R = max(max round, sum busy).

    cand holds (round_s, class, busy_s, payload). For a threshold theta on the clients' round times,
    the least server work is each class's least-busy candidate with round <= theta, so
    R* = min over theta of max(theta, total busy(theta)); theta sweeps the candidate round times.
    Returns {class: [(payload, count)]}."""
    if inst.sampled is not None:        # client sampling: the worst of the run's sampled rounds (planner/sampled.py)
        from hsplit.planner.sampled import sampled_sweep
        return sampled_sweep(inst, cand)
    C = len(inst.classes)
    counts = np.array([c.count for c in inst.classes], dtype=float)
    cand = sorted(cand, key=lambda x: (x[0], x[1], x[2]))
    current = np.full(C, np.inf)
    total, active, best_R, best_theta = 0.0, 0, np.inf, None
    i = 0
    while i < len(cand):
        theta = cand[i][0]
        while i < len(cand) and cand[i][0] == theta:
            _, c, busy, _ = cand[i]
            if busy < current[c]:
                total += counts[c] * (busy - (0.0 if np.isinf(current[c]) else current[c]))
                active += np.isinf(current[c])
                current[c] = busy
            i += 1
        if active == C and max(theta, total) < best_R:
            best_R, best_theta = max(theta, total), theta
    if best_theta is None:
        raise RuntimeError("some client class has no candidate configuration")
    by_class: dict[int, list] = {c: [] for c in range(C)}
    for x in cand:
        if x[0] <= best_theta:
            by_class[x[1]].append(x)
    return {c: [(min(xs, key=lambda x: (x[2], x[0]))[3], inst.classes[c].count)] for c, xs in by_class.items()}


def _min_round_with_floor(inst, a, tables, floor, engine, time_limit, gap):
    """Latency objective: smallest R whose best utility reaches `floor`, by bisection on R.
    V(R) solves an integer master over counts n[c, s] (clients of class c at split s)."""
    util_choice = _min_round_at_max_utility(inst, a, tables, _best_per_split(inst, a, tables)[0].max(axis=1))
    hi = _round_of_choice(inst, a, tables, util_choice)
    lo = 0.0
    best_choice = util_choice
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    while (hi - lo) > gap * hi:
        if deadline is not None and time.perf_counter() > deadline:
            break
        mid = 0.5 * (lo + hi)
        feasible, choice = _master(inst, a, tables, mid, floor, engine)
        if feasible:
            hi = min(mid, _round_of_choice(inst, a, tables, choice))
            best_choice = choice
        else:
            lo = mid
    return best_choice, (hi - lo) / hi if hi > 0 else 0.0


def _round_of_choice(inst, a, tables, choice) -> float:
    worst, busy = 0.0, 0.0
    for c, assigned in choice.items():
        for (s, m, p), n in assigned:
            if n == 0:
                continue
            zs = s - m
            step = a["step0"][c] + s * a["step_per_block"][c] + zs * a["step_per_zblock"][c] \
                + p * tables.unit * a["step_per_param"][c]
            t = inst.tau * step + a["sync_per_param"][c] * p * tables.unit + a["merge_s"][c, s] + inst.busy(s)
            worst = max(worst, t)
            busy += n * inst.busy(s)
    return max(worst, busy)


def _master(inst, a, tables, R, floor, engine):
    """Can utility `floor` be reached with round time <= R? Returns (feasible, choice)."""
    C = len(inst.classes)
    U, M, P = _best_per_split(inst, a, tables, R)
    best = {(int(c), int(s)): (float(U[c, s]), int(M[c, s]), int(P[c, s])) for c, s in zip(*np.nonzero(np.isfinite(U)))}
    if any(not any((c, s) in best for s in range(inst.L)) for c in range(C)):
        return False, None
    prob = pulp.LpProblem("master", pulp.LpMaximize)
    n = {k: pulp.LpVariable(f"n_{k[0]}_{k[1]}", 0, inst.classes[k[0]].count, cat="Integer") for k in best}
    prob += pulp.lpSum(a["weight"][c] * best[(c, s)][0] * n[(c, s)] for (c, s) in best)
    for c in range(C):
        prob += pulp.lpSum(n[k] for k in best if k[0] == c) == inst.classes[c].count
    prob += pulp.lpSum(inst.busy(s) * n[(c, s)] for (c, s) in best) <= R
    res = solve_milp(prob, engine, gap=1e-9)
    if res.status != "optimal" or res.objective is None or res.objective < floor - UTILITY_TOL:
        return False, None
    choice = {c: [] for c in range(C)}
    for (c, s), var in n.items():
        cnt = int(round(var.value() or 0))
        if cnt:
            _, m, p = best[(c, s)]
            choice[c].append(((s, m, p), cnt))
    return True, choice
