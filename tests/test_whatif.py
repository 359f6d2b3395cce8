"""`hsplit whatif`: scenarios, validation before solving, the table, the Pareto front, the plots."""
from __future__ import annotations

import json

import matplotlib.image as mpimg
import pandas as pd
import pytest
from typer.testing import CliRunner

import hsplit.planner.whatif as whatif_mod
from hsplit.cli import app
from hsplit.planner.errors import ConfigError
from hsplit.planner.whatif import build_scenarios, pareto_front, run_whatif

runner = CliRunner()


def test_every_fleet_times_every_combination():
    df = run_whatif(["example", "edge-100"], ["clients.*.uplink_mbps=20,200", "seq_len=128,256"])
    assert len(df) == 2 * 2 * 2
    assert list(df["clients.*.uplink_mbps"]) == ["20", "20", "200", "200"] * 2
    for col in ("scenario", "round_s", "straggler", "utility", "server_busy_share", "server_memory_gib",
                "traffic_mb_per_round", "headroom_gib_min", "infeasible", "split[raspberry-pi-5-8gb]",
                "rank[raspberry-pi-5-8gb]"):
        assert col in df.columns
    ok = df[df["status"] != "infeasible"]
    assert (ok["utility"].between(0, 1)).all() and (ok["round_s"] > 0).all()
    clients = df.attrs["clients"]
    assert set(clients["scenario"]) == set(ok["scenario"])
    # More uplink bandwidth never makes the predicted round slower at equal utility.
    ex = df[df["fleet"] == "edge-100"].set_index(["clients.*.uplink_mbps", "seq_len"])
    assert ex.loc[("200", "256"), "round_s"] <= ex.loc[("20", "256"), "round_s"] + 1e-9


def test_zip_walks_lists_in_lockstep_and_replaces_devices():
    df = run_whatif(["example"], ["clients.raspberry-pi-5-8gb.count=2,1,0",
                                  "clients.jetson-orin-nano-8gb.count=2,3,4"], zip_vary=True)
    assert len(df) == 3
    assert list(df["clients"]) == [5, 5, 5]
    df2 = run_whatif(["example"], ["clients.raspberry-pi-5-8gb.device=jetson-orin-nx-16gb"])
    assert "split[jetson-orin-nx-16gb]" in df2.columns and "split[raspberry-pi-5-8gb]" not in df2.columns


def test_bad_paths_and_values_fail_together_before_any_solving(monkeypatch):
    monkeypatch.setattr(whatif_mod, "make_plan", lambda *a, **k: pytest.fail("solved before validating"))
    with pytest.raises(ConfigError) as e:
        run_whatif(["example"], ["clients.*.uplinkk_mbps=10", "clients.iphone-99.count=1",
                                 "seq_len=abc", "server.device=no-such-gpu", "warp=9"])
    text = str(e.value)
    assert "uplinkk_mbps" in text and "unknown client field" in text
    assert "no client group with device 'iphone-99'" in text and "raspberry-pi-5-8gb" in text
    assert "seq_len=abc" in text
    assert "no-such-gpu" in text
    assert "warp: unknown path" in text


def test_budget_above_device_memory_is_reported_per_scenario():
    with pytest.raises(ConfigError, match=r"budget.memory_gib: 99 GiB exceeds"):
        build_scenarios(["example"], ["clients.*.budget.memory_gib=2,99"])


def test_infeasible_scenarios_are_rows_with_reasons():
    df = run_whatif(["example"], ["clients.*.budget.memory_gib=0.05,3"])
    bad = df[df["status"] == "infeasible"]
    assert len(bad) == 1 and "memory: even the smallest split" in bad["infeasible"].iloc[0]


def test_pareto_front():
    df = pd.DataFrame({"utility": [0.5, 0.9, 0.4, 0.9, 0.2], "round_s": [10, 20, 30, 25, 5],
                       "status": ["optimal"] * 5})
    assert list(pareto_front(df)) == [True, True, False, False, True]


def test_cli_writes_table_and_nonempty_plots(tmp_path):
    out = tmp_path / "wi"
    r = runner.invoke(app, ["whatif", "example", "--vary", "clients.*.uplink_mbps=20,200", "--vary",
                            "server.device=a100-80gb,h100-80gb", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "| scenario" in r.output and "4 scenarios" in r.output
    table = pd.read_csv(out / "scenarios.csv")
    assert len(table) == 4
    assert len(json.loads((out / "scenarios.json").read_text())) == 4
    for name in ("round_time.png", "pareto.png", "splits_ranks.png"):
        img = mpimg.imread(out / name)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 0.01, f"{name} is blank"


def test_cli_json_and_bad_vary(tmp_path):
    r = runner.invoke(app, ["whatif", "example", "--vary", "seq_len=128", "-o", str(tmp_path / "w"),
                            "--format", "json"])
    assert r.exit_code == 0
    assert json.loads(r.output)["scenarios"][0]["seq_len"] == "128"
    r = runner.invoke(app, ["whatif", "example", "--vary", "seq_len", "-o", str(tmp_path / "w2")])
    assert r.exit_code == 1 and "PATH=V1,V2" in r.output
    assert not (tmp_path / "w2").exists()
