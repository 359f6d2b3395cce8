"""Fleets (profiles/fleets/*.yaml): a server and groups of clients, each group `count` identical devices.

    server: {device: a100-80gb, count: 1, concurrency: 1}
    clients:
      - device: jetson-orin-nano-8gb      # shipped name, path, or an inline profile mapping
        count: 2
        data_weight: 1.0                   # FedAvg weight of each client in this group
        budget: {round_s: 600, memory_gib: 6.0}
        splits: [1, 12]                    # optional allowed range of split_layer (inclusive)

`Fleet.clients()` expands the groups into individual clients with ids c0, c1, ... in file order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hsplit.planner.device import DeviceNotFound, DeviceProfile, resolve_device
from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.yamlio import dump_yaml, number, read_yaml, sha256_text


@dataclass(frozen=True)
class Budget:
    round_s: float | None = None
    memory_gib: float | None = None


@dataclass(frozen=True)
class ClientGroup:
    device: DeviceProfile
    count: int
    data_weight: float = 1.0
    budget: Budget = field(default_factory=Budget)
    splits: tuple[int, int] | None = None
    device_ref: str | dict = ""  # as written in the file (name or inline mapping)


@dataclass(frozen=True)
class Client:
    id: str
    group: int
    device: DeviceProfile
    data_weight: float
    budget: Budget
    splits: tuple[int, int] | None


@dataclass(frozen=True)
class Server:
    device: DeviceProfile
    count: int = 1
    concurrency: int = 1
    device_ref: str | dict = ""


@dataclass(frozen=True)
class Fleet:
    name: str
    server: Server
    groups: tuple[ClientGroup, ...]
    description: str = ""
    source: str = "<fleet>"

    def clients(self) -> list[Client]:
        out, i = [], 0
        for g_idx, g in enumerate(self.groups):
            for _ in range(g.count):
                out.append(Client(f"c{i}", g_idx, g.device, g.data_weight, g.budget, g.splits))
                i += 1
        return out

    @property
    def num_clients(self) -> int:
        return sum(g.count for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        def dev(ref, profile):
            return ref if isinstance(ref, str) and ref else profile.to_dict()
        server = {"device": dev(self.server.device_ref, self.server.device), "count": self.server.count}
        if self.server.concurrency != 1:
            server["concurrency"] = self.server.concurrency
        clients = []
        for g in self.groups:
            entry: dict[str, Any] = {"device": dev(g.device_ref, g.device), "count": g.count,
                                     "data_weight": g.data_weight}
            budget = {k: v for k, v in (("round_s", g.budget.round_s), ("memory_gib", g.budget.memory_gib))
                      if v is not None}
            if budget:
                entry["budget"] = budget
            if g.splits:
                entry["splits"] = list(g.splits)
            clients.append(entry)
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(server=server, clients=clients)
        return out

    def sha256(self) -> str:
        """Hash of the resolved fleet (device profiles included), stable across formatting."""
        data = self.to_dict()
        data["server"]["device"] = self.server.device.to_dict()
        for entry, g in zip(data["clients"], self.groups):
            entry["device"] = g.device.to_dict()
        return sha256_text(dump_yaml(data))

    def with_groups(self, groups) -> "Fleet":
        return replace(self, groups=tuple(groups))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str, base_dir: Path | None = None) -> "Fleet":
        p = Problems(source)
        for key in data:
            if key not in ("name", "description", "server", "clients"):
                p.add(key, "unknown field; expected name, description, server, clients")
        server = None
        raw_server = data.get("server")
        if not isinstance(raw_server, dict) or "device" not in raw_server:
            p.add("server", "missing: add `server: {device: a100-80gb}`")
        else:
            dev = _device(raw_server["device"], "server.device", p, source, base_dir)
            count = _count(raw_server.get("count", 1), "server.count", p)
            conc = _count(raw_server.get("concurrency", 1), "server.concurrency", p)
            for key in raw_server:
                if key not in ("device", "count", "concurrency"):
                    p.add(f"server.{key}", "unknown field; expected device, count, concurrency")
            if dev and count and conc:
                server = Server(dev, count, conc, raw_server["device"])
        groups = []
        raw_clients = data.get("clients")
        example = "e.g. `clients: [{device: raspberry-pi-5-8gb, count: 4}]`, or one `- device: ...` line per group"
        if raw_clients is None:
            p.add("clients", f"missing: add a list of client groups, {example}")
            raw_clients = []
        elif not isinstance(raw_clients, list):
            p.add("clients", f"must be a list of client groups (each item starts with `- `), "
                             f"got a {type(raw_clients).__name__}; {example}")
            raw_clients = []
        elif not raw_clients:
            p.add("clients", f"is empty: add at least one client group, {example}")
        for i, entry in enumerate(raw_clients):
            f = f"clients[{i}]"
            if not isinstance(entry, dict) or "device" not in entry:
                p.add(f, "each client group needs at least `device:`")
                continue
            for key in entry:
                if key not in ("device", "count", "data_weight", "budget", "splits"):
                    p.add(f"{f}.{key}", "unknown field; expected device, count, data_weight, budget, splits")
            dev = _device(entry["device"], f"{f}.device", p, source, base_dir)
            count = _count(entry.get("count", 1), f"{f}.count", p, minimum=0)
            weight = number(entry.get("data_weight", 1.0), f"{f}.data_weight", p, positive=True)
            budget = Budget()
            raw_budget = entry.get("budget") or {}
            if not isinstance(raw_budget, dict):
                p.add(f"{f}.budget", "must be a mapping {round_s: ..., memory_gib: ...}")
            else:
                for key in raw_budget:
                    if key not in ("round_s", "memory_gib"):
                        p.add(f"{f}.budget.{key}", "unknown field; expected round_s, memory_gib")
                rs = number(raw_budget.get("round_s"), f"{f}.budget.round_s", p, positive=True, required=False)
                mem = number(raw_budget.get("memory_gib"), f"{f}.budget.memory_gib", p, positive=True,
                             required=False)
                if dev and mem and mem > dev.memory_gib:
                    p.add(f"{f}.budget.memory_gib",
                          f"{mem:g} GiB exceeds the usable memory of {dev.name} ({dev.memory_gib:g} GiB)")
                budget = Budget(rs, mem)
            splits = None
            if "splits" in entry:
                raw = entry["splits"]
                if (not isinstance(raw, list) or len(raw) != 2
                        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
                        or raw[0] < 1 or raw[1] < raw[0]):
                    p.add(f"{f}.splits", f"must be [min, max] with whole numbers 1 <= min <= max (allowed "
                                         f"split_layer range; max at most the model's blocks - 1), got {raw!r}")
                else:
                    splits = (raw[0], raw[1])
            if dev and count is not None and weight:
                groups.append(ClientGroup(dev, count, weight, budget, splits, entry["device"]))
        p.raise_if_any()
        return cls(name=str(data.get("name") or Path(source).stem), server=server, groups=tuple(groups),
                   description=str(data.get("description") or ""), source=source)

    @classmethod
    def load(cls, path: str | Path) -> "Fleet":
        path = resolve_fleet_path(path)
        return cls.from_dict(read_yaml(path), str(path), path.parent)


def resolve_fleet_path(ref: str | Path) -> Path:
    """A fleet by path, or by shipped name (`example` -> profiles/fleets/example.yaml)."""
    from hsplit.planner.device import PROFILE_DIR
    path = Path(ref)
    if path.is_file():
        return path
    shipped = PROFILE_DIR / "fleets" / f"{ref}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.stem for q in (PROFILE_DIR / "fleets").glob("*.yaml")))
    raise ConfigError(str(ref), [f"fleet file not found; give a path or a shipped fleet name ({names})"])


def _count(value, field_name, p, minimum: int = 1) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        p.add(field_name, f"must be a whole number >= {minimum}, got {value!r}")
        return None
    return value


def _device(ref, field_name, p, source, base_dir) -> DeviceProfile | None:
    if isinstance(ref, dict):
        try:
            return DeviceProfile.from_dict(ref, source, prefix=f"{field_name}.")
        except ConfigError as e:
            p.items.extend(e.problems)  # already prefixed with field_name
            return None
    if not isinstance(ref, str):
        p.add(field_name, "must be a device name, a path, or an inline profile mapping")
        return None
    try:
        return resolve_device(ref, base_dir)
    except DeviceNotFound as e:
        p.add(field_name, e.problems[0])
    except ConfigError as e:  # the profile file exists but is invalid: name it
        for prob in e.problems:
            p.add(field_name, f"in {e.source}: {prob}")
    return None
