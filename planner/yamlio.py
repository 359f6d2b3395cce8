"""YAML reading with file-named errors, content hashes, and atomic writes (temp file + rename)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hsplit.planner.errors import ConfigError

# libyaml's C loader/dumper when available: large plans (thousands of clients) load and save ~10x faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping; a missing file, a syntax error or a non-mapping is one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["file not found: check the path"])
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["top level must be a mapping of fields (key: value)"])
    return data


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def output_problem(path: Path, flag: str | None = None, *, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or, with `folder`, used as a folder), prefixed with
    `flag` when given; None if it can. The CLI checks its outputs with it before any work."""
    path = Path(path)
    why = None
    if folder:
        if path.exists() and not path.is_dir():
            why = f"{path} is an existing file, but this must be a folder; give a folder path " \
                  f"(e.g. {path.with_suffix('')}-out/)"
    elif path.is_dir():
        why = f"{path} is a directory; give a file path inside it (e.g. {path / 'plan.yaml'})"
    if why is None:
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    why = f"{parent} is a file, so {path} cannot be created inside it; choose another path"
                break
    return None if why is None else f"{flag}: {why}" if flag else why


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    if problem := output_problem(path):
        raise ConfigError("output", [problem])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dump_yaml(data: dict[str, Any], header: str = "") -> str:
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return (header.rstrip() + "\n" if header else "") + body


def number(value: Any, field: str, problems, *, minimum: float | None = None,
           positive: bool = False, required: bool = True) -> float | None:
    """Validate a numeric field into `problems`; returns the float or None."""
    if value is None:
        if required:
            problems.add(field, "missing: add a number")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e9)"
            except ValueError:
                pass
        problems.add(field, f"must be a number, got {value!r}{hint}")
        return None
    value = float(value)
    if positive and value <= 0:
        problems.add(field, f"must be > 0, got {value:g}")
        return None
    if minimum is not None and value < minimum:
        problems.add(field, f"must be >= {minimum:g}, got {value:g}")
        return None
    return value
