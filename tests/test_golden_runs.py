"""Pinned losses and final tensors (adapters of every party, AdamW moments, merged factors) of a
tiny-model run of every strategy: a refactor of the runtime leaves them identical. The pins were
recorded by `python tests/golden_runs.py write tests/golden` (its `check` mode also compares the
distributed runs against a folder recorded the same way)."""
from pathlib import Path

import pytest
import torch

from golden_runs import compare, runs

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        yield runs(tmp_path_factory.mktemp("golden"), distributed=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", ["hsplitlora", "hsplitlora-restart", "splitlora", "hetlora", "flexlora", "hafl-truncation",
                                      "hafl-freezing", "centralized"])
def test_every_strategy_trains_exactly_the_pinned_losses_and_adapters(in_process, strategy):
    assert compare({strategy: in_process[strategy]}, GOLDEN, tol=1e-6) == []
