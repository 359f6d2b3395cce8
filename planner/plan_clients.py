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
from hsplit.planner.yamlio import Lines, cut, kind, number, short, whole

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


# ---- the grouped form: one `allocations:` entry per distinct (split_layer, ranks) ----
#
# A fleet of all-different devices has one `clients:` entry per client (no two are equal), yet its clients
# fall into few allocations (split_layer and ranks). `Plan.save` writes such a plan as
#
#     allocations:
#       - split_layer: 12
#         ranks: {model.layers.0.self_attn.q_proj: 8, ...}
#         count: 3
#         ids: [c0..c9, c15]         # ids and first..last ranges, in client order within the allocation
#         device: jetson-orin-nano-8gb        # one value when every client of the entry has it, else a list
#         data_weight: [1.2, 0.7, ...]
#         predicted: {memory_gib: 5.1, round_s: 612.3, ...}   # shared values; a value that differs among the
#                                                             # entry's clients is its worst case (WORST)
#         per_client: {round_s: [...], step_s: [...]}         # PER_CLIENT values that differ, in `ids` order
#
# and `Plan.load` expands it into one ClientPlan per client, in the order of the fleet (`order:` is not
# needed: clients are sorted back by their position, the `at` list when the ids are not c<position>).
# docs/file-formats.md, "Plan", "Grouped plans", has the format.

ALLOCATION_FIELDS = ("split_layer", "ranks", "count", "ids", "at", "device", "data_weight", "predicted",
                     "per_client")
PER_CLIENT = ("round_s", "step_s")        # predicted values kept per client (the runtime reads them)
# a predicted value that differs among an allocation's clients and is not kept per client: its worst case
WORST_MIN = ("memory_budget_gib",)        # smallest is worst; every other number: largest
GROUPED_ABOVE = 64                        # a plan with more `clients:` entries than this may be written grouped


def _id_items(ids: list[str]) -> list[str]:
    """ids as `first..last` runs (counting up by one) and single ids."""
    out, i = [], 0
    while i < len(ids):
        first, j = _numbered(ids[i]), i + 1
        if first is not None:
            while j < len(ids) and _numbered(ids[j]) == (first[0], first[1] + j - i):
                j += 1
        out.append(ids[i] if j - i == 1 else f"{ids[i]}..{ids[j - 1]}")
        if j - i == 2:                          # two ids: a list of two reads better than a range
            out[-1:] = [ids[i], ids[i + 1]]
        i = j
    return out


_BLOCK_NAME = re.compile(r"^(?P<prefix>.+)\.(?P<block>0|[1-9][0-9]*)\.(?P<suffix>.+)$")   # model.layers.3.mlp.up_proj


def ranks_by_block(ranks: dict[str, int]) -> dict[str, Any]:
    """`{model.layers.*.self_attn.q_proj: [8, 8, 0, 4]}` (the rank in block 0, 1, ...; 0 = no adapter) for the
    full names of a client's ranks; a name that is not `prefix.N.suffix` (or a rank 0) is kept as written."""
    rows: dict[str, dict[int, int]] = {}
    out: dict[str, Any] = {}
    for name, r in ranks.items():
        m = _BLOCK_NAME.match(name)
        if m is None or "*" in name or r == 0:
            out[name] = r
            continue
        rows.setdefault(f"{m.group('prefix')}.*.{m.group('suffix')}", {})[int(m.group("block"))] = r
    for key, row in rows.items():
        out[key] = [row.get(b, 0) for b in range(max(row) + 1)]
    return out


def _ranks_of(raw, f: str, p: Problems) -> dict[str, int]:
    """A `ranks:` mapping: full or shorthand names -> rank, and `prefix.*.suffix` -> [rank in block 0, 1, ...]."""
    clean: dict[str, int] = {}
    if not isinstance(raw, dict):
        p.add(f, f"must be a mapping module name -> rank, found {kind(raw)}")
        return clean
    for k, v in raw.items():
        key = str(k)
        if isinstance(v, list):
            if key.count(".*.") != 1:
                p.add(f"{f}.{cut(key)}", "a list of ranks (one per block) goes with a name such as "
                                         "model.layers.*.self_attn.q_proj (`*` stands for the block number)")
                continue
            prefix, suffix = key.split(".*.")
            for b, x in enumerate(v):
                r = whole(x, f"{f}.{cut(key)}[{b}]", p, minimum=0, maximum=2 ** 31 - 1)
                if r:
                    clean[f"{prefix}.{b}.{suffix}"] = r
            continue
        r = whole(v, f"{f}.{cut(key)}", p, minimum=0, maximum=2 ** 31 - 1)
        if r is not None:
            clean[key] = r
    return clean


def _numbers_text(values) -> str:
    """Numbers as one line of text, space-separated (read back exactly: repr of a float round-trips)."""
    return " ".join(repr(float(v)) if isinstance(v, float) else str(v) for v in values)


def _one_or_list(values: list):
    first = values[0]
    return first if all(v == first for v in values) else list(values)


def allocation_entries(clients: list[ClientPlan]) -> list[dict[str, Any]] | None:
    """The `allocations:` list (see above), or None when the clients cannot be written so (an id with `..`,
    which would read back as a range)."""
    if any(".." in c.id or not c.id or any(ch.isspace() for ch in c.id) for c in clients):
        return None
    groups: dict[tuple, list[int]] = {}
    for k, c in enumerate(clients):
        key = (c.split_layer, id(c.ranks))
        if key not in groups:
            key2 = (c.split_layer, tuple(sorted(c.ranks.items())))
            groups.setdefault(key2, [])
            groups[key] = groups[key2]
        groups[key].append(k)
    seen, out = set(), []
    for members in groups.values():
        if id(members) in seen:
            continue
        seen.add(id(members))
        cs = [clients[k] for k in members]
        ids = [c.id for c in cs]
        entry: dict[str, Any] = {"split_layer": cs[0].split_layer, "ranks": ranks_by_block(cs[0].ranks),
                                 "count": len(cs), "ids": " ".join(_id_items(ids))}
        if ids != [f"c{k}" for k in members]:       # positions in the fleet, when the ids do not say them
            entry["at"] = " ".join(_id_items([str(k) for k in members]))
        devices = _one_or_list([c.device for c in cs])
        entry["device"] = Lines("\n".join(devices) + "\n") if isinstance(devices, list) else devices
        weights = _one_or_list([c.data_weight for c in cs])
        entry["data_weight"] = _numbers_text(weights) if isinstance(weights, list) else weights
        keys = list(dict.fromkeys(k for c in cs for k in c.predicted))
        shared, per = {}, {}
        distinct = {id(c.predicted): c.predicted for c in cs}
        for key in keys:
            vals = [c.predicted.get(key) for c in cs] if len(distinct) > 1 else [cs[0].predicted.get(key)]
            if all(v == vals[0] for v in vals):
                shared[key] = vals[0]
            elif key in PER_CLIENT and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                per[key] = _numbers_text(vals)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                shared[key] = min(vals) if key in WORST_MIN else max(vals)
            else:
                shared[key] = vals[0]            # text (time_model): the first client's
        entry["predicted"] = shared
        if per:
            entry["per_client"] = per
        out.append(entry)
    return out


def _expand_items(raw, f: str, p: Problems, what: str) -> list[str] | None:
    """Ids and `first..last` ranges (text separated by spaces, or a list), expanded."""
    if isinstance(raw, str):
        raw = raw.split()
    if not isinstance(raw, list) or not raw:
        p.add(f, f"must be a list of {what} and `first..last` ranges such as [c0..c99, c105], found {kind(raw)}")
        return None
    out: list[str] = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            p.add(f, f"every item must be an id or a `first..last` range, found {kind(item)}")
            return None
        text = str(item)
        m = _RANGE.match(text)
        if m is None:
            out.append(text)
            continue
        ends = (_numbered(m.group("first")), _numbered(m.group("last")))
        if None in ends or ends[0][0] != ends[1][0] or ends[1][1] < ends[0][1]:
            p.add(f, f"{cut(text)} must be `first..last` such as c0..c99 (the same text before the numbers, the "
                     "last number >= the first)")
            return None
        (prefix, lo), (_, hi) = ends
        if hi - lo + 1 > MAX_PLAN_CLIENTS:
            p.add(f, f"{cut(text)} names more than {MAX_PLAN_CLIENTS:,} clients")
            return None
        out.extend(f"{prefix}{n}" for n in range(lo, hi + 1))
    return out


def _column(raw, count: int, f: str, p: Problems, check, many=None) -> list | None:
    """One value for every client (a single value) or a list of `count` values, each passed through check;
    `many` turns text into such a list (numbers separated by spaces; devices one a line)."""
    if isinstance(raw, str) and many is not None:         # one value per client, as text (numbers / lines)
        raw = many(raw)
    vals = raw if isinstance(raw, list) else [raw] * count
    if len(vals) != count:
        p.add(f, f"has {len(vals):,} values for {count:,} clients; give one value or one per client")
        return None
    first = len(p.items)
    out = [check(v) for v in vals] if isinstance(raw, list) else [check(raw)] * count
    return None if len(p.items) > first else out


def _split_numbers(text: str):
    """`1.5 0.7 2.0` -> a list of its items (one per client); a single number stays one value."""
    items = text.split()
    return items if len(items) > 1 else text


def read_allocations(raw_allocs, p: Problems) -> tuple[list[ClientPlan], list[int]]:
    """The expanded clients of a plan's `allocations:` list, in fleet order, and each one's entry index."""
    if not isinstance(raw_allocs, list) or not raw_allocs:
        p.add("allocations", f"must be a non-empty list of allocations (split_layer, ranks, ids), found "
                             f"{kind(raw_allocs)}")
        return [], []
    placed: list[tuple[int, ClientPlan, int]] = []
    for i, a in enumerate(raw_allocs):
        f = f"allocations[{i}]"
        if not isinstance(a, dict):
            p.add(f, f"must be a mapping with split_layer, ranks, count, ids, found {kind(a)}")
            continue
        for key in a:
            if key not in ALLOCATION_FIELDS:
                p.add(f"{f}.{cut(str(key))}", f"unknown field; expected {', '.join(ALLOCATION_FIELDS)}")
        first = len(p.items)
        split = whole(a.get("split_layer"), f"{f}.split_layer", p, minimum=1, maximum=2 ** 31 - 1,
                      what=" (the client runs blocks [0, split_layer))")
        clean = _ranks_of(a.get("ranks") or {}, f"{f}.ranks", p)
        count = whole(a.get("count"), f"{f}.count", p, minimum=1, maximum=MAX_PLAN_CLIENTS,
                      what=" (clients of this allocation)")
        ids = _expand_items(a.get("ids"), f"{f}.ids", p, "client ids")
        if ids is not None and count is not None and len(ids) != count:
            p.add(f"{f}.ids", f"names {len(ids):,} clients but count is {count:,}; make them agree")
        if len(p.items) > first or count is None or ids is None:
            continue
        at = None
        if "at" in a:
            at_text = _expand_items(a["at"], f"{f}.at", p, "positions")
            if at_text is None:
                continue
            if not all(t.isdigit() for t in at_text) or len(at_text) != count:
                p.add(f"{f}.at", f"must list {count:,} positions (whole numbers >= 0) of these clients in the fleet")
                continue
            at = [int(t) for t in at_text]
        else:
            at = []
            for cid in ids:
                m = _numbered(cid)
                if m is None or m[0] != "c":
                    p.add(f"{f}.at", f"missing: the ids are not c<position> ({short(cid)}); list the clients' "
                                     "positions in the fleet, e.g. `at: [0..9, 15]`")
                    at = None
                    break
                at.append(m[1])
            if at is None:
                continue

        def _text(v, ff=f"{f}.device"):
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                p.add(ff, f"must be text, found {kind(v)}")
                return ""
            return str(v)

        devices = _column(a.get("device", ""), count, f"{f}.device", p, _text,
                          many=lambda t: t.splitlines() if "\n" in t else t)
        weights = _column(a.get("data_weight", 1.0), count, f"{f}.data_weight", p,
                          lambda v: number(v, f"{f}.data_weight", p, positive=True), many=_split_numbers)
        predicted = a.get("predicted") or {}
        if not isinstance(predicted, dict):
            p.add(f"{f}.predicted", f"must be a mapping (written by `hsplit plan`), found {kind(predicted)}")
            predicted = {}
        per = a.get("per_client") or {}
        columns = {}
        if not isinstance(per, dict):
            p.add(f"{f}.per_client", f"must be a mapping predicted value -> list (one per client), found {kind(per)}")
        else:
            for key, vals in per.items():
                ff = f"{f}.per_client.{cut(str(key))}"
                col = _column(vals if isinstance(vals, (list, str)) else [vals], count, ff, p,
                              lambda v, ff=ff: number(v, ff, p), many=lambda t: t.split())
                if col is not None:
                    columns[str(key)] = col
        if devices is None or weights is None or len(p.items) > first:
            continue
        shared = dict(predicted)
        for j, (cid, pos) in enumerate(zip(ids, at)):
            pred = shared if not columns else {**shared, **{k: v[j] for k, v in columns.items()}}
            placed.append((pos, ClientPlan(id=cid, device=devices[j], split_layer=split, ranks=clean,
                                           data_weight=weights[j], predicted=pred), i))
    total = len(placed)
    if total > MAX_PLAN_CLIENTS:
        p.add("allocations", f"more than {MAX_PLAN_CLIENTS:,} clients in all; plan a smaller fleet")
        return [], []
    placed.sort(key=lambda t: t[0])
    positions = [t[0] for t in placed]
    if positions != list(range(total)) and not p.items:
        dup = sorted({a for a, b in zip(positions, positions[1:]) if a == b})
        missing = sorted(set(range(total)) - set(positions))
        if dup:
            p.add("allocations", f"position {dup[0]} (client {placed[positions.index(dup[0])][1].id}) is in two "
                                 "allocations; every client is in exactly one")
        else:
            p.add("allocations", f"the allocations' clients must be the positions 0..{total - 1} of the fleet; "
                                 f"position {missing[0] if missing else '?'} is missing")
    clients = [c for _, c, _ in placed]
    entries = [e for _, _, e in placed]
    seen: set[str] = set()
    for c, e in zip(clients, entries):
        if c.id in seen:
            p.add("allocations", f"client ids must be unique: id {short(c.id)} is used twice (allocations[{e}])")
            break
        seen.add(c.id)
    return clients, entries
