"""Importance scoring (`hsplit importance`): a sensitivity score per adaptable weight matrix.

    imp, info = compute_importance("smollm2-135m", ImportanceSettings(steps=16, seq_len=128))
    imp.save("importance.yaml")          # read by `hsplit plan --importance importance.yaml`

Per parameter w of every adaptable matrix, on N batches of the training data (the base weights are
frozen and not updated: these are warm-up measurements, not training steps), AdaLoRA's smoothed
sensitivity (Zhang et al. 2023, eqs. 8-10):

    I_t = |w * dL/dw|                                  (first-order loss change if w were removed)
    Ibar_t = beta1 * Ibar_{t-1} + (1 - beta1) * I_t      (smoothed sensitivity)
    Ubar_t = beta2 * Ubar_{t-1} + (1 - beta2) * |I_t - Ibar_t|   (uncertainty)
    s(w) = Ibar_N * Ubar_N

reduced per matrix by summing over its elements (`raw`). `per-parameter` divides by the adapter
parameters per unit of rank, d_in + d_out: importance per adapter parameter, HSplitLoRA's
"contribution relative to cost". The file records which one it holds.

Memory. Gradients of the whole model are never held: a post-accumulate-grad hook folds each
matrix's gradient into its smoothing state and frees it at once. The two smoothing states (fp32)
are held only for a group of `blocks_per_pass` blocks at a time. One no-grad forward pass caches
the input of every group (the frozen model's hidden state at the group boundary, per batch); groups
are then scored top-down, each group's backward seeded by dL/dh at its upper boundary, which the
group above produced (the weights are frozen, so it does not depend on which group is scored):
every block runs forward twice and backward once in all, whatever the group size. Blocks run under
activation checkpointing and the LM head + loss in 64-token chunks, so activations and logits stay
small. With `blocks_per_pass=None` the group size minimises smoothing states + boundary cache
(states capped at half of the weights' bytes). `reference_scores` is the plain all-at-once computation (whole-model forward and
backward, every gradient held) that the tests compare the grouped computation with.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from operator import attrgetter
from pathlib import Path
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from hsplit.planner.errors import ConfigError
from hsplit.planner.importance import Importance
from hsplit.planner.model import ModelProfile
from hsplit.runtime.data import TokenSet
from hsplit.runtime.model import SplitLM, lm_loss

NORMALIZATIONS = ("raw", "per-parameter")
STATE_SHARE_OF_WEIGHTS = 0.5     # auto blocks_per_pass: smoothing states use at most this share of weight bytes


@dataclass
class ImportanceSettings:
    steps: int = 16
    batch_size: int = 4
    seq_len: int = 128
    beta1: float = 0.85
    beta2: float = 0.85
    seed: int = 0
    normalization: str = "raw"          # raw | per-parameter
    modules: tuple[str, ...] | None = None   # None = every adaptable module of the family
    blocks_per_pass: int | None = None  # None = auto (1 block: the boundary cache is on disk)
    head_chunk_tokens: int = 64         # tokens per LM-head/loss chunk

    def check(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "seq_len", "head_chunk_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"--{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"--normalization: must be raw or per-parameter, got {self.normalization!r}")
        if self.blocks_per_pass is not None and self.blocks_per_pass < 1:
            problems.append(f"--blocks-per-pass: must be >= 1, got {self.blocks_per_pass}")
        if problems:
            raise ConfigError("hsplit importance", problems)


class _Smoother:
    """AdaLoRA's smoothed sensitivity and uncertainty of one weight matrix (fp32 states)."""

    def __init__(self, weight: torch.Tensor, beta1: float, beta2: float):
        self.w, self.b1, self.b2 = weight, beta1, beta2
        self.ibar = torch.zeros_like(weight, dtype=torch.float32)
        self.ubar = torch.zeros_like(weight, dtype=torch.float32)
        self.updates = 0

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        sens = (self.w.float() * grad.float()).abs_()
        self.ibar.mul_(self.b1).add_(sens, alpha=1 - self.b1)
        sens.sub_(self.ibar).abs_()                       # |I_t - Ibar_t|
        self.ubar.mul_(self.b2).add_(sens, alpha=1 - self.b2)
        self.updates += 1

    def score(self) -> float:
        return float((self.ibar.double() * self.ubar.double()).sum())


def adaptable_matrices(model: torch.nn.Module, profile: ModelProfile, modules) -> dict[str, torch.nn.Parameter]:
    """Full module name -> weight Parameter of every planned matrix, block by block."""
    out = {}
    for l in range(profile.layers):
        for m in modules:
            name = profile.module_name(l, m)
            out[name] = attrgetter(name)(model).weight
    return out


def auto_blocks_per_pass(model: torch.nn.Module, profile: ModelProfile, modules, boundary_bytes: int = 0) -> int:
    """Blocks per group. At most as many blocks as fit their two fp32 smoothing states in
    STATE_SHARE_OF_WEIGHTS of the weight bytes; with `boundary_bytes` (the cached hidden states of
    one group boundary, all batches), the group size that minimises states + boundary cache."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shapes = profile.module_shapes()
    per_block = 8 * sum(shapes[m][0] * shapes[m][1] for m in modules)
    L = profile.layers
    cap = max(1, min(L, int(STATE_SHARE_OF_WEIGHTS * weight_bytes // per_block)))
    if not boundary_bytes:
        return cap
    return min(range(1, cap + 1), key=lambda g: (g * per_block + -(-L // g) * boundary_bytes, g))


def _chunked_head_loss(split: SplitLM, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token CE (as lm_loss) computed over token chunks, each checkpointed: the full
    (tokens x vocab) logits never exist at once."""
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    n = int((y != -100).sum())

    def part(hc, yc):
        logits = split.lm_head(split.final_norm(hc)).float()
        return torch.nn.functional.cross_entropy(logits, yc, ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(part, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return total / max(n, 1)


def sensitivity_scores(model: torch.nn.Module, profile: ModelProfile, batches: list[TokenSet], modules,
                       beta1: float = 0.85, beta2: float = 0.85, blocks_per_pass: int | None = None,
                       head_chunk_tokens: int = 64,
                       on_step: Callable[[int, int], None] | None = None, *,
                       spill: bool = True) -> tuple[dict[str, float], dict]:
    """Raw scores (sum over each matrix of Ibar*Ubar), grouped computation; (scores, info).

    One no-grad forward pass caches the input of every group, per batch. Groups are then scored
    top-down: group [a, b) runs forward from its cached input and backward, seeded at the top by the
    loss and below by dL/dh at its output boundary, which the group above produced (the weights are
    frozen, so that gradient does not depend on which group is being scored). Every block runs
    forward twice and backward once in all, whatever the group size.

    With `spill` (default) the cached group inputs go to a temporary folder instead of memory, so
    the group size costs nothing but smoothing states and the smallest groups (one block) are used."""
    split = SplitLM(model, profile.family)
    L = profile.layers
    boundary = sum(b.input_ids.numel() for b in batches) * profile.hidden * 4
    g = blocks_per_pass or (1 if spill else auto_blocks_per_pass(model, profile, modules, boundary))
    g = min(g, L)
    groups = [(a, min(a + g, L)) for a in range(0, L, g)]
    weights = adaptable_matrices(model, profile, modules)
    was_training = model.training
    model.eval()
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scores: dict[str, float] = {}
    handles = []
    total_work = len(groups) * len(batches)
    done = 0
    spill_dir = tempfile.TemporaryDirectory(prefix="hsplit-importance-") if spill else None
    try:
        inputs: dict[int, list] = {a: [None] * len(batches) for a, _ in groups}

        def keep(a: int, i: int, h: torch.Tensor) -> None:
            if spill_dir is None:
                inputs[a][i] = h
            else:
                path = Path(spill_dir.name) / f"{a}-{i}.pt"
                torch.save(h, path)
                inputs[a][i] = path

        def take(a: int, i: int) -> torch.Tensor:
            item, inputs[a][i] = inputs[a][i], None
            if isinstance(item, Path):
                h = torch.load(item)
                item.unlink()
                return h
            return item

        with torch.no_grad():
            for i, batch in enumerate(batches):
                h = split.embed(batch.input_ids)
                for a, b in groups[:-1]:
                    keep(a, i, h)
                    h = split._run_blocks(h, batch.attention_mask, a, b)
                keep(groups[-1][0], i, h)
                del h
        upstream: list[torch.Tensor | None] = [None] * len(batches)   # dL/d(output of the group being scored)
        for a, b in reversed(groups):
            smoothers = {}
            for l in range(a, b):
                for m in modules:
                    name = profile.module_name(l, m)
                    w = weights[name]
                    sm = _Smoother(w, beta1, beta2)
                    smoothers[name] = sm
                    w.requires_grad_(True)

                    def hook(param, sm=sm):
                        sm.update(param.grad)
                        param.grad = None          # never hold the gradient longer than this
                    handles.append(w.register_post_accumulate_grad_hook(hook))
            for i, batch in enumerate(batches):
                mask = batch.attention_mask
                x = take(a, i).detach().requires_grad_(a > 0)
                h = x
                for l in range(a, b):
                    h = checkpoint(split._run_blocks, h, mask, l, l + 1, use_reentrant=False)
                if b == L:
                    _chunked_head_loss(split, h, batch.labels, head_chunk_tokens).backward()
                else:
                    h.backward(upstream[i])
                upstream[i] = x.grad if a > 0 else None
                del x, h
                done += 1
                if on_step:
                    on_step(done, total_work)
            for name, sm in smoothers.items():
                scores[name] = sm.score()
            for hd in handles:
                hd.remove()
            handles.clear()
            for name in smoothers:
                weights[name].requires_grad_(False)
            del smoothers
    finally:
        if spill_dir is not None:
            spill_dir.cleanup()
        for hd in handles:
            hd.remove()
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
            p.grad = None
        model.train(was_training)
    return scores, {"blocks_per_pass": g, "passes": len(groups), "boundary_cache": "disk" if spill else "memory"}


def reference_scores(model: torch.nn.Module, profile: ModelProfile, batches: list[TokenSet], modules,
                     beta1: float = 0.85, beta2: float = 0.85) -> dict[str, float]:
    """All at once: whole-model forward and backward, every gradient held (for tests; no memory care)."""
    weights = adaptable_matrices(model, profile, modules)
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    smoothers = {n: _Smoother(w, beta1, beta2) for n, w in weights.items()}
    model.eval()
    try:
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, _ = lm_loss(logits, batch.labels)
            loss.backward()
            for n, w in weights.items():
                smoothers[n].update(w.grad)
                w.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
    return {n: sm.score() for n, sm in smoothers.items()}


def normalise(raw: dict[str, float], profile: ModelProfile, how: str) -> dict[str, float]:
    """raw: as is; per-parameter: divided by the adapter parameters per unit rank, d_in + d_out."""
    if how == "raw":
        return dict(raw)
    if how != "per-parameter":
        raise ConfigError("--normalization", [f"must be raw or per-parameter, got {how!r}"])
    shapes = profile.module_shapes()
    prefix = profile.family.blocks + "."
    out = {}
    for name, v in raw.items():
        suffix = name[len(prefix):].split(".", 1)[1]
        d_in, d_out = shapes[suffix]
        out[name] = v / (d_in + d_out)
    return out


def training_batches(data: str, tokenizer, settings: ImportanceSettings, data_format: str = "auto",
                     eval_fraction: float = 0.05) -> tuple[list[TokenSet], dict]:
    """`steps` batches of the training split (the held-out split of a run with the same seed and
    eval_fraction is never scored on)."""
    from hsplit.planner.plan import DataSpec
    from hsplit.runtime.data import load_federated_data

    spec = DataSpec(path=data, format=data_format, partition="iid", eval_fraction=eval_fraction)
    fed = load_federated_data(spec, tokenizer, settings.seq_len, weights=[1.0], seed=settings.seed)
    train = fed.clients[0]
    batches = [train.batch(settings.batch_size, settings.seed, 0, 0, t) for t in range(settings.steps)]
    return batches, {"path": data, "format": fed.summary["format"], "train_sequences": len(train),
                     "eval_fraction": eval_fraction}


def build_importance(raw: dict[str, float], profile: ModelProfile, settings: ImportanceSettings,
                     extra: dict | None = None) -> Importance:
    s = asdict(settings)
    s["modules"] = list(settings.modules) if settings.modules else None
    s.update(extra or {})
    return Importance(scores=normalise(raw, profile, settings.normalization), model=profile.name,
                      model_hash=profile.arch_hash(), method="sensitivity", normalization=settings.normalization,
                      settings=s, source="<computed>")


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak` bytes seen while active."""

    def __init__(self, interval: float = 0.02):
        import threading
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        return False


def release_free_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc malloc_trim; no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compute_importance(model_ref: str, settings: ImportanceSettings, data: str = "shakespeare",
                       data_format: str = "auto", progress: bool = True,
                       on_step: Callable[[int, int], None] | None = None) -> tuple[Importance, dict]:
    """Load the model and data, score, and return (Importance, info with timings and peak memory)."""
    from hsplit.runtime.model import load_lm

    settings.check()
    base_rss = PeakRSS.rss()
    lm = load_lm(model_ref, progress=progress)
    profile = lm.profile
    modules = profile.resolve_modules(list(settings.modules) if settings.modules else None)
    settings.modules = tuple(modules)
    batches, data_info = training_batches(data, lm.tokenizer, settings, data_format)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    release_free_memory()          # loader transients: freed, but still resident until trimmed
    loaded_rss = PeakRSS.rss()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        raw, info = sensitivity_scores(lm.model, profile, batches, modules, settings.beta1, settings.beta2,
                                       settings.blocks_per_pass, settings.head_chunk_tokens, on_step)
    wall = time.perf_counter() - t0
    info.update(wall_s=round(wall, 2), weight_bytes=weight_bytes, peak_rss_bytes=mem.peak,
                peak_over_weights=round((mem.peak - base_rss) / weight_bytes, 3),
                loaded_over_weights=round((loaded_rss - base_rss) / weight_bytes, 3))
    imp = build_importance(raw, profile, settings, {"data": data_info, "blocks_per_pass": info["blocks_per_pass"],
                                                    "model_path": lm.path})
    return imp, info


__all__ = ["ImportanceSettings", "compute_importance", "sensitivity_scores", "reference_scores", "normalise",
           "training_batches", "build_importance", "auto_blocks_per_pass", "PeakRSS", "NORMALIZATIONS"]
