"""hsplit profile and hsplit calibrate on a tiny model (few repetitions, tiny shapes)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hsplit.planner.cost import block_backward_flops_frozen, block_forward_flops, head_flops
from hsplit.planner.device import DeviceProfile
from hsplit.planner.model import load_model_profile
from hsplit.runtime.measure.calibrate import predicted_times
from hsplit.cli import app as hsplit_app
from hsplit.runtime.measure.profiling import matmul_throughput, summary


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def app():
    return hsplit_app


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from hsplit.runtime.models.tiny import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=3)


@pytest.fixture(scope="module")
def measured(app, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "this.yaml"
    res = CliRunner().invoke(app, ["profile", "--name", "this", "--dtypes", "fp32", "--repetitions", "2",
                                   "--warmup", "1", "--model", str(tiny_dir), "-b", "2", "-T", "16",
                                   "-o", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_summary_is_median_and_relative_iqr():
    s = summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median_s"] == 3.0 and s["n"] == 5
    assert s["spread"] == pytest.approx((4.0 - 2.0) / 3.0)


def test_matmul_throughput_is_flops_over_median_time():
    r = matmul_throughput("fp32", shapes=((64, 64, 64),), warmup=1, reps=3)
    assert r["flops"] > 1e6 and r["flops_min"] <= r["flops"] <= r["flops_max"]
    assert r["shapes"] == [[64, 64, 64]] and r["repetitions"] == 3


def test_profile_writes_a_loadable_measured_device_profile(measured):
    path, info = measured
    prof = DeviceProfile.load(path)
    assert prof.kind == "cpu" and prof.flops["fp32"] > 0 and prof.throughput("fp32") == prof.flops["fp32"]
    assert 0 < prof.memory_gib <= prof.memory_total_gib
    m = prof.measured
    for key in ("date", "torch", "threads", "repetitions", "warmup", "matmul"):
        assert key in m, key
    assert m["matmul"]["fp32"]["repetitions"] == 2 and "spread" in m["matmul"]["fp32"]
    (bt,) = prof.block_times
    assert bt.batch_size == 2 and bt.seq_len == 16 and bt.forward_s > 0 and bt.head_s > 0
    assert info["output"] == str(path)


def test_profile_rejects_unknown_dtype(app, tmp_path):
    res = CliRunner().invoke(app, ["profile", "--dtypes", "fp8", "-o", str(tmp_path / "x.yaml")])
    assert res.exit_code == 2 and "--dtypes" in res.output


def test_predicted_times_are_the_planner_cost_model(tiny_dir):
    model = load_model_profile(tiny_dir)
    dev = DeviceProfile.from_dict({"name": "d", "kind": "cpu", "memory_gib": 1, "flops": {"fp32": 1e9},
                                   "uplink_mbps": 10, "downlink_mbps": 10}, "<t>")
    pred, width = predicted_times(dev, model, 2, 16, rank=4)
    s = 2
    client = (s * (block_forward_flops(model, 2, 16) + block_backward_flops_frozen(model, 2, 16))
              + 6 * 2 * 16 * 4 * s * width) / 1e9
    assert pred[s][0] == pytest.approx(client)          # link time removed
    L = model.layers
    server = ((L - s) * (block_forward_flops(model, 2, 16) + block_backward_flops_frozen(model, 2, 16)
                         + 6 * 2 * 16 * 4 * width) + head_flops(model, 2, 16)) / 1e9
    assert pred[s][1] == pytest.approx(server)


def test_calibrate_writes_one_row_per_split_and_a_png(app, measured, tiny_dir, tmp_path):
    path, _ = measured
    out = tmp_path / "cal"
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--profile", str(path), "-b", "2", "-T", "16",
                                   "--ranks", "4", "--extra-ranks", "8", "--extra-splits", "1", "--repetitions", "2",
                                   "-o", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    rows = info["rows"]
    assert sorted((r["split"], r["rank"]) for r in rows) == [(1, 4), (1, 8), (2, 4)]
    for r in rows:
        assert r["measured_client_s"] > 0 and r["measured_server_s"] > 0 and r["predicted_server_s"] > 0
        assert r["error_client"] == pytest.approx((r["predicted_client_s"] - r["measured_client_s"]) / r["measured_client_s"])
        assert r["blocks_client_s"] is not None          # the profile's block times match (model, b, T)
        # ...and the planner itself predicts from them (docs/formulation.md, measured block times).
        assert r["predicted_client_s"] == pytest.approx(r["blocks_client_s"], rel=1e-6)
        assert r["predicted_server_s"] == pytest.approx(r["blocks_server_s"], rel=1e-6)
        # the FLOPs / throughput model alone is reported beside it (it is another prediction)
        assert r["flops_client_s"] > 0 and r["flops_client_s"] != pytest.approx(r["predicted_client_s"], rel=1e-3)
    assert info["settings"]["block_times_used"] is True
    from hsplit.runtime.measure.calibrate import planner_label
    assert planner_label(info["settings"]) == "per-block profile times"
    assert planner_label({"block_times_used": False}) == "FLOPs / throughput"
    assert "flops_median_abs_error" in info["summary"]
    assert "median_abs_error" in info["summary"] and "worst_abs_error" in info["summary"]
    png = (tmp_path / "cal.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    csv_lines = (tmp_path / "cal.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3


def test_calibrate_rejects_a_split_outside_the_model(app, measured, tiny_dir, tmp_path):
    path, _ = measured
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--profile", str(path), "--splits", "3",
                                   "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "1..2" in res.output
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--profile", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_profile_rejects_an_unknown_or_unavailable_device(app, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev, msg in (("cuda", "CUDA is not available"), ("gpu", "use auto, cpu or cuda")):
        out = tmp_path / f"{dev}.yaml"
        res = CliRunner().invoke(app, ["profile", "--device", dev, "--dtypes", "fp32", "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert "error:" in res.output and f"--device {dev}" in res.output and msg in res.output
        assert "Traceback" not in res.output and not out.exists()


# ---- trust: the spread of the repetitions against the reported error (synthetic timings, no wall clock) ----

def _rows(spreads, error=0.5):
    return [{"split": i + 1, "rank": 8, "spread_client": s, "spread_server": s, "error_client": error,
             "error_server": error} for i, s in enumerate(spreads)]


def test_default_splits_are_a_handful_spread_over_the_blocks():
    from hsplit.runtime.measure.calibrate import default_splits
    assert default_splits(30) == [1, 8, 15, 22, 29]             # SmolLM2-135M: 5 of its 29 split points
    assert default_splits(12) == [1, 4, 6, 8, 11]
    assert default_splits(3) == [1, 2] and default_splits(6) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("spreads,reps,error,trusted,words", [
    ([14.78, 3.0, 0.9, 0.5], 3, 0.85, False, "too noisy to judge the planner"),   # the 1,478 % spread
    ([0.10, 0.12, 0.08], 3, 0.05, False, "cannot tell it from noise"),
    ([0.02, 0.03, 0.01], 3, 0.30, True, None),
    ([0.02, 0.03, 0.01, 0.02, 0.9], 3, 0.30, True, "2 of 10 points vary by more than 25%"),
    ([0.0, 0.0], 1, 0.30, False, "1 repetition per point cannot show"),
])
def test_assess_says_when_the_spread_is_too_large_to_judge(spreads, reps, error, trusted, words):
    from hsplit.runtime.measure.calibrate import assess
    a = assess(_rows(spreads), reps, error)
    assert a["trusted"] is trusted and a["worst_spread"] == max(spreads)
    if words is None:
        assert a["warnings"] == []
    else:
        (w,) = a["warnings"]
        assert words in w, w
        assert "--repetitions" in w


def _fake_clock(monkeypatch, noisy: bool):
    """Replace calibrate's clock: every step takes client 2d and server d seconds, d = 0.01 s, except (noisy)
    every third step, which takes 10 times as long (a busy machine)."""
    import types

    import hsplit.runtime.measure.calibrate as cal
    state = {"t": 0.0, "calls": 0}

    def perf_counter():
        step = state["calls"] // 4
        state["calls"] += 1
        state["t"] += 0.01 * (10 if noisy and step % 3 == 2 else 1)
        return state["t"]
    monkeypatch.setattr(cal, "time", types.SimpleNamespace(perf_counter=perf_counter))


@pytest.fixture(scope="module")
def tiny12_dir(tmp_path_factory):
    from hsplit.runtime.models.tiny import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("m12") / "tiny12", layers=12)


def test_calibrate_times_a_handful_of_splits_by_default_or_all(app, measured, tiny12_dir, tmp_path, monkeypatch):
    path, _ = measured
    _fake_clock(monkeypatch, noisy=False)
    base = ["calibrate", "--model", str(tiny12_dir), "--profile", str(path), "-b", "2", "-T", "16", "--ranks", "4",
            "--extra-ranks", "", "--repetitions", "3", "--format", "json"]
    res = CliRunner().invoke(app, base + ["-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [r["split"] for r in info["rows"]] == [1, 4, 6, 8, 11]
    assert info["summary"]["trusted"] is True and info["summary"]["warnings"] == []
    assert info["summary"]["median_spread"] == pytest.approx(0.0, abs=1e-9)
    res = CliRunner().invoke(app, base + ["--splits", "all", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert [r["split"] for r in json.loads(res.stdout)["rows"]] == list(range(1, 12))


def test_calibrate_warns_when_its_timings_are_too_noisy(app, measured, tiny_dir, tmp_path, monkeypatch):
    path, _ = measured
    _fake_clock(monkeypatch, noisy=True)
    args = ["calibrate", "--model", str(tiny_dir), "--profile", str(path), "-b", "2", "-T", "16", "--ranks", "4",
            "--extra-ranks", "", "--repetitions", "3", "--warmup", "0", "-o", str(tmp_path / "c")]
    res = CliRunner().invoke(app, args + ["--format", "json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)["summary"]
    assert s["trusted"] is False and s["worst_spread"] == pytest.approx(9.0)      # (10d - d) / d
    assert "too noisy to judge the planner" in s["warnings"][0]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning: the timings are too noisy to judge the planner" in text and "cannot be trusted" in text
    assert "repetition spread (max - min) / median: median 900.0%" in text
    csv = (tmp_path / "c.csv").read_text()
    assert "spread_client" in csv.splitlines()[0]


def test_calibrate_takes_a_shipped_profile_name_and_says_why_one_repetition_is_not_trusted(
        app, tiny_dir, tmp_path, monkeypatch):
    import hsplit.planner.plots as plots
    _fake_clock(monkeypatch, noisy=False)
    titles = []
    real_save = plots._save

    def save(fig, path):
        titles.append(fig._suptitle.get_text())
        real_save(fig, path)
    monkeypatch.setattr(plots, "_save", save)
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--profile", "rtx-3060-12gb", "-b", "2",
                                   "-T", "16", "--ranks", "4", "--extra-ranks", "", "-r", "1", "--warmup", "0",
                                   "-o", str(tmp_path / "c"), "--format", "json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)["summary"]
    assert s["trusted"] is False and s["untrusted_because"].startswith("1 repetition per point")
    assert "NOT TRUSTED: 1 repetition per point cannot show the timings' spread" in titles[-1], titles
    assert "differ by 0%" not in titles[-1]
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--profile", "no-such-device"])
    assert res.exit_code == 2 and "nor a shipped profile (" in res.output and "rtx-3060-12gb" in res.output
