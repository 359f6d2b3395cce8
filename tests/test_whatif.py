"""`hsplit whatif`: scenarios, validation before solving, the table, the Pareto front, the plots."""
from __future__ import annotations

import json

import hsplit.planner.whatif as whatif_mod
import matplotlib.image as mpimg
import pandas as pd
import pytest
import yaml
from hsplit.cli import app
from hsplit.planner.errors import ConfigError
from hsplit.planner.whatif import build_scenarios, pareto_front, run_whatif
from typer.testing import CliRunner

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
    assert json.loads(r.stdout)["scenarios"][0]["seq_len"] == "128"
    r = runner.invoke(app, ["whatif", "example", "--vary", "seq_len", "-o", str(tmp_path / "w2")])
    assert r.exit_code == 2 and "PATH=V1,V2" in r.output
    assert not (tmp_path / "w2").exists()


TINY_INFEASIBLE = """server: {device: a100-80gb}
clients:
  - {device: raspberry-pi-5-8gb, count: 2, budget: {round_s: 30, memory_gib: 0.01}}
"""


def test_all_scenarios_infeasible_writes_table_and_plots_exit_0(tmp_path):
    fleet = tmp_path / "tiny.yaml"
    fleet.write_text(TINY_INFEASIBLE)
    out = tmp_path / "out"
    r = runner.invoke(app, ["whatif", str(fleet), "--vary", "seq_len=128,256", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "infeasible: c0, c1 (raspberry-pi-5-8gb): memory" in r.output
    table = pd.read_csv(out / "scenarios.csv")
    assert list(table["status"]) == ["infeasible", "infeasible"]
    for col in ("round_s", "straggler", "utility", "server_busy_share", "headroom_gib_min"):
        assert col in table.columns
    assert list(pd.read_csv(out / "clients.csv").columns)[:3] == ["scenario", "client", "device"]
    for name in ("round_time.png", "pareto.png", "splits_ranks.png"):
        img = mpimg.imread(out / name)
        assert img.std() > 0.01, f"{name} is blank"
    assert not list(out.glob("*.tmp*"))


def test_vary_values_follow_the_rules_of_hsplit_plan(monkeypatch):
    monkeypatch.setattr(whatif_mod, "make_plan", lambda *a, **k: pytest.fail("solved before validating"))
    with pytest.raises(ConfigError) as e:
        build_scenarios(["example"], ["seq_len=0,128", "batch_size=0", "local_steps=0", "dtype=fp32,fp64",
                                      "ranks=0,4,-8", "server_rank=-1"])
    text = str(e.value)
    for where in ("seq_len=0", "batch_size=0", "local_steps=0"):
        assert f"{where}: must be a whole number >= 1, got '0'" in text
    assert "dtype=fp64: must be one of fp32, bf16, fp16" in text
    # Without |, each comma-separated value is one set of allowed ranks: ranks=0, ranks=4, ranks=-8.
    assert "ranks=-8: rank -8 is negative" in text
    assert "ranks=0: give at least one rank > 0; each value is one set of allowed ranks" in text
    assert "ranks=4:" not in text
    assert "server_rank=-1: must be a whole number >= 0" in text
    with pytest.raises(ConfigError, match=r"ranks=0,0: give at least one rank > 0"):
        build_scenarios(["example"], ["ranks=0,0|0,4"])
    with pytest.raises(ConfigError, match=r"ranks=0,4,-8: rank -8 is negative"):
        build_scenarios(["example"], ["ranks=0,4,-8|0,4"])
    with pytest.raises(ConfigError, match=r"--dtype: must be one of fp32, bf16, fp16, got 'fp64'"):
        run_whatif(["example"], training=whatif_mod.Training(dtype="fp64"))


def test_value_messages_name_the_rule_and_the_scenario(monkeypatch):
    monkeypatch.setattr(whatif_mod, "make_plan", lambda *a, **k: pytest.fail("solved before validating"))
    for path in ("clients.*.data_weight", "clients.*.uplink_mbps", "clients.*.budget.round_s"):
        with pytest.raises(ConfigError) as e:
            build_scenarios(["example"], [f"{path}=0"])
        assert f"{path}=0: must be a number > 0, got '0'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_scenarios(["example"], ["clients.*.count=0,1"])
    assert e.value.source == "hsplit whatif"
    assert "scenario example clients.*.count=0: clients: the fleet has no clients" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_scenarios(["example"], ["clients.*.budget.memory_gib=1,100"])
    assert ("scenario example clients.*.budget.memory_gib=100: clients[0].budget.memory_gib: 100 GiB exceeds"
            in str(e.value))
    r = runner.invoke(app, ["whatif", "example", "--vary", "clients.*.budget.memory_gib=1,100", "-o", "unused"])
    assert r.exit_code == 2 and "scenario example clients.*.budget.memory_gib=100: " in r.output


def test_group_selector_is_the_profile_name_of_a_device_file(tmp_path):
    from hsplit.planner.device import PROFILE_DIR
    (tmp_path / "devices").mkdir()
    text = (PROFILE_DIR / "devices" / "raspberry-pi-5-8gb.yaml").read_text()
    (tmp_path / "devices" / "board.yaml").write_text(text.replace("name: raspberry-pi-5-8gb", "name: my-board"))
    fleet = tmp_path / "fb.yaml"
    fleet.write_text("server: {device: a100-80gb}\nclients:\n  - {device: devices/board.yaml, count: 2}\n")
    scenarios = build_scenarios([str(fleet)], ["clients.my-board.count=1,2"])
    assert [s.fleet.num_clients for s in scenarios] == [1, 2]
    with pytest.raises(ConfigError) as e:
        build_scenarios([str(fleet)], ["clients.board.count=1"])
    text = str(e.value)
    assert "no client group with device 'board' in fleet fb.yaml; groups: my-board (or *)" in text
    assert "None" not in text


def test_markdown_table_is_plain_and_shows_infeasible_rows():
    df = pd.DataFrame({"scenario": ["example clients.*.budget.memory_gib=0.05", "x" * 200],
                       "status": ["infeasible", "optimal"], "round_s": [float("nan"), 25.5],
                       "straggler": [None, "c2 (raspberry-pi-5-8gb)"], "utility": [float("nan"), 0.48],
                       "server_busy_share": [float("nan"), 0.09], "headroom_gib_min": [float("nan"), 1.4]})
    text = whatif_mod.markdown_table(df)
    lines = text.splitlines()
    assert lines[0].startswith("| scenario") and len(lines) == 4
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert " nan " not in text and "None" not in text
    assert lines[2].split("|")[2].strip() == "infeasible"


def test_cli_markdown_is_never_wrapped(tmp_path):
    r = runner.invoke(app, ["whatif", "example", "--vary", "clients.*.budget.memory_gib=0.05,3", "-o",
                            str(tmp_path / "w")])
    lines = r.output.splitlines()
    assert lines[0].startswith("| scenario")
    rows = [l for l in lines if l.startswith("|")]
    assert len(rows) == 4 and all(l.endswith("|") for l in rows)
    assert not any(" nan " in l for l in rows)


def test_duplicate_scenarios_get_unique_names_and_labels():
    scenarios = build_scenarios(["example", "example", "example"], [])
    assert [s.name for s in scenarios] == ["example", "example#2", "example#3"]
    assert [s.label for s in scenarios] == ["example", "example#2", "example#3"]


def test_per_device_columns_and_wording_say_device_name(tmp_path):
    import inspect
    from pathlib import Path

    from hsplit.planner import plots
    assert "device kind" not in inspect.getsource(plots)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "whatif.md").read_text()
    assert "device kind" not in doc and "`split[DEVICE]`, `rank[DEVICE]`" in doc


def test_a_group_link_override_is_planned_and_varied_end_to_end(tmp_path):
    """`clients[i].uplink_mbps` / `downlink_mbps` in a fleet replace the profile's links for that group (the
    cost model uses them); `hsplit whatif --vary 'clients.*.uplink_mbps=...'` sets the same fields."""
    from hsplit.planner.api import make_plan
    from hsplit.planner.fleet import Fleet
    from hsplit.planner.instance import build_instance
    from hsplit.planner.model import load_model_profile
    from hsplit.planner.yamlio import read_yaml
    base = read_yaml("profiles/fleets/example.yaml")
    slow = dict(base, clients=[dict(g, uplink_mbps=0.5, downlink_mbps=2) if g["device"].startswith("jetson") else g
                               for g in base["clients"]])
    fleet = Fleet.from_dict(slow, "slow.yaml")
    assert fleet.groups[0].device.uplink_mbps == 0.5 and fleet.groups[0].device.name == "jetson-orin-nano-8gb"
    assert fleet.groups[1].device.uplink_mbps == Fleet.from_dict(base, "b.yaml").groups[1].device.uplink_mbps
    assert Fleet.from_dict(fleet.to_dict(), "again.yaml").sha256() == fleet.sha256()
    assert fleet.sha256() != Fleet.from_dict(base, "b.yaml").sha256()
    model = load_model_profile("smollm2-135m")
    a, b = build_instance(Fleet.from_dict(base, "b.yaml"), model), build_instance(fleet, model)
    assert b.classes[0].link_s > 10 * a.classes[0].link_s
    assert b.classes[1].link_s == a.classes[1].link_s
    # the planner sees the slow links: the jetsons' round budget (12 s) cannot carry them
    fast_plan, slow_plan = make_plan(Fleet.from_dict(base, "b.yaml"), model), None
    with pytest.raises(Exception) as e:
        slow_plan = make_plan(fleet, model)
    assert slow_plan is None and "c0, c1 (jetson-orin-nano-8gb): round time" in str(e.value)
    assert fast_plan.clients[0].predicted["round_s"] > 0
    # whatif varies the same field, on a fleet that sets it and on one that does not; the jetsons of `mid`
    # set their own links (uplink 1, downlink 20 Mbit/s) and have no round budget
    mid = dict(base, name="mid", clients=[{k: v for k, v in dict(g, uplink_mbps=1, downlink_mbps=20).items()
                                           if k != "budget"} if g["device"].startswith("jetson") else g
                                          for g in base["clients"]])
    path = tmp_path / "mid.yaml"
    path.write_text(yaml.safe_dump(mid))
    out = tmp_path / "wi"
    r = runner.invoke(app, ["whatif", str(path), "--vary", "clients.jetson-orin-nano-8gb.uplink_mbps=2,200",
                            "--format", "json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["clients.jetson-orin-nano-8gb.uplink_mbps"]: row for row in json.loads(r.stdout)["scenarios"]}
    assert all(row["status"] == "optimal" for row in rows.values()), rows
    assert rows["200"]["round_s"] < rows["2"]["round_s"]
    assert rows["2"]["straggler"].split()[0] in ("c0", "c1")      # the jetsons, on their 2 Mbit/s uplink


@pytest.mark.parametrize("value,words", [(-1, "must be > 0"), (".nan", "must be a finite number"),
                                         ("fast", "must be a number"), (0, "must be > 0")])
def test_a_bad_group_link_is_refused_naming_the_field(tmp_path, value, words):
    from hsplit.planner.fleet import Fleet
    f = tmp_path / "fleet.yaml"
    f.write_text(f"server: {{device: a100-80gb}}\nclients:\n  - {{device: jetson-orin-nano-8gb, downlink_mbps: {value}}}\n")
    with pytest.raises(ConfigError) as e:
        Fleet.load(f)
    assert f"{f}" in str(e.value) and f"clients[0].downlink_mbps: {words}" in str(e.value), str(e.value)
