"""Exhaustive enumeration: the plain reference solver for small instances (no MILP, no tables).

For every client, every split and every assignment of a rank to every client-side matrix is
evaluated with the cost model; infeasible ones are dropped, dominated ones (no better utility, no
shorter round, no less server work) are pruned, and the product of the clients' options is searched
for the best plan under the same objective as the other solvers. Refuses instances that are too big.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from hsplit.planner.cost import ADAPTER_STATE_BYTES
from hsplit.planner.evaluate import Config
from hsplit.planner.frontier import UTILITY_TOL
from hsplit.planner.instance import Instance

MAX_CONFIGS_PER_CLIENT = 2_000_000
MAX_JOINT = 3_000_000


class TooLargeError(ValueError):
    pass


def compact_count(n: int) -> str:
    """A count for a message: `1,234,567` up to a billion, else `~1.2e150` (never 150 digits)."""
    if n < 10 ** 9:
        return f"{n:,}"
    digits = str(n)
    return f"~{digits[0]}.{digits[1]}e{len(digits) - 1}"


@dataclass
class ExhaustiveResult:
    configs: list[Config]
    status: str
    gap: float
    wall_s: float
    detail: dict


def client_options(inst: Instance, cls) -> list[tuple[float, float, float, Config]]:
    """Feasible, non-dominated (utility, round_s, busy_s, config) of one client class."""
    J, Q = len(inst.widths), np.array(inst.ranks)
    count = sum(len(Q) ** (s * J) for s in cls.splits)
    if count > MAX_CONFIGS_PER_CLIENT:
        raise TooLargeError(
            f"exhaustive: {cls.device} has {compact_count(count)} configurations (limit {MAX_CONFIGS_PER_CLIENT:,}); "
            "use --solver cbc or --solver highs")
    options = []
    for s in cls.splits:
        idx = np.array(list(itertools.product(range(len(Q)), repeat=s * J)), dtype=np.int64).reshape(-1, s, J)
        ranks = Q[idx]                                                 # [N, s, J]
        util = (inst.v[None, :s, :] * inst.g[idx]).sum(axis=(1, 2))
        params = (ranks * inst.widths[None, None, :]).sum(axis=(1, 2))
        adapted = ranks.any(axis=2)                                    # [N, s]
        lowest = np.where(adapted.any(axis=1), adapted.argmax(axis=1), s)
        zs = s - lowest
        mem = cls.mem0 + s * cls.mem_per_block + zs * cls.mem_per_zblock + ADAPTER_STATE_BYTES * params
        step = cls.step0 + s * cls.step_per_block + zs * cls.step_per_zblock + params * cls.step_per_param
        client_round = inst.tau * step + cls.sync_per_param * params + cls.merge_s[s]   # + merge download charged
        ok = (mem <= cls.mem_cap * (1 + 1e-12)) & (client_round <= cls.round_budget * (1 + 1e-12))
        rnd = client_round + inst.busy(s)
        order = np.lexsort((-util[ok], rnd[ok]))                       # by round time, then utility desc
        best = -np.inf
        for i in np.nonzero(ok)[0][order]:
            if util[i] > best:                                         # Pareto front of (round, utility)
                best = util[i]
                full = np.zeros((inst.L, J), dtype=np.int64)
                full[:s] = ranks[i]
                options.append((float(util[i]), float(rnd[i]), float(inst.busy(s)), Config(s, full)))
    return options


def solve_exhaustive(inst: Instance, objective: str = "utility", *, min_utility: float | None = None
                     ) -> ExhaustiveResult:
    t0 = time.perf_counter()
    per_class = [client_options(inst, c) for c in inst.classes]
    class_of = inst.class_of()
    opts = [per_class[c] for c in class_of]
    weights = np.array([inst.classes[c].weight for c in class_of])
    if objective == "utility":
        # Utility first: every client at its own maximum (the clients' utilities do not interact).
        opts = [[o for o in ol if o[0] >= max(x[0] for x in ol) - UTILITY_TOL] for ol in opts]
    joint = math.prod(len(o) for o in opts)  # exact: a float product overflows for large fleets
    if joint > MAX_JOINT:
        raise TooLargeError(f"exhaustive: {compact_count(joint)} joint plans to compare (limit {MAX_JOINT:,}); "
                            "use --solver cbc or --solver highs")
    U = np.zeros(1)
    worst = np.zeros(1)
    busy = np.zeros(1)
    for w, ol in zip(weights, opts):
        u = np.array([o[0] for o in ol]); r = np.array([o[1] for o in ol]); b = np.array([o[2] for o in ol])
        U = (U[:, None] + w * u[None, :]).ravel()
        worst = np.maximum(worst[:, None], r[None, :]).ravel()
        busy = (busy[:, None] + b[None, :]).ravel()
    R = np.maximum(worst, busy)
    if objective == "utility":
        pick = int(np.argmin(R))
    else:
        if min_utility is None:
            best_opts = [[o for o in ol if o[0] >= max(x[0] for x in ol) - UTILITY_TOL] for ol in opts]
            min_utility = 0.9 * sum(w * ol[0][0] for w, ol in zip(weights, best_opts))
        ok = U >= min_utility - UTILITY_TOL
        if not ok.any():
            raise ValueError(f"no plan reaches utility {min_utility:.4f}")
        pick = int(np.flatnonzero(ok)[np.argmin(R[ok])])
    idx = np.unravel_index(pick, [len(o) for o in opts])
    configs = [ol[i][3] for ol, i in zip(opts, idx)]
    return ExhaustiveResult(configs, "optimal", 0.0, time.perf_counter() - t0, {"joint_plans": joint})
