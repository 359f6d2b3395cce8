"""Shared fixtures: seeded random small planning instances and a tiny model profile."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsplit.planner.cost import GIB  # noqa: E402
from hsplit.planner.fleet import Fleet  # noqa: E402
from hsplit.planner.importance import Importance  # noqa: E402
from hsplit.planner.model import LLAMA, ModelProfile  # noqa: E402
from hsplit.planner.plan import Training  # noqa: E402


def tiny_model(layers: int = 4) -> ModelProfile:
    return ModelProfile(name="tiny-llama", family=LLAMA, hidden=64, layers=layers, heads=4, kv_heads=2,
                        intermediate=128, vocab=256, tied_embeddings=True, max_positions=512)


def random_instance(seed: int, *, uniform: bool = False, two_clients: bool = False):
    """A small instance whose budgets bind: 2-3 client groups of 1-2 clients (exactly two clients with
    `two_clients`), 3-6 blocks, 2 modules, 3-4 ranks."""
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(3, 7))
    ranks = (0, 2, 4, 8) if layers <= 5 else (0, 2, 4)
    model = tiny_model(layers)
    modules = ("q_proj", "v_proj")
    training = Training(batch_size=2, seq_len=16, local_steps=int(rng.integers(1, 4)))
    # Scale budgets to the model: a client block in memory is ~100 KB, its forward ~ 1 MFLOP.
    groups = []
    for g in range(2 if two_clients else int(rng.integers(2, 4))):
        flops = float(rng.uniform(2e6, 5e7))
        mem_gib = float(rng.uniform(0.0006, 0.003))
        device = {"name": f"dev{g}", "kind": "soc", "memory_gib": mem_gib, "flops": {"fp32": flops},
                  "uplink_mbps": float(rng.uniform(5, 200)), "downlink_mbps": float(rng.uniform(20, 400))}
        budget = {"memory_gib": float(rng.uniform(0.5, 1.0)) * mem_gib}
        if rng.random() < 0.8:
            budget["round_s"] = float(rng.uniform(0.3, 3.0)) * training.local_steps
        groups.append({"device": device, "count": 1 if two_clients else int(rng.integers(1, 3)),
                       "data_weight": float(rng.uniform(0.5, 2.0)), "budget": budget})
    server = {"device": {"name": "srv", "kind": "gpu", "memory_gib": 1.0, "flops": {"fp32": float(rng.uniform(5e7, 5e8))},
                         "uplink_mbps": 1000, "downlink_mbps": 1000}}
    fleet = Fleet.from_dict({"name": f"random-{seed}", "server": server, "clients": groups}, f"<random {seed}>")
    if uniform:
        importance = None
    else:
        scores = {model.module_name(l, m): float(rng.gamma(1.0)) for l in range(layers)
                  for m in ("self_attn.q_proj", "self_attn.v_proj")}
        importance = Importance(scores=scores, method="random", source=f"<random {seed}>")
    return dict(fleet=fleet, model=model, importance=importance, ranks=ranks, modules=list(modules),
                training=training)


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny torch ops: one thread avoids OpenMP spin contention with other processes on a shared CPU
    (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CORPUS_LINES = ["To be, or not to be, that is the question.", "The Eagle is a coffee shop near the river.",
                "Now is the winter of our discontent.", "Whether 'tis nobler in the mind to suffer."]


def tiny_runtime_env(tmp_path_factory, prefix: str, sources=("alpha", "beta", "gamma")):
    """For module-scoped runtime fixtures (`yield from tiny_runtime_env(...)`): a tiny Llama saved to
    disk, a text corpus with one file per data source, and HSPLIT_CACHE inside the temp folder
    (restored afterwards). Yields (root, model_dir, corpus_dir)."""
    from hsplit.runtime.models.tiny import save_tiny_model
    root = tmp_path_factory.mktemp(prefix)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HSPLIT_CACHE", str(root / "cache"))
        model = save_tiny_model(root / "tiny-llama", "llama", layers=4)
        text = root / "corpus"
        text.mkdir()
        for i, name in enumerate(sources):
            (text / f"{name}.txt").write_text(" ".join(CORPUS_LINES[(i + j) % 4] for j in range(120)))
        yield root, model, text


def at_step(monkeypatch, hook):
    """Call hook(round, party index, step) before every local step of an in-process run (e.g. to kill it
    at a given step); use inside `monkeypatch.context()` to limit it to one run."""
    from hsplit.runtime.train import loop
    real = loop.client_round

    def client_round(sim, p, r, server, on_step=None):
        def both(rr, i, s):
            hook(rr, i, s)
            if on_step:
                on_step(rr, i, s)
        return real(sim, p, r, server, both)
    monkeypatch.setattr(loop, "client_round", client_round)


__all__ = ["GIB", "at_step", "random_instance", "tiny_model", "tiny_runtime_env"]


def tiny_e2e_plan(root, rows: list[tuple[str, str]], *, seq_len: int = 32, local_steps: int = 1,
                  ranks: tuple[int, int] = (2, 2)):
    """A 2-layer tiny llama, an E2E CSV of (mr, ref) rows and a 2-client hetlora plan on them, under
    `root`. Returns (plan path, data path): what the eval/generate/export tests train for one round."""
    from hsplit.planner.plan import Plan
    from hsplit.runtime.models.tiny import save_tiny_model
    model = save_tiny_model(root / "model", "llama", layers=2)
    data = root / "e2e.csv"
    data.write_text("\n".join(["mr,ref"] + [f'"{mr}","{ref}"' for mr, ref in rows]) + "\n")
    plan = Plan.from_dict({"model": str(model), "strategy": "hetlora", "server_rank": 2, "modules": ["q_proj"],
                           "training": {"batch_size": 2, "seq_len": seq_len, "local_steps": local_steps,
                                        "rounds": 1, "dtype": "fp32", "learning_rate": 1e-2},
                           "data": {"path": str(data), "eval_fraction": 0.1},
                           "clients": [{"device": "a", "split_layer": 1, "ranks": {"q_proj": ranks[0]}},
                                       {"device": "b", "split_layer": 2, "ranks": {"q_proj": ranks[1]}}]},
                          "plan.yaml")
    plan.save(root / "plan.yaml")
    return root / "plan.yaml", data
