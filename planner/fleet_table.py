"""Fleet inventories as tables: a fleet's `clients:` entry `- table: devices.csv` (or .parquet) lists one
client per row, the way device inventories are exported.

    clients:
      - table: devices.csv          # beside the fleet file (a relative path is read from its folder)

    id,device,memory_gib,peak_flops.fp32,uplink_mbps,downlink_mbps,budget.round_s,data_weight
    phone-0001,snapdragon-8-gen3-phone,7.1,1.9e12,35,120,400,1.3
    board-0002,,6.0,1.2e12,40,100,500,0.8      # no device: an inline profile (name, kind, ... columns)

Columns (every one optional but `device` or the inline profile's `name`, `kind`, `memory_gib`, `peak_flops.*`,
`uplink_mbps`, `downlink_mbps`; an empty cell is "not given"):
  id                              the client's id in plans (default c<position>); unique, no `..`
  device                          a shipped device name or a profile path: the row's profile
  name, kind, memory_gib, memory_total_gib, efficiency, peak_flops.<dtype>, flops.<dtype>
                                  profile fields: with `device`, they replace that profile's values (the row's
                                  own measurement); without, they are the row's whole profile
  uplink_mbps, downlink_mbps      the row's links (in place of the profile's)
  data_weight, budget.round_s, budget.memory_gib, splits.min, splits.max   as in a YAML client group
Each row is checked with exactly the rules of a YAML client group (planner/fleet.py group_from_entry); a
problem names the table, the row (1 = the first data row) and the column. docs/file-formats.md, "Fleet".
"""
from __future__ import annotations

import math
from pathlib import Path

from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.yamlio import cut, is_file, kind, short

TABLE_SUFFIXES = (".csv", ".parquet")
GROUP_COLUMNS = ("data_weight", "budget.round_s", "budget.memory_gib", "splits.min", "splits.max")
LINK_COLUMNS = ("uplink_mbps", "downlink_mbps")
PROFILE_COLUMNS = ("name", "kind", "memory_gib", "memory_total_gib", "efficiency")
PROFILE_TABLES = ("peak_flops", "flops")      # peak_flops.fp32, ...
MAX_ROWS = 1_000_000


def _columns_problem(columns) -> list[str]:
    bad = []
    for c in columns:
        head, _, tail = str(c).partition(".")
        if c in ("id", "device") or c in GROUP_COLUMNS or c in LINK_COLUMNS or c in PROFILE_COLUMNS \
                or (head in PROFILE_TABLES and tail):
            continue
        bad.append(str(c))
    return bad


def read_table(path: Path):
    """The table as a pandas DataFrame of Python objects (numbers stay numbers, empty cells None)."""
    import pandas as pd
    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    return df


def _cell(v):
    """A cell as YAML would give it: None for empty, numbers for numeric text, else the text."""
    if v is None:
        return None
    if type(v) is float:                      # parquet numbers: as they are (NaN = empty)
        return None if math.isnan(v) else v
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()
    if isinstance(v, str):
        t = v.strip()
        if t == "":
            return None
        try:
            return int(t)
        except ValueError:
            pass
        try:
            return float(t)
        except ValueError:
            return t
    return v


def row_entry(row: dict) -> dict:
    """A row as the YAML client group it stands for ({device, id, data_weight, budget, links, splits})."""
    entry: dict = {}
    profile: dict = {}
    for col, raw in row.items():
        v = _cell(raw)
        if v is None:
            continue
        head, _, tail = col.partition(".")
        if col == "id":
            entry["id"] = v if isinstance(v, str) else str(v)
        elif col == "device":
            entry["device"] = v
        elif col == "data_weight":
            entry["data_weight"] = v
        elif head == "budget":
            entry.setdefault("budget", {})[tail] = v
        elif head == "splits":
            entry.setdefault("_splits", {})[tail] = v
        elif col in LINK_COLUMNS:
            entry[col] = v
            profile[col] = v
        elif head in PROFILE_TABLES:
            profile.setdefault(head, {})[tail] = v
        else:
            profile[col] = v
    if "_splits" in entry:
        sp = entry.pop("_splits")
        entry["splits"] = [sp.get("min", sp.get("max")), sp.get("max", sp.get("min"))]
    entry["_profile"] = profile
    return entry


def table_groups(spec: dict, f: str, p: Problems, source: str, base_dir, group_from_entry) -> list:
    """The client groups (one per row) of a `- table: FILE` entry; problems go to `p`, naming FILE, the row
    and the column. `group_from_entry` is planner/fleet.py's check of one YAML client group (passed in by
    fleet.py, which imports this module: imports run one way)."""
    from hsplit.planner.device import DeviceProfile
    for key in spec:
        if key != "table":
            p.add(f"{f}.{cut(str(key))}", "unknown field; a table entry is only `table: FILE` (.csv or .parquet): "
                                          "every client's fields are the table's columns")
    ref = spec["table"]
    if not isinstance(ref, str) or not ref.lower().endswith(TABLE_SUFFIXES):
        p.add(f"{f}.table", f"must be a .csv or .parquet file name beside the fleet file, found {kind(ref)}")
        return []
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not is_file(path):
        p.add(f"{f}.table", f"file not found: {cut(str(path), 300)} (a relative path is read from the fleet file's "
                            "folder); check the path")
        return []
    name = Path(ref).name
    try:
        df = read_table(path)
    except (OSError, ValueError, ImportError) as e:      # pandas/pyarrow: unreadable or not a table
        p.add(f"{f}.table", f"{name}: cannot be read as a {path.suffix.lower()[1:]} table: {cut(str(e), 200)}")
        return []
    bad = _columns_problem(df.columns)
    if bad:
        p.add(f"{f}.table", f"{name}: unknown column{'s' * (len(bad) > 1)} {', '.join(short(b) for b in bad[:5])}; "
                            "expected id, device, data_weight, budget.round_s, budget.memory_gib, splits.min, "
                            "splits.max, uplink_mbps, downlink_mbps, name, kind, memory_gib, memory_total_gib, "
                            "efficiency, peak_flops.<dtype>, flops.<dtype>")
        return []
    if len(df) == 0:
        p.add(f"{f}.table", f"{name} has no rows: add one row per client")
        return []
    if len(df) > MAX_ROWS:
        p.add(f"{f}.table", f"{name} has {len(df):,} rows, more than the {MAX_ROWS:,} clients hsplit plans")
        return []
    groups = []
    devices: dict = {}               # shipped profiles by name, read once
    base_dicts: dict = {}            # a shipped profile's fields, by name: each row overrides a copy
    columns = list(df.columns)
    for r, values in enumerate(df.itertuples(index=False, name=None), start=1):
        where = f"{name} row {r}"
        rp = Problems(source)
        entry = row_entry(dict(zip(columns, values)))
        profile = entry.pop("_profile")
        ref_dev = entry.get("device")
        if ref_dev is None:
            if not profile:
                rp.add("ROW", "no device: give the `device` column (a shipped name or profile path) or the inline "
                              "profile's columns (name, kind, memory_gib, peak_flops.fp32, uplink_mbps, downlink_mbps)")
            else:
                profile.setdefault("name", entry.get("id", f"row-{r}"))
                entry["device"] = profile
        elif set(profile) - set(LINK_COLUMNS):            # the named profile, with this row's measurements
            base = devices.get(ref_dev) if isinstance(ref_dev, str) else None
            if base is None and isinstance(ref_dev, str) and ref_dev not in devices:
                group_from_entry({"device": ref_dev}, "ROW", rp, source, base_dir, devices)
                base = devices.get(ref_dev)
            entry.pop("device")
            if base is not None:
                if ref_dev not in base_dicts:
                    base_dicts[ref_dev] = base.to_dict()
                merged = dict(base_dicts[ref_dev])
                for k, v in profile.items():
                    merged[k] = {**(merged.get(k) or {}), **v} if isinstance(v, dict) else v
                try:
                    entry["device"] = DeviceProfile.from_dict(merged, source, prefix="ROW.device.")
                except ConfigError as e:        # fields ROW.device.<column>
                    rp.items.extend(e.problems)
        if rp.items:
            p.items.extend(_at_row(rp.items, where))
            continue
        entry_dev = entry.get("device")
        if isinstance(entry_dev, DeviceProfile):     # a profile checked above: passed by the name ""
            entry["device"] = ""                               # (device_ref "": the fleet writes the profile)
            g = group_from_entry(entry, "ROW", rp, source, base_dir, {"": entry_dev})
        else:
            g = group_from_entry(entry, "ROW", rp, source, base_dir, devices)
        if rp.items:
            p.items.extend(_at_row(rp.items, where))
            continue
        if g is not None:
            groups.append(g)
    return groups


def _at_row(items: list[str], where: str) -> list[str]:
    """`ROW.budget.round_s: msg` -> `devices.csv row 7, column budget.round_s: msg` (device.X -> column X)."""
    out = []
    for item in items:
        field, _, msg = item.partition(": ")
        col = field[len("ROW."):] if field.startswith("ROW.") else ""
        if col.startswith("device."):
            col = col[len("device."):]
        if col == "splits":
            col = "splits.min, splits.max"
        out.append(f"{where}, column {col}: {msg}" if col else f"{where}: {msg}")
    return out
