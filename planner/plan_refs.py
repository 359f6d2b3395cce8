"""Where a plan's inputs are: data, model and fleet references as `hsplit plan` writes them (relative to the
plan file's folder) and as the runtime reads them, and Hugging Face dataset ids with a config and a split.

    resolve_data_path("data/train.jsonl", plan_dir)     # -> an absolute path (read from the plan's folder)
    hub_parts("nyu-mll/glue:sst2:validation")            # -> ("nyu-mll/glue", "sst2", "validation")
"""
from __future__ import annotations

import os
import re
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".md")

_HUB_RE = re.compile(r"(?P<name>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<config>[\w.-]+))?(?::(?P<split>[\w.\[\]%:-]+))?")


def looks_like_hub_id(ref: str) -> bool:
    """`owner/name`, optionally `:CONFIG` and `:SPLIT` (`nyu-mll/glue:sst2`, `nyu-mll/glue:sst2:validation`),
    that is not a data file name: read as a Hugging Face dataset id when no such path exists."""
    m = _HUB_RE.fullmatch(ref)
    return m is not None and not m.group("name").lower().endswith(DATA_SUFFIXES)


def hub_parts(ref: str) -> tuple[str, str | None, str | None]:
    """`owner/name[:config[:split]]` -> (owner/name, config or None, split or None); the split defaults to
    `train` (else the first split) where it is read."""
    m = _HUB_RE.fullmatch(ref)
    if m is None:
        return ref, None, None
    return m.group("name"), m.group("config"), m.group("split")


def resolve_data_path(ref: str, base_dir: str | Path) -> str:
    """data.path as the runtime reads it: a relative path is read from `base_dir` (the plan file's folder),
    made absolute; `shakespeare`, absolute paths and dataset ids that are no local path stay as written."""
    if ref == "shakespeare" or not ref:
        return ref
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p)
    local = Path(base_dir).resolve() / p
    if not local.exists() and looks_like_hub_id(ref):
        return ref
    return os.path.normpath(local)


def written_data_path(ref: str, plan_file: str | Path) -> str:
    """data.path as `hsplit plan` writes it: a relative local path given on the command line (relative to the
    current folder) becomes relative to the plan file's folder; an absolute one stays absolute (`~` expanded);
    anything else is written as given."""
    if ref == "shakespeare":
        return ref
    p = Path(ref).expanduser()
    if not p.exists():
        return ref
    if p.is_absolute():
        return str(p)
    return os.path.relpath(p.resolve(), Path(plan_file).resolve().parent)


def _model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() or (p.is_file() and p.suffix == ".json")


def resolve_model_ref(ref: str, base_dir: str | Path) -> str:
    """`model:` as the runtime reads it: a relative path to a local model folder (or config.json) is read
    from `base_dir` (the plan file's folder), made absolute; shipped names, hub ids, absolute paths, and a
    relative path that is no model folder there (a plan written before paths were plan-relative: read from
    the current folder) stay as written."""
    p = Path(ref).expanduser()
    if not ref or p.is_absolute():
        return ref
    local = Path(os.path.normpath(Path(base_dir).resolve() / p))
    return str(local) if _model_folder(local) else ref


def written_model_ref(ref: str, plan_file: str | Path) -> str:
    """`model:` as `hsplit plan` writes it: a relative path to a local model folder given on the command line
    (relative to the current folder) becomes relative to the plan file's folder, as data.path; absolute
    paths, shipped names and hub ids are written as given."""
    p = Path(ref).expanduser()
    if not ref or p.is_absolute() or not _model_folder(p):
        return ref
    return os.path.relpath(p.resolve(), Path(plan_file).resolve().parent)


def resolve_fleet_ref(ref, base_dir: str | Path):
    """inputs.fleet as the runtime and `hsplit plan --check` read it: a relative path to a fleet file next to
    the plan (relative to its folder) made absolute; anything else (absolute paths, shipped names, an older
    plan's path relative to the current folder) as written."""
    if not isinstance(ref, str) or not ref or Path(ref).is_absolute():
        return ref
    local = Path(os.path.normpath(Path(base_dir).resolve() / ref))
    return str(local) if local.is_file() else ref


def written_fleet_ref(ref: str, plan_file: str | Path) -> str:
    """inputs.fleet as `hsplit plan` writes it: a relative fleet path (from the current folder) becomes
    relative to the plan file's folder; absolute paths (shipped fleets among them) are written as given."""
    p = Path(ref)
    if not ref or p.is_absolute() or not p.is_file():
        return ref
    return os.path.relpath(p.resolve(), Path(plan_file).resolve().parent)
