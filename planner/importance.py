"""Importance scores (importance.yaml): one non-negative score per adaptable matrix.

Written by `hsplit importance`, read by `hsplit plan --importance`. Absent file = uniform scores.
The planner normalises the scores of the planned matrices to sum 1 (`weights`).

    schema_version: 1
    model: smollm2-135m
    model_hash: <ModelProfile.arch_hash()>
    method: sensitivity          # sensitivity (AdaLoRA) | rngwp (HSplitLoRA) | runtime-* | uniform | any
    normalization: raw           # raw | per-parameter (per adapter parameter) | per-byte (rngwp: per C(W))
    settings: {...}              # steps, data, betas or gamma, ...
    scores: {model.layers.0.self_attn.q_proj: 0.0123, ...}
    rank1: {module: [per-component scores]}   # optional, for HAFL
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsplit.planner.cost import ADAPTER_STATE_BYTES
from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.model import ModelProfile
from hsplit.planner.yamlio import atomic_write_text, cut, dump_yaml, kind, number, read_yaml, short

NORMALIZATIONS = ("raw", "per-parameter", "per-byte")


def finetune_bytes(d_in: int, d_out: int) -> int:
    """C(W) of the rngwp score: bytes it costs to fine-tune a (d_in, d_out) matrix, per unit of LoRA
    rank. A rank-q adapter adds q * (d_in + d_out) parameters (A: q x d_in, B: d_out x q), each held
    as fp32 weight, gradient and two AdamW moments (planner.cost.ADAPTER_STATE_BYTES = 16, what the
    planner's memory model charges); the frozen W itself is held whether or not it is fine-tuned.
    A pure function of the shape, symmetric in d_in and d_out (a weight's storage layout does not
    matter). docs/measurement.md, "rngwp"."""
    return ADAPTER_STATE_BYTES * (int(d_in) + int(d_out))


HEADER = "# Importance scores: written by `hsplit importance`, read by `hsplit plan --importance` (docs/file-formats.md)."


@dataclass(frozen=True)
class Importance:
    scores: dict[str, float]
    model: str = ""
    model_hash: str = ""
    method: str = "uniform"
    normalization: str = "raw"
    settings: dict[str, Any] = field(default_factory=dict)
    rank1: dict[str, list[float]] = field(default_factory=dict)
    source: str = "<uniform>"

    def weights(self, model: ModelProfile, modules: tuple[str, ...]) -> np.ndarray:
        """Scores of the planned matrices as an array [block, module], normalised to sum 1."""
        if self.method == "uniform" and not self.scores:
            w = np.ones((model.layers, len(modules)))
            return w / w.sum()
        if self.model_hash and self.model_hash != model.arch_hash():
            raise ConfigError(self.source, [
                f"model_hash: these scores were computed for {self.model or 'another model'} with model_hash "
                f"{self.model_hash[:12]}..., but {model.name} has model_hash {model.arch_hash()[:12]}... "
                f"(a different architecture); run `hsplit importance --model {model.name} ...` again"])
        missing, w = [], np.zeros((model.layers, len(modules)))
        for l in range(model.layers):
            for j, m in enumerate(modules):
                name = model.module_name(l, m)
                if name not in self.scores:
                    missing.append(name)
                else:
                    w[l, j] = self.scores[name]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ConfigError(self.source, [f"scores: no score for {', '.join(missing[:3])}{more}; "
                                            "compute importance for the planned --modules"])
        top = w.max()
        if not top > 0:
            raise ConfigError(self.source, ["scores: all planned matrices have score 0"])
        w = w / top                     # first to [0, 1]: huge finite scores cannot overflow the sum
        return w / w.sum()

    def to_dict(self) -> dict[str, Any]:
        out = {"schema_version": 1, "model": self.model, "model_hash": self.model_hash, "method": self.method,
               "normalization": self.normalization, "settings": self.settings,
               "scores": {k: float(v) for k, v in self.scores.items()}}
        if self.rank1:
            out["rank1"] = {k: [float(x) for x in v] for k, v in self.rank1.items()}
        return out

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, dump_yaml(self.to_dict(), HEADER))

    @classmethod
    def load(cls, path: str | Path) -> "Importance":
        data = read_yaml(path)
        p = Problems(str(path))
        known = ("schema_version", "model", "model_hash", "method", "normalization", "settings", "scores", "rank1")
        for key in data:
            if key not in known:
                p.add(cut(str(key)), f"unknown field; expected one of {', '.join(known)}")
        if data.get("schema_version", 1) != 1:
            p.add("schema_version", f"{short(data.get('schema_version'))} is not supported (this hsplit reads 1)")
        for key in ("model", "model_hash", "method"):
            if data.get(key) is not None and not isinstance(data[key], str):
                p.add(key, f"must be text, found {kind(data[key])}")
        scores = data.get("scores")
        if scores is None or scores == {}:
            p.add("scores", "missing: a mapping module name -> score (e.g. model.layers.0.self_attn.q_proj: 0.01)")
            scores = {}
        elif not isinstance(scores, dict):
            p.add("scores", f"must be a mapping module name -> score (e.g. model.layers.0.self_attn.q_proj: 0.01), "
                            f"found {kind(scores)}")
            scores = {}
        clean = {}
        for k, v in scores.items():
            x = number(v, f"scores.{cut(str(k))}", p, minimum=0.0)
            if x is not None:
                clean[str(k)] = x
        norm = data.get("normalization", "raw")
        if norm not in NORMALIZATIONS:
            p.add("normalization", f"must be one of {', '.join(NORMALIZATIONS)}, got {short(norm)}")
        elif data.get("method") == "rngwp" and norm != "per-byte":
            p.add("normalization", f"method rngwp scores are divided by C(W) (normalization per-byte), got {short(norm)}")
        rank1 = data.get("rank1") or {}
        clean_rank1 = {}
        if not isinstance(rank1, dict):
            p.add("rank1", f"must be a mapping module name -> list of component scores, found {kind(rank1)}")
            rank1 = {}
        for k, v in rank1.items():
            f = f"rank1.{cut(str(k))}"
            if not isinstance(v, list):
                p.add(f, f"must be a list of component scores >= 0, found {kind(v)}")
                continue
            values = [number(x, f"{f}[{i}]", p, minimum=0.0) for i, x in enumerate(v)]
            if None not in values:
                clean_rank1[str(k)] = values
        settings = data.get("settings")
        if settings is not None and not isinstance(settings, dict):
            p.add("settings", f"must be a mapping (e.g. {{steps: 16, data: shakespeare}}), found {kind(settings)}")
            settings = None
        p.raise_if_any()
        return cls(scores=clean, model=str(data.get("model") or ""), model_hash=str(data.get("model_hash") or ""),
                   method=str(data.get("method") or "unknown"), normalization=norm,
                   settings=dict(settings or {}), rank1=clean_rank1, source=str(path))


def uniform() -> Importance:
    return Importance(scores={})


def shift(old: Importance, new: Importance, model: ModelProfile, modules: tuple[str, ...]) -> float:
    """How far importance moved: total-variation distance 0.5 * sum |v_old - v_new| between the
    normalised scores of the planned matrices, in [0, 1]. `replan: {threshold: t}` compares this to t."""
    return float(0.5 * np.abs(old.weights(model, modules) - new.weights(model, modules)).sum())
