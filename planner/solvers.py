"""The one place where MILPs are solved: engine, time limit, threads and gap are explicit.

`solve_milp(prob, engine, ...)` runs CBC (PuLP's bundled binary) or HiGHS (highspy, in process) and
returns a `MilpResult`. A CBC run that stops at its time limit still reports LpStatus "Optimal", so
the status is read from `LpSolution[prob.sol_status]` instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pulp

ENGINES = ("cbc", "highs")


@dataclass
class MilpResult:
    status: str          # optimal | feasible | infeasible | time-limit | error
    objective: float | None
    gap: float | None    # proven relative gap (None when the engine cannot tell)
    wall_s: float


def solve_milp(prob: pulp.LpProblem, engine: str = "cbc", *, time_limit: float | None = None,
               threads: int | None = None, gap: float = 1e-9) -> MilpResult:
    if engine == "cbc":
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, threads=threads)
    elif engine == "highs":
        solver = pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap, threads=threads)
    else:
        raise ValueError(f"unknown MILP engine {engine!r}; use one of {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    prob.solve(solver)
    wall = time.perf_counter() - t0
    solution = pulp.LpSolution.get(prob.sol_status, "")
    objective = pulp.value(prob.objective)
    proven_gap = None
    if engine == "highs" and getattr(prob, "solverModel", None) is not None:
        info = prob.solverModel.getInfo()
        proven_gap = float(info.mip_gap) if info.mip_gap < float("inf") else None
    if solution == "Optimal Solution Found":
        return MilpResult("optimal", objective, proven_gap if proven_gap is not None else 0.0, wall)
    if solution == "Solution Found":
        return MilpResult("time-limit", objective, proven_gap, wall)
    if solution == "No Solution Exists":
        return MilpResult("infeasible", None, None, wall)
    if time_limit is not None and wall >= 0.95 * time_limit:
        return MilpResult("time-limit", None, None, wall)
    return MilpResult("error", None, None, wall)
