"""Fleet inventories as tables: `clients: [{table: devices.csv}]` (or .parquet) lists one client per row, checked
with the rules of a YAML client group; a bad cell is one error naming the table, the row and the column."""
from __future__ import annotations

import pandas as pd
import pytest

from hsplit.planner.api import make_plan
from hsplit.planner.errors import ConfigError
from hsplit.planner.fleet import Fleet

ROWS = [
    {"id": "phone-1", "device": "snapdragon-8-gen3-phone", "memory_gib": 5.0, "peak_flops.fp32": 2.0e12,
     "uplink_mbps": 30, "downlink_mbps": 90, "budget.round_s": 900, "data_weight": 2.0},
    {"id": "board-2", "device": "jetson-orin-nano-8gb", "memory_gib": None, "peak_flops.fp32": None,
     "uplink_mbps": None, "downlink_mbps": None, "budget.round_s": None, "data_weight": 1.0},
]


def _fleet(tmp_path, rows, name="devices.csv", extra_yaml=""):
    df = pd.DataFrame(rows)
    path = tmp_path / name
    df.to_parquet(path) if name.endswith(".parquet") else df.to_csv(path, index=False)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"server: {{device: a100-80gb}}\nclients:\n  - table: {name}\n{extra_yaml}")
    return fleet


@pytest.mark.parametrize("name", ["devices.csv", "devices.parquet"])
def test_a_table_fleet_is_the_yaml_fleet_of_the_same_clients(tmp_path, name):
    fleet = Fleet.load(_fleet(tmp_path, ROWS, name))
    clients = fleet.clients()
    assert [c.id for c in clients] == ["phone-1", "board-2"]
    phone = clients[0].device
    assert (phone.name, phone.memory_gib, phone.peak_flops["fp32"], phone.uplink_mbps) == \
        ("snapdragon-8-gen3-phone", 5.0, 2.0e12, 30)
    assert clients[0].budget.round_s == 900 and clients[0].data_weight == 2.0
    assert clients[1].device.name == "jetson-orin-nano-8gb" and clients[1].budget.round_s is None
    yaml_fleet = Fleet.from_dict(fleet.to_dict(), "again.yaml")        # the same clients written as YAML groups
    assert yaml_fleet.sha256() == fleet.sha256()
    plan = make_plan(fleet, "smollm2-135m")
    assert [c.id for c in plan.clients] == ["phone-1", "board-2"]


def test_a_row_without_device_is_an_inline_profile(tmp_path):
    rows = [{"id": "x1", "kind": "soc", "memory_gib": 6.0, "peak_flops.fp32": 1e12, "efficiency": 0.3, "uplink_mbps": 40,
             "downlink_mbps": 100}]
    dev = Fleet.load(_fleet(tmp_path, rows)).clients()[0].device
    assert (dev.name, dev.kind, dev.memory_gib) == ("x1", "soc", 6.0)


@pytest.mark.parametrize("change,words", [
    ({"budget.round_s": -3}, "devices.csv row 2, column budget.round_s: must be > 0"),
    ({"data_weight": "lots"}, "devices.csv row 2, column data_weight: must be a number"),
    ({"device": "no-such-board"}, "devices.csv row 2, column device: no profile named 'no-such-board'"),
    ({"memory_gib": -1.0}, "devices.csv row 2, column memory_gib: must be > 0"),
    ({"budget.memory_gib": 99.0}, "devices.csv row 2, column budget.memory_gib: 99 GiB exceeds the usable memory"),
    ({"id": "phone-1"}, "client id 'phone-1' is used twice"),
    ({"id": "a..b"}, "devices.csv row 2, column id: must be one line of text"),
])
def test_a_bad_cell_names_the_table_row_and_column(tmp_path, change, words):
    rows = [dict(ROWS[0]), {**ROWS[1], **change}]
    if "memory_gib" in change:          # a profile column with the device: the row's own measurement
        rows[1]["peak_flops.fp32"] = 1e12
    with pytest.raises(ConfigError) as e:
        Fleet.load(_fleet(tmp_path, rows))
    assert words in str(e.value) and "fleet.yaml" in str(e.value), str(e.value)


def test_unknown_columns_and_missing_tables_are_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        Fleet.load(_fleet(tmp_path, [{**ROWS[0], "colour": "red"}]))
    assert "clients[0].table: devices.csv: unknown column 'colour'" in str(e.value)
    fleet = tmp_path / "f2.yaml"
    fleet.write_text("server: {device: a100-80gb}\nclients:\n  - table: nowhere.csv\n")
    with pytest.raises(ConfigError) as e:
        Fleet.load(fleet)
    assert "clients[0].table: file not found" in str(e.value)


def test_a_table_and_yaml_groups_mix_with_unique_ids(tmp_path):
    fleet = Fleet.load(_fleet(tmp_path, ROWS, extra_yaml="  - {device: rtx-4090-24gb, count: 2}\n"))
    assert [c.id for c in fleet.clients()] == ["phone-1", "board-2", "c2", "c3"]
