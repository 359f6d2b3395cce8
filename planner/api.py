"""Library entry points behind `hsplit plan`: make_plan() and check_plan().

make_plan: fleet + model (+ importance) -> Plan. Strategies:
  hsplitlora                      per-client split and per-matrix ranks (decomposed, full MILP or exhaustive)
  hetlora, flexlora, hafl-*       per-client split and ONE rank per client on every client-side matrix
  splitlora                       one split and one rank for the whole fleet (fits the weakest client)
  centralized                     no split: the reference run on pooled data (nothing to optimise)
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hsplit import __version__
from hsplit.planner.cost import GIB
from hsplit.planner.errors import ConfigError, InfeasibleError, Problems
from hsplit.planner.evaluate import Config, FleetEval, evaluate_client, evaluate_fleet
from hsplit.planner.evaluate import merge_download_bytes  # noqa: F401  (api.merge_download_bytes, as before)
from hsplit.planner.exhaustive import solve_exhaustive
from hsplit.planner.fleet import Fleet
from hsplit.planner.frontier import UTILITY_TOL, min_round_sweep, solve_decomposed
from hsplit.planner.importance import Importance
from hsplit.planner.instance import Instance, build_instance, check_feasible
from hsplit.planner.milp import solve_full
from hsplit.planner.model import ModelProfile, load_model_profile
from hsplit.planner.plan import DEFAULT_AGGREGATION, ClientPlan, DataSpec, Plan, Training
from hsplit.planner.sampling import Sampling
from hsplit.planner.sampling import predict as predict_sampled
from hsplit.planner.strategies import NAMES as STRATEGIES
from hsplit.planner.strategies import traits
from hsplit.planner.yamlio import sha256_file

SOLVERS = ("cbc", "highs", "exhaustive")
METHODS = ("decomposed", "full")
OBJECTIVES = ("utility", "latency")
FULL_TIME_LIMIT_S = 60.0  # --method full without --time-limit: the full MILP can run for hours


def full_time_limit(method: str, time_limit: float | None) -> float | None:
    """The MILP time limit make_plan uses: --time-limit, else FULL_TIME_LIMIT_S for --method full."""
    return FULL_TIME_LIMIT_S if method == "full" and time_limit is None else time_limit


def load_inputs(fleet, model, importance):
    fleet_obj = fleet if isinstance(fleet, Fleet) else Fleet.load(fleet)
    model_obj = model if isinstance(model, ModelProfile) else load_model_profile(model)
    imp = importance if (importance is None or isinstance(importance, Importance)) else Importance.load(importance)
    return fleet_obj, model_obj, imp


def check_options(*, strategy: str = "hsplitlora", objective: str = "utility", solver: str = "cbc",
                  method: str = "decomposed", time_limit: float | None = None,
                  min_utility: float | None = None) -> None:
    """The planning options make_plan takes, checked before any input is loaded (one ConfigError)."""
    _check_choice("--strategy", strategy, STRATEGIES)
    _check_choice("--objective", objective, OBJECTIVES)
    _check_choice("--solver", solver, SOLVERS)
    _check_choice("--method", method, METHODS)
    if time_limit is not None and not time_limit > 0:
        raise ConfigError("--time-limit", [f"must be a number of seconds > 0, got {time_limit:g}"])
    if min_utility is not None:
        if objective != "latency":
            raise ConfigError("--min-utility", [
                f"only applies to --objective latency (the fastest round reaching that utility); --objective "
                f"{objective} maximises utility and would ignore it: add --objective latency or drop --min-utility"])
        if not 0 <= min_utility <= 1:
            raise ConfigError("--min-utility", [f"is a fleet utility in [0, 1] (importance-weighted share of the "
                                                f"model adapted), got {min_utility:g}"])


def task_classes(data: DataSpec | None) -> int | None:
    """The classes of a classification plan's head (data.task classification), None for next-token training."""
    return max(2, len(data.labels)) if data is not None and data.task == "classification" else None


def make_plan(fleet, model, *, importance=None, ranks=(0, 2, 4, 8, 16), modules=None,
              training: Training | None = None, strategy: str = "hsplitlora", objective: str = "utility",
              min_utility: float | None = None, solver: str = "cbc", method: str = "decomposed",
              time_limit: float | None = None, threads: int | None = None, server_rank: int = 8,
              data: DataSpec | None = None, tables_cache: dict | None = None, aggregation: str = DEFAULT_AGGREGATION,
              sampling: Sampling | None = None, floor_rank: int | None = None) -> Plan:
    """Solve the planning problem and return the Plan (not yet written; call plan.save(path)).
    `tables_cache`: a dict shared between calls lets the decomposed method re-use its tables.
    `aggregation` (hsplitlora: bounded | warm | restart) sizes the merge download charged in every round time;
    `floor_rank` (bounded: the download rank on a matrix a client does not adapt; default the smallest rank).
    `sampling`: clients per round (planner/sampling.py); the predicted round and fleet times follow it."""
    check_options(strategy=strategy, objective=objective, solver=solver, method=method, time_limit=time_limit,
                  min_utility=min_utility)
    time_limit = full_time_limit(method, time_limit)
    fleet_obj, model_obj, imp = load_inputs(fleet, model, importance)
    training = training or Training()
    classes = task_classes(data)
    inst = build_instance(fleet_obj, model_obj, importance=imp, ranks=ranks, modules=modules,
                          training=training, server_rank=server_rank, strategy=strategy, aggregation=aggregation,
                          classes=classes, floor_rank=floor_rank)
    if sampling is not None and traits(strategy).split:      # charge the sampled rounds (planner/sampled.py)
        from hsplit.planner.sampled import apply_sampling
        apply_sampling(inst, sampling)
    check_feasible(inst)
    t0 = time.perf_counter()
    gap, status, detail = 0.0, "optimal", {}
    how = traits(strategy).ranks
    if how == "reference":
        configs = [Config(model_obj.layers, np.full((inst.L, len(inst.modules)), server_rank)) for _ in inst.clients]
        status, label = "not-applicable", "none (centralized reference)"
    elif how == "one":     # one rank on both sides: the instance's server costs follow it
        inst, configs = _fleet_uniform(inst, lambda r: build_instance(
            fleet_obj, model_obj, importance=imp, ranks=ranks, modules=modules, training=training, server_rank=r,
            strategy=strategy, aggregation=aggregation, classes=classes, floor_rank=floor_rank))
        label = "enumeration (one split, one rank)"
    elif how == "per-client":
        configs, label = _per_client_uniform(inst), "enumeration (one rank per client) + round-time sweep"
    elif solver == "exhaustive":
        res = solve_exhaustive(inst, objective, min_utility=min_utility)
        configs, label, detail = res.configs, "exhaustive enumeration", res.detail
    elif method == "full":
        res = solve_full(inst, objective, min_utility=min_utility, engine=solver, time_limit=time_limit,
                         threads=threads)
        if res.configs is None and res.status == "time-limit":
            raise ConfigError("--time-limit", [f"{solver} found no plan within {time_limit:g} s; raise "
                                               "--time-limit or use --method decomposed (exact and fast)"])
        if res.configs is None:
            raise RuntimeError(f"{solver} found no plan ({res.status}); use --method decomposed")
        configs, status, gap, detail = res.configs, res.status, res.gap, res.detail
        label = f"full MILP ({solver})"
    else:
        res = solve_decomposed(inst, objective, min_utility=min_utility, engine=solver, time_limit=time_limit,
                               tables_cache=tables_cache)
        configs, status, gap, detail = res.configs, res.status, res.gap, res.detail
        label = "decomposed (frontier tables" + (f" + {solver} master)" if objective == "latency" else " + sweep)")
    wall = time.perf_counter() - t0
    ev = evaluate_fleet(inst, configs) if how != "reference" else None
    if ev is not None and ev.violations:
        raise RuntimeError("internal error: the solver returned a plan that violates constraints:\n"
                           + "\n".join(ev.violations))
    plan = _assemble(inst, configs, ev, fleet, fleet_obj, model, model_obj, importance, imp, strategy,
                     objective, training, data or DataSpec(), dict(name=solver if how == "milp" else "enumeration",
                     method=label, status=status, gap=gap, wall_s=round(wall, 4), **_round_detail(detail)))
    plan.aggregation = aggregation
    if inst.bounded:          # the download's floor rank the round times were charged with (the runtime uses it)
        plan.download = {"floor_rank": inst.floor_rank}
    if sampling is not None:
        p = Problems("sampling")
        plan.sampling = Sampling.from_dict(sampling.to_dict(), p, len(plan.clients))     # checked against the fleet
        if not traits(strategy).split:
            p.add("sampling", f"strategy {strategy} trains one model on the pooled data: there are no clients to "
                              "sample; remove --clients-per-round")
        if p.items:
            raise ConfigError("--clients-per-round", [x.split(": ", 1)[-1] for x in p.items])
        predict_sampled(plan)
    return plan


def replan(plan: Plan, importance: Importance, fleet=None, model=None) -> Plan:
    """Re-solve `plan` with new importance scores and everything else unchanged (fleet, model,
    training, ranks, modules, strategy, objective). The fleet is `plan.inputs["fleet"]` unless given;
    a fleet whose content changed since the plan was made is refused."""
    fleet_ref = fleet if fleet is not None else plan.inputs.get("fleet")
    if not fleet_ref:
        raise ConfigError(plan.source, ["inputs.fleet: the plan does not say which fleet it was made for; "
                                        "pass the fleet explicitly"])
    fleet_obj = fleet_ref if isinstance(fleet_ref, Fleet) else Fleet.load(fleet_ref)
    expected = plan.inputs.get("fleet_sha256")
    if expected and fleet_obj.sha256() != expected and fleet_obj.sha256_before_22() != expected:
        raise ConfigError(plan.source, [f"inputs.fleet_sha256: the fleet {fleet_obj.source} changed since this "
                                        "plan was made; plan again with `hsplit plan`"])
    solver = plan.solver.get("name", "cbc")
    new = make_plan(fleet_obj, model or plan.model, importance=importance, ranks=tuple(plan.ranks_allowed),
                    modules=plan.modules or None, training=plan.training, strategy=plan.strategy,
                    objective=plan.objective, solver=solver if solver in SOLVERS else "cbc",
                    server_rank=plan.server_rank, data=plan.data, aggregation=plan.aggregation,
                    floor_rank=plan.download.get("floor_rank"))
    new.replan = plan.replan
    new.inputs["fleet"] = plan.inputs.get("fleet", new.inputs["fleet"])
    return new


def check_plan(plan: Plan, fleet, model=None, importance=None) -> tuple[FleetEval, Instance]:
    """Predicted costs and every violated constraint of a (possibly hand-written) plan."""
    if model is None and not isinstance(plan.model, ModelProfile):    # the plan's own `model:` names the plan
        model = load_model_profile(plan.model, field="model", source=plan.source)
    fleet_obj, model_obj, imp = load_inputs(fleet, model, importance)
    plan.validate_for(model_obj)            # the same check as `hsplit run` (model hash, splits, ranks, seq_len)
    try:
        inst = build_instance(fleet_obj, model_obj, importance=imp, ranks=tuple(plan.ranks_allowed),
                              modules=plan.modules or None, training=plan.training, server_rank=plan.server_rank,
                              strategy=plan.strategy, aggregation=plan.aggregation, classes=task_classes(plan.data),
                              floor_rank=plan.download.get("floor_rank"))
    except ConfigError as e:        # the plan's ranks_allowed / modules, not the --ranks / --modules flags
        fields = {"--ranks": "ranks_allowed", "--modules": "modules"}
        if e.source not in fields:
            raise
        raise ConfigError(plan.source, [f"{fields[e.source]}: {x}" for x in e.problems]) from None
    if len(plan.clients) != len(inst.clients):
        raise ConfigError(plan.source, [f"clients: the plan has {len(plan.clients)} clients, the fleet "
                                        f"{fleet_obj.source} has {len(inst.clients)}"])
    if plan.sampling is not None and traits(plan.strategy).split:     # charged as make_plan charged it
        from hsplit.planner.sampled import apply_sampling
        apply_sampling(inst, plan.sampling, [c.data_weight for c in plan.clients])
    col = {m: j for j, m in enumerate(inst.modules)}
    configs, problems = [], []
    shared: dict[tuple[str, int, int], Config] = {}     # the clients of one plan entry share one Config
    for i, c in enumerate(plan.clients):
        key = (plan.field_of(i), c.split_layer, id(c.ranks))
        if key in shared:
            configs.append(shared[key])
            continue
        ranks = np.zeros((inst.L, len(inst.modules)), dtype=np.int64)
        for name, r in plan.client_ranks(c, model_obj).items():
            block, suffix = _split_name(name, model_obj)
            if suffix not in col:
                problems.append(f"{key[0]}.ranks.{name}: module {suffix} is not in the plan's modules "
                                f"({', '.join(inst.modules)})")
                continue
            ranks[block, col[suffix]] = r
        configs.append(shared.setdefault(key, Config(c.split_layer, ranks)))
    if problems:
        raise ConfigError(plan.source, problems)
    mismatch: dict[tuple[str, str, str], list[str]] = {}
    for i, (c, cl) in enumerate(zip(plan.clients, inst.clients)):
        if c.device and c.device != cl.device.name:
            mismatch.setdefault((plan.field_of(i), c.device, cl.device.name), []).append(cl.id)
    for (f, planned, actual), ids in mismatch.items():
        at = ids[0] if len(ids) == 1 else f"{ids[0]}..{ids[-1]} ({len(ids):,} clients)"
        problems.append(f"{f}: plan says device {planned}, fleet has {actual} at {at}")
    ev = evaluate_fleet(inst, configs)
    ev.violations[:0] = problems
    return ev, inst


def _split_name(name: str, model: ModelProfile) -> tuple[int, str]:
    rest = name[len(model.family.blocks) + 1:]
    block, suffix = rest.split(".", 1)
    return int(block), suffix


def _check_choice(flag, value, allowed):
    if value not in allowed:
        raise ConfigError(flag, [f"{value!r} is not one of {', '.join(allowed)}"])


def _round_detail(detail: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in detail.items()}


def _uniform_options(inst: Instance, cls, splits, rank_values):
    """(utility, round_s, busy_s, config) for every split s and rank r on all client-side matrices."""
    out = []
    for s in splits:
        for r in rank_values:
            ranks = np.zeros((inst.L, len(inst.modules)), dtype=np.int64)
            ranks[:s] = r
            cfg = Config(s, ranks)
            e = evaluate_client(inst, cls, cfg)
            if e.memory_bytes <= cls.mem_cap * (1 + 1e-12) and e.client_round_s <= cls.round_budget * (1 + 1e-12):
                out.append((e.utility, e.round_s, e.busy_s, cfg))
    return out


def _per_client_uniform(inst: Instance) -> list[Config]:
    """One rank per client: max utility per class, then the round-time sweep over its best options."""
    cand = []
    for cls in inst.classes:
        opts = _uniform_options(inst, cls, cls.splits, inst.ranks)
        top = max(o[0] for o in opts)
        cand += [(o[1], cls.index, o[2], o[3]) for o in opts if o[0] >= top - UTILITY_TOL]
    return _expand(inst, min_round_sweep(inst, cand))


def _fleet_uniform(inst: Instance, with_server_rank) -> tuple[Instance, list[Config]]:
    """SplitLoRA: the (split, rank) feasible for every client with the best utility, then fastest round.
    One rank everywhere, as in SplitLoRA: rank r's candidates are costed with server-side adapters at
    rank r too (`with_server_rank(r)` builds that instance). Returns (that instance, the configs)."""
    common = set.intersection(*(set(c.splits) for c in inst.classes))
    best = None
    for r in inst.ranks[1:]:
        inst_r = inst if r == inst.server_rank else with_server_rank(r)
        for s in sorted(common & set.intersection(*(set(c.splits) for c in inst_r.classes))):
            per_class = [_uniform_options(inst_r, c, [s], [r]) for c in inst_r.classes]
            if not all(per_class):
                continue
            util = sum(c.weight * c.count * o[0][0] for c, o in zip(inst_r.classes, per_class))
            busy = sum(c.count * o[0][2] for c, o in zip(inst_r.classes, per_class))
            R = max(max(o[0][1] for o in per_class), busy)
            key = (-round(util / UTILITY_TOL), R)
            if best is None or key < best[0]:
                best = (key, inst_r, s, r)
    if best is None:
        raise InfeasibleError(["splitlora: no single (split, rank) fits every client; "
                               "try strategy hsplitlora, smaller --ranks, or larger budgets"])
    _, inst_r, s, r = best
    ranks = np.zeros((inst_r.L, len(inst_r.modules)), dtype=np.int64)
    ranks[:s] = r
    cfg = Config(s, ranks)                 # one object for all: evaluated and written once
    return inst_r, [cfg] * len(inst_r.clients)


def exact_merge_round(inst: Instance, ev: FleetEval) -> float:
    """R = max(slowest client round, server busy) with each client's exact merge download D_k in place of
    the bound U(s_k) that round_s charges (hsplitlora plans; <= ev.round_s)."""
    rounds = [e.round_s - e.merge_charged_s + d * 8 / (cl.device.downlink_mbps * 1e6)
              for e, d, cl in zip(ev.clients, ev.merge_bytes, inst.clients)]
    return max(max(rounds), ev.server_busy_s)


def _expand(inst: Instance, choice: dict) -> list[Config]:
    configs: list[Config | None] = [None] * len(inst.clients)
    for c, assigned in choice.items():
        members = iter(inst.classes[c].members)
        for payload, n in assigned:
            for _ in range(n):
                configs[next(members)] = payload
    return configs


def _predicted(inst, cls, e, merge_bytes, cl) -> dict:
    """A client's `predicted` costs in the plan (the same for every client of a class with the same Config)."""
    predicted = {"step_s": round(e.step_s, 4), "server_step_s": round(e.server_step_s, 4),
                 "client_round_s": round(e.client_round_s, 3), "round_s": round(e.round_s, 3),
                 "memory_gib": round(e.memory_bytes / GIB, 3), "memory_budget_gib": round(cls.mem_cap / GIB, 3),
                 "traffic_mb_per_round": round(e.traffic_bytes / 1e6, 3),
                 "adapter_params": int(e.params), "utility": round(e.utility, 6), "time_model": cls.time_model}
    if merge_bytes is not None:      # docs/formulation.md, "Merge download"
        # charged: the bound U(s) the solver optimised with, included in round_s and client_round_s;
        # exact: D_k of this plan (what the runtime sends), <= the charged bound
        predicted["merge_download_charged_mb"] = round(e.merge_charged_bytes / 1e6, 6)
        predicted["merge_download_charged_s"] = round(e.merge_charged_s, 3)
        predicted["merge_download_mb"] = round(merge_bytes / 1e6, 6)
        predicted["merge_download_s"] = round(merge_bytes * 8 / (cl.device.downlink_mbps * 1e6), 3)
    return predicted


def _assemble(inst, configs, ev, fleet_ref, fleet_obj, model_ref, model_obj, imp_ref, imp, strategy, objective,
              training, data, solver_info) -> Plan:
    mods = list(inst.modules)
    clients = []
    class_of = inst.class_of()
    names: dict[int, dict[str, int]] = {}  # clients of a class share their Config object
    by_content: dict[tuple[int, bytes], dict[str, int]] = {}
    shared: dict[tuple[int, int], dict] = {}   # ... and their predicted costs: one mapping per (class, Config)
    merge = ev.merge_bytes if ev is not None else None      # hsplitlora: exact D_k per client
    for k, (cl, cfg) in enumerate(zip(inst.clients, configs)):
        if id(cfg) not in names:      # one mapping per distinct (split, ranks): clients of an allocation share it
            same = (int(cfg.split), cfg.ranks.tobytes())
            names[id(cfg)] = by_content.get(same) or by_content.setdefault(same, {
                model_obj.module_name(l, mods[j]): int(cfg.ranks[l, j]) for l, j in zip(*np.nonzero(cfg.ranks))})
        key = (int(class_of[k]), id(cfg))
        if key not in shared:
            shared[key] = _predicted(inst, inst.classes[class_of[k]], ev.clients[k], merge[k] if merge is not None else None,
                                     cl) if ev is not None else {}
        clients.append(ClientPlan(id=cl.id, device=cl.device.name, split_layer=int(cfg.split), ranks=names[id(cfg)],
                                  data_weight=round(inst.classes[class_of[k]].weight, 8), predicted=shared[key]))
    server = fleet_obj.server
    server_info = {"device": server.device.name, "count": server.count, "concurrency": server.concurrency,
                   "time_model": inst.server_time_model}
    predicted = {}
    if ev is not None:
        server_info["predicted"] = {"busy_s": round(ev.server_busy_s, 3),
                                    "busy_share": round(ev.server_busy_s / ev.round_s, 4) if ev.round_s else 0.0,
                                    "memory_gib": round(ev.server_memory_bytes / GIB, 3)}
        predicted = {"round_s": round(ev.round_s, 3), "straggler": ev.straggler, "utility": round(ev.utility, 6),
                     "server_busy_s": round(ev.server_busy_s, 3)}
        if merge is not None:   # R with every client's exact merge download in place of the charged bound
            predicted["round_s_exact_merge"] = round(exact_merge_round(inst, ev), 3)
        solver_info["objective"] = {"utility": round(ev.utility, 9), "round_s": round(ev.round_s, 6)}
    inputs = {"model": str(model_ref if isinstance(model_ref, (str, Path)) else model_obj.name),
              "model_hash": model_obj.arch_hash(),
              "fleet": str(fleet_obj.source), "fleet_sha256": fleet_obj.sha256(),
              "importance": None if imp is None else str(imp.source),
              "importance_sha256": (sha256_file(imp.source) if imp is not None and Path(imp.source).is_file() else None),
              "importance_method": "uniform" if imp is None else f"{imp.method} ({imp.normalization})"}
    return Plan(model=model_obj.name, strategy=strategy, clients=clients, modules=mods,
                ranks_allowed=list(inst.ranks), server_rank=inst.server_rank, objective=objective,
                training=training, data=data, inputs=inputs, solver=solver_info, server=server_info,
                predicted=predicted, hsplit_version=__version__)
