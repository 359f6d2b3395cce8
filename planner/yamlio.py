"""YAML reading with file-named errors, content hashes, and atomic writes (temp file + rename).

Every hsplit input file is read by `read_yaml`, with one loader (`Loader`) that:
  - reads numbers as people write them: `5.0e13`, `1e12`, `2E10`, `2e-4` are floats (YAML 1.2 and
    Python's float() agree; PyYAML's YAML 1.1 would read them as text). `.nan` and `.inf` still load as
    floats, and the field checks (`number`, `whole`) refuse them: every numeric field must be finite;
  - refuses a key written twice in one mapping, naming both lines (YAML 1.1 silently keeps the last);
  - refuses a file that is not UTF-8 text, naming the file and the position of the first bad byte.
`dump_yaml` writes with the same resolver, so a string that the loader would read as a number
(a device named `1e5`) is quoted and reads back as the same string.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hsplit.planner.errors import ConfigError

# libyaml's C parser/emitter when available: large plans (thousands of clients) load and save ~10x faster.
# The resolver (which plain scalars are numbers) and the constructor are Python in both, so the
# subclasses below behave the same with or without libyaml.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BaseDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.1's floats (a dot required, sexagesimal, .inf/.nan) plus YAML 1.2 / Python's float() forms:
# an exponent without a dot or with an unsigned exponent (1e12, 5.0e13, 2E10, 2e-4), a signed leading dot.
_FLOAT_RE = re.compile(r"""^(?:
    [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
  | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN)
)$""", re.X)


def _with_floats(resolvers: dict) -> dict:
    """A copy of a resolver table with the float rule replaced by _FLOAT_RE (checked first, as in PyYAML)."""
    out = {}
    for first, rules in resolvers.items():
        out[first] = [(tag, rx) for tag, rx in rules if tag != FLOAT_TAG]
    for first in "-+0123456789.":
        out[first] = [(FLOAT_TAG, _FLOAT_RE)] + out.get(first, [])
    return out


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first_line: int, second_line: int):
        self.key, self.first_line, self.second_line = key, first_line, second_line
        super().__init__(f"duplicate key {key!r} at lines {first_line} and {second_line}")


class Loader(_BaseLoader):
    """hsplit's YAML loader: YAML 1.2 floats, duplicate keys refused (see the module docstring)."""
    yaml_implicit_resolvers = _with_floats(_BaseLoader.yaml_implicit_resolvers)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":     # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:           # an unhashable key: the constructor reports it
                    continue
        return super().construct_mapping(node, deep=deep)


class Dumper(_BaseDumper):
    """Writes what Loader reads back unchanged (strings that look like YAML 1.2 floats are quoted)."""
    yaml_implicit_resolvers = _with_floats(_BaseDumper.yaml_implicit_resolvers)


def is_file(path: str | Path) -> bool:
    """Path.is_file() that says False, instead of raising, for names the OS refuses (too long, NUL bytes)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: str | Path) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def path_text_problem(value: Any) -> str | None:
    """Why `value` cannot be a file name or path on this OS (None if it can): text, one line, no NUL byte,
    each part at most 255 characters (a longer one is an OS error, not a missing file)."""
    if not isinstance(value, str) or not value:
        return f"must be a name or path, found {kind(value)}"
    if "\x00" in value or "\n" in value:
        return f"must be one line of text without NUL bytes, got {short(value)}"
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in re.split(r"[/\\]", value)):
        return f"each part of a name or path must be at most 255 bytes, got {short(value)}"
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping; a missing file, bytes that are not UTF-8, a syntax error, a duplicate key
    or a non-mapping is one ConfigError naming the file."""
    path = Path(path)
    if not is_file(path):
        raise ConfigError(cut(str(path)), ["file not found: check the path"])
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file: {e.strerror or e}"]) from None
    return parse_yaml(raw, str(path))


def parse_yaml(raw: bytes | str, source: str) -> dict[str, Any]:
    """read_yaml on bytes or text already read; `source` names it in errors."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError(source, [f"not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} (offset "
                                       f"{e.start}) cannot be decoded; save the file as UTF-8"]) from None
    else:
        text = raw
    try:
        data = yaml.load(text, Loader=Loader)
    except DuplicateKey as e:
        field = e.key if isinstance(e.key, str) else short(e.key)
        raise ConfigError(source, [f"{cut(field)}: written twice in one mapping (lines {e.first_line} and "
                                   f"{e.second_line}); keep one"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"not valid YAML: {cut(str(e), 400)}"]) from None
    except RecursionError:
        raise ConfigError(source, ["not valid YAML: nested too deeply"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [f"top level must be a mapping of fields (key: value), found {kind(data)}"])
    return data


def kind(value: Any) -> str:
    """What a YAML value is, in words, for `expected X, found Y` messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, dict):
        return "a mapping (key: value)"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return f"the text {short(value)}"
    if isinstance(value, (int, float)):
        return f"the number {short(value)}"
    return f"a {type(value).__name__}"


def cut(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters with its length said when longer."""
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def short(value: Any, limit: int = 60) -> str:
    """repr of a value echoed in a message, cut when long (a whole file pasted into a field)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return cut(text, limit)


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


class Lines(str):
    """Text that dump_yaml writes as a literal block (`|`), one item a line: the devices of a grouped plan."""


def _literal(dumper, text):
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(text), style="|")


Dumper.add_representer(Lines, _literal)


def dump_yaml(data: dict[str, Any], header: str = "", flow_lists: bool = False) -> str:
    """YAML text of `data` (block style; with `flow_lists`, lists of plain values on one line: [1, 2, 3])."""
    body = yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=None if flow_lists else False,
                     width=100)
    return (header.rstrip() + "\n" if header else "") + body


def _as_number(value: Any) -> float | None:
    """A finite or non-finite float from what a person writes (int, float, or text float() reads),
    None when it is no number at all."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:            # an int too large for a float
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def number(value: Any, field: str, problems, *, minimum: float | None = None, maximum: float | None = None,
           positive: bool = False, required: bool = True) -> float | None:
    """Validate a numeric field into `problems`; returns the float or None. Accepts what Python's float()
    accepts (1e12, 2e-4, 5.0e13, also as text); refuses NaN and infinities and values out of range."""
    if value is None:
        if required:
            problems.add(field, "missing: add a number")
        return None
    x = _as_number(value)
    if x is None:
        problems.add(field, f"must be a number (e.g. 0.5, 2e-4, 1.0e12), found {kind(value)}")
        return None
    if not math.isfinite(x):
        problems.add(field, f"must be a finite number, got {short(value)}")
        return None
    if positive and x <= 0:
        problems.add(field, f"must be > 0, got {x:g}")
        return None
    if minimum is not None and x < minimum:
        problems.add(field, f"must be >= {minimum:g}, got {x:g}")
        return None
    if maximum is not None and x > maximum:
        problems.add(field, f"must be <= {maximum:g}, got {x:g}")
        return None
    return x


def whole(value: Any, field: str, problems, *, minimum: int | None = 0, maximum: int | None = None,
          required: bool = True, default: int | None = None, what: str = "") -> int | None:
    """Validate a whole-number field into `problems`; returns the int or None. `4`, `4.0`, `1e3` and the
    text "4" are whole numbers; 2.5, NaN, true and out-of-range values are refused."""
    if value is None:
        if required:
            problems.add(field, "missing: add a whole number")
        return default
    x = _as_number(value)
    ok = x is not None and math.isfinite(x) and x == int(x)
    rng = (f" in {minimum}..{maximum}" if minimum is not None and maximum is not None else
           f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else "")
    if not ok:
        problems.add(field, f"must be a whole number{rng}{what}, found {kind(value)}")
        return None
    n = int(value) if isinstance(value, int) and not isinstance(value, bool) else int(x)
    if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        problems.add(field, f"must be a whole number{rng}{what}, got {n:,}")
        return None
    return n
