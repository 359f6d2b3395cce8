"""`hsplit whatif` in the units people decide in: fleet hours for a budget, MB per client, the share of
the fleet that can take part, time to a target perplexity from a measured curve; and the plots'
legends, per-fleet Pareto fronts and titles."""
from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from hsplit.cli import app
from hsplit.planner.api import make_plan
from hsplit.planner.curve import read_curve
from hsplit.planner.errors import ConfigError
from hsplit.planner.fleet import Fleet
from hsplit.planner.plan import Training
from hsplit.planner.plots import FIGURES, plot_vs_value
from hsplit.planner.whatif import build_scenarios, pareto_front, run_whatif
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.collections import PathCollection
from typer.testing import CliRunner

runner = CliRunner()

# What `hsplit run` writes (docs/runtime.md, Run folder): client rows without a perplexity, one
# `all` row per round. The held-out perplexity dips below 9 at round 3 and rises again at round 4.
METRICS = """round,client,device,split_layer,train_loss,eval_loss,eval_ppl,tokens,wall_s,fleet_s,fleet_total_s
0,all,,,,2.772589,16,0,0,,0
1,c0,jetson-orin-nano-8gb,6,2.4,,,100,9.8,0.313,
1,c1,raspberry-pi-5-8gb,4,2.5,,,90,9.1,0.639,
1,all,,,2.45,2.484907,12,190,20,0.639,0.639
2,c0,jetson-orin-nano-8gb,6,2.3,,,100,9.8,0.313,
2,all,,,2.3,2.251292,9.5,190,20,0.639,1.278
3,c0,jetson-orin-nano-8gb,6,2.2,,,100,9.8,0.313,
3,all,,,2.2,2.186051,8.9,190,20,0.639,1.917
4,c0,jetson-orin-nano-8gb,6,2.1,,,100,9.8,0.313,
4,all,,,2.1,2.219203,9.2,190,20,0.639,2.556
"""


@pytest.fixture
def metrics(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS)
    return path


def test_time_to_target_matches_a_hand_computation_from_metrics_csv(tmp_path, metrics):
    out = tmp_path / "wi"
    r = runner.invoke(app, ["whatif", "example", "--vary", "clients.*.uplink_mbps=200,500", "--curve", str(metrics),
                            "--target-ppl", "9", "-o", str(out)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out / "scenarios.csv")
    # By hand: the first round whose held-out perplexity is <= 9 is round 3 (8.9); 3 rounds x round time.
    assert list(table["rounds_to_target"]) == [3, 3]
    for _, row in table.iterrows():
        assert row["fleet_hours_to_target"] == pytest.approx(3 * row["round_s"] / 3600, rel=1e-12)
    # ... and the round time is the one `hsplit plan` predicts for the same fleet.
    fleet = build_scenarios(["example"], ["clients.*.uplink_mbps=200"])[0].fleet
    plan = make_plan(fleet, "smollm2-135m", solver="highs", training=Training())
    assert table["fleet_hours_to_target"].iloc[0] == pytest.approx(3 * plan.predicted["round_s"] / 3600, rel=1e-12)
    assert "fleet_hours_to_target" in r.output and "after 3 rounds" in r.output
    # Without --target-ppl, the target is the run's final perplexity (9.2): first reached at round 3.
    df = run_whatif(["example"], curve=metrics)
    assert df.attrs["curve"]["target_ppl"] == 9.2 and df.attrs["curve"]["target_is_final"]
    assert df["rounds_to_target"].iloc[0] == 3
    # A target reached at round 2 (9.5).
    assert read_curve(metrics, 9.6).rounds_to_target == 2


def test_a_hand_made_curve_with_eval_loss_only(tmp_path):
    path = tmp_path / "curve.csv"
    path.write_text("round,eval_loss\n0,3.0\n5,2.0\n10,1.5\n")
    # perplexity exp(2.0) = 7.389 at round 5
    assert read_curve(path, 7.5).rounds_to_target == 5
    assert read_curve(path).rounds_to_target == 10


def test_bad_curves_fail_with_one_clear_error(tmp_path, metrics):
    cases = {"missing.csv": None, "cols.csv": "round,client,train_loss\n0,all,2\n",
             "empty.csv": "round,client,eval_ppl\n1,c0,\n", "bad.csv": "round,eval_ppl\n0,16\n1,abc\n-1,5\n",
             "twice.csv": "round,eval_ppl\n1,12\n1,11\n"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    expect = {"missing.csv": "no such file", "cols.csv": "eval_ppl: missing column(s)",
              "empty.csv": "no row has a held-out perplexity", "bad.csv": "line 3: eval_ppl: must be a finite number",
              "twice.csv": "round 1 appears twice"}
    for name, words in expect.items():
        with pytest.raises(ConfigError) as e:
            read_curve(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and words in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=r"line 4: round: must be a whole number >= 0"):
        read_curve(tmp_path / "bad.csv")
    r = runner.invoke(app, ["whatif", "example", "--curve", str(metrics), "--target-ppl", "5", "-o",
                            str(tmp_path / "w")])
    assert r.exit_code == 2
    assert "never reaches the target perplexity 5 (best 8.9 after round 3" in " ".join(r.output.split())
    assert not (tmp_path / "w").exists()
    r = runner.invoke(app, ["whatif", "example", "--target-ppl", "5", "-o", str(tmp_path / "w")])
    assert r.exit_code == 2 and "needs --curve" in r.output
    r = runner.invoke(app, ["whatif", "example", "--curve", str(metrics), "--target-ppl", "0", "-o",
                            str(tmp_path / "w")])
    assert r.exit_code == 2 and "--target-ppl: must be a perplexity > 0" in r.output


def test_budget_in_rounds_or_examples_and_bytes_per_client():
    t = Training(batch_size=4, local_steps=10)
    by_rounds = run_whatif(["example"], ["seq_len=128,256"], training=t, rounds=40)
    by_examples = run_whatif(["example"], ["seq_len=128,256"], training=t, examples=3_001)
    clients = by_rounds.attrs["clients"]
    for (_, a), (_, b) in zip(by_rounds.iterrows(), by_examples.iterrows()):
        assert a["examples_per_round"] == 4 * 10 * 5 and a["rounds"] == 40
        assert a["fleet_hours"] == pytest.approx(40 * a["round_s"] / 3600)
        assert b["rounds"] == math.ceil(3_001 / 200) == 16
        assert b["fleet_hours"] == pytest.approx(16 * b["round_s"] / 3600)
        mine = clients[clients["scenario"] == a["scenario"]]["mb_per_round"]
        assert a["client_mb_per_round"] == pytest.approx(mine.mean())
        assert a["client_mb_per_round_max"] == pytest.approx(mine.max())
        assert a["client_mb_per_run"] == pytest.approx(40 * mine.mean())
        assert a["traffic_mb_per_round"] == pytest.approx(mine.sum(), abs=1e-3)
        assert 0 < a["server_busy_share"] <= 1 and a["fleet_share"] == 1.0
    # By hand for c0 at seq_len 128: 10 steps x (activations up + gradients down) of 4 x 128 x 576 fp32
    # values, its adapters up (4 bytes per parameter), and the exact merge download.
    plan = make_plan("example", "smollm2-135m", solver="highs", training=Training(batch_size=4, local_steps=10,
                                                                                  seq_len=128))
    c0 = plan.clients[0].predicted
    by_hand = (10 * 2 * 4 * 128 * 576 * 4 + 4 * c0["adapter_params"]) / 1e6 + c0["merge_download_mb"]
    assert clients["mb_per_round"].iloc[0] == pytest.approx(by_hand, abs=2e-3)
    with pytest.raises(ConfigError, match="give --rounds or --examples, not both"):
        run_whatif(["example"], rounds=2, examples=10)
    r = runner.invoke(app, ["whatif", "example", "--examples", "0", "-o", "unused"])
    assert r.exit_code == 2 and "--examples: must be a whole number >= 1" in r.output


def test_groups_that_cannot_take_part_are_left_out_and_counted(tmp_path):
    out = tmp_path / "wi"
    r = runner.invoke(app, ["whatif", "example", "--vary", "clients.raspberry-pi-5-8gb.budget.memory_gib=0.1,2",
                            "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["scenarios"]
    partial, whole = rows
    assert partial["status"] == "optimal" and partial["participating"] == 3 and partial["fleet_share"] == 0.6
    assert "c2, c3 (raspberry-pi-5-8gb): memory: even the smallest split" in partial["excluded"]
    assert whole["fleet_share"] == 1.0 and whole["excluded"] == ""
    # The left-out clients keep their ids; the rest is planned exactly as a fleet without them.
    clients = pd.read_csv(out / "clients.csv")
    assert list(clients[clients["scenario"] == partial["scenario"]]["client"]) == ["c0", "c1", "c4"]
    fleet = Fleet.load("example")
    rest = fleet.with_groups([g for g in fleet.groups if g.device.name != "raspberry-pi-5-8gb"])
    plan = make_plan(rest, "smollm2-135m", solver="highs")
    assert partial["round_s"] == plan.predicted["round_s"]
    # Utility over the whole fleet: the left-out clients (data weight 2 of 6) adapt nothing.
    assert partial["utility"] == pytest.approx(plan.predicted["utility"] * 4 / 6)
    r = runner.invoke(app, ["whatif", "example", "--vary", "clients.raspberry-pi-5-8gb.budget.memory_gib=0.1",
                            "-o", str(tmp_path / "w2")])
    assert "3 of 5 clients take part; left out: c2, c3 (raspberry-pi-5-8gb)" in r.output
    # No client can take part: infeasible, share 0.
    df = run_whatif(["example"], ["clients.*.budget.memory_gib=0.05"])
    assert df["status"].iloc[0] == "infeasible" and df["fleet_share"].iloc[0] == 0


def _table(fleets=("a", "a", "a", "b", "b"), util=(0.5, 0.9, 0.4, 0.3, 0.2), round_s=(10, 20, 30, 40, 50)):
    n = len(fleets)
    df = pd.DataFrame({"scenario": [f"{f} x={i}" for i, f in enumerate(fleets)], "label": [f"x={i}" for i in range(n)],
                       "fleet": list(fleets), "x": [str(i) for i in range(n)], "status": ["optimal"] * n,
                       "fleet_share": [1.0] * n, "round_s": list(round_s), "utility": list(util),
                       "straggler": ["c0 (d)"] * n, "fleet_hours": [r / 36 for r in round_s]})
    df.attrs["vary"] = ["x"]
    return df


def test_pareto_front_is_per_fleet():
    df = _table()
    # Fleet a dominates every scenario of fleet b, yet b has its own front.
    assert list(pareto_front(df, per_fleet=False)) == [True, True, False, False, False]
    assert list(pareto_front(df)) == [True, True, False, True, False]
    fig = FIGURES["pareto.png"](df)
    fronts = [line for line in fig.axes[0].lines if "Pareto front" in line.get_label()]
    assert len(fronts) == 2
    for line in fronts:
        fleet = line.get_label().split(":")[0]
        assert set(line.get_xdata()) == set(df.loc[pareto_front(df) & (df["fleet"] == fleet), "round_s"])
    plt.close(fig)


def _legend_labels(fig) -> set[str]:
    legends = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    return {t.get_text() for lg in legends if lg is not None for t in lg.get_texts()}


def _every_mark_in_legend(fig) -> None:
    labels = _legend_labels(fig)
    for ax in fig.axes:
        for artist in list(ax.lines) + [c for c in ax.collections if isinstance(c, PathCollection)]:
            empty = (isinstance(artist, PathCollection) and len(artist.get_offsets()) == 0) or \
                (not isinstance(artist, PathCollection) and len(artist.get_xdata()) == 0)
            if not empty and ax.get_legend() is not None:
                assert artist.get_label() in labels, f"{artist} ({artist.get_label()!r}) has no legend entry"


def _titles_apart(figs) -> None:
    """Titles are unique across the figures and no two titles of one figure overlap on the canvas."""
    seen = []
    for fig in figs:
        fig.canvas.draw()
        texts = [ax.title for ax in fig.axes if ax.get_title()] + ([fig._suptitle] if fig._suptitle else [])
        seen += [t.get_text() for t in texts]
        boxes = [t.get_window_extent() for t in texts]
        for i, a in enumerate(boxes):
            assert 0 <= a.x0 and a.x1 <= fig.bbox.width + 1, f"title {texts[i].get_text()!r} leaves the figure"
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), "two titles overlap"
    assert len(seen) == len(set(seen)), seen


def test_every_mark_has_a_legend_entry_and_titles_do_not_collide():
    df = _table()
    df.loc[1, "straggler"] = "server"
    df.loc[2, "fleet_share"] = 0.5
    df.loc[4, ["status", "round_s", "utility", "fleet_hours", "straggler"]] = ["infeasible", None, None, None, None]
    df.attrs["clients"] = pd.DataFrame({"scenario": ["a x=0"] * 3, "client": ["c0", "c1", "c2"],
                                        "device": ["jetson-orin-nano-8gb"] * 2 + ["raspberry-pi-5-8gb"],
                                        "split": [5, 6, 20], "total_rank": [100, 120, 900]})
    figs = {name: build(df) for name, build in FIGURES.items()}
    labels = _legend_labels(figs["round_time.png"])
    assert {"straggler: a client", "straggler: the server", "some client groups cannot take part",
            "infeasible: no client can take part"} <= labels
    assert {"a: Pareto front", "a: other scenarios", "b: Pareto front", "some client groups cannot take part",
            "1 infeasible scenario(s): not shown"} <= _legend_labels(figs["pareto.png"])
    assert {"median", "mean", "outlier"} <= _legend_labels(figs["splits_ranks.png"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    plot_vs_value(df, "fleet_hours", axes[0])
    plot_vs_value(df, "utility", axes[1])
    figs["vs"] = fig
    assert "infeasible: no client can take part" in _legend_labels(fig)
    for f in figs.values():
        _every_mark_in_legend(f)
    _titles_apart(figs.values())
    for f in figs.values():
        plt.close(f)


def test_plot_vs_value_needs_exactly_one_varied_field():
    df = run_whatif(["example"], ["clients.*.uplink_mbps=5,50", "seq_len=128"])
    with pytest.raises(ValueError, match="varies exactly one field; this one varies 2"):
        plot_vs_value(df)
    one = run_whatif(["example"], ["clients.*.uplink_mbps=5,200,2000"])
    ax = plot_vs_value(one, "round_s")
    line = ax.lines[0]
    assert one["status"].iloc[0] == "infeasible"           # 5 Mbit/s: no client fits its round budget
    assert list(line.get_xdata()) == [200, 2000] and list(line.get_ydata()) == list(one["round_s"].iloc[1:])
    assert ax.get_xscale() == "log"                          # values over more than two decades
    assert "uplink_mbps" in ax.get_title()
    plt.close(ax.figure)


CELLS = st.one_of(st.sampled_from(["", "nan", "inf", "-inf", "-1", "0", "1e999", "3.5", "all", "c0", "2.0", "x,y",
                                   '"', "\u00e9"]), st.text(max_size=8), st.floats(allow_nan=True).map(str))


@given(data=st.data())
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_mutated_curve_is_read_or_refused_with_one_clear_error(tmp_path, data):
    """A metrics.csv with a cell replaced, a column dropped, the file cut short or bytes that are not
    UTF-8 is either read (a finite target reached at a round of the curve) or refused by one
    ConfigError naming the file."""
    lines = [line.split(",") for line in METRICS.strip().splitlines()]
    how = data.draw(st.sampled_from(["cell", "column", "cut", "bytes"]))
    if how == "cell":
        r, c = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines[0]) - 1))
        lines[r][c] = data.draw(CELLS)
    elif how == "column":
        c = data.draw(st.integers(0, len(lines[0]) - 1))
        lines = [line[:c] + line[c + 1:] for line in lines]
    text = "\n".join(",".join(line) for line in lines)
    if how == "cut":
        text = text[: data.draw(st.integers(0, len(text)))]
    raw = text.encode() if how != "bytes" else text.encode()[:40] + b"\xff\xfe" + text.encode()[40:]
    path = tmp_path / "mutated.csv"
    path.write_bytes(raw)
    target = data.draw(st.one_of(st.none(), st.floats(0.5, 20)))
    try:
        curve = read_curve(path, target)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "Traceback" not in str(e)
        return
    ppl = dict(curve.points)
    assert math.isfinite(curve.target_ppl) and curve.target_ppl > 0
    assert curve.rounds_to_target in ppl and ppl[curve.rounds_to_target] <= curve.target_ppl
    assert all(ppl[r] > curve.target_ppl for r in ppl if r < curve.rounds_to_target)


def test_whatif_with_client_sampling_reports_the_sampled_rounds():
    """--clients-per-round: every scenario is planned with sampling; its round time is the plan's (the mean
    over the sampled rounds), examples per round count the sampled clients, and a client's MB per run is its
    MB per round x the rounds it is drawn for on average."""
    from hsplit.planner.sampling import Sampling
    from hsplit.planner.whatif import client_mb_per_round
    t = Training(batch_size=2, seq_len=64, local_steps=3)
    sampling = Sampling(clients_per_round=10)
    df = run_whatif(["edge-100"], training=t, rounds=40, sampling=sampling)
    row = df.iloc[0]
    plan = make_plan("edge-100", "smollm2-135m", training=t, solver="highs", sampling=sampling)
    full = make_plan("edge-100", "smollm2-135m", training=t, solver="highs")
    assert row["round_s"] == pytest.approx(plan.predicted["round_s"])
    assert plan.predicted["round_s"] <= full.predicted["round_s"]      # the straggler is among 10, not 100
    assert row["examples_per_round"] == 2 * 3 * 10
    assert row["fleet_hours"] == pytest.approx(40 * plan.predicted["round_s"] / 3600)
    mean_mb = sum(client_mb_per_round(c) for c in plan.clients) / len(plan.clients)
    assert row["client_mb_per_run"] == pytest.approx(mean_mb * 40 * 10 / 100)
    res = CliRunner().invoke(app, ["whatif", "edge-100", "--clients-per-round", "ten", "-o", "/tmp/nowhere-wi"])
    assert res.exit_code == 2 and "--clients-per-round" in res.output


def _run_config(folder, model_hash, batch_size, seq_len, local_steps):
    import yaml
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "plan": {"model": "smollm2-135m", "training": {"batch_size": batch_size, "seq_len": seq_len,
                                                       "local_steps": local_steps}},
        "run": {"model_hash": model_hash}}))


def test_a_curve_of_another_set_up_is_warned_about(tmp_path, metrics):
    """--curve reads the run's config.yaml next to metrics.csv: a different model (by architecture hash),
    batch size, seq len or local steps is one warning line on stderr and curve.warning in the JSON."""
    from hsplit.planner.model import load_model_profile
    smollm = load_model_profile("smollm2-135m").arch_hash()
    out = str(tmp_path / "wi")
    df = run_whatif(["example"], curve=metrics)                 # no config.yaml (a hand-made CSV): no warning
    assert df.attrs["curve"]["warning"] is None
    _run_config(tmp_path, smollm, 1, 64, 1)
    r = runner.invoke(app, ["whatif", "example", "--curve", str(metrics), "-o", out])
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("warning:")]
    for words in ("batch size 1 (what-if: 4)", "seq len 64 (what-if: 256)", "local steps 1 (what-if: 10)",
                  str(tmp_path / "config.yaml"), "--batch-size 1 --seq-len 64 --local-steps 1"):
        assert words in line, line
    assert "model" not in line.split("trained with")[1].split(":")[0]       # the same model: not named
    r = runner.invoke(app, ["whatif", "example", "--curve", str(metrics), "-b", "1", "-T", "64", "--local-steps", "1",
                            "-o", out, "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["curve"]["warning"] is None, r.output
    # another model (a varied batch size is listed with all its values)
    df = run_whatif(["example"], ["batch_size=1,2"], model="gpt2", curve=metrics,
                    training=Training(seq_len=64, local_steps=1))
    warning = df.attrs["curve"]["warning"]
    assert "model smollm2-135m (what-if: gpt2)" in warning and "batch size 1 (what-if: 1, 2)" in warning, warning
    assert "seq len" not in warning and "--model smollm2-135m" in warning


def test_numbers_are_plain_and_fleets_are_named_as_in_the_labels():
    """The terminal table and round_time.png write 86,301 and 0.000012, never 8.63e+04 or 1.2e-05; pareto.png's
    legend names a fleet by its name (as the point labels do), by its path only when two fleets share a name."""
    from hsplit.planner.whatif import markdown_table
    df = _table(fleets=("../big/f10k.yaml", "../big/f10k.yaml", "edge.yaml"), util=(0.5, 0.9, 0.4),
                round_s=(86301.4, 10788.2, 8.63))
    df["fleet_name"] = ["my-10k", "my-10k", "edge"]
    df["scenario"] = ["my-10k x=0", "my-10k x=1", "edge x=2"]
    df["label"] = ["my-10k x=0", "my-10k x=1", "edge x=2"]
    df["fleet_hours_to_target"] = [0.0000123, 0.006962, 1234.5]
    text = markdown_table(df)
    for cell in ("86,301", "10,788", "8.63", "0.0000123", "0.006962", "1,234"):
        assert f" {cell} |" in text, text
    assert "e+" not in text and "e-0" not in text
    fig = FIGURES["round_time.png"](df)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert " 86,301 s (24.0 h)" in labels and " 10,788 s (3.0 h)" in labels and " 8.63 s" in labels, labels
    plt.close(fig)
    fig = FIGURES["pareto.png"](df)
    legend = _legend_labels(fig)
    assert {"my-10k: Pareto front", "edge: Pareto front"} <= legend and not any("yaml" in x for x in legend), legend
    annotations = [t.get_text() for t in fig.axes[0].texts]
    assert "x=1" in annotations and "x=2" in annotations, annotations      # the legend names the fleet
    plt.close(fig)
    df["fleet_name"] = ["same", "same", "same"]            # two fleets of one name: their paths tell them apart
    fig = FIGURES["pareto.png"](df)
    assert {"../big/f10k.yaml: Pareto front", "edge.yaml: Pareto front"} <= _legend_labels(fig)
    plt.close(fig)
    # a whatif names the fleet: the fleet_name column
    assert list(run_whatif(["example"])["fleet_name"]) == ["example"]
