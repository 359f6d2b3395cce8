"""Client sampling in the planning model: with `sampling:` (planner/sampling.py) the server's busy time, its
memory, the straggler and hsplitlora's merge download are charged for the clients that train together in a
round, not for the whole fleet at once.

    apply_sampling(inst, sampling)       # after build_instance, before the solver (make_plan does this)

The draws are a pure function of (seed, round, data weights, count), so the planner enumerates the very rounds
`hsplit run` will train (training.rounds of them) and charges the worst of them (docs/formulation.md, "Client
sampling"):
  - round time R = max over the run's rounds r of max(slowest drawn client's round, server busy of the drawn
    clients): the decomposed method's sweep (frontier.min_round_sweep) minimises this worst round exactly;
    clients that no round draws still get their best-utility configuration within their own budgets;
  - server memory: at most min(concurrency, clients per round) clients are in service at once;
  - merge download bound U(s): the holders are the clients some round of the run draws, not the whole fleet.
The full MILP, the exhaustive enumeration and `--objective latency` use the sampled concurrency and merge bound
but still charge the server's busy time and the straggler over the whole fleet (pessimistic).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsplit.planner.cost import MERGE_RANK_FACTOR, merge_matrix_bytes
from hsplit.planner.instance import Instance
from hsplit.planner.sampling import Sampling, sample_clients


@dataclass
class SampledRounds:
    """The run's draws: client indices per round, and per class the (round, members drawn) pairs."""
    rounds: list[list[int]]
    by_class: dict[int, list[tuple[int, int]]]
    per_round: int


def plan_weights(inst: Instance) -> list[float]:
    """Each client's data weight as the plan writes it (api._assemble), which is what the run samples with."""
    class_of = inst.class_of()
    return [round(inst.classes[c].weight, 8) for c in class_of]


def draws(inst: Instance, sampling: Sampling, weights=None) -> list[list[int]]:
    """The clients of every round 0..rounds-1 of a run of this instance's plan (`weights`: the plan's data
    weights, by default those make_plan writes)."""
    t = inst.training
    weights = plan_weights(inst) if weights is None else list(weights)
    n = sampling.count(len(inst.clients))
    return [sample_clients(t.seed, r, weights, n, sampling.by) for r in range(t.rounds)]


def apply_sampling(inst: Instance, sampling: Sampling, weights=None) -> SampledRounds:
    """Charge `inst` for the sampled rounds (module docstring); sets inst.sampled and returns it. `weights`:
    the data weights the run samples with (a given plan's, for `hsplit plan --check`)."""
    rounds = draws(inst, sampling, weights)
    class_of = inst.class_of()
    by_class: dict[int, dict[int, int]] = {}
    for r, ids in enumerate(rounds):
        for k in ids:
            d = by_class.setdefault(int(class_of[k]), {})
            d[r] = d.get(r, 0) + 1
    n = sampling.count(len(inst.clients))
    inst.sampled = SampledRounds(rounds, {c: sorted(d.items()) for c, d in by_class.items()}, n)
    if inst.concurrency > n:         # no more clients in service than train in a round
        inst.concurrency = n
        fits = (n * inst.server_slot <= inst.server_mem_free).tolist()
        for cls in inst.classes:
            lo, hi = cls.split_range
            cls.splits = [s for s in range(lo, hi + 1) if fits[s]]
    if inst.merge_download and not inst.bounded:     # bounded: the download bound F(s) does not depend on the holders
        _sampled_merge_bounds(inst)
    return inst.sampled


def _sampled_merge_bounds(inst: Instance) -> None:
    """instance.merge_bounds with the holders the run can have: every client some round draws (a client that
    skipped rounds lacks the updates of every round since it last trained, so one round's holders are not a
    bound); clients no round draws hold nothing and download nothing."""
    L, shapes = inst.L, inst.model.module_shapes()
    max_rank, blocks = max(inst.ranks), np.arange(L)
    contrib = np.zeros((len(inst.classes), L))
    for c in inst.classes:
        if c.splits:
            contrib[c.index] = np.maximum(np.where(blocks < max(c.splits), max_rank, 0),
                                          np.where(blocks >= min(c.splits), inst.server_rank, 0))
    counts = np.zeros(len(inst.classes))
    class_of = inst.class_of()
    for k in set().union(*map(set, inst.sampled.rounds)):          # every client some round draws, once
        counts[class_of[k]] += 1
    total = counts @ contrib                                                # [L]
    K = MERGE_RANK_FACTOR[inst.aggregation] * (total[None, :] - contrib + max_rank)
    per_block = sum(merge_matrix_bytes(K, *shapes[m]) for m in inst.modules)
    bounds = np.zeros((len(inst.classes), L + 1))
    bounds[:, 1:] = np.cumsum(per_block, axis=1)
    for c in inst.classes:
        c.merge_bytes = bounds[c.index]
        c.merge_s = c.merge_bytes * 8.0 / (inst.clients[c.members[0]].device.downlink_mbps * 1e6)


def sampled_sweep(inst: Instance, cand: list[tuple[float, int, float, object]]) -> dict:
    """frontier.min_round_sweep for a sampled plan: one candidate per class minimising the worst round of the
    run, max over rounds r of max(theta, sum of the busy times of round r's clients), where theta bounds the
    round time of every client some round draws. As in the unsampled sweep, for a threshold theta each class's
    least-busy candidate with round <= theta minimises every round's busy time at once, so sweeping theta
    over the candidates' round times is exact. Classes no round draws take their fastest candidate."""
    S = inst.sampled
    C = len(inst.classes)
    drawn = set(S.by_class)
    cand = sorted(cand, key=lambda x: (x[0], x[1], x[2]))
    current = np.full(C, np.inf)
    totals = np.zeros(len(S.rounds))
    active, best_R, best_theta = 0, np.inf, None
    i = 0
    while i < len(cand):
        theta = cand[i][0]
        while i < len(cand) and cand[i][0] == theta:
            _, c, busy, _ = cand[i]
            if c in drawn and busy < current[c]:
                delta = busy - (0.0 if np.isinf(current[c]) else current[c])
                for r, m in S.by_class[c]:
                    totals[r] += m * delta
                active += np.isinf(current[c])
                current[c] = busy
            i += 1
        if active == len(drawn):
            R = max(theta, float(totals.max()) if len(totals) else 0.0)
            if R < best_R:
                best_R, best_theta = R, theta
    if best_theta is None:
        raise RuntimeError("some client class has no candidate configuration")
    by_class: dict[int, list] = {c: [] for c in range(C)}
    for x in cand:
        if x[1] not in drawn or x[0] <= best_theta:
            by_class[x[1]].append(x)
    return {c: [(min(xs, key=(lambda x: (x[2], x[0])) if c in drawn else (lambda x: (x[0], x[2])))[3],
                 inst.classes[c].count)] for c, xs in by_class.items()}
