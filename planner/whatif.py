"""What-if analysis: plan many fleet scenarios and tabulate what changes (`hsplit whatif`).

    df = run_whatif(["example", "edge-100"], vary=["clients.*.uplink_mbps=10,50,200"], model="smollm2-135m")

Every listed fleet is combined with every combination of the varied settings (or, with
`zip_vary=True`, the varied lists are walked in lockstep). All scenarios are built and validated
before anything is solved; bad paths or values (checked by the rules of `hsplit plan` and the fleet
file) raise one ConfigError listing every problem. Scenarios are named `FLEET PATH=VALUE ...`;
repeated names get `#2`, `#3`, ...
Scenarios share the decomposed method's frontier tables when model, modules, ranks and importance
agree, so a sweep costs little more than its first plan.
Besides utility, every scenario is reported in the units people decide in (docs/whatif.md,
"Decision units"): fleet hours for a budget of rounds or examples, MB per client per round and per
run, the share of the fleet that can take part (groups that cannot are left out, with the reason),
the server's busy share and, with a measured convergence curve (planner/curve.py), the fleet hours
to the curve's target perplexity. Round time and bytes come from the plan (planner/evaluate.py).

Vary paths (PATH=V1,V2,...; use | to separate values that contain commas, e.g. ranks=0,4,8|0,2,4,8,16):
  clients.SEL.count | data_weight | budget.round_s | budget.memory_gib | uplink_mbps | downlink_mbps |
  memory_gib | efficiency | device        SEL: a device name (profile `name:`) in the fleet, or * for every group
  server.device | server.count | server.concurrency
  ranks | modules | batch_size | seq_len | local_steps | dtype | server_rank | model
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hsplit.planner.api import load_inputs, make_plan
from hsplit.planner.curve import Curve, read_curve, setup_warning
from hsplit.planner.device import resolve_device
from hsplit.planner.errors import ConfigError, InfeasibleError, Problems
from hsplit.planner.fleet import Fleet, resolve_fleet_path, server_from_entry
from hsplit.planner.instance import build_instance, dtype_problem, infeasible_classes
from hsplit.planner.model import ModelProfile, load_model_profile
from hsplit.planner.plan import Training
from hsplit.planner.sampling import Sampling
from hsplit.planner.units import num
from hsplit.planner.yamlio import read_yaml

# Each field's kind of value and its rule; the same rules as the fleet loader and `hsplit plan`.
COUNT, WHOLE, POSITIVE_INT, POSITIVE, FRACTION = "count", "whole", "positive_int", "positive", "fraction"
# Fields of a fleet's client group (uplink_mbps / downlink_mbps: the group's own links, planner/fleet.py) ...
CLIENT_FIELDS = {"count": COUNT, "data_weight": POSITIVE, "budget.round_s": POSITIVE, "budget.memory_gib": POSITIVE,
                 "uplink_mbps": POSITIVE, "downlink_mbps": POSITIVE}
# ... and of its device profile (written into an inline copy of the profile)
DEVICE_FIELDS = {"memory_gib": POSITIVE, "efficiency": FRACTION}
SERVER_FIELDS = {"device": "str", "count": POSITIVE_INT, "concurrency": POSITIVE_INT}
SETTINGS = {"ranks": "ranks", "modules": "names", "batch_size": POSITIVE_INT, "seq_len": POSITIVE_INT,
            "local_steps": POSITIVE_INT, "dtype": "dtype", "server_rank": WHOLE, "model": "str"}
# Columns every result table has, feasible scenarios or not (docs/whatif.md).
RESULT_COLUMNS = ("status", "fleet_share", "participating", "round_s", "straggler", "utility", "examples_per_round",
                  "rounds", "fleet_hours", "client_mb_per_round", "client_mb_per_round_max", "client_mb_per_run",
                  "client_mb_per_run_max", "server_busy_share", "server_memory_gib", "traffic_mb_per_round",
                  "headroom_gib_min", "excluded", "infeasible", "solve_s")
TARGET_COLUMNS = ("rounds_to_target", "fleet_hours_to_target")     # with a convergence curve (--curve)
CLIENT_COLUMNS = ("scenario", "client", "device", "split", "total_rank", "matrices", "round_s", "memory_gib",
                  "memory_budget_gib", "mb_per_round")
# The columns `hsplit whatif` prints as a markdown table.
TABLE_COLUMNS = ("scenario", "status", "fleet_share", "round_s", "straggler", "utility", "fleet_hours",
                 "client_mb_per_round", "server_busy_share", "fleet_hours_to_target")
DEFAULT_ROUNDS = 100      # the training budget when neither rounds nor examples is given


@dataclass(frozen=True)
class Vary:
    path: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Vary:
        if "=" not in text:
            raise ConfigError("--vary", [f"{text!r}: expected PATH=V1,V2,... (e.g. clients.*.uplink_mbps=10,50)"])
        path, rhs = text.split("=", 1)
        sep = "|" if "|" in rhs else ","
        values = tuple(v.strip() for v in rhs.split(sep) if v.strip())
        if not values:
            raise ConfigError("--vary", [f"{text!r}: no values after '='"])
        return cls(path.strip(), values)


@dataclass
class Scenario:
    name: str
    fleet_ref: str
    fleet: Fleet
    settings: dict[str, str]          # vary path -> value, as given
    plan_kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""                   # short name for plots: fleet (if several) + varied values
    fleet_name: str = ""              # the fleet's `name` (its file name without .yaml when it has none)


def _convert(kind: str, value: str, where: str, problems: list[str]):
    """One --vary value converted and checked against its rule; a problem (and None) when it breaks it."""
    def bad(rule: str):
        problems.append(f"{where}: {rule}, got {value!r}")

    if kind == "ranks":
        try:
            ranks = tuple(int(x) for x in value.split(","))
        except ValueError:
            return bad("expected comma-separated whole numbers like 0,2,4,8,16")
        negative = [q for q in ranks if q < 0]
        if negative:
            problems.append(f"{where}: rank {', '.join(map(str, negative))} is negative; ranks are whole numbers "
                            f">= 0 (0 = no adapter), e.g. 0,2,4,8,16")
            return None
        if not any(ranks):
            problems.append(f"{where}: give at least one rank > 0; each value is one set of allowed ranks, "
                            f"separate sets with | (e.g. ranks=0,4,8|0,2,4,8,16)")
            return None
        return ranks
    if kind == "names":
        return None if value == "all" else value.split(",")
    if kind == "dtype":
        if why := dtype_problem(value):
            problems.append(f"{where}: {why}")
            return None
        return value
    if kind in (COUNT, WHOLE, POSITIVE_INT):
        minimum = 1 if kind == POSITIVE_INT else 0
        try:
            out = int(value)
        except ValueError:
            out = None
        return out if out is not None and out >= minimum else bad(f"must be a whole number >= {minimum}")
    if kind in (POSITIVE, FRACTION):
        try:
            out = float(value)
        except ValueError:
            out = float("nan")
        if not (out > 0 and math.isfinite(out)):
            return bad("must be a number > 0")
        if kind == FRACTION and out > 1:
            return bad("must be a number in (0, 1]")
        return out
    return value


def _apply(fleet_dict: dict, fleet_path: Path, vary: Vary, value: str, problems: list[str]) -> None:
    """Apply one vary setting to a fleet mapping (in place). Problems the fleet loader reports anyway
    (a missing server or clients list) are left to it."""
    where = f"{vary.path}={value}"
    base_dir = fleet_path.parent
    parts = vary.path.split(".")
    if parts[0] == "server":
        key = ".".join(parts[1:])
        if key not in SERVER_FIELDS:
            problems.append(f"{vary.path}: unknown server field; use server.{', server.'.join(SERVER_FIELDS)}")
            return
        conv = _convert(SERVER_FIELDS[key], value, where, problems)
        if conv is not None and isinstance(fleet_dict.get("server"), dict):
            fleet_dict["server"][key] = conv
        return
    if parts[0] != "clients" or len(parts) < 3:
        problems.append(f"{vary.path}: unknown path; use clients.SEL.FIELD, server.FIELD, or one of "
                        f"{', '.join(SETTINGS)}")
        return
    sel, key = parts[1], ".".join(parts[2:])
    all_groups = [g for g in fleet_dict.get("clients") or [] if isinstance(g, dict) and "device" in g]
    groups = [g for g in all_groups if sel == "*" or sel in _device_names(g["device"], base_dir)]
    tables = [str(g["table"]) for g in fleet_dict.get("clients") or [] if isinstance(g, dict) and "table" in g]
    if tables and (sel == "*" or not groups):    # a table's rows are not groups of the fleet file
        problems.append(f"{vary.path}: fleet {fleet_path.name} lists clients in {', '.join(tables)}, whose rows "
                        f"--vary clients.* does not reach; vary server.* or the plan settings, or edit the table")
        return
    if not groups:
        names = sorted({_device_names(g["device"], base_dir)[0] for g in all_groups})
        problems.append(f"{vary.path}: no client group with device {sel!r} in fleet {fleet_path.name}; "
                        f"groups: {', '.join(names)} (or *)")
        return
    if key == "device":
        try:
            resolve_device(value, base_dir)
        except ConfigError as e:
            problems.extend(f"{where}: {p}" for p in e.problems)
            return
        for g in groups:
            g["device"] = value
    elif key in CLIENT_FIELDS:
        conv = _convert(CLIENT_FIELDS[key], value, where, problems)
        if conv is None:
            return
        for g in groups:
            if key.startswith("budget."):
                g.setdefault("budget", {})[key.split(".")[1]] = conv
            else:
                g[key] = conv
    elif key in DEVICE_FIELDS:
        conv = _convert(DEVICE_FIELDS[key], value, where, problems)
        if conv is None:
            return
        for g in groups:
            dev = g["device"]
            profile = dict(dev) if isinstance(dev, dict) else resolve_device(dev, base_dir).to_dict()
            profile[key] = conv
            g["device"] = profile
    else:
        problems.append(f"{vary.path}: unknown client field {key!r}; use one of "
                        f"{', '.join(list(CLIENT_FIELDS) + list(DEVICE_FIELDS) + ['device'])}")


def short_path(path: str) -> str:
    """clients.*.uplink_mbps -> uplink_mbps; clients.jetson.count -> jetson.count; server.device -> server.device."""
    parts = path.split(".")
    if parts[0] == "clients" and len(parts) >= 3:
        return ".".join(parts[2:]) if parts[1] == "*" else ".".join(parts[1:])
    return path


def _device_names(dev, base_dir: Path) -> list[str]:
    """Names a group selector may use for a client group's `device:`: the profile's `name:` (what the
    table and the plan show) first, then the reference as written in the fleet file."""
    if isinstance(dev, dict):
        return [str(dev.get("name", ""))]
    try:
        return [resolve_device(str(dev), base_dir).name, str(dev)]
    except ConfigError:
        return [str(dev)]


def build_scenarios(fleets: list[str], vary: list[str | Vary], zip_vary: bool = False) -> list[Scenario]:
    """All scenarios, validated; one ConfigError lists every problem before anything is solved.
    Scenario names are `FLEET PATH=VALUE ...`; a name (or label) seen before gets `#2`, `#3`, ..."""
    varies = [v if isinstance(v, Vary) else Vary.parse(v) for v in vary]
    problems: list[str] = []
    if zip_vary and len({len(v.values) for v in varies}) > 1:
        raise ConfigError("--zip", ["every --vary needs the same number of values to walk them in lockstep"])
    combos = list(zip(*(v.values for v in varies))) if zip_vary else list(itertools.product(*(v.values for v in varies)))
    if not varies:
        combos = [()]
    scenarios = []
    seen_names: dict[str, int] = {}
    seen_labels: dict[str, int] = {}
    for ref in fleets:
        try:
            path = resolve_fleet_path(ref)
            base = read_yaml(path)
        except ConfigError as e:
            problems.extend(f"{ref}: {p}" for p in e.problems)
            continue
        fleet_name = str(base.get("name") or path.stem)
        # Only the server or the plan settings vary: read and check the clients once (a 10,000-row inventory
        # takes seconds) and give each scenario the loaded clients with its own server.
        loaded = _loaded_clients(base, path) if not any(v.path.startswith("clients.") for v in varies) else None
        for combo in combos:
            data = {**base, "server": copy.deepcopy(base.get("server"))} if loaded else copy.deepcopy(base)
            settings, kwargs = {}, {}
            for v, value in zip(varies, combo):
                settings[v.path] = value
                if v.path in SETTINGS:
                    kwargs[v.path] = _convert(SETTINGS[v.path], value, f"{v.path}={value}", problems)
                else:
                    _apply(data, path, v, value, problems)
            label = " ".join(f"{k}={val}" for k, val in settings.items())
            name = _unique(f"{fleet_name} {label}".strip(), seen_names)
            try:
                fleet = (_with_server(loaded, data, f"{path} {label}".strip(), path.parent) if loaded
                         else Fleet.from_dict(data, f"{path} {label}".strip(), path.parent))
            except ConfigError as e:
                problems.extend(f"scenario {name}: {p}" for p in e.problems)
                continue
            if fleet.num_clients == 0:
                problems.append(f"scenario {name}: clients: the fleet has no clients (all counts are 0); "
                                f"keep a count >= 1 in at least one group")
                continue
            short = " ".join(f"{short_path(k)}={val}" for k, val in settings.items())
            short = (f"{fleet_name} " if len(fleets) > 1 or not short else "") + short
            scenarios.append(Scenario(name, str(ref), fleet, settings, kwargs, _unique(short.strip(), seen_labels),
                                      fleet_name))
    if problems:
        raise ConfigError("hsplit whatif", sorted(set(problems), key=problems.index))
    return scenarios


def _loaded_clients(base: dict, path: Path) -> Fleet | None:
    """The fleet file loaded once, for scenarios that vary only its server; None when it has a problem (each
    scenario then loads it and reports the problem as `hsplit plan` would)."""
    try:
        return Fleet.from_dict(base, str(path), path.parent)
    except ConfigError:
        return None


def _with_server(loaded: Fleet, data: dict, source: str, base_dir: Path) -> Fleet:
    """`loaded` with the scenario's (varied) `server:` mapping, checked by the fleet loader's rules."""
    p = Problems(source)
    server = server_from_entry(data.get("server"), p, source, base_dir)
    p.raise_if_any()
    # the name as Fleet.from_dict gives it (a fleet without `name:` is named after its source)
    return replace(loaded, server=server, source=source, name=str(data.get("name") or Path(source).stem))


def _unique(name: str, seen: dict[str, int]) -> str:
    """`name` the first time, then `name#2`, `name#3`, ... (counts kept in `seen`)."""
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name}#{seen[name]}"


def run_whatif(fleets: list[str], vary: list[str | Vary] = (), *, zip_vary: bool = False, model: str = "smollm2-135m",
               importance=None, objective: str = "utility", ranks=(0, 2, 4, 8, 16), modules=None,
               training: Training | None = None, solver: str = "highs", server_rank: int = 8,
               rounds: int | None = None, examples: int | None = None, curve: Curve | str | Path | None = None,
               target_ppl: float | None = None, sampling: Sampling | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
    """Plan every scenario; one row per scenario (columns: docs/whatif.md). The per-client choices
    are in `df.attrs["clients"]` (one row per scenario and client).
    The training budget is `rounds` or `examples` (sequences; default DEFAULT_ROUNDS rounds); `curve`
    (a run's metrics.csv, or a Curve) adds the predicted fleet time to `target_ppl` (default: that
    run's final held-out perplexity). Client groups that cannot take part are left out of their
    scenario (`fleet_share`, `excluded`); a scenario none of whose clients can take part is infeasible.
    `sampling` (clients per round, planner/sampling.py) plans every scenario with client sampling: round
    times, examples and bytes per run are those of the sampled rounds."""
    training = training or Training()
    _check_training(training)
    budget = _budget(rounds, examples)
    if curve is not None and not isinstance(curve, Curve):
        curve = read_curve(curve, target_ppl)
    elif target_ppl is not None and curve is None:
        raise ConfigError("--target-ppl", ["needs --curve: the measured convergence curve (a run's metrics.csv) "
                                           "whose rounds to that perplexity are timed per scenario"])
    scenarios = build_scenarios(list(fleets), list(vary), zip_vary)
    _, _, imp = load_inputs(scenarios[0].fleet, "smollm2-135m", importance) if importance else (None, None, None)
    cache: dict = {}
    rows, client_rows = [], []
    used: dict[str, list] = {"batch_size": [], "seq_len": [], "local_steps": []}   # for the curve's set-up check
    hashes: dict[str, str | None] = {}
    for i, sc in enumerate(scenarios):
        if progress:
            progress(i, len(scenarios), sc.name)
        kw = dict(sc.plan_kwargs)
        t = replace(training, **{k: kw.pop(k) for k in ("batch_size", "seq_len", "local_steps", "dtype") if k in kw})
        for k in used:
            used[k].append(getattr(t, k))
        m = kw.get("model", model)
        if curve is not None and (key := m.name if isinstance(m, ModelProfile) else str(m)) not in hashes:
            hashes[key] = model_hash(m)
        row: dict[str, Any] = {"scenario": sc.name, "label": sc.label, "fleet": sc.fleet_ref,
                               "fleet_name": sc.fleet_name, **sc.settings,
                               "clients": sc.fleet.num_clients}
        t0 = time.perf_counter()
        args = dict(model=kw.get("model", model), importance=imp, ranks=kw.get("ranks", ranks),
                    modules=kw.get("modules", modules), training=t, server_rank=kw.get("server_rank", server_rank),
                    sampling=sampling)
        plan, excluded, reasons, data_share = _plan_participants(sc.fleet, args, objective, solver, cache)
        if plan is None:
            row.update(status="infeasible", fleet_share=0.0, participating=0, infeasible="; ".join(reasons),
                       solve_s=time.perf_counter() - t0)
            rows.append(row)
            continue
        row.update(_summarise(plan), **_decision_units(plan, t, budget, curve, sc.fleet.num_clients),
                   excluded="; ".join(excluded), solve_s=time.perf_counter() - t0)
        row["utility"] = plan.predicted["utility"] * data_share   # left-out clients adapt nothing
        rows.append(row)
        for c in plan.clients:
            client_rows.append({"scenario": sc.name, "client": c.id, "device": c.device, "split": c.split_layer,
                                "total_rank": sum(c.ranks.values()), "matrices": len(c.ranks),
                                "round_s": c.predicted["round_s"], "memory_gib": c.predicted["memory_gib"],
                                "memory_budget_gib": c.predicted["memory_budget_gib"],
                                "mb_per_round": client_mb_per_round(c)})
    if progress:
        progress(len(scenarios), len(scenarios), "done")
    # The same columns whether or not any scenario is feasible: per-device columns go last.
    df = pd.DataFrame(rows)
    lead = ["scenario", "label", "fleet", "fleet_name", *scenarios[0].settings, "clients", *RESULT_COLUMNS,
            *(TARGET_COLUMNS if curve is not None else ())]
    df = df.reindex(columns=lead + [c for c in df.columns if c not in lead])
    df.attrs["clients"] = pd.DataFrame(client_rows, columns=list(CLIENT_COLUMNS))
    df.attrs["vary"] = list(scenarios[0].settings)
    df.attrs["budget"] = budget
    if curve is not None:
        df.attrs["curve"] = {"file": curve.source, "target_ppl": curve.target_ppl,
                             "target_is_final": not curve.target_given, "rounds_to_target": curve.rounds_to_target,
                             "warning": setup_warning(curve, used, hashes)}
    return df


def _budget(rounds: int | None, examples: int | None) -> dict[str, int]:
    """The training budget every scenario is timed for: {"rounds": R} or {"examples": N}."""
    if rounds is not None and examples is not None:
        raise ConfigError("hsplit whatif", ["give --rounds or --examples, not both: the budget is a number of "
                                            "rounds or a number of training sequences"])
    for flag, value in (("--rounds", rounds), ("--examples", examples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(flag, [f"must be a whole number >= 1, got {value!r}"])
    return {"examples": examples} if examples is not None else {"rounds": rounds or DEFAULT_ROUNDS}


def _plan_participants(fleet: Fleet, args: dict, objective: str, solver: str, cache: dict):
    """(plan, excluded reasons, infeasible reasons, data share): the plan of the clients that can take
    part. Client groups with no feasible split (memory, round budget, server slot) are left out and the
    rest is planned; the plan's client ids are those of the whole fleet; data share = the participants'
    data weight / the fleet's. (None, [], reasons, 0.0) when no client can take part or the server
    cannot hold the model."""
    try:
        return make_plan(fleet, objective=objective, solver=solver, tables_cache=cache, **args), [], [], 1.0
    except InfeasibleError as e:
        reasons = list(e.reasons)
    fleet_obj, model_obj, _ = load_inputs(fleet, args["model"], None)
    inst = build_instance(fleet_obj, model_obj, importance=args["importance"], ranks=args["ranks"],
                          modules=args["modules"], training=args["training"], server_rank=args["server_rank"])
    bad = infeasible_classes(inst)
    if not bad or any(c is None for c, _ in bad):
        return None, [], reasons, 0.0
    out = {inst.clients[m].group for c, _ in bad for m in inst.classes[c].members}
    kept = [g for i, g in enumerate(fleet.groups) if i not in out and g.count > 0]
    if not kept:
        return None, [], reasons, 0.0
    ids = [c.id for c in inst.clients if c.group not in out]
    sampling = args.get("sampling")
    if sampling is not None:            # fewer clients can take part: at most all of them train in a round
        args = {**args, "sampling": replace(
            sampling, min_clients=min(sampling.min_clients, len(ids)),
            clients_per_round=None if sampling.clients_per_round is None else min(sampling.clients_per_round, len(ids)))}
    try:
        plan = make_plan(fleet.with_groups(kept), objective=objective, solver=solver, tables_cache=cache, **args)
    except InfeasibleError as e:
        return None, [], reasons + list(e.reasons), 0.0
    rename = {c.id: ids[k] for k, c in enumerate(plan.clients)}
    for c in plan.clients:
        c.id = rename[c.id]
    plan.predicted["straggler"] = rename.get(plan.predicted["straggler"], plan.predicted["straggler"])
    weight = sum(g.count * g.data_weight for g in fleet.groups)
    return plan, [r for _, r in bad], [], sum(g.count * g.data_weight for g in kept) / weight


def clients_per_round(plan) -> int:
    """Clients that train in one round of the plan: every client, or with client sampling the sampled count."""
    return plan.sampling.count(len(plan.clients)) if plan.sampling is not None else len(plan.clients)


def client_mb_per_round(client) -> float:
    """MB (1e6 bytes) a client sends and receives in a round it takes part in: activations up and their
    gradients down for every local step, its adapters up, and (hsplitlora) the exact merge download the
    runtime sends (`merge_download_mb`) in place of the bound its round time is charged with."""
    p = client.predicted
    return p["traffic_mb_per_round"] - p.get("merge_download_charged_mb", 0.0) + p.get("merge_download_mb", 0.0)


def _decision_units(plan, training: Training, budget: dict, curve: Curve | None, fleet_clients: int) -> dict:
    """The columns people decide in (docs/whatif.md, "Decision units"), from the plan's predictions."""
    round_s = float(plan.predicted["round_s"])
    per_round = clients_per_round(plan)
    examples_per_round = training.batch_size * training.local_steps * per_round
    rounds = budget.get("rounds") or math.ceil(budget["examples"] / examples_per_round)
    traffic = np.array([client_mb_per_round(c) for c in plan.clients], dtype=float)
    # a client takes part in per_round of the plan's len(plan.clients) clients' rounds
    share = per_round / len(plan.clients)
    out = {"fleet_share": len(plan.clients) / fleet_clients, "participating": len(plan.clients),
           "examples_per_round": examples_per_round, "rounds": rounds, "fleet_hours": rounds * round_s / 3600,
           "client_mb_per_round": float(traffic.mean()), "client_mb_per_round_max": float(traffic.max()),
           "client_mb_per_run": float(traffic.mean()) * rounds * share,
           "client_mb_per_run_max": float(traffic.max()) * rounds * share}
    if curve is not None:
        out.update(rounds_to_target=curve.rounds_to_target,
                   fleet_hours_to_target=curve.rounds_to_target * round_s / 3600)
    return out


def _check_training(training: Training) -> None:
    """The fixed training settings (--batch-size, --seq-len, --local-steps, --dtype) by the rules of `hsplit plan`."""
    problems = []
    for flag, value in (("--batch-size", training.batch_size), ("--seq-len", training.seq_len),
                        ("--local-steps", training.local_steps), ("training.rounds", training.rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{flag}: must be a whole number >= 1, got {value!r}")
    if why := dtype_problem(training.dtype):
        problems.append(f"--dtype: {why}")
    if problems:
        raise ConfigError("hsplit whatif", problems)


def _summarise(plan) -> dict[str, Any]:
    pr, srv = plan.predicted, plan.server.get("predicted", {})
    by_id = {c.id: c for c in plan.clients}
    straggler = pr["straggler"] if pr["straggler"] == "server" else f"{pr['straggler']} ({by_id[pr['straggler']].device})"
    out: dict[str, Any] = {
        "status": plan.solver["status"], "round_s": pr["round_s"], "straggler": straggler,
        "utility": pr["utility"], "server_busy_share": srv.get("busy_share"),
        "server_memory_gib": srv.get("memory_gib"),
        "traffic_mb_per_round": round(sum(client_mb_per_round(c) for c in plan.clients), 3),
        "headroom_gib_min": round(min(c.predicted["memory_budget_gib"] - c.predicted["memory_gib"]
                                      for c in plan.clients), 3),
        "infeasible": "",
    }
    # One split/rank column pair per device name (the profile's `name:`), not per profile `kind:`.
    by_device: dict[str, list] = {}
    for c in plan.clients:
        by_device.setdefault(c.device, []).append(c)
    for device, cs in by_device.items():
        splits = np.array([c.split_layer for c in cs])
        ranks = np.array([sum(c.ranks.values()) for c in cs])
        out[f"split[{device}]"] = f"{splits.min()}/{int(np.median(splits))}/{splits.max()}"
        out[f"rank[{device}]"] = f"{ranks.min()}/{int(np.median(ranks))}/{ranks.max()}"
    return out


def model_hash(model) -> str | None:
    """The architecture hash of a what-if model (None when it cannot be read: planning reports that)."""
    try:
        return (model if isinstance(model, ModelProfile) else load_model_profile(model)).arch_hash()
    except ConfigError:
        return None


def budget_text(df: pd.DataFrame) -> str:
    """What fleet_hours (and fleet_hours_to_target) are the time for, in words (printed under the table)."""
    budget = df.attrs.get("budget", {"rounds": DEFAULT_ROUNDS})
    if "examples" in budget:
        text = (f"fleet_hours: time to train {budget['examples']:,} examples (rounds = examples / (batch x local "
                f"steps x clients per round), rounded up: column rounds)")
    else:
        text = f"fleet_hours: time to train {budget['rounds']:,} rounds"
    if c := df.attrs.get("curve"):
        what = "its final" if c["target_is_final"] else "the target"
        text += (f"; fleet_hours_to_target: {c['file']} reaches {what} held-out perplexity {c['target_ppl']:.4g} "
                 f"after {c['rounds_to_target']} rounds, times each scenario's round time (assumes convergence "
                 f"in rounds carries over to every scenario)")
    return text


def pareto_front(df: pd.DataFrame, per_fleet: bool = True) -> pd.Series:
    """True for feasible scenarios that no other feasible scenario beats on both utility (higher) and
    round time (lower). With `per_fleet` (and a `fleet` column), scenarios compete only with scenarios
    of the same fleet: one front per fleet."""
    ok = df.get("status", pd.Series(["optimal"] * len(df), index=df.index)) != "infeasible"
    groups = df["fleet"] if per_fleet and "fleet" in df else pd.Series("", index=df.index)
    front = pd.Series(False, index=df.index)
    for i in df.index[ok]:
        same = ok & (groups == groups[i])
        u, r = df.at[i, "utility"], df.at[i, "round_s"]
        dominated = ((df.loc[same, "utility"] >= u) & (df.loc[same, "round_s"] <= r)
                     & ((df.loc[same, "utility"] > u) | (df.loc[same, "round_s"] < r))).any()
        front[i] = not dominated
    return front


def markdown_table(df: pd.DataFrame, columns=TABLE_COLUMNS) -> str:
    """The main columns as a GitHub markdown table, one line per scenario, never wrapped: print it
    as is (no console wrapping). Numbers plain (86,300; 0.006962), never in scientific notation; cells an
    infeasible scenario has no value for are empty."""
    table = df[[c for c in columns if c in df]].astype(object)
    numeric = [c for c in table if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    for c in numeric:      # 4 significant digits, thousands separated, never 8.63e+04 (planner/units.py)
        table[c] = [num(float(x), 4) if isinstance(x, (int, float)) and x == x else "" for x in table[c]]
    table = table.where(table.notna(), "")
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=["right" if c in numeric else "left" for c in table])


def write_table(df: pd.DataFrame, outdir) -> list:
    """scenarios.csv, scenarios.json and clients.csv in `outdir` (each written atomically)."""
    from hsplit.planner.yamlio import atomic_write_text
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = [outdir / "scenarios.csv", outdir / "scenarios.json", outdir / "clients.csv"]
    atomic_write_text(files[0], df.to_csv(index=False))
    atomic_write_text(files[1], df.to_json(orient="records", indent=2))
    atomic_write_text(files[2], df.attrs.get("clients", pd.DataFrame(columns=list(CLIENT_COLUMNS))).to_csv(index=False))
    return files
