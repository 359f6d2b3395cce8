"""Helpers every part of the runtime shares (the lowest runtime module: imports nothing of hsplit.runtime).

    seed = derive_seed(plan_seed, 3, round, client, step)   # all randomness of a run derives from the seed
    lr = lr_at(step, total_steps, base, warmup, "cosine")   # the learning-rate schedule
    device = pick_device("auto")                            # the one check of --device
    GLOBAL                                                  # the global adapter's name in the AdapterBank
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hsplit.planner.errors import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GLOBAL = "global"          # the adapter that holds the aggregated model (strategies that keep one)


def compute_dtype(plan_dtype: str, device: torch.device, override: str = "auto") -> torch.dtype | None:
    """Autocast dtype for the simulation (None = fp32).

    `auto` follows the plan's dtype, except on a CPU without native bf16/fp16 matmuls (no AVX512-BF16
    or AMX), where low-precision autocast is emulated and ~8x slower than fp32: there it computes in fp32.
    Master weights are always fp32 (merged updates are exact); the dtype only affects compute.
    """
    name = plan_dtype if override == "auto" else override
    if name not in DTYPES:
        raise ConfigError("--compute-dtype", [f"must be auto, fp32, bf16 or fp16, got {override!r}"])
    if override == "auto" and device.type == "cpu" and name != "fp32" and not _cpu_has_fast_bf16():
        return None
    return DTYPES[name]


def _cpu_has_fast_bf16() -> bool:
    cpu = getattr(torch._C, "_cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return bool(cpu) and any(getattr(cpu, c, lambda: False)() for c in checks)


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    """Warm-up (linear from base/warmup) then constant, linear or cosine decay towards 0."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    """The torch device for --device auto | cpu | cuda[:N]; the one check of that flag (run, eval,
    profile), made before anything is loaded: a bad or unavailable device is a ConfigError."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"--device {name}", ["use auto, cpu or cuda"])
    if not torch.cuda.is_available():
        why = "this torch is CPU-only" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"--device {name}", [f"CUDA is not available ({why}); use --device cpu or auto"])
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}", [f"only {torch.cuda.device_count()} CUDA device(s) are visible "
                                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); use --device cuda"])
    return torch.device(name)


def predicted_round(c) -> float | None:
    """A plan client's predicted round time in seconds (None when the plan has none)."""
    v = c.predicted.get("round_s")
    return float(v) if isinstance(v, (int, float)) else None
