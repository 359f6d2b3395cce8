"""Compact plans: identical clients are written once with `count` and `ids`, read back expanded; the
per-client form (older plans, hand-written ones) still loads; `--check` works on both."""
from __future__ import annotations

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.api import check_plan, make_plan
from hsplit.planner.errors import ConfigError
from hsplit.planner.fleet import Fleet, resolve_fleet_path
from hsplit.planner.plan import Plan
from hsplit.planner.yamlio import dump_yaml, read_yaml

runner = CliRunner()


def _edge_fleet(n_per_1000: int, tmp_path):
    """The shipped edge-1000 fleet with every group `n_per_1000` times as large (edge-10000: 10)."""
    data = read_yaml(resolve_fleet_path("edge-1000"))
    for g in data["clients"]:
        g["count"] *= n_per_1000
    data["name"] = f"edge-{1000 * n_per_1000}"
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(dump_yaml(data))
    return path


def _same(a: Plan, b: Plan) -> bool:
    return dataclasses.replace(a, source="x") == dataclasses.replace(b, source="x")


def test_a_10000_client_plan_is_small_and_reads_back_exactly(tmp_path):
    fleet = _edge_fleet(10, tmp_path)
    plan = make_plan(fleet, "smollm2-135m")
    assert len(plan.clients) == 10_000
    out = tmp_path / "plan.yaml"
    plan.save(out)
    assert out.stat().st_size < 1_000_000
    back = Plan.load(out)
    assert _same(back, plan)
    assert [c.id for c in back.clients] == [f"c{i}" for i in range(10_000)]
    entries = yaml.safe_load(out.read_text())["clients"]
    assert len(entries) < 100 and sum(e.get("count", 1) for e in entries) == 10_000
    assert entries[0]["ids"] == f"c0..c{entries[0]['count'] - 1}"
    # the expanded plan is what --check and run read: every constraint holds, costs as predicted
    ev, _ = check_plan(back, fleet)
    assert ev.violations == []
    assert round(ev.round_s, 3) == plan.predicted["round_s"]


def test_check_on_a_compact_plan_names_the_entry_once(tmp_path):
    fleet = _edge_fleet(1, tmp_path)
    out = tmp_path / "plan.yaml"
    assert runner.invoke(app, ["plan", "--fleet", str(fleet), "-o", str(out)]).exit_code == 0
    r = runner.invoke(app, ["plan", "--check", str(out), "--fleet", str(fleet)])
    assert r.exit_code == 0 and "all constraints satisfied" in r.output, r.output
    assert "c0-c219" in r.output                # one table row for the 220 phones of the first entry
    data = yaml.safe_load(out.read_text())
    data["clients"][0]["ranks"] = {"model.layers.0.self_attn.q_proj": 4096}      # q_proj is 576 x 576
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    r = runner.invoke(app, ["plan", "--check", str(bad), "--fleet", str(fleet)])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "clients[0].ranks.model.layers.0.self_attn.q_proj: rank 4096 is larger than" in text
    assert text.count("rank 4096") == 1 and "clients[1]" not in text


def test_the_per_client_form_of_earlier_plans_still_loads(tmp_path):
    plan = make_plan("example", "smollm2-135m")
    out = tmp_path / "old.yaml"
    plan.save(out)
    data = read_yaml(out)
    assert any("count" in e for e in data["clients"])         # the example fleet has pairs of identical clients
    data["clients"] = [{"id": c.id, "device": c.device, "data_weight": c.data_weight, "split_layer": c.split_layer,
                        "ranks": dict(c.ranks), "predicted": dict(c.predicted)} for c in Plan.load(out).clients]
    out.write_text(dump_yaml(data))
    back = Plan.load(out)
    assert _same(back, plan)
    ev, _ = check_plan(back, "example")
    assert ev.violations == []


def test_hand_written_entries_with_count_expand_in_order():
    plan = Plan.from_dict({"model": "smollm2-135m", "clients": [
        {"count": 2, "device": "jetson-orin-nano-8gb", "split_layer": 3, "ranks": {"q_proj": 8}},
        {"count": 2, "ids": "pi7..pi8", "device": "raspberry-pi-5-8gb", "split_layer": 2},
        {"device": "rtx-3060-12gb", "split_layer": 4}]}, "<hand>")
    assert [c.id for c in plan.clients] == ["c0", "c1", "pi7", "pi8", "c4"]
    assert [c.split_layer for c in plan.clients] == [3, 3, 2, 2, 4]
    assert plan.clients[1].ranks == {"q_proj": 8}
    again = Plan.from_dict(plan.to_dict(), "<again>")
    assert _same(again, plan)


def test_any_ids_read_back_as_written():
    from hsplit.planner.plan_clients import ClientPlan
    ids = ["c007", "c008", "c009", "c010", "c011", "a..b1", "a..b2", "5", "6", "x", "x1", "x2", "c12", "c13"]
    plan = Plan(model="smollm2-135m", strategy="hsplitlora",
                clients=[ClientPlan(id=i, device="d", split_layer=1) for i in ids])
    data = plan.to_dict()
    assert [e.get("ids") for e in data["clients"] if "ids" in e] == ["c007..c009", "c010..c011", "5..6", "x1..x2",
                                                                     "c12..c13"]
    assert [c.id for c in Plan.from_dict(data, "<p>").clients] == ids


@pytest.mark.parametrize("entry,field,words", [
    ({"count": 0}, "clients[0].count", "must be a whole number in 1..1000000"),
    ({"count": 2.5}, "clients[0].count", "must be a whole number"),
    ({"count": 10 ** 7}, "clients[0].count", "in 1..1000000"),
    ({"count": 3, "ids": "c0..c1"}, "clients[0].ids", "names 2 clients but count is 3"),
    ({"ids": "c0..c1"}, "clients[0].count", "missing"),
    ({"count": 2, "ids": "c0-c1"}, "clients[0].ids", "must be `first..last`"),
    ({"count": 2, "ids": "a0..b1"}, "clients[0].ids", "must be `first..last`"),
    ({"count": 2, "ids": "c5..c4"}, "clients[0].ids", "must be `first..last`"),
    ({"count": 2, "ids": ["c0", "c1"]}, "clients[0].ids", "found a list"),
    ({"count": 2, "id": "c0"}, "clients[0].id", "write `ids: c0..LAST` instead"),
    ({"count": 2, "id": "x", "ids": "c0..c1"}, "clients[0]", "not both"),
])
def test_bad_count_and_ids_are_refused_naming_the_field(entry, field, words):
    with pytest.raises(ConfigError) as e:
        Plan.from_dict({"model": "smollm2-135m", "clients": [{"split_layer": 1, **entry}]}, "p.yaml")
    assert f"{field}: " in str(e.value) and words in str(e.value), str(e.value)
    assert "p.yaml" in str(e.value)


def test_ids_of_two_entries_that_overlap_are_refused():
    with pytest.raises(ConfigError) as e:
        Plan.from_dict({"model": "smollm2-135m", "clients": [
            {"count": 3, "split_layer": 1}, {"count": 2, "ids": "c2..c3", "split_layer": 1}]}, "p.yaml")
    assert "id 'c2' is used by clients[0], clients[1]" in str(e.value), str(e.value)


def test_a_plan_of_more_clients_than_the_limit_is_refused_before_expanding():
    with pytest.raises(ConfigError) as e:
        Plan.from_dict({"model": "smollm2-135m", "clients": [{"count": 1_000_000, "split_layer": 1},
                                                             {"count": 5, "split_layer": 1}]}, "p.yaml")
    assert "more than 1,000,000 clients in all" in str(e.value)


def test_a_fleet_above_ten_thousand_clients_is_accepted(tmp_path):
    fleet = Fleet.load(_edge_fleet(50, tmp_path))
    assert fleet.num_clients == 50_000


def test_the_plan_table_of_all_different_clients_is_cut_with_a_note():
    from hsplit.cliutil.console import console
    from hsplit.cliutil.render import PLAN_ROWS, render_plan
    from hsplit.planner.plan_clients import ClientPlan
    n = PLAN_ROWS + 25
    plan = Plan(model="smollm2-135m", strategy="hsplitlora",
                clients=[ClientPlan(id=f"c{i}", device=f"board-{i}", split_layer=1) for i in range(n)])
    with console.capture() as cap:
        render_plan(plan)
    text = cap.get()
    assert f"board-{PLAN_ROWS - 1} " in text and f"board-{PLAN_ROWS} " not in text
    assert "and 25 more rows: every client is in the plan file" in " ".join(text.split())


# ---- grouped plans: one `allocations:` entry per distinct split and ranks ----

def _distinct_fleet(n: int, tmp_path):
    """n clients that are all different (each its own measured profile, budget and weight): a table fleet."""
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(0)
    kinds = ["jetson-orin-nano-8gb", "raspberry-pi-5-8gb", "rtx-3060-12gb"]
    rows = [{"id": f"dev{i}", "device": kinds[i % 3], "uplink_mbps": float(rng.uniform(20, 200)),
             "downlink_mbps": float(rng.uniform(50, 300)), "data_weight": float(rng.uniform(0.5, 2.0)),
             "budget.round_s": float(rng.uniform(2000, 4000))} for i in range(n)]
    pd.DataFrame(rows).to_csv(tmp_path / "devices.csv", index=False)
    path = tmp_path / "fleet.yaml"
    path.write_text("server: {device: a100-80gb}\nclients:\n  - table: devices.csv\n")
    return path


def test_all_different_clients_are_written_grouped_by_allocation_and_read_back(tmp_path):
    fleet = _distinct_fleet(300, tmp_path)
    plan = make_plan(fleet, "smollm2-135m", ranks=(0, 4, 8))
    out = tmp_path / "plan.yaml"
    plan.save(out)
    data = yaml.safe_load(out.read_text())
    assert "clients" not in data and 1 <= len(data["allocations"]) < 300
    assert sum(a["count"] for a in data["allocations"]) == 300
    back = Plan.load(out)
    assert back.entry_list == "allocations"
    for a, b in zip(plan.clients, back.clients):       # what the file keeps exactly, client by client
        assert (a.id, a.device, a.split_layer, a.ranks, a.data_weight) == (b.id, b.device, b.split_layer, b.ranks,
                                                                          b.data_weight)
        assert (a.predicted["round_s"], a.predicted["step_s"]) == (b.predicted["round_s"], b.predicted["step_s"])
    # a value not kept per client is the allocation's worst case (a memory budget: the smallest)
    for i, a in enumerate(data["allocations"]):
        mine = [c for c, e in zip(plan.clients, back.entries) if e == i]
        assert a["predicted"]["memory_budget_gib"] == min(c.predicted["memory_budget_gib"] for c in mine)
    ev, _ = check_plan(back, fleet)
    assert ev.violations == []
    assert round(ev.round_s, 3) == plan.predicted["round_s"]


def test_a_hand_written_allocation_list_loads_in_fleet_order():
    plan = Plan.from_dict({"model": "smollm2-135m", "allocations": [
        {"split_layer": 2, "ranks": {"model.layers.*.self_attn.q_proj": [8, 4]}, "count": 3, "ids": "c0 c2..c3",
         "device": "jetson-orin-nano-8gb"},
        {"split_layer": 1, "count": 1, "ids": "c1", "device": "raspberry-pi-5-8gb", "data_weight": 2.0}]}, "<hand>")
    assert [c.id for c in plan.clients] == ["c0", "c1", "c2", "c3"]
    assert plan.clients[0].ranks == {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 4}
    assert plan.field_of(1) == "allocations[1]"
    named = Plan.from_dict({"model": "smollm2-135m", "allocations": [
        {"split_layer": 1, "count": 2, "ids": "pi7 pi9", "at": "1 0"}]}, "<named>")
    assert [c.id for c in named.clients] == ["pi9", "pi7"]


@pytest.mark.parametrize("allocs,words", [
    ([{"split_layer": 1, "count": 3, "ids": "c0..c1"}], "allocations[0].ids: names 2 clients but count is 3"),
    ([{"split_layer": 1, "count": 2, "ids": "c0 c1"}, {"split_layer": 2, "count": 1, "ids": "c1"}],
     "position 1 (client c1) is in two allocations"),
    ([{"split_layer": 1, "count": 1, "ids": "c1"}], "position 0 is missing"),
    ([{"split_layer": 1, "count": 1, "ids": "x"}], "allocations[0].at: missing"),
    ([{"split_layer": 1, "count": 2, "ids": "c0 c1", "data_weight": "1.0 lots"}],
     "allocations[0].data_weight: must be a number"),
    ([{"split_layer": 1, "count": 2, "ids": "c0 c1", "per_client": {"round_s": "1.5"}}],
     "allocations[0].per_client.round_s: has 1 values for 2 clients"),
    ([{"split_layer": 1, "count": 1, "ids": "c0", "ranks": {"q_proj": [4]}}], "allocations[0].ranks.q_proj: a list"),
])
def test_bad_allocations_are_refused_naming_the_field(allocs, words):
    with pytest.raises(ConfigError) as e:
        Plan.from_dict({"model": "smollm2-135m", "allocations": allocs}, "p.yaml")
    assert words in str(e.value) and "p.yaml" in str(e.value), str(e.value)
