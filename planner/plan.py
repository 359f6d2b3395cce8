"""Plans (plan.yaml): what every client runs. Written by `hsplit plan`, read by `hsplit run`.

A plan may also be written by hand (this is how SplitLoRA's fixed split is expressed): only
`model` and `clients` (each with a `split_layer`) are required; `strategy` defaults to hsplitlora,
a client's `ranks` to none and its `device` to "".
`ranks` keys are full module names (`model.layers.3.self_attn.q_proj`) or, as a shorthand, a module
suffix (`q_proj`, `self_attn.q_proj`) meaning "every block this client runs". Client `id`s default to
c0, c1, ... Server-side blocks [split_layer, L) carry `server_rank` on every planned module.
See docs/file-formats.md for every field.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hsplit import __version__
from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.model import ModelProfile
from hsplit.planner.plan_refs import (DATA_SUFFIXES, looks_like_hub_id, resolve_data_path, resolve_fleet_ref,
                                      resolve_model_ref)
from hsplit.planner.plan_clients import (GROUPED_ABOVE, ClientPlan, allocation_entries, client_entries,
                                         read_allocations, read_clients)
from hsplit.planner.sampling import Sampling
from hsplit.planner.strategies import DEFAULT as DEFAULT_STRATEGY
from hsplit.planner.strategies import NAMES as STRATEGIES
from hsplit.planner.strategies import traits
from hsplit.planner.yamlio import (atomic_write_text, cut, dump_yaml, kind, number, path_text_problem, read_yaml,
                                  short, whole)

SCHEMA_VERSION = 1
# hsplitlora's exact aggregation: holders carry on and each client downloads a bounded-rank part of what its
# blocks lack (bounded: what `hsplit plan` writes), holders carry on and download every holder's update
# (warm: what a plan without `aggregation:` means, as before bounded existed), or restart each round
AGGREGATIONS = ("bounded", "warm", "restart")
DEFAULT_AGGREGATION = "bounded"      # hsplit plan / make_plan (docs/benchmarks.md: measured against warm)
FILE_AGGREGATION = "warm"            # a plan file without `aggregation:` (hand-written, or written before)
DOWNLOAD_KEYS = ("floor_rank", "owed_rank")   # plan `download:` (aggregation bounded; docs/file-formats.md)
DTYPES = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
DATA_FORMATS = ("auto", "shakespeare", "text", "jsonl", "csv", "parquet", "arrow", "e2e")
TASKS = ("lm", "classification")     # data.task: next-token prediction | sequence classification (runtime/models/task.py)
TASK_FIELDS = ("task", "text_column", "label_column", "labels")   # data fields a next-token plan does not write
# hsplit's own (by-source, iid, dirichlet) and Flower Datasets' partitioners (flower-*: docs/runtime.md, Data)
PARTITIONS = ("by-source", "iid", "dirichlet", "flower-iid", "flower-dirichlet", "flower-natural-id",
              "flower-pathological")
DIRICHLET_PARTITIONS = ("dirichlet", "flower-dirichlet")     # the partitions data.alpha applies to
OBJECTIVES = ("utility", "latency")
MAX_INT = 2 ** 31 - 1          # whole-number fields: what torch and numpy index with
MAX_SEED = 2 ** 63 - 1

# The check of every training and data field: (kind, minimum, maximum, what). kind: "int" (whole number,
# also written 4.0 or 1e3), "float" (finite number), "choice" (one of `what`), "path" (a file name).
# Bounds are inclusive unless written as ("<", x). docs/file-formats.md lists the same table.
TRAINING_RULES = {
    "batch_size": ("int", 1, MAX_INT, "sequences per step"),
    "seq_len": ("int", 1, MAX_INT, "tokens per sequence; at most the model's maximum positions"),
    "local_steps": ("int", 1, MAX_INT, "steps per client per round"),
    "rounds": ("int", 1, MAX_INT, "rounds hsplit run trains"),
    "dtype": ("choice", None, None, DTYPES),
    "learning_rate": ("float", ("<", 0.0), None, "AdamW step size, > 0"),
    "lr_schedule": ("choice", None, None, LR_SCHEDULES),
    "warmup_steps": ("int", 0, MAX_INT, "steps of linear warm-up"),
    "weight_decay": ("float", 0.0, None, "AdamW weight decay"),
    "max_grad_norm": ("float", 0.0, None, "gradient clipping norm; 0 = no clipping"),
    "lora_alpha_over_rank": ("float", ("<", 0.0), None, "lora_alpha / rank, > 0"),
    "lora_dropout": ("float", 0.0, ("<", 1.0), "dropout probability in [0, 1)"),
    "seed": ("int", 0, MAX_SEED, "random seed"),
}
DATA_RULES = {
    "path": ("path", None, None, "shakespeare, a data file or folder, or a dataset id"),
    "format": ("choice", None, None, DATA_FORMATS),
    "partition": ("choice", None, None, PARTITIONS),
    "partition_by": ("path", None, None, "the column naming each record's source"),
    "alpha": ("float", ("<", 0.0), None, "Dirichlet concentration, > 0"),
    "sources_per_client": ("int", 1, MAX_INT, "flower-pathological: sources each client holds"),
    "eval_fraction": ("float", 0.0, ("<", 1.0), "held-out share in [0, 1)"),
    "task": ("choice", None, None, TASKS),
    "text_column": ("path", None, None, "classification: the column holding the text (auto: text, sentence, ...)"),
    "label_column": ("path", None, None, "classification: the column (or E2E MR attribute) holding the label"),
    "labels": ("labels", None, None, "classification: the label set, read from the data by `hsplit plan`"),
}
# `hsplit plan` flags that set plan fields: flag -> (section, field). The flags are checked with the rules
# above (settings_from_flags) and written into the plan, which `hsplit run` follows.
PLAN_FLAGS = {
    "--batch-size": ("training", "batch_size"), "--seq-len": ("training", "seq_len"),
    "--local-steps": ("training", "local_steps"), "--rounds": ("training", "rounds"),
    "--dtype": ("training", "dtype"), "--lr": ("training", "learning_rate"),
    "--lr-schedule": ("training", "lr_schedule"), "--warmup": ("training", "warmup_steps"),
    "--weight-decay": ("training", "weight_decay"), "--max-grad-norm": ("training", "max_grad_norm"),
    "--lora-dropout": ("training", "lora_dropout"), "--seed": ("training", "seed"),
    "--partition": ("data", "partition"), "--dirichlet-alpha": ("data", "alpha"),
    "--partition-by": ("data", "partition_by"), "--sources-per-client": ("data", "sources_per_client"),
    "--eval-fraction": ("data", "eval_fraction"), "--data": ("data", "path"),
    "--task": ("data", "task"), "--text-column": ("data", "text_column"), "--label-column": ("data", "label_column"),
}
HEADER = "# Plan: written by `hsplit plan`, run by `hsplit run` (fields: docs/file-formats.md)."


@dataclass
class Training:
    """Training settings the planner's cost model and the runtime both read."""
    batch_size: int = 4
    seq_len: int = 256
    local_steps: int = 10
    rounds: int = 2
    dtype: str = "fp32"            # frozen weights and activations: fp32 | bf16 | fp16
    learning_rate: float = 2e-4
    lr_schedule: str = "cosine"    # constant | linear | cosine (after warm-up)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_alpha_over_rank: float = 2.0  # lora_alpha = this * rank (constant scaling alpha/r)
    lora_dropout: float = 0.0
    seed: int = 0


@dataclass
class DataSpec:
    """Which data the clients hold and how it is split among them (read by the runtime)."""
    path: str = "shakespeare"       # shakespeare (embedded) | a data file or folder | a hub dataset id
    format: str = "auto"            # auto | jsonl | csv | parquet | arrow | text | e2e | shakespeare
    partition: str = "by-source"    # one of PARTITIONS
    partition_by: str = "source"    # the column naming each record's source (natural id)
    alpha: float = 0.5              # Dirichlet concentration (dirichlet, flower-dirichlet)
    sources_per_client: int = 2     # flower-pathological: sources (classes) per client
    eval_fraction: float = 0.05     # held-out share no client trains on
    task: str = "lm"                # lm (next-token) | classification (runtime/data/classification.py)
    text_column: str = "auto"       # classification: the text column (auto: the first of text, sentence, ...)
    label_column: str = "auto"      # classification: the label column, or an E2E MR attribute (e.g. eatType)
    labels: list[str] = field(default_factory=list)   # classification: the label set, in class-index order


@dataclass
class Plan:
    model: str
    strategy: str
    clients: list[ClientPlan]
    modules: list[str] = field(default_factory=list)
    ranks_allowed: list[int] = field(default_factory=lambda: [0, 2, 4, 8, 16])
    server_rank: int = 8
    objective: str = "utility"
    training: Training = field(default_factory=Training)
    data: DataSpec = field(default_factory=DataSpec)
    inputs: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    replan: dict[str, Any] | None = None
    aggregation: str = FILE_AGGREGATION      # hsplitlora: bounded | warm | restart (all exact at the server)
    # aggregation bounded: {floor_rank: r_f, owed_rank: R_o}; absent keys take the runtime's defaults
    # (floor_rank: the smallest positive rank of ranks_allowed; owed_rank: 4 x the largest)
    download: dict[str, int] = field(default_factory=dict)
    sampling: Sampling | None = None  # clients that train each round (None: every client, every round)
    schema_version: int = SCHEMA_VERSION
    hsplit_version: str = __version__
    source: str = "<plan>"
    # the index of each client's entry in the file's `clients:` list (one entry may stand for `count`
    # clients: plan_clients.py); empty for a plan built in memory
    entries: list[int] = field(default_factory=list, compare=False, repr=False)
    entry_list: str = field(default="clients", compare=False, repr=False)   # or "allocations" (grouped plans)
    # as the file says (provenance, not compared): Plan.load makes a relative data.path, model folder and
    # inputs.fleet absolute; a distributed run hashes the plan as written (runtime/distributed/auth.py)
    written_data_path: str | None = field(default=None, compare=False, repr=False)
    written_model: str | None = field(default=None, compare=False, repr=False)
    written_fleet: str | None = field(default=None, compare=False, repr=False)

    # ---- model-aware views (used by the runtime and `hsplit plan --check`) ----
    def client_ranks(self, client: ClientPlan, model: ModelProfile) -> dict[str, int]:
        """Full module name -> rank for the client's own blocks; validates names against the model."""
        p = Problems(self.source)
        out = _expand_ranks(client, model, p, "clients[?]")
        if p.items:          # name the client's entry (only now: finding it is a search)
            p = Problems(self.source)
            _expand_ranks(client, model, p, self.field_of(next(i for i, c in enumerate(self.clients) if c is client)))
        p.raise_if_any()
        return out

    def field_of(self, k: int) -> str:
        """`clients[i]`: the entry of the file that client k comes from (one entry may stand for many)."""
        if len(self.entries) != len(self.clients):
            return f"clients[{k}]"
        return f"{self.entry_list}[{self.entries[k]}]"

    def server_ranks(self, client: ClientPlan, model: ModelProfile) -> dict[str, int]:
        """Full module name -> rank of the server-side adapters kept for this client."""
        if self.server_rank <= 0:
            return {}
        mods = model.resolve_modules(self.modules, f"{self.source}: modules")
        return {model.module_name(l, m): self.server_rank for l in range(client.split_layer, model.layers)
                for m in mods}

    def validate_for(self, model: ModelProfile) -> None:
        """Everything about the plan that depends on the model, one error listing all problems: the model
        hash, each client's split and ranks (names, blocks, rank at most the matrix's smaller side), the
        server rank, the modules and seq_len against the model's maximum positions. The one check of a
        plan against its model, shared by `hsplit plan --check` and `hsplit run`."""
        p = Problems(self.source)
        planned = self.inputs.get("model_hash")
        if planned and planned != model.arch_hash():       # one root cause: say it alone
            p.add("inputs.model_hash", f"the plan was made for another model architecture than {model.name} "
                                       f"({model.family.name}, {model.layers} blocks, hidden {model.hidden}); "
                                       "re-plan for this model with `hsplit plan --model ...`")
            p.raise_if_any()
        if self.training.seq_len > model.max_positions:
            p.add("training.seq_len", f"{self.training.seq_len} is more than {model.name}'s maximum of "
                                      f"{model.max_positions} positions; use at most {model.max_positions}")
        shapes = model.module_shapes()
        mods = ()
        try:
            mods = model.resolve_modules(self.modules, f"{self.source}: modules") if self.modules else ()
        except ConfigError as e:
            p.items.extend(f"modules: {x.split(': ', 1)[-1]}" for x in e.problems)
        if self.server_rank > 0 and any(c.split_layer < model.layers for c in self.clients):
            for m in mods or model.family.default_modules:
                if self.server_rank > min(shapes[m]):
                    p.add("server_rank", f"{self.server_rank} is larger than {m} ({shapes[m][0]} x {shapes[m][1]}) "
                                         f"allows: a rank is at most {min(shapes[m])} for it")
                    break
        seen = set()
        for i, c in enumerate(self.clients):
            f = self.field_of(i)
            if (f, c.split_layer, id(c.ranks)) in seen:      # the clients of one entry: checked once
                continue
            seen.add((f, c.split_layer, id(c.ranks)))
            top = model.layers
            if not 1 <= c.split_layer <= top:
                p.add(f"{f}.split_layer", f"{c.split_layer} is outside 1..{top} for {model.name} ({model.layers} blocks)")
            _expand_ranks(c, model, p, f)
        p.raise_if_any()

    # ---- YAML ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "hsplit_version": self.hsplit_version,
            "model": self.model, "inputs": self.inputs, "strategy": self.strategy,
            "objective": self.objective, "modules": list(self.modules),
            "ranks_allowed": list(self.ranks_allowed), "server_rank": self.server_rank,
            "training": asdict(self.training), "data": {k: v for k, v in asdict(self.data).items()
                                                        if self.data.task != "lm" or k not in TASK_FIELDS},
            **({"replan": self.replan} if self.replan else {}), "aggregation": self.aggregation,
            **({"download": dict(self.download)} if self.download else {}),
            **({"sampling": self.sampling.to_dict()} if self.sampling else {}),
            "solver": self.solver, "predicted": self.predicted, "server": self.server,
            **self.client_lists(),
        }

    def client_lists(self) -> dict[str, Any]:
        """`clients:` (one entry per client, or per run of identical clients: plan_clients.py), or, for a plan
        of more than GROUPED_ABOVE such entries that falls into fewer allocations, `allocations:` (one entry
        per distinct split_layer and ranks)."""
        entries = client_entries(self.clients)
        if len(entries) > GROUPED_ABOVE:
            allocations = allocation_entries(self.clients)
            if allocations is not None and len(allocations) < len(entries):
                return {"allocations": allocations}
        return {"clients": entries}

    def save(self, path: str | Path) -> None:
        data = _plain(self.to_dict())
        # a grouped plan writes its lists of numbers and ids on one line each ([c0..c9, c15]): 100,000 clients
        atomic_write_text(path, dump_yaml(data, HEADER, flow_lists="allocations" in data))

    def data_path_problem(self) -> str | None:
        """A local data.path (as the file writes it) that is not there, said with the plan file's folder it was
        read from (None when it is there, or is shakespeare or a dataset id)."""
        written, resolved = self.written_data_path, self.data.path
        if written is None or written == "shakespeare" or self.data.format == "shakespeare" or \
                Path(resolved).expanduser().exists() or (resolved == written and looks_like_hub_id(written)):
            return None
        rel = "" if Path(written).expanduser().is_absolute() else \
            f" (relative to the plan file's folder {Path(self.source).resolve().parent}/) -> {resolved}"
        return (f"data.path {written!r}{rel}: no such file or folder; put the data there, edit data.path, or plan "
                "again with --data PATH (a relative path is written relative to the plan file)")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """The plan in `path`; a relative data.path, model folder and inputs.fleet are read from the plan
        file's folder (made absolute here)."""
        plan = cls.from_dict(read_yaml(path), str(path))
        plan.written_data_path = plan.data.path
        plan.data.path = resolve_data_path(plan.data.path, Path(path).parent)
        plan.written_model = plan.model
        plan.model = resolve_model_ref(plan.model, Path(path).parent)
        if "fleet" in plan.inputs:
            plan.written_fleet = plan.inputs["fleet"]
            plan.inputs["fleet"] = resolve_fleet_ref(plan.inputs["fleet"], Path(path).parent)
        return plan

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "Plan":
        """Check every field's type, range and finiteness (one ConfigError listing all problems); the checks
        that need the model are in validate_for."""
        p = Problems(source)
        known = {"schema_version", "hsplit_version", "model", "inputs", "strategy", "objective", "modules",
                 "ranks_allowed", "server_rank", "training", "data", "replan", "solver", "predicted",
                 "server", "clients", "allocations", "aggregation", "sampling", "download"}
        for key in data:
            if key not in known:
                p.add(cut(str(key)), f"unknown field; expected one of {', '.join(sorted(known))}")
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            p.add("schema_version", f"{short(data.get('schema_version'))} is not supported (this hsplit reads "
                                    f"{SCHEMA_VERSION}); re-run `hsplit plan`")
        model = data.get("model")
        if model is None or model == "":
            p.add("model", "missing: the model name or path the plan is for (e.g. smollm2-135m)")
        elif (why := path_text_problem(model)) is not None:
            p.add("model", f"{why} (a model name or path, e.g. smollm2-135m)")
        strategy = data.get("strategy", DEFAULT_STRATEGY)
        if strategy not in STRATEGIES:
            p.add("strategy", f"must be one of {', '.join(STRATEGIES)}, got {short(strategy)}")
        objective = data.get("objective", "utility")
        if objective not in OBJECTIVES:
            p.add("objective", f"must be one of {', '.join(OBJECTIVES)}, got {short(objective)}")
        training = _section(Training, TRAINING_RULES, data.get("training"), "training", p)
        data_spec = _section(DataSpec, DATA_RULES, data.get("data"), "data", p)
        raw_ranks = data.get("ranks_allowed", [0, 2, 4, 8, 16])
        ranks_allowed = [0, 2, 4, 8, 16]
        if not isinstance(raw_ranks, list) or not raw_ranks:
            p.add("ranks_allowed", f"must be a non-empty list of whole numbers >= 0, found {kind(raw_ranks)}")
        else:
            vals = [whole(r, f"ranks_allowed[{i}]", p, minimum=0, maximum=MAX_INT) for i, r in enumerate(raw_ranks)]
            if None not in vals and not any(vals):
                p.add("ranks_allowed", "give at least one rank > 0 (0 = no adapter), e.g. [0, 2, 4, 8, 16]")
            elif None not in vals:
                ranks_allowed = vals
        server_rank = whole(data.get("server_rank"), "server_rank", p, minimum=0, maximum=MAX_INT, required=False,
                            default=8)
        modules = data.get("modules") or []
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            p.add("modules", f"must be a list of module names (e.g. [self_attn.q_proj, self_attn.v_proj]), "
                             f"found {kind(modules)}")
            modules = []
        aggregation = data.get("aggregation", FILE_AGGREGATION)
        if aggregation not in AGGREGATIONS:
            p.add("aggregation", f"must be {' or '.join(AGGREGATIONS)} (hsplitlora: adapters and AdamW moments carry "
                                 f"on with a bounded or a full download / restart from a fresh init every round), "
                                 f"got {short(aggregation)}")
        download = _download(data.get("download"), p)
        mappings = {}
        for key in ("inputs", "solver", "server", "predicted"):
            raw = data.get(key)
            if raw is not None and not isinstance(raw, dict):
                p.add(key, f"must be a mapping (key: value; written by `hsplit plan`), found {kind(raw)}")
                raw = None
            mappings[key] = dict(raw or {})
        if mappings["inputs"].get("model_hash") is not None and not isinstance(mappings["inputs"]["model_hash"], str):
            p.add("inputs.model_hash", f"must be text (written by `hsplit plan`), found "
                                       f"{kind(mappings['inputs']['model_hash'])}")
            mappings["inputs"].pop("model_hash")
        replan = _replan(data.get("replan"), p)
        if "allocations" in data and "clients" in data:
            p.add("allocations", "give `clients:` (one entry per client) or `allocations:` (one entry per split and "
                                 "ranks, written by `hsplit plan` for large fleets), not both")
        entry_list = "allocations" if "allocations" in data else "clients"
        clients, entries = (read_allocations(data["allocations"], p) if entry_list == "allocations" else
                            read_clients(data.get("clients"), p))
        sampling = Sampling.from_dict(data.get("sampling"), p, len(clients) or None)
        if sampling is not None and strategy in STRATEGIES and not traits(strategy).split:
            p.add("sampling", f"strategy {strategy} trains one model on the pooled data: there are no clients to "
                              "sample; remove sampling")
        if sampling is not None and replan:
            p.add("sampling", "re-planning (replan) and client sampling cannot be combined yet; remove one of them")
        p.raise_if_any()
        return cls(model=model, strategy=strategy, clients=clients, modules=list(modules),
                   ranks_allowed=sorted(set(ranks_allowed)), server_rank=server_rank,
                   objective=objective, training=training, data=data_spec,
                   inputs=mappings["inputs"], solver=mappings["solver"], server=mappings["server"],
                   predicted=mappings["predicted"], replan=replan, aggregation=str(aggregation), sampling=sampling,
                   download=download,
                   hsplit_version=str(data.get("hsplit_version", __version__)), source=source, entries=entries,
                   entry_list=entry_list)


def _download(raw, p: Problems) -> dict[str, int]:
    """The plan's `download:` mapping (aggregation bounded): floor_rank and owed_rank, whole numbers >= 0."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        p.add("download", f"must be a mapping {{floor_rank: N, owed_rank: N}} (aggregation bounded), found {kind(raw)}")
        return {}
    out = {}
    for key, v in raw.items():
        if key not in DOWNLOAD_KEYS:
            p.add(f"download.{cut(str(key))}", f"unknown field; expected one of {', '.join(DOWNLOAD_KEYS)}")
            continue
        n = whole(v, f"download.{key}", p, minimum=0, maximum=MAX_INT)
        if n is not None:
            out[key] = n
    return out


def settings_from_flags(given: dict[str, Any]) -> tuple[Training, DataSpec, list[str]]:
    """(Training, DataSpec, notes) from `hsplit plan` flags {flag: value} (None: the plan's default), checked
    with the plan file's rules (TRAINING_RULES, DATA_RULES): one ConfigError naming every bad flag."""
    raw: dict[str, dict] = {"training": {}, "data": {}}
    for flag, value in given.items():
        if value is not None:
            section, key = PLAN_FLAGS[flag]
            raw[section][key] = value
    p = Problems("hsplit plan")
    training = _section(Training, TRAINING_RULES, raw["training"], "training", p)
    data = _section(DataSpec, DATA_RULES, raw["data"], "data", p)
    names = {f"{section}.{key}": flag for flag, (section, key) in PLAN_FLAGS.items()}
    p.items = [names.get(x.partition(": ")[0], x.partition(": ")[0]) + ": " + x.partition(": ")[2] for x in p.items]
    for flag, applies in (("--dirichlet-alpha", DIRICHLET_PARTITIONS), ("--sources-per-client", ("flower-pathological",))):
        if given.get(flag) is not None and data.partition not in applies:
            p.add(flag, f"applies to --partition {' or '.join(applies)} only (this plan partitions {data.partition}); "
                        f"add --partition {applies[0]} or leave {flag} out")
    for flag in ("--text-column", "--label-column"):
        if given.get(flag) is not None and data.task != "classification":
            p.add(flag, "applies to --task classification only; add --task classification or leave it out")
    p.raise_if_any()
    notes = []
    if training.warmup_steps >= training.rounds * training.local_steps:
        notes.append(f"--warmup {training.warmup_steps} is not shorter than the run ({training.rounds} rounds x "
                     f"{training.local_steps} local steps): the learning rate never reaches {training.learning_rate:g}")
    return training, data, notes


def _replan(raw, p: Problems) -> dict | None:
    """`replan: {every: N, threshold: t}`: N a whole number >= 1, t a number in [0, 1]."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        p.add("replan", f"must be a mapping {{every: N, threshold: t}}, found {kind(raw)}")
        return None
    for key in raw:
        if key not in ("every", "threshold"):
            p.add(f"replan.{cut(str(key))}", "unknown field; expected every, threshold")
    out = dict(raw)
    if "every" in raw:
        out["every"] = whole(raw["every"], "replan.every", p, minimum=1, maximum=MAX_INT,
                             what=" (re-score importance every N rounds)")
    if "threshold" in raw:
        out["threshold"] = number(raw["threshold"], "replan.threshold", p, minimum=0.0, maximum=1.0)
    return out


def _section(cls, rules: dict, raw, name, p):
    """A dataclass section (training, data) checked field by field against `rules`."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        p.add(name, f"must be a mapping (key: value), found {kind(raw)}")
        return cls()
    for key in raw:
        if key not in rules:
            p.add(f"{name}.{cut(str(key))}", f"unknown field; expected one of {', '.join(rules)}")
    kwargs = {}
    for key, (kind_, lo, hi, what) in rules.items():
        if key not in raw:
            continue
        val, f = raw[key], f"{name}.{key}"
        if kind_ == "choice":
            if val not in what:
                p.add(f, f"must be one of {', '.join(what)}, got {short(val)}")
                continue
        elif kind_ == "labels":
            if not isinstance(val, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                    for v in val) or len({str(v) for v in val}) != len(val):
                p.add(f, f"must be a list of distinct label names ({what}), found {short(val)}")
                continue
            val = [str(v) for v in val]
        elif kind_ == "path":
            if (why := path_text_problem(val)) is not None:
                p.add(f, f"{why} ({what})")
                continue
        elif kind_ == "int":
            val = whole(val, f, p, minimum=lo, maximum=hi, what=f" ({what})")
            if val is None:
                continue
        else:
            x = number(val, f, p, minimum=lo if not isinstance(lo, tuple) else None,
                       maximum=hi if not isinstance(hi, tuple) else None)
            if x is None:
                continue
            if isinstance(lo, tuple) and not x > lo[1]:
                p.add(f, f"must be > {lo[1]:g} ({what}), got {x:g}")
                continue
            if isinstance(hi, tuple) and not x < hi[1]:
                p.add(f, f"must be < {hi[1]:g} ({what}), got {x:g}")
                continue
            val = x
        kwargs[key] = val
    return cls(**kwargs)


_BLOCK_RE = re.compile(r"^(?P<prefix>.+)\.(?P<block>\d+)\.(?P<suffix>.+)$")


def block_of(module: str) -> int | None:
    """The block index in a full module name (`model.layers.3.self_attn.q_proj` -> 3), None outside blocks."""
    m = _BLOCK_RE.match(module)
    return int(m.group("block")) if m else None


def _expand_ranks(client: ClientPlan, model: ModelProfile, p: Problems, field_name: str) -> dict[str, int]:
    """Resolve a client's rank keys (full names or suffix shorthands) into full module names."""
    out: dict[str, int] = {}
    for key, rank in client.ranks.items():
        m = _BLOCK_RE.match(key)
        if m and m.group("prefix") == model.family.blocks:
            block, suffix = int(m.group("block")), m.group("suffix")
            if suffix not in model.family.modules:
                p.add(f"{field_name}.ranks.{key}",
                      f"{model.name} has no module {suffix!r}; use one of {', '.join(model.family.modules)}")
            elif block >= client.split_layer:
                p.add(f"{field_name}.ranks.{key}",
                      f"block {block} is on the server (split_layer {client.split_layer}); "
                      "client adapters must be in blocks [0, split_layer)")
            elif _rank_fits(model, suffix, rank, p, f"{field_name}.ranks.{key}") and rank > 0:
                out[key] = rank
            continue
        if m:
            p.add(f"{field_name}.ranks.{key}",
                  f"{model.name} names its blocks {model.family.blocks}.N; this key matches nothing")
            continue
        try:
            (suffix,) = model.resolve_modules([key], f"{field_name}.ranks.{key}")
        except ConfigError as e:
            p.items.extend(e.problems)
            continue
        if _rank_fits(model, suffix, rank, p, f"{field_name}.ranks.{key}") and rank > 0:
            for block in range(min(client.split_layer, model.layers)):
                out.setdefault(model.module_name(block, suffix), rank)
    return out


def _rank_fits(model: ModelProfile, suffix: str, rank: int, p: Problems, field_name: str) -> bool:
    """A LoRA rank is at most the smaller side of its matrix (d_in x d_out)."""
    d_in, d_out = model.module_shapes()[suffix]
    if rank > min(d_in, d_out):
        p.add(field_name, f"rank {rank} is larger than {suffix} ({d_in} x {d_out}) allows: at most {min(d_in, d_out)}")
        return False
    return True


def _plain(obj):
    """Convert numpy scalars and tuples so yaml.safe_dump can write them."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj
