"""Where a run with client sampling keeps the state of the clients that are not training this round.

    store = PartyStore(run_dir / "clients", upto=last_round)     # versions after `upto` are dropped
    store.save("k17", 4, tensors)       # party k17's state after round 4 (it trained in round 4)
    tensors = store.load("k17")          # its newest state (None: it never trained, fresh init)

runs/<name>/clients/<adapter>/round-NNNN.safetensors holds one party's adapter factors (both sides),
AdamW moments and what its strategy keeps per client (hafl: component selection, own scores), as
of the end of round NNNN, the last round it trained. Only the clients of the current round are
in memory; a file is written once, atomically, when its client finishes a round, and never
rewritten, so a checkpoint of round r (and --resume from it) reads each client's newest version
<= r. Versions newer than the checkpoint a run resumes from are the killed round's and are removed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError


class PartyStore:
    def __init__(self, root: Path, upto: int | None = None):
        self.root = Path(root)
        self.versions: dict[str, list[int]] = {}
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if not d.is_dir():
                    continue
                for f in d.iterdir():
                    if f.name.startswith(".tmp-"):
                        f.unlink(missing_ok=True)
                        continue
                    if not (f.name.startswith("round-") and f.name.endswith(".safetensors")):
                        continue
                    v = int(f.name[len("round-"):-len(".safetensors")])
                    if upto is not None and v > upto:
                        f.unlink()                  # written by a round that was not committed
                        continue
                    self.versions.setdefault(d.name, []).append(v)
        for vs in self.versions.values():
            vs.sort()

    def path(self, name: str, version: int) -> Path:
        return self.root / name / f"round-{version:04d}.safetensors"

    def save(self, name: str, version: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        final = self.path(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, final)
        vs = self.versions.setdefault(name, [])
        if version not in vs:
            vs.append(version)
            vs.sort()

    def latest(self, name: str, upto: int | None = None) -> int | None:
        vs = [v for v in self.versions.get(name, []) if upto is None or v <= upto]
        return vs[-1] if vs else None

    def load(self, name: str, upto: int | None = None) -> dict[str, torch.Tensor] | None:
        """Party `name`'s newest state (at most version `upto`), None when it has never trained."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        v = self.latest(name, upto)
        if v is None:
            return None
        path = self.path(name, v)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(str(path), [f"a client's saved state is corrupt or unreadable ({e}); restore it from "
                                          "a backup or start the run again with a new --name"]) from None

    def read_bytes(self, name: str, upto: int | None = None) -> bytes | None:
        v = self.latest(name, upto)
        return None if v is None else self.path(name, v).read_bytes()

    def prune(self, keep_rounds: list[int]) -> None:
        """Keep, per party, only the versions a kept checkpoint round reads (its newest <= that round)."""
        for name, vs in self.versions.items():
            needed = {max((v for v in vs if v <= r), default=None) for r in keep_rounds} - {None}
            for v in [v for v in vs if v not in needed and v < max(vs)]:
                self.path(name, v).unlink(missing_ok=True)
                vs.remove(v)
