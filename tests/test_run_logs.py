"""Logs beside metrics.csv: TensorBoard event files read back with TensorBoard's own reader, W&B through a
fake `wandb` module, no duplicated step after --resume, and the progress bars' ETA (tiny model, offline)."""
import csv
import io
import os
import sys
import types

import pytest
from conftest import tiny_runtime_env
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.runtime.train.loop import run
from hsplit.runtime.train.options import RunOptions

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_runtime_env(tmp_path_factory, "logs")


def make_plan(env, name="plan.yaml", rounds=2):
    root, model, text = env
    plan = Plan.from_dict({"model": str(model), "strategy": "hsplitlora", "server_rank": 2, "modules": ["q_proj"],
                           "training": {"batch_size": 2, "seq_len": 32, "local_steps": 2, "rounds": rounds,
                                        "learning_rate": 5e-3},
                           "data": {"path": str(text), "partition": "by-source", "eval_fraction": 0.1},
                           "clients": [{"id": "a", "device": "pi", "split_layer": 1, "ranks": {"q_proj": 2},
                                        "predicted": {"round_s": 3.0}},
                                       {"id": "b", "device": "jetson", "split_layer": 3, "ranks": {"q_proj": 4},
                                        "predicted": {"round_s": 7.5}}],
                           "predicted": {"round_s": 7.5}}, name)
    plan.save(root / name)
    return root / name


def opts(env, **kw):
    return RunOptions(runs_dir=env[0] / "runs", progress=False, eval_max_seqs=4, **kw)


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_tensorboard_event_files_hold_the_fleet_and_every_client_per_round(env):
    res = run(make_plan(env), opts(env, name="tb"))
    rows = metrics(res.run_dir)
    fleet = [r for r in rows if r["client"] == "all"]
    tb = res.run_dir / "tb"
    assert [s for s, _ in scalars(tb, "eval/loss")] == [0, 1, 2]
    assert [v for _, v in scalars(tb, "eval/loss")] == pytest.approx([float(r["eval_loss"]) for r in fleet], rel=1e-5)
    assert [v for _, v in scalars(tb, "eval/perplexity")] == pytest.approx([float(r["eval_ppl"]) for r in fleet],
                                                                           rel=1e-5)
    assert [s for s, _ in scalars(tb, "train/loss")] == [1, 2]
    assert [v for _, v in scalars(tb, "fleet/total_s")] == pytest.approx([0.0, 7.5, 15.0])
    up = [v for _, v in scalars(tb, "bytes/up_mb")]
    assert up[1:] == pytest.approx([float(r["bytes_up"]) / 1e6 for r in fleet[1:]], rel=1e-5) and up[1] > 0
    for client in ("a", "b"):
        mine = [r for r in rows if r["client"] == client]
        got = scalars(tb / "clients" / client, "train/loss")
        assert [s for s, _ in got] == [1, 2]
        assert [v for _, v in got] == pytest.approx([float(r["train_loss"]) for r in mine], rel=1e-5)
        assert [s for s, _ in scalars(tb / "clients" / client, "bytes/down_mb")] == [1, 2]


def age_event_files(folder):
    """Give the event files under `folder` names from the past, in the order they were written: what files of
    an earlier process look like. (TensorBoard reads a folder's files in name order; names hold the second
    and a per-process counter, so files one process writes within a second can sort out of order.)"""
    for sub in {f.parent for f in folder.rglob("events.out.tfevents.*")}:
        files = sorted(sub.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime_ns)
        for i, f in enumerate(files):
            parts = f.name.split(".")
            parts[3] = f"{1_000_000_000 + i:010d}"
            f.rename(sub / ".".join(parts))


def test_a_resumed_run_logs_every_round_once_even_after_dying_while_logging(env):
    from torch.utils.tensorboard import SummaryWriter
    plan = make_plan(env, "resume.yaml")
    first = run(plan, opts(env, name="res", rounds=1))
    # a run that died after logging round 2 but before its checkpoint was complete
    w = SummaryWriter(str(first.run_dir / "tb"))
    w.add_scalar("eval/loss", 99.0, 2)
    w.add_scalar("eval/loss", 98.0, 1)
    w.close()
    age_event_files(first.run_dir / "tb")
    res = run(plan, opts(env, name="res", rounds=2, resume=True))
    fleet = [r for r in metrics(res.run_dir) if r["client"] == "all"]
    got = scalars(res.run_dir / "tb", "eval/loss")
    assert [s for s, _ in got] == [0, 1, 2]
    assert [v for _, v in got] == pytest.approx([float(r["eval_loss"]) for r in fleet], rel=1e-5)
    assert [s for s, _ in scalars(res.run_dir / "tb" / "clients" / "a", "train/loss")] == [1, 2]


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self

    def log(self, data, step=None):
        self.calls.append(("log", step, dict(data)))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_the_same_scalars_and_a_resume_continues_its_run(env, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    plan = make_plan(env, "wandb.yaml")
    res = run(plan, opts(env, name="wb", rounds=1, wandb="my-project"))
    (kind, init), *logs, end = fake.calls
    assert kind == "init" and init["project"] == "my-project" and init["name"] == "wb" and init["id"] == "abc123"
    assert init["resume"] == "allow" and init["config"]["strategy"] == "hsplitlora"
    assert [c[1] for c in logs] == [0, 1] and end == ("finish",)
    step1 = logs[1][2]
    fleet = [r for r in metrics(res.run_dir) if r["client"] == "all"]
    assert step1["eval/loss"] == pytest.approx(float(fleet[1]["eval_loss"]), rel=1e-5)
    assert {"clients/a/train/loss", "clients/b/train/loss", "clients/b/bytes/up_mb", "fleet/total_s"} <= set(step1)
    fake.calls.clear()
    monkeypatch.setenv("HSPLIT_WANDB_PROJECT", "my-project")      # the environment asks as well as the flag
    run(plan, opts(env, name="wb", rounds=2, resume=True))
    assert fake.calls[0][1]["id"] == "abc123"                       # the same W&B run continues
    assert [c[1] for c in fake.calls if c[0] == "log"] == [2]      # ...with the new round only


def test_asking_for_wandb_without_it_installed_is_one_error_before_any_work(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)                 # `import wandb` raises ImportError
    with pytest.raises(ConfigError) as e:
        run(make_plan(env, "nowandb.yaml"), opts(env, name="nowb", wandb="p"))
    assert "needs the wandb package, which is not installed: pip install wandb" in str(e.value)
    assert not (env[0] / "runs" / "nowb").exists()
    res = runner.invoke(app, ["run", str(env[0] / "nowandb.yaml"), "--runs-dir", str(env[0] / "runs"),
                              "--wandb", "p"])
    assert res.exit_code == 2 and "--wandb" in res.output


def test_run_eta_is_the_average_pace_so_far():
    from hsplit.cliutil.progress import run_eta
    assert run_eta(60.0, 1.0, 4.0) == "ETA 0:03:00"
    assert run_eta(30.0, 0.5, 10.0) == "ETA 0:09:30"
    assert run_eta(0.0, 0.0, 3.0) == "ETA -:--:--" and run_eta(5.0, 3.0, 3.0) == "ETA 0:00:00"


def test_round_bars_show_the_runs_eta_and_the_rounds_steps(monkeypatch):
    from rich.console import Console

    from hsplit.cliutil import progress as cliutil
    out = io.StringIO()
    monkeypatch.setattr(cliutil, "err", Console(file=out, force_terminal=True, width=140))
    clock = [100.0]
    with cliutil.RoundBars() as bars:
        bars.p.get_time = lambda: clock[0]
        bars.start_rounds(4, 0)
        bars.start_round(0, 10)
        for _ in range(5):
            bars.advance()
        clock[0] = 130.0                           # half a round in 30 s: 3.5 rounds left at that pace
        text = Console(file=io.StringIO(), width=140, record=True)
        text.print(bars.p.get_renderable())
        shown = text.export_text()
    assert "ETA 0:03:30" in shown and "5/10" in shown and "0/4" in shown
