"""`hsplit plan` end to end through the CLI: the file it writes is read back and checked."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.api import check_plan, make_plan
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


def test_plan_charges_the_merge_download_in_the_round_times(tmp_path):
    """hsplitlora: every client's round time contains its merge download (the charged bound), the plan
    reports the exact download next to it, and the output no longer calls it extra."""
    out = tmp_path / "plan.yaml"
    r = runner.invoke(app, ["plan", "--fleet", "example", "--model", "smollm2-135m", "-o", str(out)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "not in the round times" not in text
    assert "merge s" in text and "round times include the merge download" in text
    plan = Plan.load(out)
    ev, inst = check_plan(plan, "example")
    for c, e, d, cl in zip(plan.clients, ev.clients, ev.merge_bytes, inst.clients):
        pr = c.predicted
        assert 0 < pr["merge_download_mb"] == round(d / 1e6, 6) <= pr["merge_download_charged_mb"]
        assert pr["merge_download_charged_s"] == round(e.merge_charged_s, 3) > 0
        upload = 4 * pr["adapter_params"] * 8 / (cl.device.uplink_mbps * 1e6)     # hsplitlora: no adapter download
        assert e.client_round_s == pytest.approx(plan.training.local_steps * e.step_s + upload + e.merge_charged_s)
        assert pr["round_s"] == round(e.round_s, 3)
    assert plan.predicted["round_s_exact_merge"] <= plan.predicted["round_s"]
    r = runner.invoke(app, ["plan", "--check", str(out), "--fleet", "example", "--format", "json"])
    assert r.exit_code == 0, r.output
    for c, row in zip(plan.clients, json.loads(r.stdout)["clients"]):
        assert round(row["merge_download_mb"], 6) == c.predicted["merge_download_mb"]
        assert round(row["merge_download_charged_s"], 3) == c.predicted["merge_download_charged_s"]


def test_plan_json_output(tmp_path):
    out = tmp_path / "p.yaml"
    r = runner.invoke(app, ["plan", "--fleet", "example", "--ranks", "0,4,8", "--modules", "q_proj,v_proj",
                            "--solver", "highs", "--format", "json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
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
    oa, ob = json.loads(a.stdout)["solver"]["objective"], json.loads(b.stdout)["solver"]["objective"]
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
    report = json.loads(r.stdout)
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
    assert r.exit_code == 2 and "--solver" in r.output and "cbc, highs, exhaustive" in r.output
    assert not (tmp_path / "p.yaml").exists()


def test_other_strategies_plan(tmp_path):
    r = runner.invoke(app, ["plan", "--strategy", "splitlora", "--server-rank", "4", "-o", str(tmp_path / "x.yaml")])
    assert r.exit_code == 0 and "note: --server-rank does not apply to splitlora" in r.stderr, r.output
    assert Plan.load(tmp_path / "x.yaml").server_rank != 4 or set(Plan.load(tmp_path / "x.yaml").clients[0].ranks.values()) == {4}
    for strategy in ("splitlora", "hetlora", "centralized"):
        out = tmp_path / f"{strategy}.yaml"
        r = runner.invoke(app, ["plan", "--strategy", strategy, "--modules", "q_proj,v_proj", "-o", str(out)])
        assert r.exit_code == 0, r.output
        plan = Plan.load(out)
        assert plan.strategy == strategy
        if strategy == "splitlora":       # SplitLoRA: one split and ONE rank, server-side adapters included
            assert len({(c.split_layer, tuple(sorted(set(c.ranks.values())))) for c in plan.clients}) == 1
            assert set(plan.clients[0].ranks.values()) == {plan.server_rank}
        if strategy == "hetlora":
            assert all(len(set(c.ranks.values())) <= 1 for c in plan.clients)


# ---- QA pass: every bad input is one clear error, never a traceback, checked before solving ----

def _clean_error(r, *needles, code=2):
    """Exit `code`, no Python exception escaped (typer.Exit is SystemExit), every needle printed."""
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def test_unknown_dtype_is_a_clear_error_in_plan_and_whatif(tmp_path):
    r = runner.invoke(app, ["plan", "--dtype", "fp64", "-o", str(tmp_path / "p.yaml")])
    _clean_error(r, "--dtype", "must be one of fp32, bf16, fp16", "'fp64'")
    r = runner.invoke(app, ["whatif", "example", "--dtype", "fp64", "-o", str(tmp_path / "w")])
    _clean_error(r, "--dtype", "must be one of fp32, bf16, fp16")


def test_bad_output_paths_are_refused_before_solving(tmp_path, monkeypatch):
    import hsplit.planner.api as api
    from hsplit.planner.errors import ConfigError
    from hsplit.planner.yamlio import atomic_write_text

    def no_solve(*a, **k):
        raise AssertionError("solved before checking -o")
    monkeypatch.setattr(api, "make_plan", no_solve)
    (tmp_path / "adir").mkdir()
    r = runner.invoke(app, ["plan", "-o", str(tmp_path / "adir")])
    _clean_error(r, "--output", "is a directory", code=2)
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["plan", "-o", str(tmp_path / "afile" / "plan.yaml")])
    _clean_error(r, "--output", "is a file", code=2)
    r = runner.invoke(app, ["whatif", "example", "-o", str(tmp_path / "afile")])
    _clean_error(r, "--output", "existing file", code=2)
    assert (tmp_path / "afile").read_text() == "x"
    with pytest.raises(ConfigError, match="is a directory"):
        atomic_write_text(tmp_path / "adir", "text")
    assert list((tmp_path / "adir").iterdir()) == []


def test_negative_ranks_are_named(tmp_path):
    from hsplit.planner.errors import ConfigError
    r = runner.invoke(app, ["plan", "--ranks", "0,-4,8", "-o", str(tmp_path / "p.yaml")])
    _clean_error(r, "--ranks", "-4", ">= 0")
    assert "broadcast" not in r.output and not (tmp_path / "p.yaml").exists()
    with pytest.raises(ConfigError, match="at least one rank > 0"):
        make_plan("example", "smollm2-135m", ranks=(0,))


def test_full_method_has_a_default_time_limit_and_says_so(tmp_path, monkeypatch):
    import hsplit.planner.api as api
    seen = {}
    real = api.solve_full

    def spy(*a, **k):
        seen["time_limit"] = k["time_limit"]
        return real(*a, **k)
    monkeypatch.setattr(api, "solve_full", spy)
    fleet = tmp_path / "one.yaml"
    fleet.write_text("server: {device: a100-80gb}\nclients:\n  - {device: rtx-3060-12gb, splits: [1, 2]}\n")
    args = ["plan", "--fleet", str(fleet), "--method", "full", "--modules", "q_proj", "--ranks", "0,4",
            "-o", str(tmp_path / "p.yaml")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert seen["time_limit"] == api.FULL_TIME_LIMIT_S == 60
    assert "solving the full MILP with cbc, time limit 60 s" in r.stderr
    r = runner.invoke(app, args + ["--time-limit", "30"])
    assert r.exit_code == 0 and seen["time_limit"] == 30 and "time limit 30 s" in r.stderr
    for bad in ("0", "-1"):
        _clean_error(runner.invoke(app, args + ["--time-limit", bad]), "--time-limit", "> 0")


def test_time_limit_status_and_long_times_read_well(capsys):
    import hsplit.cliutil.render as cli
    p = make_plan("example", "smollm2-135m", modules=["q_proj"], ranks=(0, 4))
    p.solver["status"] = "time-limit"
    p.predicted["round_s"] = 39220.4
    p.solver["wall_s"] = 1234.5
    cli.render_plan(p)
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "status time-limit (stopped early: not proven optimal)" in out
    assert "round 39,220 s (10.9 h)" in out and "wall 1,234 s (20.6 min)" in out and "e+0" not in out
    assert cli.seconds(25.561) == "25.56 s"


def test_version_without_a_command():
    from hsplit import __version__
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == __version__


def test_bad_splits_message_is_printed_whole(tmp_path):
    fleet = tmp_path / "f.yaml"
    fleet.write_text("server: {device: a100-80gb}\nclients:\n  - {device: rtx-3060-12gb, splits: [20, 5]}\n")
    r = runner.invoke(app, ["plan", "--fleet", str(fleet), "-o", str(tmp_path / "p.yaml")])
    _clean_error(r, f"{fleet}", "clients[0].splits: must be [min, max] with", "got [20, 5]")


def test_check_counts_adapted_matrices_like_plan(tmp_path):
    path = tmp_path / "splitlora.yaml"
    _splitlora_plan(path, 3)
    r = runner.invoke(app, ["plan", "--check", str(path), "--fleet", "example", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert [c["matrices"] for c in json.loads(r.stdout)["clients"]] == [6] * 5
    r = runner.invoke(app, ["plan", "--check", str(path), "--fleet", "example"])
    row = next(line for line in r.output.splitlines() if "c0" in line and "jetson" in line)
    assert [x.strip() for x in row.split("│") if x.strip()][2:4] == ["3", "6"]


def test_readme_check_example_works_as_written(tmp_path, monkeypatch):
    """README's `hsplit plan --check examples/splitlora.yaml --fleet example`, from the repository root, on the
    shipped file; docs/file-formats.md's example is that plan (same model, strategy, modules, clients) and
    passes the check too."""
    import re
    import shlex
    from pathlib import Path

    import yaml

    import hsplit
    root = Path(hsplit.__file__).parent
    line = next(x for x in (root / "README.md").read_text().splitlines() if "hsplit plan --check" in x)
    argv = shlex.split(line.split("#")[0])
    plan_name = argv[argv.index("--check") + 1]
    docs = (root / "docs" / "file-formats.md").read_text()
    example = next(b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "strategy: splitlora" in b)
    shipped, documented = yaml.safe_load((root / plan_name).read_text()), yaml.safe_load(example)
    for key in ("model", "strategy", "modules", "ranks_allowed"):
        assert shipped[key] == documented[key], key
    assert [(c["device"], c["split_layer"], c["ranks"]) for c in shipped["clients"]] == \
        [(c["device"], c["split_layer"], c["ranks"]) for c in documented["clients"]]
    monkeypatch.chdir(root)
    r = runner.invoke(app, argv[1:])
    assert r.exit_code == 0, r.output
    assert "all constraints satisfied" in r.output
    monkeypatch.chdir(tmp_path)
    (tmp_path / "documented.yaml").write_text(example)
    r = runner.invoke(app, ["plan", "--check", "documented.yaml", "--fleet", "example"])
    assert r.exit_code == 0 and "all constraints satisfied" in r.output, r.output


def test_min_utility_and_time_limit_are_never_silently_ignored(tmp_path):
    out = str(tmp_path / "p.yaml")
    _clean_error(runner.invoke(app, ["plan", "--min-utility", "0.5", "-o", out]),
                 "--min-utility", "only applies to --objective latency")
    _clean_error(runner.invoke(app, ["plan", "--objective", "latency", "--min-utility", "-1", "-o", out]),
                 "--min-utility", "[0, 1]")
    _clean_error(runner.invoke(app, ["plan", "--time-limit", "-1", "-o", out]), "--time-limit", "> 0")
    assert not (tmp_path / "p.yaml").exists()


def test_full_milp_splits_its_time_and_keeps_the_stage1_plan_when_stage2_runs_out(monkeypatch):
    import hsplit.planner.milp as milp
    from hsplit.planner.fleet import Fleet
    from hsplit.planner.solvers import MilpResult
    calls = []
    real = milp.solve_milp

    def stage2_times_out(prob, engine, **k):
        calls.append(k["time_limit"])
        if len(calls) == 2:
            return MilpResult("time-limit", None, None, k["time_limit"])
        return real(prob, engine, **k)
    monkeypatch.setattr(milp, "solve_milp", stage2_times_out)
    fleet = Fleet.from_dict({"server": {"device": "a100-80gb"},
                             "clients": [{"device": "rtx-3060-12gb", "splits": [1, 2]}]}, "<one>")
    p = make_plan(fleet, "smollm2-135m", method="full", modules=["q_proj"], ranks=(0, 4), time_limit=10)
    assert calls[0] <= 5.0 + 1e-9  # stage 1 gets half of the limit
    assert p.solver["status"] == "time-limit" and p.solver["gap"] is None
    assert p.clients[0].ranks  # the stage-1 plan (make_plan re-checks it against every constraint)


def test_error_text_is_printed_as_written_no_emoji_codes(tmp_path, capsys):
    import typer
    from hsplit.cliutil.console import fail
    with pytest.raises(typer.Exit):
        fail("data.path: nowhere:x: cannot tell the format; [min, max] stays")
    err = capsys.readouterr().err
    assert "nowhere:x: cannot tell" in err and "[min, max]" in err


def test_a_centralized_plan_is_described_not_tabulated_with_empty_predictions(tmp_path):
    r = runner.invoke(app, ["plan", "--fleet", "example", "--strategy", "centralized", "-o", str(tmp_path / "c.yaml")])
    assert r.exit_code == 0, r.output
    assert "centralized reference for smollm2-135m" in r.output and "210 matrices adapted" in r.output
    assert "straggler None" not in r.output and "0.00/0.00" not in r.output
