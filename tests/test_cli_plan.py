"""`hsplit plan` end to end through the CLI: the file it writes is read back and checked."""
from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.api import check_plan
from hsplit.planner.plan import Plan

runner = CliRunner()


def test_plan_writes_a_plan_that_satisfies_its_constraints(tmp_path):
    out = tmp_path / "plan.yaml"
    r = runner.invoke(app, ["plan", "--fleet", "example", "--model", "smollm2-135m", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "status optimal" in r.output and "proven gap 0%" in r.output
    assert "jetson-orin-nano-8gb" in r.output and f"plan written to {out}" in r.output
    plan = Plan.load(out)
    assert plan.model == "smollm2-135m" and len(plan.clients) == 5
    assert plan.inputs["model_hash"] and plan.inputs["fleet_sha256"]
    ev, inst = check_plan(plan, "example")
    assert ev.violations == []
    for c, e in zip(plan.clients, ev.clients):
        assert c.predicted["round_s"] == round(e.round_s, 3)
        assert all(name.startswith("model.layers.") for name in c.ranks)
        assert all(int(name.split(".")[2]) < c.split_layer for name in c.ranks)
    # Heterogeneous budgets give heterogeneous splits.
    assert len({c.split_layer for c in plan.clients}) >= 2


def test_plan_json_output(tmp_path):
    out = tmp_path / "p.yaml"
    r = runner.invoke(app, ["plan", "--fleet", "example", "--ranks", "0,4,8", "--modules", "q_proj,v_proj",
                            "--solver", "highs", "--format", "json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["plan"] == str(out)
    assert data["modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert set(data["ranks_allowed"]) == {0, 4, 8}
    assert data["solver"]["status"] == "optimal"
    assert yaml.safe_load(out.read_text())["clients"][0]["split_layer"] == data["clients"][0]["split_layer"]


def test_full_milp_method_agrees_with_decomposed(tmp_path):
    args = ["plan", "--fleet", "example", "--modules", "q_proj,v_proj", "--ranks", "0,4,8"]
    a = runner.invoke(app, args + ["-o", str(tmp_path / "a.yaml"), "--format", "json"])
    b = runner.invoke(app, args + ["-o", str(tmp_path / "b.yaml"), "--format", "json", "--method", "full",
                                   "--solver", "highs"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    oa, ob = json.loads(a.output)["solver"]["objective"], json.loads(b.output)["solver"]["objective"]
    assert abs(oa["utility"] - ob["utility"]) < 1e-6
    assert abs(oa["round_s"] - ob["round_s"]) <= 1e-6 * oa["round_s"]


def _splitlora_plan(path, split):
    path.write_text(yaml.safe_dump({
        "model": "smollm2-135m", "strategy": "splitlora", "modules": ["q_proj", "v_proj"], "server_rank": 8,
        "ranks_allowed": [0, 8],
        "clients": [{"device": d, "split_layer": split, "ranks": {"q_proj": 8, "v_proj": 8}}
                    for d in ["jetson-orin-nano-8gb"] * 2 + ["raspberry-pi-5-8gb"] * 2 + ["rtx-3060-12gb"]]}))


def test_check_accepts_a_hand_written_splitlora_plan(tmp_path):
    path = tmp_path / "splitlora.yaml"
    _splitlora_plan(path, 3)
    r = runner.invoke(app, ["plan", "--check", str(path), "--fleet", "example"])
    assert r.exit_code == 0, r.output
    assert "all constraints satisfied" in r.output


def test_check_reports_every_violated_constraint(tmp_path):
    path = tmp_path / "splitlora.yaml"
    _splitlora_plan(path, 29)
    r = runner.invoke(app, ["plan", "--check", str(path), "--fleet", "example", "--format", "json"])
    assert r.exit_code == 1
    report = json.loads(r.output)
    assert not report["valid"]
    text = "\n".join(report["violations"])
    assert "c2 (raspberry-pi-5-8gb): round time" in text and "exceeds budget 25.0 s" in text
    assert "c0 (jetson-orin-nano-8gb): round time 19.5 s exceeds budget 12.0 s" in text
    assert "rtx-3060" not in text


def test_infeasible_fleet_exits_nonzero_and_keeps_the_old_plan(tmp_path):
    fleet = tmp_path / "tight.yaml"
    fleet.write_text("server: {device: a100-80gb}\nclients:\n"
                     "  - {device: raspberry-pi-5-8gb, count: 3, budget: {memory_gib: 0.1}}\n"
                     "  - {device: rtx-3060-12gb}\n")
    out = tmp_path / "plan.yaml"
    out.write_text("previous plan\n")
    r = runner.invoke(app, ["plan", "--fleet", str(fleet), "-o", str(out)])
    assert r.exit_code == 1
    assert "c0, c1, c2 (raspberry-pi-5-8gb): memory: even the smallest split" in r.output
    assert out.read_text() == "previous plan\n"
    assert not list(tmp_path.glob(".plan.yaml.*"))


def test_bad_flag_values_get_one_clear_error(tmp_path):
    r = runner.invoke(app, ["plan", "--ranks", "0,two", "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code != 0 and "--ranks" in r.output
    r = runner.invoke(app, ["plan", "--solver", "gurobi", "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 1 and "--solver" in r.output and "cbc, highs, exhaustive" in r.output
    assert not (tmp_path / "p.yaml").exists()


def test_other_strategies_plan(tmp_path):
    for strategy in ("splitlora", "hetlora", "centralized"):
        out = tmp_path / f"{strategy}.yaml"
        r = runner.invoke(app, ["plan", "--strategy", strategy, "--modules", "q_proj,v_proj", "-o", str(out)])
        assert r.exit_code == 0, r.output
        plan = Plan.load(out)
        assert plan.strategy == strategy
        if strategy == "splitlora":
            assert len({(c.split_layer, tuple(sorted(set(c.ranks.values())))) for c in plan.clients}) == 1
        if strategy == "hetlora":
            assert all(len(set(c.ranks.values())) <= 1 for c in plan.clients)
