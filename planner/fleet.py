"""Fleets (profiles/fleets/*.yaml): a server and groups of clients, each group `count` identical devices.

    server: {device: a100-80gb, count: 1, concurrency: 1}
    clients:
      - device: jetson-orin-nano-8gb      # shipped name, path, or an inline profile mapping
        count: 2
        data_weight: 1.0                   # FedAvg weight of each client in this group
        budget: {round_s: 600, memory_gib: 6.0}
        splits: [1, 12]                    # optional allowed range of split_layer (inclusive)
        uplink_mbps: 20                    # optional: this group's links, in place of the device profile's
        downlink_mbps: 80
      - table: devices.csv                 # or .parquet: one client per row (planner/fleet_table.py)

`Fleet.clients()` expands the groups into individual clients with ids c0, c1, ... in file order (a group's
`id:`, or a table's id column, names its client instead).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hsplit.planner.device import DeviceNotFound, DeviceProfile, resolve_device
from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.plan_clients import MAX_PLAN_CLIENTS
from hsplit.planner.yamlio import cut, dump_yaml, is_file, kind, number, read_yaml, sha256_text, short, whole


# Clients in one fleet, all groups together: the planner handles a million clients of a few dozen kinds in
# seconds (docs/benchmarks.md) and plan.yaml writes identical clients once; a larger fleet is refused when it
# is loaded, before a list of that many clients is built.
MAX_CLIENTS = MAX_PLAN_CLIENTS
LINK_FIELDS = ("uplink_mbps", "downlink_mbps")   # a group may override its device profile's link speeds
GROUP_FIELDS = ("device", "count", "id", "data_weight", "budget", "splits") + LINK_FIELDS
MAX_SERVERS = 1_000_000     # server.count and server.concurrency
MAX_NAME = 100              # characters in a fleet name (used in what-if scenario names and file names)


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
    links: tuple[tuple[str, float], ...] = ()  # the group's own uplink_mbps / downlink_mbps, as written
    ids: tuple[str, ...] = ()      # the clients' ids when given (`id:`, a table's id column); default c<position>
    # (`device` already carries them: the cost model reads device.uplink_mbps / downlink_mbps)


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
    # (groups, canonical JSON of their resolved entries): kept for sha256, shared by the fleets replace() makes
    # from this one (what-if scenarios that vary only the server); checked by identity, so new groups recompute
    clients_json: list = field(default_factory=list, compare=False, repr=False)

    def clients(self) -> list[Client]:
        out, i = [], 0
        for g_idx, g in enumerate(self.groups):
            for j in range(g.count):
                out.append(Client(g.ids[j] if g.ids else f"c{i}", g_idx, g.device, g.data_weight, g.budget, g.splits))
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
            entry.update(g.links)
            if g.ids:
                entry["id"] = g.ids[0]
            clients.append(entry)
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(server=server, clients=clients)
        return out

    def _resolved(self) -> dict[str, Any]:
        data = self.to_dict()
        data["server"]["device"] = self.server.device.to_dict()
        for entry, g in zip(data["clients"], self.groups):
            entry["device"] = g.device.to_dict()
        return data

    def sha256(self) -> str:
        """Hash of the resolved fleet (device profiles included), stable across formatting (and across YAML
        and table inventories of the same clients): canonical JSON, fast for 100,000 clients."""
        def canonical(x) -> str:
            return json.dumps(x, sort_keys=True, separators=(",", ":"), default=str)
        # The clients' part is kept per groups tuple: what-if scenarios that vary only the server share it.
        # "clients" sorts first among the keys, so the text is the same as canonical(self._resolved()).
        if not self.clients_json or self.clients_json[0] is not self.groups:
            self.clients_json[:] = [self.groups, canonical(self._resolved()["clients"])]
        kept = self.clients_json
        rest = replace(self, groups=(), clients_json=[])._resolved()
        del rest["clients"]
        return sha256_text('{"clients":' + kept[1] + "," + canonical(rest)[1:])

    def sha256_before_22(self) -> str:
        """The hash plans written before issue 22 carry in inputs.fleet_sha256 (YAML text of the same data)."""
        return sha256_text(dump_yaml(self._resolved()))

    def with_groups(self, groups) -> "Fleet":
        return replace(self, groups=tuple(groups))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str, base_dir: Path | None = None) -> "Fleet":
        p = Problems(source)
        for key in data:
            if key not in ("name", "description", "server", "clients"):
                p.add(str(key), "unknown field; expected name, description, server, clients")
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME or "\n" in name
                                 or "/" in name or "\\" in name):
            p.add("name", f"must be one line of text of at most {MAX_NAME} characters without / or \\ "
                          f"(it names what-if scenarios and files), found {kind(name)}")
            name = None
        description = data.get("description")
        if description is not None and not isinstance(description, str):
            p.add("description", f"must be text, found {kind(description)}")
            description = None
        server = server_from_entry(data.get("server"), p, source, base_dir)
        groups = []
        raw_clients = data.get("clients")
        example = "e.g. `clients: [{device: raspberry-pi-5-8gb, count: 4}]`, or one `- device: ...` line per group"
        if raw_clients is None:
            p.add("clients", f"missing: add a list of client groups, {example}")
            raw_clients = []
        elif not isinstance(raw_clients, list):
            p.add("clients", f"must be a list of client groups (each item starts with `- `), "
                             f"found {kind(raw_clients)}; {example}")
            raw_clients = []
        elif not raw_clients:
            p.add("clients", f"is empty: add at least one client group, {example}")
        total = 0
        for i, entry in enumerate(raw_clients):
            f = f"clients[{i}]"
            if isinstance(entry, dict) and "table" in entry:      # a CSV or Parquet inventory beside the fleet
                from hsplit.planner.fleet_table import table_groups
                for g in table_groups(entry, f, p, source, base_dir, group_from_entry):
                    groups.append(g)
                    total += g.count
                continue
            g = group_from_entry(entry, f, p, source, base_dir)
            if g is not None:
                groups.append(g)
                total += g.count
        if any(g.ids for g in groups) and total <= MAX_CLIENTS:    # given ids: unique among all clients
            ids = [cid or f"c{k}" for k, cid in enumerate(cid for g in groups for cid in (g.ids or ("",) * g.count))]
            if len(set(ids)) < len(ids):
                seen: set[str] = set()
                twice = next(cid for cid in ids if cid in seen or seen.add(cid))
                p.add("clients", f"client id {short(twice)} is used twice (default ids are c<position>); make the "
                                 "ids unique")
        if total > MAX_CLIENTS:
            p.add("clients", f"{total:,} clients in all (sum of the counts) is more than the {MAX_CLIENTS:,} hsplit "
                             "plans (a million clients of a dozen kinds plan in seconds); plan a representative "
                             "sample of each group with smaller counts")
        p.raise_if_any()
        return cls(name=str(name or Path(source).stem), server=server, groups=tuple(groups),
                   description=str(description or ""), source=source)

    @classmethod
    def load(cls, path: str | Path) -> "Fleet":
        path = resolve_fleet_path(path)
        return cls.from_dict(read_yaml(path), str(path), path.parent)


def resolve_fleet_path(ref: str | Path) -> Path:
    """A fleet by path, or by shipped name (`example` -> profiles/fleets/example.yaml)."""
    from hsplit.planner.device import PROFILE_DIR
    path = Path(ref)
    if is_file(path):
        return path
    shipped = PROFILE_DIR / "fleets" / f"{ref}.yaml"
    if is_file(shipped):
        return shipped
    names = ", ".join(sorted(q.stem for q in (PROFILE_DIR / "fleets").glob("*.yaml")))
    raise ConfigError(cut(str(ref)), [f"fleet file not found; give a path or a shipped fleet name ({names})"])


def server_from_entry(raw_server, p: Problems, source: str, base_dir) -> Server | None:
    """A fleet's `server:` mapping checked field by field into `p`; None when it is missing or has a problem
    (also used by what-if to vary the server of an already loaded fleet)."""
    server = None
    if raw_server is None:
        p.add("server", "missing: add `server: {device: a100-80gb}`")
    elif not isinstance(raw_server, dict):
        p.add("server", f"must be a mapping such as `server: {{device: a100-80gb}}`, found {kind(raw_server)}")
    elif "device" not in raw_server:
        p.add("server.device", "missing: add `device: a100-80gb` (a shipped name, a path or an inline profile)")
    else:
        dev = _device(raw_server["device"], "server.device", p, source, base_dir)
        count = whole(raw_server.get("count"), "server.count", p, minimum=1, maximum=MAX_SERVERS,
                      required=False, default=1)
        conc = whole(raw_server.get("concurrency"), "server.concurrency", p, minimum=1, maximum=MAX_SERVERS,
                     required=False, default=1)
        for key in raw_server:
            if key not in ("device", "count", "concurrency"):
                p.add(f"server.{key}", "unknown field; expected device, count, concurrency")
        if dev and count and conc:
            server = Server(dev, count, conc, raw_server["device"])
    return server


def _device(ref, field_name, p, source, base_dir) -> DeviceProfile | None:
    if isinstance(ref, dict):
        try:
            return DeviceProfile.from_dict(ref, source, prefix=f"{field_name}.")
        except ConfigError as e:
            p.items.extend(e.problems)  # already prefixed with field_name
            return None
    if not isinstance(ref, str):
        p.add(field_name, f"must be a device name, a path, or an inline profile mapping, found {kind(ref)}")
        return None
    try:
        return resolve_device(ref, base_dir)
    except DeviceNotFound as e:
        p.add(field_name, e.problems[0])
    except ConfigError as e:  # the profile file exists but is invalid: name it
        for prob in e.problems:
            p.add(field_name, f"in {e.source}: {prob}")
    return None


def group_from_entry(entry, f: str, p: Problems, source: str, base_dir, devices: dict | None = None
                     ) -> ClientGroup | None:
    """One `clients:` entry (a group of `count` identical clients) checked field by field into `p`, with
    `f` naming it (clients[3], or a table's row: planner/fleet_table.py); None when it has a problem.
    `devices`: shipped profiles already read, by name (a table names the same few thousands of times)."""
    if not isinstance(entry, dict):
        p.add(f, f"must be a mapping with at least `device:` (e.g. `- device: raspberry-pi-5-8gb`), "
                 f"found {kind(entry)}")
        return None
    if "device" not in entry:
        p.add(f"{f}.device", "missing: each client group needs `device:` (a shipped name, a path or "
                             "an inline profile)")
        return None
    for key in entry:
        if key not in GROUP_FIELDS:
            p.add(f"{f}.{key}", f"unknown field; expected {', '.join(GROUP_FIELDS)}")
    ref = entry["device"]
    if devices is not None and isinstance(ref, str):
        if ref not in devices:
            devices[ref] = _device(ref, f"{f}.device", p, source, base_dir)
        dev = devices[ref]
    else:
        dev = _device(ref, f"{f}.device", p, source, base_dir)
    links = tuple((key, number(entry[key], f"{f}.{key}", p, positive=True)) for key in LINK_FIELDS
                  if key in entry)
    if dev and links and None not in dict(links).values():
        dev = replace(dev, **dict(links))       # this group's links in place of the profile's
    count = whole(entry.get("count"), f"{f}.count", p, minimum=0, maximum=MAX_CLIENTS, required=False,
                  default=1, what=" (clients in this group)")
    cid = None
    if "id" in entry:
        cid = entry["id"]
        if isinstance(cid, bool) or not isinstance(cid, (str, int)) or not str(cid) or "\n" in str(cid) \
                or ".." in str(cid) or len(str(cid)) > MAX_NAME:
            p.add(f"{f}.id", f"must be one line of text of at most {MAX_NAME} characters without `..` (the client's "
                             f"id in plans), found {kind(cid)}")
            cid = None
        elif count != 1:
            p.add(f"{f}.id", f"names one client but count is {count}; give `id:` only to a group of count 1")
            cid = None
        else:
            cid = str(cid)
    weight = number(entry.get("data_weight", 1.0), f"{f}.data_weight", p, positive=True)
    budget = Budget()
    raw_budget = entry.get("budget")
    if raw_budget is not None and not isinstance(raw_budget, dict):
        p.add(f"{f}.budget", f"must be a mapping {{round_s: ..., memory_gib: ...}}, found {kind(raw_budget)}")
    elif raw_budget:
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
        sp = Problems(source)
        pair = ([whole(v, "", sp, minimum=1, maximum=MAX_CLIENTS) for v in raw]
                if isinstance(raw, list) and len(raw) == 2 else None)
        if pair is None or None in pair or pair[1] < pair[0]:
            p.add(f"{f}.splits", f"must be [min, max] with whole numbers 1 <= min <= max (allowed "
                                 f"split_layer range; max at most the model's blocks - 1), got {short(raw)}")
        else:
            splits = (pair[0], pair[1])
    if dev and count is not None and weight:
        return ClientGroup(dev, count, weight, budget, splits, entry["device"], links, (cid,) if cid else ())
    return None
