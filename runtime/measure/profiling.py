"""Device profiling (`hsplit profile`): measure this machine and write a device profile YAML.

    prof = profile_device("my-laptop", model="smollm2-135m", batch_size=4, seq_len=64)
    save_profile(prof, "profiles/devices/my-laptop.yaml")     # loads with DeviceProfile.load

Measured: sustained matmul throughput per dtype (fp32, bf16, fp16 where the backend runs them; on
CUDA when a GPU is present), usable memory, and optionally the time of one transformer block of a
model at a (batch, seq_len): forward, backward with frozen weights (input gradients only), the LoRA
cost per adapter parameter, the embeddings and the head (norm + LM head + loss, forward + backward).
Every number is the median of `repetitions` timed runs after `warmup` untimed ones; the spread is
the interquartile range relative to the median. Links are not measured: `uplink_mbps` and
`downlink_mbps` are what the caller gives (recorded as such in `notes`).

Matmul throughput is FLOPs / time over a fixed mix of shapes (`SHAPES_CPU` / `SHAPES_GPU`: token
count x d_in x d_out like a small model's projections, plus one square matmul), i.e. the sustained
rate of LoRA-training-sized GEMMs, not the datasheet peak.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable

import torch

from hsplit.planner.device import DeviceProfile
from hsplit.planner.yamlio import atomic_write_text, dump_yaml

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES_CPU = ((512, 576, 1536), (512, 1536, 576), (512, 576, 576), (1024, 1024, 1024))
SHAPES_GPU = ((4096, 4096, 11008), (4096, 11008, 4096), (4096, 4096, 4096), (8192, 8192, 8192))
HEADER = "# Device profile: measured by `hsplit profile`; used by `hsplit plan --fleet ...` (docs/file-formats.md)."


def timed(fn: Callable[[], object], warmup: int, reps: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of `reps` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def summary(samples: list[float]) -> dict:
    """median, quartiles and relative IQR spread of timing samples (seconds)."""
    s = sorted(samples)
    med = statistics.median(s)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25, p75 = s[0], s[-1]
    return {"median_s": med, "p25_s": p25, "p75_s": p75, "min_s": s[0], "max_s": s[-1], "n": len(s),
            "spread": (p75 - p25) / med if med > 0 else 0.0}


def matmul_throughput(dtype: str, device: str = "cpu", shapes=None, warmup: int = 2, reps: int = 7,
                      max_seconds: float = 20.0) -> dict | None:
    """Sustained FLOP/s of `dtype` matmuls over a mix of shapes; None when the backend cannot run it."""
    shapes = shapes or (SHAPES_GPU if device.startswith("cuda") else SHAPES_CPU)
    dt = DTYPES[dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    try:
        pairs = [(torch.randn(m, k, generator=gen).to(device=device, dtype=dt),
                  torch.randn(k, n, generator=gen).to(device=device, dtype=dt)) for m, k, n in shapes]
        torch.matmul(*pairs[0])
    except (RuntimeError, TypeError):
        return None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # Slow dtypes (bf16/fp16 without hardware support run at ~1 GFLOP/s): shrink the token
    # dimension so that the measurement stays within max_seconds; the shapes used are recorded.
    a, b = pairs[-1]
    t0 = time.perf_counter()
    torch.matmul(a, b)
    sync()
    rate = 2.0 * a.shape[0] * a.shape[1] * b.shape[1] / max(time.perf_counter() - t0, 1e-9)
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    if flops * (warmup + reps) / rate > max_seconds:
        scale = max(flops * (warmup + reps) / rate / max_seconds, 1.0)
        shapes = tuple((max(16, int(m / scale)), k, n) for m, k, n in shapes)
        pairs = [(x[:m], y) for (x, y), (m, _, _) in zip(pairs, shapes)]
        flops = sum(2.0 * m * k * n for m, k, n in shapes)

    def run():
        for a, b in pairs:
            torch.matmul(a, b)
    st = summary(timed(run, warmup, reps, sync))
    return {"flops": flops / st["median_s"], "spread": round(st["spread"], 4),
            "flops_min": flops / st["max_s"], "flops_max": flops / st["min_s"], "repetitions": reps,
            "shapes": [list(s) for s in shapes]}


def memory_info(device: str = "cpu") -> tuple[float, float, str]:
    """(total GiB, usable GiB, how): CUDA free/total; CPU: MemAvailable, capped by a cgroup limit."""
    gib = 2 ** 30
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        return total / gib, free / gib, "torch.cuda.mem_get_info (free)"
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    total, avail, how = info["MemTotal"], info.get("MemAvailable", info["MemFree"]), "/proc/meminfo MemAvailable"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < total:
            used = 0
            for cur in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(open(cur).read().strip())
                    break
                except (OSError, ValueError):
                    pass
            total, avail, how = int(raw), min(avail, int(raw) - used), f"cgroup limit {path}"
        break
    return total / gib, avail / gib, how


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def block_times(model_ref: str, batch_size: int, seq_len: int, *, rank: int = 8, warmup: int = 1, reps: int = 5,
                device: str = "cpu", blocks: int | None = None, lm=None,
                on_step: Callable[[], None] | None = None) -> dict:
    """Per-block forward / frozen-weight backward seconds, LoRA seconds per adapter parameter,
    embeddings and head (+ loss) seconds, of `model_ref` at (batch_size, seq_len), fp32.

    Blocks are timed as a run of `blocks` consecutive blocks (default min(L, 4)) through the split
    runtime's own code path (SplitLM), divided by their number. LoRA: the same run with rank-`rank`
    adapters on every adaptable module, minus the frozen run, per adapter parameter."""
    from hsplit.runtime.models.lora import get_peft_model

    from hsplit.runtime.models.lora import lora_config
    from hsplit.runtime.models.causal_lm import SplitLM, lm_loss, load_lm

    lm = lm or load_lm(model_ref, progress=False)
    model, profile = lm.model.to(device), lm.profile
    for p in model.parameters():
        p.requires_grad_(False)
    n = blocks or min(profile.layers, 4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, profile.vocab, (batch_size, seq_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def tick(fn):
        def run():
            fn()
            if on_step:
                on_step()
        return run

    def measure(split):
        h0 = torch.randn(batch_size, seq_len, profile.hidden, generator=gen).to(device)

        def fwd():
            with torch.no_grad():
                split._run_blocks(h0, mask, 0, n)

        def fwd_bwd():
            h = h0.detach().requires_grad_(True)
            out = split._run_blocks(h, mask, 0, n)
            out.backward(torch.ones_like(out))
        f = summary(timed(tick(fwd), warmup, reps, sync))
        fb = summary(timed(tick(fwd_bwd), warmup, reps, sync))
        return f, fb

    split = SplitLM(model, profile.family)
    f, fb = measure(split)

    def embed():
        with torch.no_grad():
            split.embed(ids)

    def head():
        h = torch.randn(batch_size, seq_len, profile.hidden, generator=gen, device=device, requires_grad=True)
        loss, _ = lm_loss(split.lm_head(split.final_norm(h)), ids)
        loss.backward()
    e = summary(timed(tick(embed), warmup, reps, sync))
    hd = summary(timed(tick(head), warmup, reps, sync))
    ranks = {profile.module_name(l, m): rank for l in range(n) for m in profile.family.default_modules}
    peft_model = get_peft_model(model, lora_config(ranks, 2.0, 0.0, profile.family))
    lsplit = SplitLM(peft_model.base_model.model, profile.family)
    lf, lfb = measure(lsplit)
    widths = sum(a + b for a, b in profile.module_shapes().values())
    params = rank * widths * n
    lora_s = max(0.0, lfb["median_s"] - fb["median_s"]) / params
    peft_model.unload()
    return {
        "model": profile.name, "model_hash": profile.arch_hash(), "batch_size": batch_size, "seq_len": seq_len,
        "dtype": "fp32", "device": device, "blocks_timed": n, "repetitions": reps, "warmup": warmup,
        "forward_s": f["median_s"] / n, "backward_s": max(0.0, fb["median_s"] - f["median_s"]) / n,
        "embed_s": e["median_s"], "head_s": hd["median_s"],
        "lora_rank_timed": rank, "lora_s_per_param": lora_s,
        "spread": {"forward": round(f["spread"], 4), "forward_backward": round(fb["spread"], 4),
                   "head": round(hd["spread"], 4), "lora_forward_backward": round(lfb["spread"], 4)},
    }


def profile_device(name: str, *, model: str | None = None, batch_size: int = 4, seq_len: int = 64,
                   dtypes=("fp32", "bf16", "fp16"), warmup: int = 2, reps: int = 7, block_reps: int = 5,
                   uplink_mbps: float = 1000.0, downlink_mbps: float = 1000.0, device: str | None = None,
                   on_step: Callable[[str], None] | None = None) -> dict:
    """Measure this machine and return a device-profile mapping (validated by DeviceProfile)."""
    from hsplit.runtime.common import pick_device       # the one --device check (ConfigError), before measuring
    device = str(pick_device(device or "auto"))
    flops, details = {}, {}
    for dt in dtypes:
        if on_step:
            on_step(f"matmul {dt}")
        r = matmul_throughput(dt, device, warmup=warmup, reps=reps)
        if r is not None:
            flops[dt] = float(f"{r['flops']:.4g}")
            details[dt] = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items() if k != "flops"}
    total, usable, how = memory_info(device)
    measured = {
        "by": "hsplit profile", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(), "device": device,
        "processor": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "warmup": warmup, "repetitions": reps, "statistic": "median; spread = IQR / median",
        "matmul": details, "memory_from": how,
    }
    if model:
        if on_step:
            on_step(f"blocks of {model}")
        timed = [{k: (float(f"{v:.5g}") if isinstance(v, float) else v)
                  for k, v in block_times(model, batch_size, seq_len, device=device, reps=block_reps, warmup=1).items()}]
    data = {"name": name, "kind": "gpu" if device.startswith("cuda") else "cpu",
            "memory_total_gib": round(total, 2), "memory_gib": round(min(usable, total), 2),
            "flops": flops, "uplink_mbps": uplink_mbps, "downlink_mbps": downlink_mbps,
            "measured": measured, **({"block_times": timed} if model else {}),
            "notes": (f"measured on {measured['processor']} with {measured['threads']} threads; memory_gib = "
                      f"memory available when measured ({how}); links not measured (given: "
                      f"--uplink-mbps {uplink_mbps:g}, --downlink-mbps {downlink_mbps:g})")}
    DeviceProfile.from_dict(data, f"<profile {name}>")        # validates
    return data


def save_profile(data: dict, path) -> None:
    atomic_write_text(path, dump_yaml(data, HEADER))
