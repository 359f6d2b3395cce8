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

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hsplit import __version__
from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.model import ModelProfile
from hsplit.planner.strategies import DEFAULT as DEFAULT_STRATEGY
from hsplit.planner.strategies import NAMES as STRATEGIES
from hsplit.planner.yamlio import atomic_write_text, dump_yaml, read_yaml

SCHEMA_VERSION = 1
AGGREGATIONS = ("warm", "restart")   # hsplitlora's exact aggregation: holders carry on, or restart each round
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
    path: str = "shakespeare"       # shakespeare (embedded) | a JSONL, CSV, text or E2E CSV path
    format: str = "auto"            # auto | jsonl | csv | text | e2e | shakespeare
    partition: str = "by-source"    # by-source | iid | dirichlet
    alpha: float = 0.5              # Dirichlet concentration (partition: dirichlet)
    eval_fraction: float = 0.05     # held-out share no client trains on


@dataclass
class ClientPlan:
    id: str
    device: str
    split_layer: int
    ranks: dict[str, int] = field(default_factory=dict)
    data_weight: float = 1.0
    predicted: dict[str, Any] = field(default_factory=dict)


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
    aggregation: str = "warm"        # hsplitlora: warm (exact, adapters carry on) | restart (exact, fresh init)
    schema_version: int = SCHEMA_VERSION
    hsplit_version: str = __version__
    source: str = "<plan>"

    # ---- model-aware views (used by the runtime and `hsplit plan --check`) ----
    def client_ranks(self, client: ClientPlan, model: ModelProfile) -> dict[str, int]:
        """Full module name -> rank for the client's own blocks; validates names against the model."""
        p = Problems(self.source)
        out = _expand_ranks(client, model, p, f"clients[{self.clients.index(client)}]")
        p.raise_if_any()
        return out

    def server_ranks(self, client: ClientPlan, model: ModelProfile) -> dict[str, int]:
        """Full module name -> rank of the server-side adapters kept for this client."""
        if self.server_rank <= 0:
            return {}
        mods = model.resolve_modules(self.modules, f"{self.source}: modules")
        return {model.module_name(l, m): self.server_rank for l in range(client.split_layer, model.layers)
                for m in mods}

    def validate_for(self, model: ModelProfile) -> None:
        """Every client's split and ranks make sense for `model` (one error listing all problems)."""
        p = Problems(self.source)
        for i, c in enumerate(self.clients):
            top = model.layers
            if not 1 <= c.split_layer <= top:
                p.add(f"clients[{i}].split_layer",
                      f"{c.split_layer} is outside 1..{top} for {model.name} ({model.layers} blocks)")
            _expand_ranks(c, model, p, f"clients[{i}]")
        if self.modules:
            try:
                model.resolve_modules(self.modules, f"{self.source}: modules")
            except ConfigError as e:
                p.items.extend(f"modules: {x}" for x in e.problems)
        p.raise_if_any()

    # ---- YAML ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "hsplit_version": self.hsplit_version,
            "model": self.model, "inputs": self.inputs, "strategy": self.strategy,
            "objective": self.objective, "modules": list(self.modules),
            "ranks_allowed": list(self.ranks_allowed), "server_rank": self.server_rank,
            "training": asdict(self.training), "data": asdict(self.data),
            **({"replan": self.replan} if self.replan else {}), "aggregation": self.aggregation,
            "solver": self.solver, "predicted": self.predicted, "server": self.server,
            "clients": [{"id": c.id, "device": c.device, "data_weight": c.data_weight,
                         "split_layer": c.split_layer, "ranks": dict(c.ranks), "predicted": c.predicted}
                        for c in self.clients],
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, dump_yaml(_plain(self.to_dict()), HEADER))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_yaml(path), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "Plan":
        p = Problems(source)
        known = {"schema_version", "hsplit_version", "model", "inputs", "strategy", "objective", "modules",
                 "ranks_allowed", "server_rank", "training", "data", "replan", "solver", "predicted",
                 "server", "clients", "aggregation"}
        for key in data:
            if key not in known:
                p.add(key, f"unknown field; expected one of {', '.join(sorted(known))}")
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            p.add("schema_version", f"{data.get('schema_version')!r} is not supported (this hsplit reads "
                                    f"{SCHEMA_VERSION}); re-run `hsplit plan`")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            p.add("model", "missing: the model name or path the plan is for (e.g. smollm2-135m)")
        strategy = data.get("strategy", DEFAULT_STRATEGY)
        if strategy not in STRATEGIES:
            p.add("strategy", f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        training = _section(Training, data.get("training"), "training", p)
        data_spec = _section(DataSpec, data.get("data"), "data", p)
        if training and training.dtype not in ("fp32", "bf16", "fp16"):
            p.add("training.dtype", f"must be fp32, bf16 or fp16, got {training.dtype!r}")
        if training and training.lr_schedule not in ("constant", "linear", "cosine"):
            p.add("training.lr_schedule", f"must be constant, linear or cosine, got {training.lr_schedule!r}")
        if data_spec and data_spec.partition not in ("by-source", "iid", "dirichlet"):
            p.add("data.partition", f"must be by-source, iid or dirichlet, got {data_spec.partition!r}")
        ranks_allowed = data.get("ranks_allowed", [0, 2, 4, 8, 16])
        if not (isinstance(ranks_allowed, list) and ranks_allowed
                and all(isinstance(r, int) and r >= 0 for r in ranks_allowed)):
            p.add("ranks_allowed", f"must be a list of whole numbers >= 0, got {ranks_allowed!r}")
        server_rank = data.get("server_rank", 8)
        if not isinstance(server_rank, int) or server_rank < 0:
            p.add("server_rank", f"must be a whole number >= 0, got {server_rank!r}")
        modules = data.get("modules") or []
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            p.add("modules", "must be a list of module names (e.g. [self_attn.q_proj, self_attn.v_proj])")
            modules = []
        aggregation = data.get("aggregation", "warm")
        if aggregation not in AGGREGATIONS:
            p.add("aggregation", f"must be {' or '.join(AGGREGATIONS)} (hsplitlora: adapters and AdamW moments carry "
                                 f"on / restart from a fresh init every round), got {aggregation!r}")
        replan = data.get("replan")
        if replan is not None and not (isinstance(replan, dict) and set(replan) <= {"every", "threshold"}):
            p.add("replan", "must be {every: N, threshold: t}")
        clients = []
        raw_clients = data.get("clients")
        if not isinstance(raw_clients, list) or not raw_clients:
            p.add("clients", "missing: a list of clients with device, split_layer and ranks")
            raw_clients = []
        for i, c in enumerate(raw_clients):
            f = f"clients[{i}]"
            if not isinstance(c, dict):
                p.add(f, "must be a mapping with device, split_layer, ranks")
                continue
            for key in c:
                if key not in ("id", "device", "data_weight", "split_layer", "ranks", "predicted"):
                    p.add(f"{f}.{key}", "unknown field; expected id, device, data_weight, split_layer, ranks")
            split = c.get("split_layer")
            if isinstance(split, bool) or not isinstance(split, int) or split < 1:
                p.add(f"{f}.split_layer", f"must be a whole number >= 1 (client runs blocks [0, split)), got {split!r}")
            ranks = c.get("ranks") or {}
            if not isinstance(ranks, dict):
                p.add(f"{f}.ranks", "must be a mapping module name -> rank")
                ranks = {}
            for k, v in ranks.items():
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    p.add(f"{f}.ranks.{k}", f"must be a whole number >= 0, got {v!r}")
            weight = c.get("data_weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                p.add(f"{f}.data_weight", f"must be a number > 0, got {weight!r}")
            clients.append(ClientPlan(id=str(c.get("id", f"c{i}")), device=str(c.get("device", "")),
                                      split_layer=split if isinstance(split, int) else 0,
                                      ranks={str(k): v for k, v in ranks.items()},
                                      data_weight=float(weight) if isinstance(weight, (int, float)) else 1.0,
                                      predicted=dict(c.get("predicted") or {})))
        ids = [c.id for c in clients]
        for cid in dict.fromkeys(ids):
            where = [f"clients[{i}]" for i, x in enumerate(ids) if x == cid]
            if len(where) > 1:
                p.add("clients", f"client ids must be unique: id {cid!r} is used by {', '.join(where)}; "
                                 "rename or remove the `id:` fields (default c0, c1, ...)")
        p.raise_if_any()
        return cls(model=model, strategy=strategy, clients=clients, modules=list(modules),
                   ranks_allowed=sorted(set(ranks_allowed)), server_rank=server_rank,
                   objective=str(data.get("objective", "utility")), training=training, data=data_spec,
                   inputs=dict(data.get("inputs") or {}), solver=dict(data.get("solver") or {}),
                   server=dict(data.get("server") or {}), predicted=dict(data.get("predicted") or {}),
                   replan=replan, aggregation=str(aggregation), hsplit_version=str(data.get("hsplit_version", __version__)), source=source)


def _section(cls, raw, name, p):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        p.add(name, "must be a mapping")
        return cls()
    fields = cls.__dataclass_fields__
    for key in raw:
        if key not in fields:
            p.add(f"{name}.{key}", f"unknown field; expected one of {', '.join(fields)}")
    kwargs = {}
    for key, f in fields.items():
        if key in raw:
            default = getattr(cls(), key)
            val = raw[key]
            if isinstance(default, bool) or isinstance(default, str):
                ok = isinstance(val, type(default))
            elif isinstance(default, int):
                ok = isinstance(val, int) and not isinstance(val, bool)
            else:
                ok = isinstance(val, (int, float)) and not isinstance(val, bool)
            if not ok:
                p.add(f"{name}.{key}", f"must be a {type(default).__name__}, got {val!r}")
            else:
                kwargs[key] = float(val) if isinstance(default, float) else val
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
            elif rank > 0:
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
        if rank > 0:
            for block in range(min(client.split_layer, model.layers)):
                out.setdefault(model.module_name(block, suffix), rank)
    return out


def _plain(obj):
    """Convert numpy scalars and tuples so yaml.safe_dump can write them."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj
