"""`hsplit export RUN --adapter DIR | --merged DIR`: the learned update as a PEFT adapter or full model.

    report = export_run("runs/demo", adapter="out/adapter")          # rank: the plan's largest rank
    report = export_run("runs/demo", adapter="out/exact", exact=True)  # every rank: the update exactly
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(report["base_model"]), "out/adapter")
    # a classification run (data.task classification): the adapter is for sequence classification, with the head
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        report["base_model"], num_labels=len(report["labels"])), "out/adapter")

The total learned update of every module is kept in factored form: the exact aggregates merged in
rounds 1..N (B_cat, A_cat from the checkpoints) plus, for strategies that keep adapters, the
global adapter (scaling * B, A). Stacked, they are one product B_tot @ A_tot of rank R. It is
factored by SVD without ever forming the dense matrix (QR of both factors, SVD of the R x R core)
and cut to `rank` (default: the largest rank of the plan, client or server side, since the update
of many rounds and clients has rank up to their sum; `exact`: R per module); the relative Frobenius
error of the cut is reported per module and overall. The adapter uses lora_alpha = r (scaling 1),
per-module ranks as anchored rank_pattern keys, and base_model_name_or_path = the model's hub id
(shipped names and hub-cache folders know theirs; `base_model` overrides, else the model folder).
A model card (README.md, runtime/outputs/modelcard.py) says how the adapter was trained.
`--merged` adds the exact dense updates to the base weights and saves a plain HF model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.model import is_hub_id
from hsplit.planner.yamlio import output_problem
from hsplit.planner.strategies import traits
from hsplit.runtime.train import checkpoint
from hsplit.runtime.common import GLOBAL
from hsplit.runtime.models.lora import rank_pattern_key
from hsplit.runtime.models.hub import hub_id_of_folder
from hsplit.runtime.models.causal_lm import load_lm
from hsplit.runtime.outputs.modelcard import model_card


def total_update(run_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, int]:
    """Module -> (B_tot, A_tot) with B_tot @ A_tot = everything learned; plus config and round."""
    from hsplit.planner.yamlio import read_yaml

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(str(run_dir), ["not a run folder (no config.yaml); runs are under runs/<name>"])
    config = read_yaml(run_dir / "config.yaml")
    done = checkpoint.complete_rounds(run_dir)
    if not done or done[-1] == 0:
        raise ConfigError(str(run_dir), ["the run has no trained round yet: nothing to export"])
    last = done[-1]
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for r in range(1, last + 1):
        _, t = checkpoint.load(run_dir, r, ("merged.safetensors",))
        merged = t["merged.safetensors"]
        for m in sorted({k[:-2] for k in merged}):
            parts.setdefault(m, []).append((merged[f"{m}.B"].double(), merged[f"{m}.A"].double()))
    state, t = checkpoint.load(run_dir, last, ("adapters.safetensors",))
    adapters = t["adapters.safetensors"]
    holder = traits(config["plan"]["strategy"]).model_adapter      # which adapter is part of the model
    keep = {"global": f"{GLOBAL}/", "party": "k0/"}.get(holder)
    if keep:
        scaling = float(config["plan"]["training"]["lora_alpha_over_rank"])
        for k in adapters:
            if k.startswith(keep) and k.endswith(".lora_A"):
                m = k[len(keep):-len(".lora_A")]
                a, b = adapters[k].double(), adapters[f"{keep}{m}.lora_B"].double()
                parts.setdefault(m, []).append((scaling * b, a))
    total = {m: (torch.cat([b for b, _ in ps], dim=1), torch.cat([a for _, a in ps], dim=0))
             for m, ps in parts.items()}
    return total, config, last


def svd_factor(b: torch.Tensor, a: torch.Tensor, rank: int | None):
    """(B', A', rank, ||b a||_F^2, squared error, full rank): B' @ A' is the best rank-r approximation
    of b @ a."""
    qb, rb = torch.linalg.qr(b)               # b = qb rb
    qa, ra = torch.linalg.qr(a.T)             # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    full = int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0
    r = full if rank is None else min(rank, full)
    r = max(r, 1)
    b2 = qb @ (u[:, :r] * s[:r])
    a2 = vh[:r] @ qa.T
    return b2, a2, r, float((s ** 2).sum()), float((s[r:] ** 2).sum()), max(full, 1)


def _target_problem(path: Path, flag: str | None = None) -> str | None:
    """Why `path` cannot become a fresh export folder (one line, prefixed with `flag`), or None: the
    output checks every command makes (yamlio.output_problem), plus not empty and writable."""
    if problem := output_problem(path, flag, folder=True):
        return problem
    why = None
    if path.is_dir() and any(path.iterdir()):
        why = f"{path} exists and is not empty; choose another folder (or empty/remove this one)"
    else:
        parent = next(p for p in path.parents if p.exists())      # a folder: output_problem checked it
        if not os.access(parent, os.W_OK | os.X_OK):
            why = f"{parent} is not writable, so {path} cannot be created; choose another folder"
    return None if why is None else f"{flag}: {why}" if flag else why


def check_targets(adapter: Path | None, merged: Path | None) -> None:
    """Every export target is checked before anything is written (ConfigError, one line per problem)."""
    problems = [p for p in (_target_problem(adapter, "--adapter") if adapter is not None else None,
                            _target_problem(merged, "--merged") if merged is not None else None) if p]
    if adapter is not None and merged is not None:
        a, m = adapter.expanduser().resolve(), merged.expanduser().resolve()
        if a == m:
            problems.append(f"--adapter and --merged are the same folder ({adapter}); give two different folders")
        elif a in m.parents or m in a.parents:
            problems.append(f"--adapter {adapter} and --merged {merged}: one is inside the other; "
                            "give two separate folders")
    if problems:
        raise ConfigError("hsplit export", problems)


def _fresh_target(path: Path) -> Path:
    if problem := _target_problem(path):
        raise ConfigError("export", [problem])
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))


def _publish_modes(tmp: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: give the export the modes mkdir/open
    would (0777 / 0666 less the umask), so that other users can read it."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _commit(tmp: Path, path: Path) -> None:
    _publish_modes(tmp)
    if path.exists():
        path.rmdir()
    os.replace(tmp, path)


def plan_max_rank(plan: dict) -> int:
    """The largest LoRA rank the plan trains (any client's, or the server-side rank where blocks are on
    the server): the default rank of an exported adapter."""
    ranks = [r for c in plan.get("clients", []) for r in (c.get("ranks") or {}).values()]
    server = int(plan.get("server_rank") or 0)
    return max(ranks + [server] + [1])


def export_run(run_dir: str | Path, adapter: str | Path | None = None, merged: str | Path | None = None,
               rank: int | None = None, exact: bool = False, base_model: str | None = None,
               progress: bool = False) -> dict:
    """Write a PEFT adapter folder (+ model card) and/or a merged HF model; returns a report (rank,
    truncation errors, base model). rank: SVD rank (default: the plan's largest rank); exact: keep all."""
    if adapter is None and merged is None:
        raise ConfigError("hsplit export", ["pass --adapter DIR and/or --merged DIR"])
    if rank is not None and rank < 1:
        raise ConfigError("hsplit export", ["--rank must be >= 1 (or --exact for the full-rank update)"])
    if rank is not None and exact:
        raise ConfigError("hsplit export", ["--rank and --exact exclude each other: --exact keeps every rank"])
    if base_model is not None and not is_hub_id(base_model):
        raise ConfigError("hsplit export", [f"--base-model: {base_model!r} is not a Hugging Face hub id (ORG/NAME)"])
    adapter = Path(adapter) if adapter is not None else None
    merged = Path(merged) if merged is not None else None
    check_targets(adapter, merged)              # every target before anything is written
    total, config, last = total_update(run_dir)
    model_path = config["run"]["model_path"]
    hub_id = base_model or config["run"].get("hub_id") or hub_id_of_folder(Path(model_path))
    if not Path(model_path).exists() and config["run"].get("hub_id"):   # e.g. the run was trained elsewhere
        model_path = config["run"]["hub_id"]
    report = {"run": str(run_dir), "round": last, "base_model": hub_id or model_path, "base_model_hub_id": hub_id,
              "model_path": model_path, "modules": len(total)}
    if adapter is not None:
        adapter = Path(adapter)
        if exact:
            cut, source = None, "--exact"
        elif rank is not None:
            cut, source = rank, "--rank"
        else:
            cut, source = plan_max_rank(config["plan"]), "the plan's largest rank"
        factors, errs, ranks, full, sq_total, sq_lost = {}, {}, {}, {}, 0.0, 0.0
        for m, (b, a) in sorted(total.items()):
            b2, a2, r, norm2, lost2, full[m] = svd_factor(b, a, cut)
            sq_total += norm2
            sq_lost += lost2
            factors[m], ranks[m] = (b2, a2), r
            errs[m] = math.sqrt(lost2 / norm2) if norm2 > 0 else 0.0
        report.update(adapter=str(adapter), rank=cut if cut is not None else "exact", rank_source=source,
                      max_rank=max(ranks.values()) if ranks else 0,
                      exact_max_rank=max(full.values()) if full else 0,
                      relative_error=math.sqrt(sq_lost / sq_total) if sq_total > 0 else 0.0,
                      max_module_error=max(errs.values()) if errs else 0.0,
                      worst_module=max(errs, key=errs.get) if errs else None,
                      embedded=config["run"].get("model_origin") == "embedded" and not base_model)
        card = model_card(config, _rows(run_dir, last), report)
        data = config["plan"].get("data") or {}
        labels = list(data.get("labels") or []) if data.get("task") == "classification" else None
        if labels:
            report["task"], report["labels"] = "classification", labels
        report["size_mb"] = _write_adapter(adapter, factors, ranks, model_path, hub_id or model_path, card, progress,
                                           labels)
        report["model_card"] = str(adapter / "README.md")
    if merged is not None:
        merged = Path(merged)
        tmp = _fresh_target(merged)
        try:
            lm = load_lm(model_path, progress=progress)
            with torch.no_grad():
                for m, (b, a) in total.items():
                    w = lm.model.get_submodule(m).weight
                    delta = (b @ a).to(w.dtype)
                    w += delta.T if lm.profile.family.name == "gpt2" else delta
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            _commit(tmp, merged)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        report["merged"] = str(merged)
    return report


def _rows(run_dir: str | Path, last: int) -> list[dict]:
    """The run's metrics rows up to round `last` (from its checkpoints)."""
    return [row for r in checkpoint.complete_rounds(Path(run_dir)) if r <= last
            for row in checkpoint.read_state(Path(run_dir), r).get("metrics", [])]


def _seq_cls_model(lm, model_path: str, labels: list[str]):
    """`AutoModelForSequenceClassification` of the base model whose `score` is the run's label-word head
    (runtime/models/task.py), and that head: what a classification run's adapter is saved against."""
    from transformers import AutoModelForSequenceClassification

    from hsplit.runtime.models.task import Classification, label_word_head
    head = label_word_head(lm.model.get_output_embeddings().weight, Classification(labels, lm.tokenizer).tokens)
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()        # its report of the new `score` weight: set from the head below
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)}, pad_token_id=lm.tokenizer.pad_token_id)
    finally:
        hf_logging.set_verbosity(level)
    return model, head


def _write_adapter(path: Path, factors, ranks, model_path: str, base_name: str, card: str, progress: bool,
                   labels: list[str] | None = None) -> float:
    """The PEFT adapter folder with its model card; returns the size of its weights in MB. labels: a
    classification run's label set: the adapter is for `AutoModelForSequenceClassification` (task SEQ_CLS)
    and carries the head as the saved `score` module (modules_to_save)."""
    from peft import LoraConfig

    from hsplit.runtime.models.lora import get_peft_model

    tmp = _fresh_target(path)
    try:
        lm = load_lm(model_path, progress=progress)
        base, extra = lm.model, {}
        if labels:
            base, head = _seq_cls_model(lm, model_path, labels)
            extra = {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}
        names = sorted(factors)
        cfg = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=names,
                         rank_pattern={rank_pattern_key(m): ranks[m] for m in names},
                         alpha_pattern={rank_pattern_key(m): ranks[m] for m in names},
                         fan_in_fan_out=lm.profile.family.name == "gpt2", bias="none", lora_dropout=0.0, **extra)
        model = get_peft_model(base, cfg)
        if labels:
            with torch.no_grad():
                model.base_model.model.score.modules_to_save["default"].weight.copy_(head)
        layers = {n.removeprefix("base_model.model."): mod for n, mod in model.named_modules()
                  if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}
        with torch.no_grad():
            for m, (b, a) in factors.items():
                layers[m].lora_A["default"].weight.copy_(a.float())
                layers[m].lora_B["default"].weight.copy_(b.float())
        model.peft_config["default"].base_model_name_or_path = model_path   # PEFT reads its config.json when saving
        model.save_pretrained(tmp)
        cfg_file = tmp / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = base_name                         # what users load: the hub id
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)           # instead of PEFT's empty template
        size = sum(f.stat().st_size for f in tmp.glob("adapter_model.*")) / 1e6
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size
