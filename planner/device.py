"""Device profiles (profiles/devices/*.yaml): memory, throughput per dtype, links.

A shipped profile records the datasheet `peak_flops` and an `efficiency` factor; the planning
throughput is `peak_flops[dtype] * efficiency`. A profile written by `hsplit profile` records the
measured sustained `flops` instead (with a `measured:` block), which then takes precedence.
A dtype missing from both is an error (no silent default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.yamlio import kind as kind_of
from hsplit.planner.yamlio import cut, is_file, number, read_yaml, short, whole

KINDS = ("cpu", "gpu", "soc", "phone")
MAX_NAME = 100           # characters in a device name (it is echoed in tables and plan files)
DTYPES = ("fp32", "bf16", "fp16")
PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class BlockTimes:
    """Measured seconds per training step of one model's parts on this device (`hsplit profile --model`),
    at batch `batch_size` x `seq_len` tokens. The planner scales them linearly in tokens (b*T)."""
    model: str
    model_hash: str
    batch_size: int
    seq_len: int
    dtype: str
    forward_s: float          # one block, forward
    backward_s: float         # one block, backward with frozen weights (input gradients)
    lora_s_per_param: float   # LoRA forward + backward, per adapter parameter
    embed_s: float            # embedding lookup
    head_s: float             # final norm + LM head + loss, forward and backward
    extra: dict = field(default_factory=dict)  # how it was measured (repetitions, blocks timed, ...)

    FIELDS = ("model", "model_hash", "batch_size", "seq_len", "dtype", "forward_s", "backward_s",
              "lora_s_per_param", "embed_s", "head_s")

    def scale(self, batch_size: int, seq_len: int) -> float:
        return (batch_size * seq_len) / (self.batch_size * self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.FIELDS}, **self.extra}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str
    memory_gib: float
    uplink_mbps: float
    downlink_mbps: float
    peak_flops: dict[str, float] = field(default_factory=dict)
    efficiency: float | None = None
    flops: dict[str, float] = field(default_factory=dict)  # measured sustained FLOP/s
    memory_total_gib: float | None = None
    source: str | None = None
    measured: dict[str, Any] | None = None
    notes: str | None = None
    block_times: tuple[BlockTimes, ...] = ()

    def block_times_for(self, model_hash: str, dtype: str) -> BlockTimes | None:
        """Measured block times for this model and dtype, if this profile has them."""
        for bt in self.block_times:
            if bt.model_hash == model_hash and bt.dtype == dtype:
                return bt
        return None

    def throughput(self, dtype: str) -> float:
        """Planning throughput in FLOP/s for `dtype`: measured if present, else peak * efficiency."""
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype in self.peak_flops and self.efficiency is not None:
            return self.peak_flops[dtype] * self.efficiency
        have = sorted(set(self.flops) | set(self.peak_flops))
        raise ConfigError(f"device {self.name}", [
            f"flops.{dtype}: no throughput for dtype {dtype} (profile has {', '.join(have) or 'none'}); "
            f"measure it with `hsplit profile` or plan with --dtype {have[0] if have else 'fp32'}"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.memory_total_gib is not None:
            out["memory_total_gib"] = self.memory_total_gib
        out["memory_gib"] = self.memory_gib
        if self.peak_flops:
            out["peak_flops"] = dict(self.peak_flops)
        if self.efficiency is not None:
            out["efficiency"] = self.efficiency
        if self.flops:
            out["flops"] = dict(self.flops)
        out["uplink_mbps"] = self.uplink_mbps
        out["downlink_mbps"] = self.downlink_mbps
        for key in ("source", "measured", "notes"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.block_times:
            out["block_times"] = [bt.to_dict() for bt in self.block_times]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str, prefix: str = "") -> "DeviceProfile":
        p = Problems(source)
        known = {"name", "kind", "memory_gib", "memory_total_gib", "peak_flops", "efficiency", "flops",
                 "uplink_mbps", "downlink_mbps", "source", "measured", "notes", "block_times"}
        for key in data:
            if key not in known:
                p.add(prefix + key, f"unknown field; expected one of {', '.join(sorted(known))}")
        name = data.get("name")
        if name is None or name == "":
            p.add(prefix + "name", "missing: give the device a name (e.g. jetson-orin-nano-8gb)")
        elif not isinstance(name, str):
            p.add(prefix + "name", f"must be text (e.g. jetson-orin-nano-8gb), found {kind_of(name)}")
        elif len(name) > MAX_NAME or "\n" in name:
            p.add(prefix + "name", f"must be one line of at most {MAX_NAME} characters, got {short(name)}")
        kind = data.get("kind")
        if kind not in KINDS:
            p.add(prefix + "kind", f"must be one of {', '.join(KINDS)}, got {short(kind)}")
        mem = number(data.get("memory_gib"), prefix + "memory_gib", p, positive=True)
        total = number(data.get("memory_total_gib"), prefix + "memory_total_gib", p, positive=True, required=False)
        if mem and total and mem > total:
            p.add(prefix + "memory_gib", f"usable memory {mem:g} GiB exceeds memory_total_gib {total:g}")
        up = number(data.get("uplink_mbps"), prefix + "uplink_mbps", p, positive=True)
        down = number(data.get("downlink_mbps"), prefix + "downlink_mbps", p, positive=True)
        tables, given = {}, {}
        for key in ("peak_flops", "flops"):
            given[key] = data.get(key) is not None
            raw = data.get(key) or {}
            if not isinstance(raw, dict):
                p.add(prefix + key, f"must be a mapping dtype -> FLOP/s, e.g. {{fp32: 1.0e12}}, found {kind_of(raw)}")
                raw = {}
            table = {}
            for dt, val in raw.items():
                if dt not in DTYPES:
                    p.add(f"{prefix}{key}.{dt}", f"unknown dtype; use one of {', '.join(DTYPES)}")
                    continue
                v = number(val, f"{prefix}{key}.{dt}", p, positive=True)
                if v:
                    table[dt] = v
            tables[key] = table
        eff = number(data.get("efficiency"), prefix + "efficiency", p, positive=True, required=False)
        if eff is not None and eff > 1:
            p.add(prefix + "efficiency", f"is sustained/peak and must be <= 1, got {eff:g}")
            eff = None
        # "missing" only when the fields are absent: an invalid value already has its own problem.
        if not given["flops"] and not given["peak_flops"]:
            p.add(prefix + "flops", "missing: give measured `flops` or datasheet `peak_flops` with `efficiency`")
        if given["peak_flops"] and data.get("efficiency") is None and not given["flops"]:
            p.add(prefix + "efficiency", "missing: peak_flops needs an efficiency factor (docs/file-formats.md)")
        measured = data.get("measured")
        if measured is not None and not isinstance(measured, dict):
            p.add(prefix + "measured", f"must be a mapping (written by `hsplit profile`), found {kind_of(measured)}")
        for key in ("source", "notes"):
            if data.get(key) is not None and not isinstance(data[key], str):
                p.add(prefix + key, f"must be text, found {kind_of(data[key])}")
        block_times = _block_times(data.get("block_times"), prefix, p)
        p.raise_if_any()
        return cls(name=name, kind=kind, memory_gib=mem, uplink_mbps=up, downlink_mbps=down,
                   peak_flops=tables["peak_flops"], efficiency=eff, flops=tables["flops"],
                   memory_total_gib=total, source=data.get("source"), measured=measured,
                   notes=data.get("notes"), block_times=block_times)

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        return cls.from_dict(read_yaml(path), str(path))


def _block_times(raw, prefix: str, p: Problems) -> tuple[BlockTimes, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        p.add(prefix + "block_times", "must be a list of measurements (written by `hsplit profile --model`), "
                                      f"found {kind_of(raw)}")
        return ()
    out = []
    for i, entry in enumerate(raw):
        f = f"{prefix}block_times[{i}]"
        if not isinstance(entry, dict):
            p.add(f, f"must be a mapping (model, model_hash, batch_size, ...), found {kind_of(entry)}")
            continue
        missing = [k for k in BlockTimes.FIELDS if k not in entry]
        if missing:
            p.add(f, f"missing {', '.join(missing)}; re-run `hsplit profile --model ...`")
            continue
        before = len(p.items)
        vals = {k: number(entry[k], f"{f}.{k}", p, minimum=0.0) for k in BlockTimes.FIELDS[5:]}
        shape = {k: whole(entry[k], f"{f}.{k}", p, minimum=1) for k in ("batch_size", "seq_len")}
        if entry["dtype"] not in DTYPES:
            p.add(f"{f}.dtype", f"must be one of {', '.join(DTYPES)}, got {short(entry['dtype'])}")
        for k in ("model", "model_hash"):
            if not isinstance(entry[k], str) or not entry[k]:
                p.add(f"{f}.{k}", f"must be text (written by `hsplit profile --model`), found {kind_of(entry[k])}")
        if len(p.items) > before:
            continue
        out.append(BlockTimes(model=entry["model"], model_hash=entry["model_hash"],
                              batch_size=shape["batch_size"], seq_len=shape["seq_len"], dtype=entry["dtype"],
                              extra={k: v for k, v in entry.items() if k not in BlockTimes.FIELDS}, **vals))
    return tuple(out)


def shipped_device_names() -> list[str]:
    return sorted(p.stem for p in (PROFILE_DIR / "devices").glob("*.yaml"))


def resolve_device(ref: str, base_dir: Path | None = None) -> DeviceProfile:
    """A device by shipped name, or by path (relative to the fleet file's folder)."""
    candidates = []
    if base_dir is not None:
        candidates += [base_dir / ref, base_dir / f"{ref}.yaml"]
    candidates += [Path(ref), PROFILE_DIR / "devices" / f"{ref}.yaml"]
    for c in candidates:
        if is_file(c):
            return DeviceProfile.load(c)
    if "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml")):  # meant as a path
        resolved = base_dir / ref if base_dir is not None else Path(ref)
        try:
            resolved = resolved.resolve()
        except (OSError, ValueError):
            pass
        where = " (a relative path is read from the fleet file's folder)" if base_dir is not None else ""
        raise DeviceNotFound(f"device {short(ref)}", [f"file not found: {cut(str(resolved), 300)}{where}; "
                                                      "check the path"])
    raise DeviceNotFound(f"device {short(ref)}", [
        f"no profile named {short(ref)}; shipped: {', '.join(shipped_device_names())}; "
        "or give a path to a profile YAML, or an inline mapping"])


class DeviceNotFound(ConfigError):
    """resolve_device found no profile by that name or path (one problem: what was looked for)."""
