"""Every shipped file under profiles/ loads, validates and says which command uses it."""
from __future__ import annotations

from pathlib import Path

import pytest

from hsplit.planner.device import PROFILE_DIR, DeviceProfile
from hsplit.planner.fleet import Fleet
from hsplit.planner.model import SHIPPED_MODELS, load_model_profile

DEVICES = sorted((PROFILE_DIR / "devices").glob("*.yaml"))
FLEETS = sorted((PROFILE_DIR / "fleets").glob("*.yaml"))


@pytest.mark.parametrize("path", DEVICES, ids=lambda p: p.stem)
def test_device_profile_loads_with_source_and_honest_throughput(path: Path):
    assert path.read_text().startswith("# "), "shipped YAML starts with a comment naming its command"
    d = DeviceProfile.load(path)
    assert d.name == path.stem
    assert d.source and d.source.startswith("http")
    assert d.peak_flops and 0 < d.efficiency <= 1
    assert d.throughput("fp32") == pytest.approx(d.peak_flops["fp32"] * d.efficiency)
    assert d.memory_total_gib is None or d.memory_gib <= d.memory_total_gib


def test_at_least_twelve_device_kinds_cover_the_fleet_spectrum():
    kinds = {DeviceProfile.load(p).kind for p in DEVICES}
    assert len(DEVICES) >= 12 and {"phone", "soc", "gpu", "cpu"} <= kinds


@pytest.mark.parametrize("path", FLEETS, ids=lambda p: p.stem)
def test_fleet_loads(path: Path):
    assert path.read_text().startswith("# ")
    fleet = Fleet.load(path)
    assert fleet.num_clients >= 5
    assert len(fleet.clients()) == fleet.num_clients


def test_shipped_fleet_sizes():
    assert Fleet.load("example").num_clients == 5
    assert len({g.device.name for g in Fleet.load("example").groups}) == 3
    assert 90 <= Fleet.load("edge-100").num_clients <= 110
    big = Fleet.load("edge-1000")
    assert big.num_clients == 1000 and len({g.device.name for g in big.groups}) >= 6


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_model_configs(name):
    m = load_model_profile(name)
    expected = {"smollm2-135m": 0.135e9, "gpt2": 0.124e9, "gpt2-medium": 0.355e9, "gpt2-large": 0.774e9,
                "llama-2-7b": 6.74e9, "llama-3-8b": 8.03e9, "qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.62e9}[name]
    assert m.total_params() == pytest.approx(expected, rel=0.01)


def test_model_from_folder_and_config_path(tmp_path):
    src = PROFILE_DIR / "models" / "gpt2.json"
    (tmp_path / "config.json").write_text(src.read_text())
    assert load_model_profile(tmp_path).layers == 12
    assert load_model_profile(tmp_path / "config.json").family.name == "gpt2"
