"""Importance scoring (`hsplit importance`): one score per adaptable weight matrix, by one of two methods.

    imp, info = compute_importance("smollm2-135m", ImportanceSettings(steps=16, seq_len=128))
    imp = compute_importance("smollm2-135m", ImportanceSettings(method="rngwp"))[0]
    imp.save("importance.yaml")          # read by `hsplit plan --importance importance.yaml`

On N batches of the training data (the base weights are frozen and not updated: these are warm-up
measurements, not training steps), per step t:

`sensitivity` (default): per parameter w of every adaptable matrix, AdaLoRA's smoothed sensitivity
(Zhang et al. 2023, eqs. 8-10):

    I_t = |w * dL/dw|                                  (first-order loss change if w were removed)
    Ibar_t = beta1 * Ibar_{t-1} + (1 - beta1) * I_t      (smoothed sensitivity)
    Ubar_t = beta2 * Ubar_{t-1} + (1 - beta2) * |I_t - Ibar_t|   (uncertainty)
    s(w) = Ibar_N * Ubar_N

reduced per matrix by summing over its elements (`raw`). `per-parameter` divides by the adapter
parameters per unit of rank, d_in + d_out: importance per adapter parameter. The file records which
one it holds.

`rngwp` (HSplitLoRA's importance as secondary summaries of the paper describe it): per matrix W,

    score_t(W) = |sum_j w_j * dL/dw_j| / C(W)     (first-order loss change if all of W were removed,
                                                   per byte of fine-tuning memory)
    I_t = gamma * I_{t-1} + (1 - gamma) * score_t,   I_0 = 0;   the matrix's score is I_N

with C(W) = hsplit.planner.importance.finetune_bytes(d_in, d_out) = 16 * (d_in + d_out) bytes (fp32
LoRA weight, gradient and two AdamW moments per unit of rank). normalization `per-byte`. One float
per matrix: no per-parameter state.

Memory. Gradients of the whole model are never held: a post-accumulate-grad hook folds each
matrix's gradient into its smoothing state and frees it at once. sensitivity's two smoothing states
(fp32) are held only for a group of `blocks_per_pass` blocks at a time. One no-grad forward pass caches
the input of every group (the frozen model's hidden state at the group boundary, per batch); groups
are then scored top-down, each group's backward seeded by dL/dh at its upper boundary, which the
group above produced (the weights are frozen, so it does not depend on which group is scored):
every block runs forward twice and backward once in all, whatever the group size. Blocks run under
activation checkpointing and the LM head + loss in 64-token chunks, so activations and logits stay
small. With `blocks_per_pass=None` groups are one block each (the boundary cache is on disk; with
the cache in memory, the group size minimises smoothing states + boundary cache, states capped at
half of the weights' bytes; rngwp has no per-weight state). `reference_scores` is the plain
all-at-once computation (whole-model forward and backward, every gradient held) that the tests
compare the grouped computation with.
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
from hsplit.planner.importance import Importance, finetune_bytes
from hsplit.planner.model import ModelProfile
from hsplit.runtime.data.federated import TokenSet
from hsplit.runtime.models.causal_lm import SplitLM, lm_loss

METHODS = ("sensitivity", "rngwp")
NORMALIZATIONS = ("raw", "per-parameter")          # of sensitivity scores; rngwp's is always per-byte
DEFAULT_NORMALIZATION = {"sensitivity": "raw", "rngwp": "per-byte"}
STATE_SHARE_OF_WEIGHTS = 0.5     # auto blocks_per_pass: smoothing states use at most this share of weight bytes


@dataclass
class ImportanceSettings:
    steps: int = 16
    batch_size: int = 4
    seq_len: int = 128
    beta1: float = 0.85                 # sensitivity: smoothing of I
    beta2: float = 0.85                 # sensitivity: smoothing of U
    seed: int = 0
    normalization: str | None = None    # sensitivity: raw (default) | per-parameter; rngwp: per-byte
    modules: tuple[str, ...] | None = None   # None = every adaptable module of the family
    blocks_per_pass: int | None = None  # None = auto (1 block: the boundary cache is on disk)
    head_chunk_tokens: int = 64         # tokens per LM-head/loss chunk
    method: str = "sensitivity"         # sensitivity | rngwp
    gamma: float = 0.85                 # rngwp: I_t = gamma I_{t-1} + (1 - gamma) score_t

    def __post_init__(self):
        if self.normalization is None:
            self.normalization = DEFAULT_NORMALIZATION.get(self.method, "raw")

    def check(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "seq_len", "head_chunk_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "gamma"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"--{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.method not in METHODS:
            problems.append(f"--method: must be sensitivity or rngwp, got {self.method!r}")
        elif self.method == "rngwp":
            if self.normalization != "per-byte":
                problems.append(f"--normalization: applies to --method sensitivity; rngwp divides every score by "
                                f"C(W) itself (per-byte), got {self.normalization!r}")
        elif self.normalization not in NORMALIZATIONS:
            problems.append(f"--normalization: must be raw or per-parameter, got {self.normalization!r}")
        if self.blocks_per_pass is not None and self.blocks_per_pass < 1:
            problems.append(f"--blocks-per-pass: must be >= 1, got {self.blocks_per_pass}")
        if problems:
            raise ConfigError("hsplit importance", problems)


class _Smoother:
    """AdaLoRA's smoothed sensitivity and uncertainty of one weight matrix (fp32 states)."""
    state_bytes_per_weight = 8

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


class _RngwpSmoother:
    """rngwp of one weight matrix: I_t = gamma I_{t-1} + (1 - gamma) |sum w dL/dw| / C(W), I_0 = 0.
    One float of state; the sum is taken in float64 (terms of both signs cancel in it)."""
    state_bytes_per_weight = 0

    def __init__(self, weight: torch.Tensor, gamma: float):
        self.w, self.gamma = weight, gamma
        self.value, self.updates = 0.0, 0

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        self.value = self.gamma * self.value + (1 - self.gamma) * rngwp_step_score(self.w, grad)
        self.updates += 1

    def score(self) -> float:
        return self.value


def rngwp_step_score(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """score_t(W) = |sum_j w_j dL/dw_j| / C(W) of one step (also the re-planner's per-step score).
    C(W) from the weight's shape: finetune_bytes is symmetric in (d_in, d_out), so the storage layout
    (Linear: (d_out, d_in); GPT-2 Conv1D: (d_in, d_out)) does not matter."""
    dot = torch.dot(weight.detach().reshape(-1).double(), grad.detach().reshape(-1).double())
    return abs(float(dot)) / finetune_bytes(*weight.shape)


def _smoother_factory(method: str, beta1: float, beta2: float, gamma: float):
    if method == "sensitivity":
        return lambda w: _Smoother(w, beta1, beta2)
    if method == "rngwp":
        return lambda w: _RngwpSmoother(w, gamma)
    raise ConfigError("--method", [f"must be one of {', '.join(METHODS)}, got {method!r}"])


STATE_BYTES_PER_WEIGHT = {"sensitivity": _Smoother.state_bytes_per_weight,
                          "rngwp": _RngwpSmoother.state_bytes_per_weight}


def adaptable_matrices(model: torch.nn.Module, profile: ModelProfile, modules) -> dict[str, torch.nn.Parameter]:
    """Full module name -> weight Parameter of every planned matrix, block by block."""
    out = {}
    for l in range(profile.layers):
        for m in modules:
            name = profile.module_name(l, m)
            out[name] = attrgetter(name)(model).weight
    return out


def auto_blocks_per_pass(model: torch.nn.Module, profile: ModelProfile, modules, boundary_bytes: int = 0,
                         state_bytes_per_weight: int = 8) -> int:
    """Blocks per group. At most as many blocks as fit their smoothing states (8 bytes per weight:
    sensitivity's two fp32 states) in STATE_SHARE_OF_WEIGHTS of the weight bytes; with
    `boundary_bytes` (the cached hidden states of one group boundary, all batches), the group size
    that minimises states + boundary cache. Without per-weight state (rngwp): all blocks, one group
    (used only when the boundary cache is kept in memory, spill=False)."""
    L = profile.layers
    if state_bytes_per_weight <= 0:
        return L
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shapes = profile.module_shapes()
    per_block = state_bytes_per_weight * sum(shapes[m][0] * shapes[m][1] for m in modules)
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
    """Raw sensitivity scores (sum over each matrix of Ibar*Ubar), grouped computation; (scores, info)."""
    return grouped_scores(model, profile, batches, modules, "sensitivity", beta1=beta1, beta2=beta2,
                          blocks_per_pass=blocks_per_pass, head_chunk_tokens=head_chunk_tokens, on_step=on_step,
                          spill=spill)


def rngwp_scores(model: torch.nn.Module, profile: ModelProfile, batches: list[TokenSet], modules,
                 gamma: float = 0.85, blocks_per_pass: int | None = None, head_chunk_tokens: int = 64,
                 on_step: Callable[[int, int], None] | None = None, *,
                 spill: bool = True) -> tuple[dict[str, float], dict]:
    """rngwp scores (I_N of |sum w dL/dw| / C(W) per matrix), grouped computation; (scores, info)."""
    return grouped_scores(model, profile, batches, modules, "rngwp", gamma=gamma, blocks_per_pass=blocks_per_pass,
                          head_chunk_tokens=head_chunk_tokens, on_step=on_step, spill=spill)


def grouped_scores(model: torch.nn.Module, profile: ModelProfile, batches: list[TokenSet], modules,
                   method: str = "sensitivity", *, beta1: float = 0.85, beta2: float = 0.85, gamma: float = 0.85,
                   blocks_per_pass: int | None = None, head_chunk_tokens: int = 64,
                   on_step: Callable[[int, int], None] | None = None,
                   spill: bool = True) -> tuple[dict[str, float], dict]:
    """Per-matrix scores of `method` (sensitivity: raw; rngwp), grouped computation; (scores, info).

    One no-grad forward pass caches the input of every group, per batch. Groups are then scored
    top-down: group [a, b) runs forward from its cached input and backward, seeded at the top by the
    loss and below by dL/dh at its output boundary, which the group above produced (the weights are
    frozen, so that gradient does not depend on which group is being scored). Every block runs
    forward twice and backward once in all, whatever the group size.

    With `spill` (default) the cached group inputs go to a temporary folder instead of memory, so
    the group size costs nothing but smoothing states and the smallest groups (one block) are used,
    for rngwp too: it has no per-weight state, but a group's backward holds per-block checkpoint
    state for every block of the group (SmolLM2-135M, 16 steps: one group of all blocks peaks at
    2.06 x the weights, one block per group at 1.69 x; docs/measurement.md)."""
    make_smoother = _smoother_factory(method, beta1, beta2, gamma)
    split = SplitLM(model, profile.family)
    L = profile.layers
    boundary = sum(b.input_ids.numel() for b in batches) * profile.hidden * 4
    g = blocks_per_pass or (1 if spill else auto_blocks_per_pass(model, profile, modules, boundary,
                                                                  STATE_BYTES_PER_WEIGHT[method]))
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
                    sm = make_smoother(w)
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
    return scores, {"method": method, "blocks_per_pass": g, "passes": len(groups),
                    "boundary_cache": "disk" if spill else "memory"}


def reference_scores(model: torch.nn.Module, profile: ModelProfile, batches: list[TokenSet], modules,
                     beta1: float = 0.85, beta2: float = 0.85, *, method: str = "sensitivity",
                     gamma: float = 0.85) -> dict[str, float]:
    """All at once: whole-model forward and backward, every gradient held (for tests; no memory care)."""
    make_smoother = _smoother_factory(method, beta1, beta2, gamma)
    weights = adaptable_matrices(model, profile, modules)
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    smoothers = {n: make_smoother(w) for n, w in weights.items()}
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
    """raw: as is; per-parameter: divided by the adapter parameters per unit rank, d_in + d_out;
    per-byte: as is (rngwp scores are divided by C(W) at every step already)."""
    if how in ("raw", "per-byte"):
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
    from hsplit.runtime.data.federated import load_federated_data

    spec = DataSpec(path=data, format=data_format, partition="iid", eval_fraction=eval_fraction)
    fed = load_federated_data(spec, tokenizer, settings.seq_len, weights=[1.0], seed=settings.seed)
    train = fed.clients[0]
    batches = [train.batch(settings.batch_size, settings.seed, 0, 0, t) for t in range(settings.steps)]
    return batches, {"path": data, "format": fed.summary["format"], "train_sequences": len(train),
                     "eval_fraction": eval_fraction}


def build_importance(raw: dict[str, float], profile: ModelProfile, settings: ImportanceSettings,
                     extra: dict | None = None) -> Importance:
    """The Importance of `settings.method`; its settings record what that method used (sensitivity:
    betas; rngwp: gamma, C(W) and the smoothing start)."""
    s = asdict(settings)
    s["modules"] = list(settings.modules) if settings.modules else None
    s.pop("method")                                   # the file's top-level `method`
    if settings.method == "rngwp":
        s.pop("beta1"), s.pop("beta2")
        s.update(cost="C(W) = 16 * (d_in + d_out) bytes", smoothing_start="I_0 = 0")
    else:
        s.pop("gamma")
    s.update(extra or {})
    return Importance(scores=normalise(raw, profile, settings.normalization), model=profile.name,
                      model_hash=profile.arch_hash(), method=settings.method, normalization=settings.normalization,
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
    from hsplit.runtime.models.causal_lm import load_lm

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
        raw, info = grouped_scores(lm.model, profile, batches, modules, settings.method, beta1=settings.beta1,
                                   beta2=settings.beta2, gamma=settings.gamma, blocks_per_pass=settings.blocks_per_pass,
                                   head_chunk_tokens=settings.head_chunk_tokens, on_step=on_step)
    wall = time.perf_counter() - t0
    info.update(wall_s=round(wall, 2), weight_bytes=weight_bytes, peak_rss_bytes=mem.peak,
                peak_over_weights=round((mem.peak - base_rss) / weight_bytes, 3),
                loaded_over_weights=round((loaded_rss - base_rss) / weight_bytes, 3))
    imp = build_importance(raw, profile, settings, {"data": data_info, "blocks_per_pass": info["blocks_per_pass"],
                                                    "model_path": lm.path})
    return imp, info


__all__ = ["ImportanceSettings", "compute_importance", "sensitivity_scores", "rngwp_scores", "grouped_scores",
           "rngwp_step_score", "reference_scores", "normalise", "training_batches", "build_importance",
           "auto_blocks_per_pass", "PeakRSS", "NORMALIZATIONS", "METHODS"]
