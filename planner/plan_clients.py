"""The `clients:` list of a plan (plan.yaml): one entry per client, or one entry per run of identical clients.

A plan of 10,000 clients of a dozen kinds has a few dozen distinct assignments. `Plan.save` writes
consecutive clients that are equal in everything but their id (device, data_weight, split_layer,
ranks, predicted) and whose ids count up by one (`c17`, `c18`, ...) once, as

    - count: 2500
      ids: c0..c2499            # first..last: the same text before the numbers, counting up by one
      device: snapdragon-8-gen3-phone
      split_layer: 3
      ...

and `Plan.load` expands such an entry back into `count` clients, so every reader of `plan.clients`
(the runtime, `hsplit plan --check`, what-if) sees one ClientPlan per client, in file order. The
clients of one entry share their `ranks` and `predicted` mappings: treat them as read-only. An entry
without `count` is one client (today's form, and what people write by hand); `count` without `ids`
gives the default ids c<position>. docs/file-formats.md, "Plan", has the format.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from hsplit.planner.errors import Problems
from hsplit.planner.yamlio import cut, kind, number, short, whole

# Clients in one plan, all entries together (what `hsplit plan` accepts for a fleet, planner/fleet.py):
# a larger count is refused before a list of that many clients is built.
MAX_PLAN_CLIENTS = 1_000_000
CLIENT_FIELDS = ("id", "ids", "count", "device", "data_weight", "split_layer", "ranks", "predicted")
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<n>0|[1-9][0-9]*)$")          # c17 -> (c, 17)
_RANGE = re.compile(r"^(?P<first>.+?)\.\.(?P<last>.+)$")                   # c0..c2499


@dataclass
class ClientPlan:
    id: str
    device: str
    split_layer: int
    ranks: dict[str, int] = field(default_factory=dict)
    data_weight: float = 1.0
    predicted: dict[str, Any] = field(default_factory=dict)


def _numbered(cid: str) -> tuple[str, int] | None:
    m = _NUMBERED.match(cid)
    return (m.group("prefix"), int(m.group("n"))) if m else None


def _same(a: ClientPlan, b: ClientPlan) -> bool:
    """Equal in everything but the id (shared mappings compare by identity first: fast)."""
    return (a.device == b.device and a.split_layer == b.split_layer and a.data_weight == b.data_weight
            and (a.ranks is b.ranks or a.ranks == b.ranks) and (a.predicted is b.predicted or a.predicted == b.predicted))


def client_entries(clients: list[ClientPlan]) -> list[dict[str, Any]]:
    """The `clients:` list as written: runs of identical, consecutively numbered clients as one entry."""
    out, i = [], 0
    while i < len(clients):
        c, j = clients[i], i + 1
        first = _numbered(c.id) if ".." not in c.id else None       # `ids:` must read back as written
        if first is not None:
            while (j < len(clients) and _same(c, clients[j])
                   and _numbered(clients[j].id) == (first[0], first[1] + j - i)):
                j += 1
        body = {"device": c.device, "data_weight": c.data_weight, "split_layer": c.split_layer,
                "ranks": dict(c.ranks), "predicted": c.predicted}
        out.append({"id": c.id, **body} if j == i + 1 else
                   {"count": j - i, "ids": f"{c.id}..{clients[j - 1].id}", **body})
        i = j
    return out


def _ids_of(entry: dict, f: str, position: int, p: Problems) -> list[str] | None:
    """The ids an entry stands for (`id`, `ids: first..last`, or c<position>... by default), None on error."""
    if "count" in entry:
        count = whole(entry["count"], f"{f}.count", p, minimum=1, maximum=MAX_PLAN_CLIENTS,
                      what=" (identical clients this entry stands for)")
        if count is None:
            return None
    else:
        count = None
    if "id" in entry and "ids" in entry:
        p.add(f, "give `id:` (one client) or `ids: first..last` (with `count:`), not both")
        return None
    if "id" in entry:
        if count is not None and count != 1:
            p.add(f"{f}.id", f"one id for count {count} clients; write `ids: {cut(str(entry['id']))}..LAST` instead "
                             "(the same text before the numbers, counting up by one)")
            return None
        return [str(entry["id"])]
    if "ids" not in entry:
        return [f"c{position + k}" for k in range(count or 1)]
    raw = entry["ids"]
    m = _RANGE.match(raw) if isinstance(raw, str) else None
    ends = (_numbered(m.group("first")), _numbered(m.group("last"))) if m else (None, None)
    if None in ends or ends[0][0] != ends[1][0] or ends[1][1] < ends[0][1]:
        p.add(f"{f}.ids", f"must be `first..last` such as c0..c2499 (the same text before the numbers, the last "
                          f"number >= the first), found {kind(raw)}")
        return None
    (prefix, lo), (_, hi) = ends
    if count is None:
        p.add(f"{f}.count", f"missing: `ids: {cut(raw)}` stands for {hi - lo + 1:,} clients; add `count: {hi - lo + 1}`")
        return None
    if hi - lo + 1 != count:
        p.add(f"{f}.ids", f"{cut(raw)} names {hi - lo + 1:,} clients but count is {count:,}; make them agree")
        return None
    return [f"{prefix}{n}" for n in range(lo, hi + 1)]


def read_clients(raw_clients, p: Problems) -> tuple[list[ClientPlan], list[int]]:
    """The expanded clients of a plan's `clients:` list and, for each, the index of its entry in the file."""
    clients: list[ClientPlan] = []
    entries: list[int] = []
    if raw_clients is None or raw_clients == []:
        p.add("clients", "missing: a list of clients with device, split_layer and ranks")
        return clients, entries
    if not isinstance(raw_clients, list):
        p.add("clients", f"must be a list of clients (each item starts with `- `), found {kind(raw_clients)}")
        return clients, entries
    for i, c in enumerate(raw_clients):
        f = f"clients[{i}]"
        if not isinstance(c, dict):
            p.add(f, f"must be a mapping with device, split_layer, ranks, found {kind(c)}")
            continue
        for key in c:
            if key not in CLIENT_FIELDS:
                p.add(f"{f}.{cut(str(key))}", f"unknown field; expected {', '.join(CLIENT_FIELDS)}")
        split = whole(c.get("split_layer"), f"{f}.split_layer", p, minimum=1, maximum=2 ** 31 - 1,
                      what=" (the client runs blocks [0, split_layer))")
        ranks = c.get("ranks") or {}
        if not isinstance(ranks, dict):
            p.add(f"{f}.ranks", f"must be a mapping module name -> rank, found {kind(ranks)}")
            ranks = {}
        clean = {}
        for k, v in ranks.items():
            r = whole(v, f"{f}.ranks.{cut(str(k))}", p, minimum=0, maximum=2 ** 31 - 1)
            if r is not None:
                clean[str(k)] = r
        weight = number(c.get("data_weight", 1.0), f"{f}.data_weight", p, positive=True)
        for key in ("id", "device"):
            if c.get(key) is not None and not isinstance(c[key], (str, int)) or isinstance(c.get(key), bool):
                p.add(f"{f}.{key}", f"must be text, found {kind(c[key])}")
        predicted = c.get("predicted")
        if predicted is not None and not isinstance(predicted, dict):
            p.add(f"{f}.predicted", f"must be a mapping (written by `hsplit plan`), found {kind(predicted)}")
            predicted = None
        ids = _ids_of(c, f, len(clients), p)
        if ids is None:
            continue
        if len(clients) + len(ids) > MAX_PLAN_CLIENTS:
            p.add("clients", f"more than {MAX_PLAN_CLIENTS:,} clients in all (the counts together); plan a "
                             "smaller fleet")
            break
        proto = ClientPlan(id=ids[0], device=str(c.get("device") or ""), split_layer=split or 0, ranks=clean,
                           data_weight=weight or 1.0, predicted=dict(predicted or {}))
        clients.append(proto)
        clients.extend(replace(proto, id=cid) for cid in ids[1:])       # shares ranks and predicted
        entries.extend([i] * len(ids))
    ids = {}
    for k, c in enumerate(clients):
        ids.setdefault(c.id, []).append(k)
    twice = [(cid, where) for cid, where in ids.items() if len(where) > 1]
    for cid, where in twice[:5]:
        at = [f"clients[{entries[k]}]" for k in where]
        more = f" and {len(at) - 3} more" if len(at) > 3 else ""
        p.add("clients", f"client ids must be unique: id {short(cid)} is used by {', '.join(at[:3])}{more}; "
                         "rename or remove the `id:`/`ids:` fields (default c0, c1, ...)")
    if len(twice) > 5:
        p.add("clients", f"... and {len(twice) - 5:,} more ids used twice")
    return clients, entries
