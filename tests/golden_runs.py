"""Pinned tiny-model runs of every strategy (in-process and distributed): per-round losses and the
final checkpoint's tensors. `python tests/golden_runs.py write DIR` records them; `... check DIR`
re-runs and compares (the runtime redesign must leave them identical). tests/test_golden_runs.py
checks the in-process runs against tests/golden/ on every test run.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every strategy; hsplitlora-restart: hsplitlora with `aggregation: restart` (the aggregation before warm)
STRATEGIES = ["hsplitlora", "hsplitlora-restart", "splitlora", "hetlora", "flexlora", "hafl-truncation",
              "hafl-freezing", "centralized"]
LINES = ["To be, or not to be, that is the question.", "The Eagle is a coffee shop near the river.",
         "Now is the winter of our discontent.", "Whether 'tis nobler in the mind to suffer."]


def make_env(root: Path):
    from hsplit.runtime.models.tiny import save_tiny_model
    model = save_tiny_model(root / "tiny-llama", "llama", layers=4)
    text = root / "corpus"
    text.mkdir(exist_ok=True)
    for i, name in enumerate(("alpha", "beta", "gamma")):
        (text / f"{name}.txt").write_text(" ".join(LINES[(i + j) % 4] for j in range(120)))
    return model, text


def make_plan(root: Path, model, text, strategy: str) -> Path:
    """The plan of tests/test_distributed.py (dropout and clipping on, clients split at blocks 1 and 3)."""
    from hsplit.planner.plan import Plan
    from test_distributed import make_plan as distributed_plan
    path = distributed_plan((root, model, text), f"{strategy}.yaml", strategy.removesuffix("-restart"))
    if strategy.endswith("-restart"):
        plan = Plan.load(path)
        plan.aggregation = "restart"
        plan.save(path)
    return path


def record(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    import csv
    from hsplit.runtime.train import checkpoint
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    losses = {f"{r['round']}/{r['client']}": [r["train_loss"], r["eval_loss"]] for r in rows}
    last = checkpoint.complete_rounds(run_dir)[-1]
    _, files = checkpoint.load(run_dir, last)
    tensors = {f"{f}/{k}": v.float().contiguous() for f, d in files.items() for k, v in d.items()}
    return losses, tensors


def runs(root: Path, distributed: bool) -> dict[str, tuple[dict, dict]]:
    torch.set_num_threads(1)
    before = os.environ.get("HSPLIT_CACHE")
    os.environ["HSPLIT_CACHE"] = str(root / "cache")
    try:
        return _runs(root, distributed)
    finally:
        os.environ.pop("HSPLIT_CACHE") if before is None else os.environ.update(HSPLIT_CACHE=before)


def _runs(root: Path, distributed: bool) -> dict[str, tuple[dict, dict]]:
    from hsplit.runtime.train.loop import run
    from hsplit.runtime.train.options import RunOptions
    model, text = make_env(root)
    out = {}
    paths = {s: make_plan(root, model, text, s) for s in STRATEGIES}
    for s, path in paths.items():
        res = run(path, RunOptions(runs_dir=root / "runs", name=s, progress=False, eval_max_seqs=8, threads=1))
        out[s] = record(res.run_dir)
    if distributed:
        from hsplit.runtime.distributed.launcher import launch_local
        from hsplit.runtime.train.options import DistOptions
        split = [paths[s] for s in STRATEGIES if s != "centralized"]
        opts = RunOptions(runs_dir=root / "runs-dist", progress=False, threads=1, eval_max_seqs=8)
        code = launch_local(split, opts, DistOptions(timeout_s=60),
                            env=dict(os.environ, HSPLIT_TOKEN="s3cret", OMP_NUM_THREADS="1"), deadline_s=300)
        assert code == 0
        for s in STRATEGIES[:-1]:
            out["dist-" + s] = record(root / "runs-dist" / s)
    return out


def save(results, folder: Path) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    for name, (losses, tensors) in results.items():
        (folder / f"{name}.json").write_text(json.dumps(losses, indent=1, sort_keys=True) + "\n")
        save_file(tensors, str(folder / f"{name}.safetensors"))


def compare(results, folder: Path, tol: float = 0.0) -> list[str]:
    from safetensors.torch import load_file
    bad = []
    for name, (losses, tensors) in results.items():
        want_l = json.loads((folder / f"{name}.json").read_text())
        want_t = load_file(str(folder / f"{name}.safetensors"))
        if want_l != losses:
            bad.append(f"{name}: losses differ: {want_l} vs {losses}")
        if want_t.keys() != tensors.keys():
            bad.append(f"{name}: tensor names differ: {sorted(set(want_t) ^ set(tensors))[:5]}")
            continue
        for k in want_t:
            d = float((want_t[k] - tensors[k]).abs().max()) if want_t[k].numel() else 0.0
            if not d <= tol:
                bad.append(f"{name}: {k} differs by {d:.3g}")
    return bad


if __name__ == "__main__":
    import tempfile
    mode, folder = sys.argv[1], Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        res = runs(Path(tmp), distributed=True)
        if mode == "write":
            save(res, folder)
        else:
            problems = compare(res, folder)
            print("\n".join(problems) or "identical")
            sys.exit(1 if problems else 0)
