"""Client sampling per round: which clients of a plan train in round r (the plan's `sampling:` field).

    s = Sampling.from_dict({"clients_per_round": 10}, source, n_clients=1000)  # or {fraction: 0.01, min_clients: 2}
    n = s.count(1000)                                    # clients per round
    ids = sample_clients(seed, r, weights, n, s.by)      # sorted client indices of round r (0-based)
    times = sampled_round_times(plan_clients, s, seed, rounds, local_steps)   # the planner's fleet time

The sample is a pure function of (seed, round, data weights, count): the in-process simulation, every
process of a distributed run, a resumed run and the planner draw exactly the same clients. Weighted
sampling without replacement is successive sampling (draw one client with probability proportional
to its weight among those not drawn yet, n times), computed in one pass as the n largest keys
log(u_k) / w_k, u_k ~ U(0, 1) (Efraimidis and Spirakis, 2006); `by: uniform` uses w_k = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hsplit.planner.yamlio import cut, kind, number, short, whole

SAMPLE_PURPOSE = 0x53414D50         # "SAMP": the seed stream of the sampler (apart from every runtime stream)
BY = ("data_weight", "uniform")
MAX_INT = 2 ** 31 - 1


@dataclass
class Sampling:
    """`sampling: {clients_per_round: N}` or `{fraction: F, min_clients: M}`, optional `by`."""
    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1
    by: str = "data_weight"        # data_weight: P(drawn) grows with the data weight | uniform

    def count(self, n_clients: int) -> int:
        """Clients per round: N, or max(M, floor(F * K)) (as Flower's fraction_fit / min_fit_clients), at most K."""
        if self.clients_per_round is not None:
            return min(n_clients, self.clients_per_round)
        return min(n_clients, max(self.min_clients, int(math.floor(self.fraction * n_clients + 1e-9))))

    def to_dict(self) -> dict:
        out: dict = ({"clients_per_round": self.clients_per_round} if self.clients_per_round is not None
                     else {"fraction": self.fraction, "min_clients": self.min_clients})
        if self.by != "data_weight":
            out["by"] = self.by
        return out

    @classmethod
    def from_dict(cls, raw, p, n_clients: int | None = None) -> "Sampling | None":
        """The checked section (problems go to `p`, a planner.errors.Problems); None when absent or bad."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            p.add("sampling", f"must be a mapping {{clients_per_round: N}} or {{fraction: F, min_clients: M}}, "
                              f"found {kind(raw)}")
            return None
        first = len(p.items)
        for key in raw:
            if key not in ("clients_per_round", "fraction", "min_clients", "by"):
                p.add(f"sampling.{cut(str(key))}", "unknown field; expected clients_per_round, fraction, "
                                                   "min_clients, by")
        has_n, has_f = "clients_per_round" in raw, "fraction" in raw
        if has_n == has_f:
            p.add("sampling", "give exactly one of clients_per_round (a count, e.g. 10) and fraction (a share of "
                              "the clients in (0, 1], e.g. 0.01)" + (", not both" if has_n else ""))
        top = n_clients if n_clients else MAX_INT
        n = f = None
        m = 1
        if has_n:
            n = whole(raw["clients_per_round"], "sampling.clients_per_round", p, minimum=1, maximum=MAX_INT,
                      what=" (clients that train each round)")
            if n is not None and n > top:
                p.add("sampling.clients_per_round", f"{n} is more than the plan's {top} clients; use 1..{top}")
            if "min_clients" in raw:
                p.add("sampling.min_clients", "goes with fraction (a floor on the sampled count); with "
                                              "clients_per_round remove it")
        if has_f:
            f = number(raw["fraction"], "sampling.fraction", p)
            if f is not None and not 0 < f <= 1:
                p.add("sampling.fraction", f"must be in (0, 1] (a share of the clients), got {f:g}")
        if "min_clients" in raw and not has_n:
            m = whole(raw["min_clients"], "sampling.min_clients", p, minimum=1, maximum=MAX_INT,
                      what=" (at least this many clients per round)")
            if m is not None and m > top:
                p.add("sampling.min_clients", f"{m} is more than the plan's {top} clients; use 1..{top}")
        by = raw.get("by", "data_weight")
        if by not in BY:
            p.add("sampling.by", f"must be one of {', '.join(BY)}, got {short(by)}")
        if len(p.items) > first:
            return None
        return cls(clients_per_round=n, fraction=f, min_clients=m or 1, by=by)


def sample_clients(seed: int, round_index: int, weights, n: int, by: str = "data_weight") -> list[int]:
    """The n clients (ascending indices) that train in round `round_index` (0-based)."""
    w = np.asarray(weights, dtype=np.float64)
    K = len(w)
    if n >= K:
        return list(range(K))
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, SAMPLE_PURPOSE,
                                 int(round_index) & 0xFFFFFFFF])
    u = np.random.Generator(np.random.PCG64(ss)).random(K)
    u = np.maximum(u, np.finfo(np.float64).tiny)           # log(0) never happens
    keys = np.log(u) / (w if by == "data_weight" else np.ones(K))
    top = np.argpartition(-keys, n - 1)[:n]             # the n largest keys (ties have probability 0)
    return sorted(int(i) for i in top)


def from_flags(value: str, min_clients: int | None = None, by: str = "data_weight") -> Sampling:
    """`hsplit plan --clients-per-round N|F|P% [--min-clients-per-round M] [--sample-by B]`: a whole number is
    a count, a number with a decimal point in (0, 1] or a percentage is a fraction (ConfigError otherwise)."""
    from hsplit.planner.errors import ConfigError, Problems
    text = str(value).strip()
    raw: dict = {"by": by}
    try:
        if text.endswith("%"):
            raw["fraction"] = float(text[:-1]) / 100
        elif text.isdigit():
            raw["clients_per_round"] = int(text)
        else:
            raw["fraction"] = float(text)
    except ValueError:
        raise ConfigError("--clients-per-round", [f"{text!r}: give a count (e.g. 10), a fraction (e.g. 0.01) or a "
                                                  "percentage (e.g. 1%)"]) from None
    if min_clients is not None:
        if "fraction" not in raw:
            raise ConfigError("--min-clients-per-round", ["goes with a fraction (--clients-per-round 0.01): with a "
                                                          "count, drop it"])
        raw["min_clients"] = min_clients
    p = Problems("--clients-per-round")
    out = Sampling.from_dict(raw, p)
    p.items = [x.replace("sampling.clients_per_round", "--clients-per-round").replace("sampling.fraction",
               "--clients-per-round").replace("sampling.min_clients", "--min-clients-per-round")
               .replace("sampling.by", "--sample-by") for x in p.items]
    p.raise_if_any()
    return out


def predict(plan) -> None:
    """Fill a plan's predicted round and fleet times for its sampling (docs/formulation.md, "Client
    sampling"): the rounds of `hsplit run` with this plan's seed and rounds draw exactly these clients."""
    pr = plan.predicted
    rounds = sampled_round_times(plan.clients, plan.sampling, plan.training.seed, plan.training.rounds,
                                 plan.training.local_steps)
    if not rounds or any(t is None for t, _, _ in rounds):
        return
    times = [t for t, _, _ in rounds]
    worst = max(range(len(rounds)), key=lambda i: times[i])
    busy = [plan.training.local_steps * sum(plan.clients[i].predicted.get("server_step_s") or 0.0 for i in ids)
            for _, _, ids in rounds]
    all_round = pr.get("round_s")
    pr.update({"round_s": round(float(np.mean(times)), 3), "straggler": rounds[worst][1],
               "round_s_max": round(times[worst], 3), "fleet_time_s": round(float(sum(times)), 3),
               "clients_per_round": plan.sampling.count(len(plan.clients)),
               "server_busy_s": round(float(np.mean(busy)), 3)})
    if all_round is not None:
        pr["round_s_all_clients"] = all_round
    srv = plan.server.get("predicted")
    if isinstance(srv, dict):
        srv["busy_s"] = pr["server_busy_s"]
        srv["busy_share"] = round(pr["server_busy_s"] / pr["round_s"], 4) if pr["round_s"] else 0.0


def checked_rounds(plan, evals) -> dict:
    """`hsplit plan --check` of a plan with sampling: its run's sampled rounds from the cost model's
    per-client evaluations (`evals`: evaluate.ClientEval per plan client), as `predict` reports them."""
    from types import SimpleNamespace
    clients = [SimpleNamespace(id=c.id, data_weight=c.data_weight,
                               predicted={"round_s": e.round_s, "server_step_s": e.server_step_s})
               for c, e in zip(plan.clients, evals)]
    rounds = sampled_round_times(clients, plan.sampling, plan.training.seed, plan.training.rounds,
                                 plan.training.local_steps)
    times = [t for t, _, _ in rounds]
    return {"clients_per_round": plan.sampling.count(len(plan.clients)), "round_s": float(np.mean(times)),
            "round_s_max": max(times), "fleet_time_s": float(sum(times)), "rounds": len(times)}


def round_time(clients, ids, local_steps: int) -> tuple[float | None, str | None]:
    """One round's time with clients `ids` (plan ClientPlans with predicted round_s / server_step_s):
    max(slowest sampled client's round, the server's busy time for the sampled clients), and who sets it."""
    times = [(clients[i].predicted.get("round_s"), clients[i].id) for i in ids]
    if any(not isinstance(t, (int, float)) for t, _ in times) or not times:
        return None, None
    t, who = max(times, key=lambda x: x[0])
    steps = [clients[i].predicted.get("server_step_s") for i in ids]
    busy = local_steps * sum(s for s in steps if isinstance(s, (int, float)))
    return (busy, "server") if busy > t else (float(t), who)


def sampled_round_times(clients, sampling: Sampling, seed: int, rounds: int, local_steps: int) -> list:
    """(time, straggler, client indices) of every round 0..rounds-1 of a run of this plan: the exact
    rounds `hsplit run` trains (the same draws), so their sum is the run's fleet time."""
    weights = [c.data_weight for c in clients]
    n = sampling.count(len(clients))
    out = []
    for r in range(rounds):
        ids = sample_clients(seed, r, weights, n, sampling.by)
        t, who = round_time(clients, ids, local_steps)
        out.append((t, who, ids))
    return out
