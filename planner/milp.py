"""The full integer program of docs/formulation.md, one set of variables per client (no aggregation).

This is the straightforward model: it is the reference the decomposed method is benchmarked and
tested against, and the method for instances the decomposition does not cover.
build_problem() -> solve (hsplit.planner.solvers.solve_milp) -> extract_configs().
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp

from hsplit.planner.cost import ADAPTER_STATE_BYTES, GIB
from hsplit.planner.evaluate import Config
from hsplit.planner.frontier import UTILITY_TOL
from hsplit.planner.instance import Instance
from hsplit.planner.solvers import solve_milp


@dataclass
class MilpVars:
    y: dict       # (k, s) -> split choice
    x: dict       # (k, l, j, qi) -> rank choice (qi > 0)
    z: dict       # (k, l) -> block l of client k is back-propagated
    R: pulp.LpVariable
    utility: dict  # k -> utility expression


def build_problem(inst: Instance, objective: str = "utility") -> tuple[pulp.LpProblem, MilpVars]:
    """Variables, constraints and (for the latency objective) the objective; see formulation.md."""
    prob = pulp.LpProblem("hsplit", pulp.LpMinimize if objective == "latency" else pulp.LpMaximize)
    class_of = inst.class_of()
    J, Q = len(inst.widths), inst.ranks
    y, x, z, util = {}, {}, {}, {}
    R = pulp.LpVariable("R", lowBound=0)
    busy_terms = []
    for k in range(len(inst.clients)):
        cls = inst.classes[class_of[k]]
        top = max(cls.splits)
        # --- Variables ---
        for s in cls.splits:
            y[k, s] = pulp.LpVariable(f"y_{k}_{s}", cat="Binary")
        for l in range(top):
            z[k, l] = pulp.LpVariable(f"z_{k}_{l}", lowBound=0, upBound=1)
            for j in range(J):
                for qi in range(1, len(Q)):
                    x[k, l, j, qi] = pulp.LpVariable(f"x_{k}_{l}_{j}_{qi}", cat="Binary")
        # --- Constraints ---
        # Exactly one split point.
        prob += pulp.lpSum(y[k, s] for s in cls.splits) == 1
        on = {l: pulp.lpSum(y[k, s] for s in cls.splits if s > l) for l in range(top)}  # block l on client
        for l in range(top):
            for j in range(J):
                # At most one rank per matrix, and adapters only on the client's own blocks.
                prob += pulp.lpSum(x[k, l, j, qi] for qi in range(1, len(Q))) <= on[l]
                # Backward passes through every block that holds an adapter...
                prob += z[k, l] >= pulp.lpSum(x[k, l, j, qi] for qi in range(1, len(Q)))
            # ...and through every client block above the lowest adapter.
            if l > 0:
                prob += z[k, l] >= z[k, l - 1] + on[l] - 1
            prob += z[k, l] <= on[l]
        split = pulp.lpSum(s * y[k, s] for s in cls.splits)
        zs = pulp.lpSum(z[k, l] for l in range(top))
        params = pulp.lpSum(Q[qi] * int(inst.widths[j]) * x[k, l, j, qi]
                            for l in range(top) for j in range(J) for qi in range(1, len(Q)))
        # Client memory: frozen embeddings and blocks, activations of back-propagated blocks, adapter state.
        prob += (cls.mem0 + cls.mem_per_block * split + cls.mem_per_zblock * zs
                 + ADAPTER_STATE_BYTES * params) / GIB <= cls.mem_cap / GIB
        # hsplitlora's merge download, charged as the bound U(s) of the client's own split (a constant per split).
        merge = pulp.lpSum(float(cls.merge_s[s]) * y[k, s] for s in cls.splits if cls.merge_s[s] > 0)
        client_round = inst.tau * (cls.step0 + cls.step_per_block * split + cls.step_per_zblock * zs
                                   + cls.step_per_param * params) + cls.sync_per_param * params + merge
        # The client's own part of a round fits its budget.
        if np.isfinite(cls.round_budget):
            prob += client_round <= cls.round_budget
        busy = pulp.lpSum(float(inst.busy(s)) * y[k, s] for s in cls.splits)
        busy_terms.append(busy)
        # The round lasts at least as long as each client's steps, server share, sync and merge download.
        prob += R >= client_round + busy
        util[k] = pulp.lpSum(float(inst.v[l, j] * inst.g[qi]) * x[k, l, j, qi]
                             for l in range(top) for j in range(J) for qi in range(1, len(Q)))
    # The round lasts at least as long as the server's total work.
    prob += R >= pulp.lpSum(busy_terms)
    return prob, MilpVars(y, x, z, R, util)


def extract_configs(inst: Instance, v: MilpVars) -> list[Config]:
    configs = []
    for k in range(len(inst.clients)):
        split = max((s for (kk, s), var in v.y.items() if kk == k), key=lambda s: v.y[k, s].value() or 0)
        ranks = np.zeros((inst.L, len(inst.widths)), dtype=np.int64)
        for (kk, l, j, qi), var in v.x.items():
            if kk == k and (var.value() or 0) > 0.5:
                ranks[l, j] = inst.ranks[qi]
        configs.append(Config(split, ranks))
    return configs


@dataclass
class FullResult:
    configs: list[Config] | None
    status: str
    gap: float | None
    wall_s: float
    detail: dict


def solve_full(inst: Instance, objective: str = "utility", *, min_utility: float | None = None,
               engine: str = "cbc", time_limit: float | None = None, gap: float = 1e-9,
               threads: int | None = None) -> FullResult:
    """Lexicographic utility objective: stage 1 maximises utility, stage 2 keeps every client within
    UTILITY_TOL of its stage-1 utility and minimises R. Latency: min R s.t. utility >= floor."""
    t0 = time.perf_counter()
    weights = {k: inst.classes[c].weight for k, c in enumerate(inst.class_of())}
    prob, v = build_problem(inst, objective)
    total_util = pulp.lpSum(weights[k] * u for k, u in v.utility.items())
    build_s = time.perf_counter() - t0
    remaining = lambda: None if time_limit is None else max(1.0, time_limit - (time.perf_counter() - t0))
    # With a time limit, stage 1 gets half of it, so stage 2 is not left with nothing.
    half = lambda: None if time_limit is None else max(1.0, 0.5 * remaining())
    if objective == "latency":
        if min_utility is None:
            stage1 = solve_full(inst, "utility", engine=engine, time_limit=half(), gap=gap, threads=threads)
            if stage1.configs is None:
                return stage1
            from hsplit.planner.evaluate import evaluate_fleet
            min_utility = 0.9 * evaluate_fleet(inst, stage1.configs).utility
        prob += v.R
        prob += total_util >= min_utility
        res = solve_milp(prob, engine, time_limit=remaining(), threads=threads, gap=gap)
        configs = extract_configs(inst, v) if res.objective is not None else None
        return FullResult(configs, res.status, res.gap, time.perf_counter() - t0, {"build_s": build_s})
    # Stage 1: maximise utility (R plays no part).
    prob.setObjective(total_util)
    res1 = solve_milp(prob, engine, time_limit=half(), threads=threads, gap=gap)
    if res1.objective is None:
        return FullResult(None, res1.status, None, time.perf_counter() - t0, {"build_s": build_s})
    stage1 = {k: float(pulp.value(u) or 0.0) for k, u in v.utility.items()}
    stage1_configs = extract_configs(inst, v)  # feasible: the fallback if stage 2 runs out of time
    # Stage 2: minimise R, every client keeping its utility.
    prob.sense = pulp.LpMinimize
    prob.setObjective(v.R)
    for k, u in v.utility.items():
        prob += u >= stage1[k] - UTILITY_TOL
    res2 = solve_milp(prob, engine, time_limit=remaining(), threads=threads, gap=gap)
    status = res2.status if res1.status == "optimal" else res1.status
    gap_out = None if res1.gap is None or res2.gap is None else max(res1.gap, res2.gap)
    if res2.objective is not None:
        configs = extract_configs(inst, v)
    elif res2.status == "time-limit":
        configs, status, gap_out = stage1_configs, "time-limit", None
    else:
        configs = None
    return FullResult(configs, status, gap_out, time.perf_counter() - t0,
                      {"build_s": build_s, "stage1_s": res1.wall_s, "stage2_s": res2.wall_s})
