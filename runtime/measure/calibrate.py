"""Calibration (`hsplit calibrate`): the planner's predicted step times next to measured ones.

    res = calibrate("smollm2-135m", "profiles/devices/this-machine.yaml", batch_size=4, seq_len=64)
    res.write_csv("calibration.csv"); res.plot("calibration.png")

For a handful of split points s spread over 1..L-1 (`default_splits`; every one with splits="all") and a
few LoRA ranks r, on this machine:

- predicted, from the planner (hsplit.planner.instance.build_instance with a one-client fleet whose
  client and server are the measured device): client seconds per step = `cls.step(s, s, P) -
  cls.step0` (compute only, the link part removed) with P = r * s * sum_j (d_in + d_out) (rank r on
  every planned matrix of the client's blocks, so all s blocks are back-propagated), server seconds
  per step = `inst.server_step_s[s]` with server rank r;
- predicted from the profile's measured per-block times (the profile's top-level `block_times`, when present):
  client = embed + s*(forward + backward) + P*lora_per_param, server = (L-s)*(forward + backward)
  + (L-s)*r*sum_j w_j*lora_per_param + head -- the refinement proposed to the planner;
- measured: one LoRA training step of the real model (rank r on every module of every block; the
  client's adapters on blocks [0, s), the server's on [s, L)), timed in parts: client = embeddings
  + blocks [0, s) forward + backward through them from the cut gradient; server = blocks [s, L) +
  norm + head + loss forward and backward to the cut. Optimizer steps are not timed (the planner
  does not model them). Median of `repetitions` after warm-up; repetitions are interleaved across
  splits so that a change in machine load spreads over all splits instead of biasing some.

Error = (predicted - measured) / measured. Spread of a point = (max - min) / median of its repetitions;
`assess` says when the spread is too large for the errors to mean anything (docs/measurement.md).
"""
from __future__ import annotations

import csv
import io
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hsplit.planner.device import DeviceProfile
from hsplit.planner.errors import ConfigError
from hsplit.planner.fleet import Fleet
from hsplit.planner.instance import build_instance
from hsplit.planner.plan import Training
from hsplit.planner.yamlio import atomic_write_text

COLUMNS = ("split", "rank", "predicted_client_s", "measured_client_s", "error_client",
           "predicted_server_s", "measured_server_s", "error_server",
           "blocks_client_s", "blocks_error_client", "blocks_server_s", "blocks_error_server",
           "flops_client_s", "flops_error_client", "flops_server_s", "flops_error_server",
           "spread_client", "spread_server")


DEFAULT_SPLITS = 5       # split points timed by default, spread over the model's blocks
SPREAD_LIMIT = 0.25      # a point's repetitions may differ by this share of their median before it is noisy
MIN_REPS = 3             # fewer repetitions cannot show a spread


def default_splits(layers: int, n: int = DEFAULT_SPLITS) -> list[int]:
    """`n` split points evenly spread over 1..L-1, both ends included (every one when there are fewer)."""
    top = layers - 1
    if top <= n:
        return list(range(1, top + 1))
    return sorted({round(1 + i * (top - 1) / (n - 1)) for i in range(n)})


def assess(rows: list[dict], reps: int, median_abs_error: float | None) -> dict:
    """Whether the measurements can judge the planner: the spread of every point's repetitions (client and
    server), against SPREAD_LIMIT and against the median |error| being reported. `warnings` says what is
    wrong and what to do; `trusted` is False when the errors cannot be told from measurement noise."""
    spreads = [(r[f"spread_{part}"], r["split"], r["rank"], part) for r in rows for part in ("client", "server")
               if r.get(f"spread_{part}") is not None]
    out: dict = {"spread_limit": SPREAD_LIMIT, "trusted": True, "warnings": []}
    if not spreads:
        return out
    worst = max(spreads)
    median = statistics.median(s for s, *_ in spreads)
    noisy = [x for x in spreads if x[0] > SPREAD_LIMIT]
    out.update(median_spread=median, worst_spread=worst[0], noisy_points=len(noisy), points=len(spreads))
    advice = ("re-run on an idle machine (stop other jobs; --threads 1 steadies the timings) with more "
              "repetitions (--repetitions 7)")
    where = f"split {worst[1]}, rank {worst[2]}, {worst[3]}"
    if reps < MIN_REPS:
        out["trusted"] = False
        out["untrusted_because"] = f"{reps} repetition{'s' * (reps != 1)} per point cannot show the timings' spread"
        out["warnings"].append(f"{reps} repetition{'s' * (reps != 1)} per point cannot show how much the timings "
                               f"vary, so the errors above cannot be judged; use --repetitions {MIN_REPS + 2} or more")
    elif median > SPREAD_LIMIT:
        out["trusted"] = False
        out["warnings"].append(
            f"the timings are too noisy to judge the planner: a point's repetitions differ by {median:.0%} of their "
            f"median (median over the points; worst {worst[0]:.0%}, at {where}), above the {SPREAD_LIMIT:.0%} limit "
            f"for {len(noisy)} of {len(spreads)}; the errors above cannot be trusted: {advice}")
    elif median_abs_error is not None and median > median_abs_error:
        out["trusted"] = False
        out["warnings"].append(
            f"the median error ({median_abs_error:.0%}) is smaller than the timings' own spread ({median:.0%} median, "
            f"worst {worst[0]:.0%}): the measurements cannot tell it from noise; {advice}")
    elif noisy:
        out["warnings"].append(f"{len(noisy)} of {len(spreads)} points vary by more than {SPREAD_LIMIT:.0%} between "
                               f"repetitions (worst {worst[0]:.0%}, at {where}): their errors cannot be trusted; "
                               f"{advice}")
    return out


def planner_label(settings: dict) -> str:
    """What the planner's prediction is made of for this profile (docs/formulation.md)."""
    return "per-block profile times" if settings.get("block_times_used") else "FLOPs / throughput"


@dataclass
class Calibration:
    rows: list[dict]
    settings: dict
    summary: dict = field(default_factory=dict)

    def write_csv(self, path) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
        atomic_write_text(path, buf.getvalue())

    def plot(self, path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from hsplit.planner.plots import _save

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        label = planner_label(self.settings)
        for ax, part in zip(axes, ("client", "server")):
            for rank in sorted({r["rank"] for r in self.rows}):
                rows = sorted((r for r in self.rows if r["rank"] == rank), key=lambda r: r["split"])
                xs = [r["split"] for r in rows]
                line, = ax.plot(xs, [r[f"measured_{part}_s"] for r in rows], "o-", ms=3, label=f"measured r={rank}")
                ax.plot(xs, [r[f"predicted_{part}_s"] for r in rows], "--", color=line.get_color(),
                        label=f"planner ({label}) r={rank}")
                if rows and rows[0].get(f"flops_{part}_s") is not None:
                    ax.plot(xs, [r[f"flops_{part}_s"] for r in rows], ":", color=line.get_color(),
                            label=f"FLOPs model alone r={rank}")
            ax.set_title(f"{part} seconds per step")
            ax.set_xlabel("split point s (client runs blocks [0, s))")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("seconds")
        axes[1].legend(fontsize=7)
        s = self.settings
        because = self.summary.get("untrusted_because") or \
            f"repetitions differ by {self.summary.get('median_spread', 0):.0%} (median)"
        noisy = "" if self.summary.get("trusted", True) else f"\nNOT TRUSTED: {because}, see the warning"
        fig.suptitle(f"{s['model']} b={s['batch_size']} T={s['seq_len']} on {s['device']}: "
                     f"planner median |err| {self.summary['median_abs_error']:.0%}, worst {self.summary['worst_abs_error']:.0%}"
                     + noisy, fontsize=10, color="black" if not noisy else "firebrick")
        _save(fig, Path(path))           # temporary file + rename; closes the figure


def _errors(rows, prefix_pred: str) -> list[float]:
    out = []
    for r in rows:
        for part in ("client", "server"):
            p = r.get(f"{prefix_pred}_{part}_s")
            m = r[f"measured_{part}_s"]
            if p is not None and m > 0:
                out.append((p - m) / m)
    return out


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key, prefix in (("", "predicted"), ("blocks_", "blocks"), ("flops_", "flops")):
        errs = _errors(rows, prefix)
        if not errs:
            continue
        worst = max(errs, key=abs)
        out[f"{key}median_abs_error"] = statistics.median(abs(e) for e in errs)
        out[f"{key}worst_abs_error"] = abs(worst)
        out[f"{key}worst_signed_error"] = worst
        out[f"{key}mean_signed_error"] = statistics.fmean(errs)
        for part in ("client", "server"):
            pe = [(r[f"{prefix}_{part}_s"] - r[f"measured_{part}_s"]) / r[f"measured_{part}_s"]
                  for r in rows if r.get(f"{prefix}_{part}_s") is not None]
            out[f"{key}median_abs_error_{part}"] = statistics.median(abs(e) for e in pe)
            out[f"{key}worst_abs_error_{part}"] = max(abs(e) for e in pe)
    return out


def predicted_times(device: DeviceProfile, model_profile, batch_size: int, seq_len: int, rank: int, dtype: str = "fp32",
                    block_times: bool = True):
    """[(client_s, server_s)] for s = 0..L from the planner's cost model (one client, server = device); with
    block_times=False the profile's measured block times are left out (the FLOPs / throughput model)."""
    dev = device.to_dict()
    if not block_times:
        dev.pop("block_times", None)
    fleet = Fleet.from_dict({"name": "calibrate", "server": {"device": dev}, "clients": [{"device": dev, "count": 1}]},
                            "<calibrate>")
    inst = build_instance(fleet, model_profile, ranks=(0, rank), training=Training(
        batch_size=batch_size, seq_len=seq_len, local_steps=1, dtype=dtype), server_rank=rank)
    cls = inst.classes[0]
    width = int(inst.widths.sum())
    out = []
    for s in range(model_profile.layers + 1):
        P = rank * s * width
        out.append((cls.step(s, s, P) - cls.link_s, float(inst.server_step_s[s])))
    return out, width


def block_model_times(bt, L: int, s: int, rank: int, width: int) -> tuple[float, float]:
    """The per-block model (what the planner uses when a profile has block_times): seconds per step
    from measured block times at the same (b, T). `bt` is a hsplit.planner.device.BlockTimes."""
    fb = bt.forward_s + bt.backward_s
    client = bt.embed_s + s * fb + rank * s * width * bt.lora_s_per_param
    server = (L - s) * fb + (L - s) * rank * width * bt.lora_s_per_param + bt.head_s
    return client, server


def calibrate(model_ref: str, profile_path, *, batch_size: int = 4, seq_len: int = 64, ranks=(8,),
              splits=None, extra_ranks=(), extra_splits=None, reps: int = 3, warmup: int = 1,
              on_step: Callable[[int, int], None] | None = None, lm=None) -> Calibration:
    """Measure and predict every (split, rank); `ranks` at every split in `splits` (default: DEFAULT_SPLITS
    points spread over 1..L-1, `default_splits`; "all": every split 1..L-1), `extra_ranks` only at
    `extra_splits` (default: 1, L/2, L-1)."""
    from hsplit.runtime.models.lora import get_peft_model

    from hsplit.runtime.models.lora import lora_config
    from hsplit.runtime.models.causal_lm import SplitLM, lm_loss, load_lm

    device = DeviceProfile.load(profile_path)
    lm = lm or load_lm(model_ref, progress=False)
    profile = lm.profile
    L = profile.layers
    splits = list(range(1, L) if splits == "all" else splits or default_splits(L))
    extra_splits = list(extra_splits or sorted({1, L // 2, L - 1}))
    bad = [s for s in splits + extra_splits if not 1 <= s <= L - 1]
    if bad:
        raise ConfigError("--splits", [f"split points must be in 1..{L - 1} for {profile.name}, got {bad}"])
    bt = device.block_times_for(profile.arch_hash(), "fp32")
    if bt and (bt.batch_size, bt.seq_len) != (batch_size, seq_len):
        bt = None                                    # measured at another shape: not compared here
    jobs = [(s, r) for r in ranks for s in splits] + [(s, r) for r in extra_ranks for s in extra_splits
                                                       if (s, r) not in {(a, b) for b in ranks for a in splits}]
    by_rank: dict[int, list] = {}
    for s, r in jobs:
        by_rank.setdefault(r, []).append(s)
    total = sum(len(v) * reps + warmup for v in by_rank.values())
    done = 0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, profile.vocab, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    model = lm.model
    for p in model.parameters():
        p.requires_grad_(False)
    samples: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for r, ss in by_rank.items():
        names = {profile.module_name(l, m): r for l in range(L) for m in profile.family.default_modules}
        peft_model = get_peft_model(model, lora_config(names, 2.0, 0.0, profile.family))
        peft_model.train()
        split = SplitLM(peft_model.base_model.model, profile.family)

        def step(s):
            t0 = time.perf_counter()
            h = split.client_forward(ids, mask, s)
            t1 = time.perf_counter()
            hs = h.detach().requires_grad_(True)
            loss, _ = lm_loss(split.server_forward(hs, mask, s), ids)
            loss.backward()
            t2 = time.perf_counter()
            h.backward(hs.grad)
            t3 = time.perf_counter()
            peft_model.zero_grad(set_to_none=True)
            return (t1 - t0) + (t3 - t2), t2 - t1
        for _ in range(warmup):
            step(ss[len(ss) // 2])
            done += 1
            if on_step:
                on_step(done, total)
        for _ in range(reps):
            for s in ss:
                samples.setdefault((s, r), []).append(step(s))
                done += 1
                if on_step:
                    on_step(done, total)
        peft_model.unload()
    rows = []
    flops_pred = {r: predicted_times(device, profile, batch_size, seq_len, r, block_times=False)[0]
                  for r in by_rank} if bt else {}
    for r in sorted(by_rank):
        pred, width = predicted_times(device, profile, batch_size, seq_len, r)
        for s in sorted(by_rank[r]):
            smp = samples[(s, r)]
            mc = statistics.median(c for c, _ in smp)
            ms = statistics.median(v for _, v in smp)
            pc, ps = pred[s]
            row = {"split": s, "rank": r, "predicted_client_s": pc, "measured_client_s": mc,
                   "error_client": (pc - mc) / mc, "predicted_server_s": ps, "measured_server_s": ms,
                   "error_server": (ps - ms) / ms,
                   "spread_client": (max(c for c, _ in smp) - min(c for c, _ in smp)) / mc,
                   "spread_server": (max(v for _, v in smp) - min(v for _, v in smp)) / ms}
            if bt:
                bc, bs = block_model_times(bt, L, s, r, width)
                row.update(blocks_client_s=bc, blocks_error_client=(bc - mc) / mc, blocks_server_s=bs,
                           blocks_error_server=(bs - ms) / ms)
                fc, fs = flops_pred[r][s]
                row.update(flops_client_s=fc, flops_error_client=(fc - mc) / mc, flops_server_s=fs,
                           flops_error_server=(fs - ms) / ms)
            rows.append(row)
    settings = {"model": profile.name, "model_hash": profile.arch_hash(), "profile": str(profile_path),
                "device": device.name, "batch_size": batch_size, "seq_len": seq_len, "dtype": "fp32",
                "repetitions": reps, "warmup": warmup, "threads": torch.get_num_threads(),
                "torch": str(torch.__version__), "flops_fp32": device.throughput("fp32"),
                "block_times_used": bool(bt)}
    summary = summarise(rows)
    summary.update(assess(rows, reps, summary.get("median_abs_error")))
    return Calibration(rows=rows, settings=settings, summary=summary)
