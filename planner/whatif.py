"""What-if analysis: plan many fleet scenarios and tabulate what changes (`hsplit whatif`).

    df = run_whatif(["example", "edge-100"], vary=["clients.*.uplink_mbps=10,50,200"], model="smollm2-135m")

Every listed fleet is combined with every combination of the varied settings (or, with
`zip_vary=True`, the varied lists are walked in lockstep). All scenarios are built and validated
before anything is solved; bad paths or values raise one ConfigError listing every problem.
Scenarios share the decomposed method's frontier tables when model, modules, ranks and importance
agree, so a sweep costs little more than its first plan.

Vary paths (PATH=V1,V2,...; use | to separate values that contain commas, e.g. ranks=0,4,8|0,2,4,8,16):
  clients.SEL.count | data_weight | budget.round_s | budget.memory_gib | uplink_mbps | downlink_mbps |
  memory_gib | efficiency | device        SEL: a device name in the fleet, or * for every group
  server.device | server.count | server.concurrency
  ranks | modules | batch_size | seq_len | local_steps | dtype | server_rank | model
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pandas as pd

from hsplit.planner.api import load_inputs, make_plan
from hsplit.planner.device import resolve_device
from hsplit.planner.errors import ConfigError, InfeasibleError
from hsplit.planner.fleet import Fleet, resolve_fleet_path
from hsplit.planner.plan import Training
from hsplit.planner.yamlio import read_yaml

CLIENT_FIELDS = {"count": int, "data_weight": float, "budget.round_s": float, "budget.memory_gib": float}
DEVICE_FIELDS = {"uplink_mbps": float, "downlink_mbps": float, "memory_gib": float, "efficiency": float}
SERVER_FIELDS = {"device": str, "count": int, "concurrency": int}
SETTINGS = {"ranks": "ints", "modules": "names", "batch_size": int, "seq_len": int, "local_steps": int,
            "dtype": str, "server_rank": int, "model": str}


@dataclass(frozen=True)
class Vary:
    path: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Vary":
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


def _convert(kind, value: str, where: str, problems: list[str]):
    try:
        if kind == "ints":
            return tuple(int(x) for x in value.split(","))
        if kind == "names":
            return None if value == "all" else value.split(",")
        if kind in (int, float):
            out = kind(value)
            if out < 0 or (kind is float and out == 0 and where.split("=")[0].split(".")[-1] != "count"):
                raise ValueError
            return out
        return value
    except ValueError:
        problems.append(f"{where}: {value!r} is not a valid {getattr(kind, '__name__', kind)} >= 0")
        return None


def _apply(fleet_dict: dict, base_dir, vary: Vary, value: str, problems: list[str]) -> None:
    """Apply one vary setting to a fleet mapping (in place)."""
    where = f"{vary.path}={value}"
    parts = vary.path.split(".")
    if parts[0] == "server":
        key = ".".join(parts[1:])
        if key not in SERVER_FIELDS:
            problems.append(f"{vary.path}: unknown server field; use server.{', server.'.join(SERVER_FIELDS)}")
            return
        conv = _convert(SERVER_FIELDS[key], value, where, problems)
        if conv is not None:
            fleet_dict["server"][key] = conv
        return
    if parts[0] != "clients" or len(parts) < 3:
        problems.append(f"{vary.path}: unknown path; use clients.SEL.FIELD, server.FIELD, or one of "
                        f"{', '.join(SETTINGS)}")
        return
    sel, key = parts[1], ".".join(parts[2:])
    groups = [g for g in fleet_dict["clients"]
              if sel == "*" or _device_name(g["device"]) == sel]
    if not groups:
        names = sorted({_device_name(g["device"]) for g in fleet_dict["clients"]})
        problems.append(f"{vary.path}: no client group with device {sel!r} in fleet {fleet_dict.get('name')}; "
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


def _short_path(path: str) -> str:
    """clients.*.uplink_mbps -> uplink_mbps; clients.jetson.count -> jetson.count; server.device -> server.device."""
    parts = path.split(".")
    if parts[0] == "clients" and len(parts) >= 3:
        return ".".join(parts[2:]) if parts[1] == "*" else ".".join(parts[1:])
    return path


def _device_name(dev) -> str:
    return dev.get("name", "") if isinstance(dev, dict) else str(dev).removesuffix(".yaml").split("/")[-1]


def build_scenarios(fleets: list[str], vary: list[str | Vary], zip_vary: bool = False) -> list[Scenario]:
    """All scenarios, validated; one ConfigError lists every problem before anything is solved."""
    varies = [v if isinstance(v, Vary) else Vary.parse(v) for v in vary]
    problems: list[str] = []
    if zip_vary and len({len(v.values) for v in varies}) > 1:
        raise ConfigError("--zip", ["every --vary needs the same number of values to walk them in lockstep"])
    combos = list(zip(*(v.values for v in varies))) if zip_vary else list(itertools.product(*(v.values for v in varies)))
    if not varies:
        combos = [()]
    scenarios = []
    for ref in fleets:
        try:
            path = resolve_fleet_path(ref)
            base = read_yaml(path)
        except ConfigError as e:
            problems.extend(f"{ref}: {p}" for p in e.problems)
            continue
        for combo in combos:
            data = copy.deepcopy(base)
            settings, kwargs = {}, {}
            for v, value in zip(varies, combo):
                settings[v.path] = value
                if v.path in SETTINGS:
                    conv = _convert(SETTINGS[v.path], value, f"{v.path}={value}", problems)
                    kwargs[v.path] = conv
                else:
                    _apply(data, path.parent, v, value, problems)
            label = " ".join(f"{k}={val}" for k, val in settings.items())
            name = f"{data.get('name', path.stem)}" + (f" [{label}]" if label else "")
            try:
                fleet = Fleet.from_dict(data, f"{path} {label}".strip(), path.parent)
            except ConfigError as e:
                problems.extend(f"scenario {name}: {p}" for p in e.problems)
                continue
            short = " ".join(f"{_short_path(k)}={val}" for k, val in settings.items())
            label = (f"{data.get('name', path.stem)} " if len(fleets) > 1 or not short else "") + short
            scenarios.append(Scenario(name, str(ref), fleet, settings, kwargs, label.strip()))
    if problems:
        raise ConfigError("hsplit whatif", sorted(set(problems), key=problems.index))
    return scenarios


def run_whatif(fleets: list[str], vary: list[str | Vary] = (), *, zip_vary: bool = False, model: str = "smollm2-135m",
               importance=None, objective: str = "utility", ranks=(0, 2, 4, 8, 16), modules=None,
               training: Training | None = None, solver: str = "highs", server_rank: int = 8,
               progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
    """Plan every scenario; one row per scenario (columns: docs/whatif.md). The per-client choices
    are in `df.attrs["clients"]` (one row per scenario and client)."""
    scenarios = build_scenarios(list(fleets), list(vary), zip_vary)
    training = training or Training()
    _, _, imp = load_inputs(scenarios[0].fleet, "smollm2-135m", importance) if importance else (None, None, None)
    cache: dict = {}
    rows, client_rows = [], []
    for i, sc in enumerate(scenarios):
        if progress:
            progress(i, len(scenarios), sc.name)
        kw = dict(sc.plan_kwargs)
        t = replace(training, **{k: kw.pop(k) for k in ("batch_size", "seq_len", "local_steps", "dtype") if k in kw})
        row: dict[str, Any] = {"scenario": sc.name, "label": sc.label, "fleet": sc.fleet_ref, **sc.settings,
                               "clients": sc.fleet.num_clients}
        t0 = time.perf_counter()
        try:
            plan = make_plan(sc.fleet, kw.get("model", model), importance=imp, ranks=kw.get("ranks", ranks),
                             modules=kw.get("modules", modules), training=t, objective=objective, solver=solver,
                             server_rank=kw.get("server_rank", server_rank), tables_cache=cache)
        except InfeasibleError as e:
            row.update(status="infeasible", infeasible="; ".join(e.reasons), solve_s=time.perf_counter() - t0)
            rows.append(row)
            continue
        row.update(_summarise(plan), solve_s=time.perf_counter() - t0)
        rows.append(row)
        for c in plan.clients:
            client_rows.append({"scenario": sc.name, "client": c.id, "device": c.device, "split": c.split_layer,
                                "total_rank": sum(c.ranks.values()), "matrices": len(c.ranks),
                                "round_s": c.predicted["round_s"], "memory_gib": c.predicted["memory_gib"],
                                "memory_budget_gib": c.predicted["memory_budget_gib"]})
    if progress:
        progress(len(scenarios), len(scenarios), "done")
    df = pd.DataFrame(rows)
    df.attrs["clients"] = pd.DataFrame(client_rows)
    df.attrs["vary"] = [v if isinstance(v, str) else v.path for v in (Vary.parse(x) if isinstance(x, str) else x
                                                                       for x in vary)]
    return df


def _summarise(plan) -> dict[str, Any]:
    pr, srv = plan.predicted, plan.server.get("predicted", {})
    by_id = {c.id: c for c in plan.clients}
    straggler = pr["straggler"] if pr["straggler"] == "server" else f"{pr['straggler']} ({by_id[pr['straggler']].device})"
    out: dict[str, Any] = {
        "status": plan.solver["status"], "round_s": pr["round_s"], "straggler": straggler,
        "utility": pr["utility"], "server_busy_share": srv.get("busy_share"),
        "server_memory_gib": srv.get("memory_gib"),
        "traffic_mb_per_round": round(sum(c.predicted["traffic_mb_per_round"] for c in plan.clients), 3),
        "headroom_gib_min": round(min(c.predicted["memory_budget_gib"] - c.predicted["memory_gib"]
                                      for c in plan.clients), 3),
        "infeasible": "",
    }
    kinds: dict[str, list] = {}
    for c in plan.clients:
        kinds.setdefault(c.device, []).append(c)
    for kind, cs in kinds.items():
        splits = np.array([c.split_layer for c in cs])
        ranks = np.array([sum(c.ranks.values()) for c in cs])
        out[f"split[{kind}]"] = f"{splits.min()}/{int(np.median(splits))}/{splits.max()}"
        out[f"rank[{kind}]"] = f"{ranks.min()}/{int(np.median(ranks))}/{ranks.max()}"
    return out


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """True for scenarios no other scenario beats on both utility (higher) and round time (lower)."""
    ok = df.get("status", pd.Series(["optimal"] * len(df))) != "infeasible"
    front = pd.Series(False, index=df.index)
    for i in df.index[ok]:
        u, r = df.at[i, "utility"], df.at[i, "round_s"]
        dominated = ((df.loc[ok, "utility"] >= u) & (df.loc[ok, "round_s"] <= r)
                     & ((df.loc[ok, "utility"] > u) | (df.loc[ok, "round_s"] < r))).any()
        front[i] = not dominated
    return front


def write_table(df: pd.DataFrame, outdir) -> list:
    """scenarios.csv, scenarios.json and clients.csv in `outdir` (each written atomically)."""
    from pathlib import Path

    from hsplit.planner.yamlio import atomic_write_text
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = [outdir / "scenarios.csv", outdir / "scenarios.json", outdir / "clients.csv"]
    atomic_write_text(files[0], df.to_csv(index=False))
    atomic_write_text(files[1], df.to_json(orient="records", indent=2))
    atomic_write_text(files[2], df.attrs.get("clients", pd.DataFrame()).to_csv(index=False))
    return files
