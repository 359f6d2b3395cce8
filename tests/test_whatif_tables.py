"""`hsplit whatif` over table fleets (`clients: [{table: devices.csv}]`): a sweep of the server and the plan
settings reads the fleet once and gives the same table as planning each scenario's fleet file on its own;
`--vary clients.*` names the table whose rows it cannot reach."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from hsplit.planner.api import make_plan
from hsplit.planner.errors import ConfigError
from hsplit.planner.fleet import Fleet
from hsplit.planner.whatif import build_scenarios, run_whatif

ROWS = [
    {"id": "phone-1", "device": "snapdragon-8-gen3-phone", "memory_gib": 5.0, "uplink_mbps": 30,
     "budget.round_s": 900, "data_weight": 2.0},
    {"id": "board-2", "device": "jetson-orin-nano-8gb", "memory_gib": 6.0, "uplink_mbps": 12,
     "budget.round_s": 1200, "data_weight": 1.0},
    {"id": "laptop-3", "device": "laptop-core-i7-1360p-16gb", "memory_gib": 9.0, "uplink_mbps": 80,
     "budget.round_s": 600, "data_weight": 0.5},
]


def _table_fleet(tmp_path):
    pd.DataFrame(ROWS).to_csv(tmp_path / "devices.csv", index=False)
    path = tmp_path / "fleet.yaml"
    path.write_text("name: inventory\nserver: {device: a100-80gb, count: 1}\nclients:\n  - table: devices.csv\n")
    return path


def test_a_server_sweep_of_a_table_fleet_plans_each_scenario_as_hsplit_plan_would(tmp_path):
    path = _table_fleet(tmp_path)
    scenarios = build_scenarios([str(path)], ["server.count=1,3", "server.concurrency=1,2"])
    assert len({id(sc.fleet.groups) for sc in scenarios}) == 1            # the table was read once
    df = run_whatif([str(path)], ["server.count=1,3", "server.concurrency=1,2"], solver="highs")
    assert list(df["status"]) == ["optimal"] * 4
    loaded = Fleet.load(path)
    for (_, row), (count, conc) in zip(df.iterrows(), [(1, 1), (1, 2), (3, 1), (3, 2)]):
        fleet = replace(loaded, server=replace(loaded.server, count=count, concurrency=conc))
        plan = make_plan(fleet, "smollm2-135m", solver="highs")
        assert row["round_s"] == plan.predicted["round_s"] and row["utility"] == plan.predicted["utility"]
    assert df.loc[0, "server_busy_share"] != df.loc[2, "server_busy_share"]    # each scenario has its own server


def test_varying_the_clients_of_a_table_fleet_names_the_table(tmp_path):
    path = _table_fleet(tmp_path)
    with pytest.raises(ConfigError, match=r"clients\.\*\.uplink_mbps: fleet fleet.yaml lists clients in "
                                          r"devices.csv, whose rows --vary clients.\* does not reach"):
        build_scenarios([str(path)], ["clients.*.uplink_mbps=10,20"])
