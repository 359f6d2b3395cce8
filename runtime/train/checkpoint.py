"""Per-round checkpoints of a run: written atomically, verified by hash when read back.

    runs/<name>/checkpoints/round-0003/
        adapters.safetensors   every client's (and the global) LoRA factors after aggregation
        optimizer.safetensors  every client's AdamW moments (client side and server side)
        merged.safetensors     this round's exact aggregate factors merged into the base (hsplitlora)
        state.json             round, metrics rows, AdamW hyper-parameters, sha256 of each file

With `hsplit run --keep-checkpoints K` only the newest K rounds keep adapters.safetensors and
optimizer.safetensors (the only ones read back); merged.safetensors and state.json of every round
stay, because resuming and exporting replay every round's merge.

A checkpoint directory is first written as `.tmp-round-0003-<pid>` and renamed into place: a run
killed at any moment leaves either a complete checkpoint or none (stale temp dirs are removed on
resume). `round-0000` is the initial state. Resuming replays the merged factors of rounds 1..N
onto the base weights in order (bit-identical to the uninterrupted run) and loads adapters and
optimizer state of round N.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.yamlio import atomic_write_text

FILES = ("adapters.safetensors", "optimizer.safetensors", "merged.safetensors")


def round_dir(run_dir: Path, r: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{r:04d}"


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(run_dir: Path, r: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
         keep: int | None = None) -> Path:
    """Write checkpoint `r` (tensors: file name -> flat tensor dict) atomically, then prune older
    rounds to the newest `keep` (None: keep every round's files)."""
    from safetensors.torch import save_file

    final = round_dir(run_dir, r)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hashes = {}
        for name in FILES:
            flat = {k: v.detach().cpu().contiguous() for k, v in tensors.get(name, {}).items()}
            save_file(flat, str(tmp / name))
            hashes[name] = _sha(tmp / name)
        (tmp / "state.json").write_text(json.dumps({**state, "round": r, "files": hashes}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep)
    return final


def complete_rounds(run_dir: Path) -> list[int]:
    """Rounds with a committed checkpoint, ascending."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if d.name.startswith("round-") and (d / "state.json").is_file():
            try:
                out.append(int(d.name.split("-")[1]))
            except ValueError:
                continue
    return sorted(out)


def remove_stale(run_dir: Path) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)


PRUNABLE = ("adapters.safetensors", "optimizer.safetensors")


def prune(run_dir: Path, keep: int | None) -> None:
    """Drop adapters + optimizer state of all but the newest `keep` complete rounds (None: keep all).

    Nothing but the last round's adapters/optimizer is ever read back (resume, eval, export replay
    every round's merged factors, which are kept with state.json). The rounds pruned are recorded in
    their state.json (atomically, before the files go) so that reading one says why it is gone."""
    if keep is None:
        return
    done = complete_rounds(run_dir)
    for r in done[:max(0, len(done) - keep)]:
        d = round_dir(run_dir, r)
        if not any((d / name).exists() for name in PRUNABLE):
            continue        # pruned after an earlier round
        state = read_state(run_dir, r)
        atomic_write_text(d / "state.json", json.dumps({**state, "pruned": list(PRUNABLE)}, indent=1))
        for name in PRUNABLE:
            (d / name).unlink(missing_ok=True)


def _has_full_state(run_dir: Path, r: int) -> bool:
    """Round r can be resumed from: committed, and its adapters + optimizer state not pruned."""
    d = round_dir(run_dir, r)
    return r >= 0 and (d / "state.json").is_file() and all((d / name).is_file() for name in PRUNABLE)


def fallback_advice(run_dir: Path, r: int) -> str:
    """What to do about a corrupt file of round r. Deleting round r (and the later rounds) only helps
    when round r-1 still has its adapters and optimizer state (--keep-checkpoints may have pruned them)."""
    run_dir = Path(run_dir)
    d = round_dir(run_dir, r)
    later = [x for x in complete_rounds(run_dir) if x > r]
    if _has_full_state(run_dir, r - 1):
        if later:
            return (f"delete {d} and the later rounds' folders (round-{later[0]:04d} to round-{later[-1]:04d}) "
                    f"to resume from round {r - 1}")
        return f"delete {d} to resume from round {r - 1}"
    why = ("round 0 is the initial state" if r <= 0 else
           f"round {r - 1}'s adapters and optimizer state were pruned (--keep-checkpoints)")
    return (f"there is no complete earlier round to fall back to ({why}): restore this file from a backup, "
            f"or start the run again (delete {run_dir} or pass a new --name)")


def read_state(run_dir: Path, r: int) -> dict:
    path = round_dir(run_dir, r) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(str(path), [f"checkpoint is corrupt or unreadable ({e}); "
                                      f"{fallback_advice(run_dir, r)}"]) from None


def load(run_dir: Path, r: int, files=FILES) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(state, {file: tensors}) of checkpoint `r`, after checking every file's sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = round_dir(run_dir, r)
    state = read_state(run_dir, r)
    out = {}
    for name in files:
        path = d / name
        if name in state.get("pruned", []):
            raise ConfigError(str(path), [f"round {r}'s {name} was pruned (--keep-checkpoints); only the newest "
                                          "rounds keep adapters and optimizer state"])
        expected = state.get("files", {}).get(name)
        if not path.is_file() or expected is None or _sha(path) != expected:
            raise ConfigError(str(path), [
                "checkpoint is corrupt (missing, or its sha256 differs from state.json); "
                f"{fallback_advice(run_dir, r)}"])
        try:
            out[name] = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(str(path), [f"checkpoint is corrupt ({e}); {fallback_advice(run_dir, r)}"]) from None
    return state, out
