"""The round loop: split training == plain LoRA for one client, resume == uninterrupted, bad input."""
import csv
import os

import pytest
from conftest import at_step, tiny_runtime_env
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.runtime.train import checkpoint
from hsplit.runtime.models.lora import lora_config
from hsplit.runtime.models.causal_lm import lm_loss, load_lm
from hsplit.runtime.common import lr_at
from hsplit.runtime.train.loop import InProcess, Silent, run
from hsplit.runtime.train.options import RunOptions
from hsplit.runtime.train.simulation import build


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_runtime_env(tmp_path_factory, "rt")


def make_plan(env, path_name="plan.yaml", strategy="hsplitlora", clients=None, **training):
    root, model, text = env
    t = {"batch_size": 2, "seq_len": 32, "local_steps": 3, "rounds": 2, "dtype": "fp32", "learning_rate": 5e-3,
         "lr_schedule": "cosine", "warmup_steps": 1, "seed": 0}
    t.update(training)
    clients = clients or [
        {"id": "a", "device": "pi", "split_layer": 1, "ranks": {"q_proj": 2}, "data_weight": 1.0,
         "predicted": {"round_s": 3.0}},
        {"id": "b", "device": "jetson", "split_layer": 3, "ranks": {"q_proj": 8, "model.layers.1.mlp.down_proj": 4},
         "data_weight": 2.0, "predicted": {"round_s": 7.5}}]
    plan = Plan.from_dict({"model": str(model), "strategy": strategy, "server_rank": 4,
                           "modules": ["q_proj", "v_proj", "down_proj"], "training": t,
                           "data": {"path": str(text), "partition": "by-source", "eval_fraction": 0.1},
                           "clients": clients}, path_name)
    path = root / path_name
    plan.save(path)
    return path


def opts(env, **kw):
    return RunOptions(runs_dir=env[0] / "runs", progress=False, **kw)


def test_one_client_alone_reproduces_plain_unsplit_lora_training(env):
    path = make_plan(env, "one.yaml", clients=[{"device": "x", "split_layer": 2, "ranks": {
        "q_proj": 2, "model.layers.0.mlp.down_proj": 8}}], local_steps=5, rounds=1, max_grad_norm=0.05)
    plan = Plan.load(path)
    sim = build(plan, progress=False, device="cpu")
    party = sim.parties[0]
    init = sim.bank.state(party.adapter)
    ranks = dict(party.ranks)
    assert sum(1 for m in ranks if ".layers.3." in m) == 3          # server side: server_rank on 3 modules
    InProcess(sim, None).train_round(0, Silent())
    trained = sim.bank.state(party.adapter)

    # plain single-process peft LoRA on a fresh copy of the same model, same init, batches and schedule
    from peft import get_peft_model
    lm = load_lm(plan.model, progress=False)
    model = get_peft_model(lm.model, lora_config(ranks, 2.0, 0.0, lm.profile.family))
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for m in ranks:
            layers[m].lora_A["default"].weight.copy_(init[f"{m}.lora_A"])
            layers[m].lora_B["default"].weight.copy_(init[f"{m}.lora_B"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.training.learning_rate, weight_decay=0.0)
    model.train()
    t = plan.training
    for s in range(t.local_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, t.local_steps, t.learning_rate, t.warmup_steps, t.lr_schedule)
        b = sim.data.clients[0].batch(t.batch_size, t.seed, 0, 0, s)
        loss, _ = lm_loss(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad()
    moved = 0.0
    for m in ranks:
        for f in ("A", "B"):
            ref = getattr(layers[m], f"lora_{f}")["default"].weight
            torch.testing.assert_close(trained[f"{m}.lora_{f}"], ref, rtol=1e-4, atol=1e-6)
            moved += float((ref - init[f"{m}.lora_{f}"]).abs().sum())
    assert moved > 1e-3                                              # training really moved the adapters

    # and the aggregated (merged) model is the plain LoRA model merged
    InProcess(sim, None).aggregate(0, [{"bytes_up": 0, "bytes_down": 0}])
    merged = model.merge_and_unload()
    for m in ranks:
        torch.testing.assert_close(sim.bank.base_weight(m), merged.get_submodule(m).weight, rtol=1e-4, atol=1e-6)


def test_run_writes_metrics_with_fleet_time_and_traffic(env):
    res = run(make_plan(env, "metrics.yaml"), opts(env))
    with open(res.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["client"]) for r in rows] == [
        ("0", "all"), ("1", "a"), ("1", "b"), ("1", "all"), ("2", "a"), ("2", "b"), ("2", "all")]
    g = [r for r in rows if r["client"] == "all"]
    assert float(g[1]["fleet_s"]) == 7.5 and float(g[2]["fleet_total_s"]) == 15.0    # the straggler sets it
    a = next(r for r in rows if r["client"] == "a")
    # per step: activations 2x32x32 fp32 + mask + int32 labels up; gradients down (3 steps) + adapters
    assert int(a["bytes_up"]) > 3 * (2 * 32 * 32 * 4 + 2 * 32 * 5)
    assert int(a["bytes_down"]) >= 3 * 2 * 32 * 32 * 4
    assert float(a["train_loss"]) > 0 and int(a["tokens"]) == 3 * 2 * 31
    assert all(float(r["eval_ppl"]) > 1 for r in g)
    assert (res.run_dir / "config.yaml").is_file()
    assert checkpoint.complete_rounds(res.run_dir) == [0, 1, 2]


def test_same_seed_same_result_and_another_seed_differs(env):
    a = run(make_plan(env, "s1.yaml"), opts(env))
    b = run(make_plan(env, "s1.yaml"), opts(env, name="s1-again"))
    c = run(make_plan(env, "s2.yaml", seed=1), opts(env))
    la = [r["train_loss"] for r in a.rows if r["client"] != "all"]
    assert la == [r["train_loss"] for r in b.rows if r["client"] != "all"]
    assert la != [r["train_loss"] for r in c.rows if r["client"] != "all"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("strategy", ["hsplitlora", "splitlora", "hetlora", "flexlora", "hafl-truncation",
                                      "hafl-freezing"])
def test_a_killed_run_resumes_to_the_same_adapters_as_an_uninterrupted_one(env, strategy, monkeypatch):
    clients = None
    if strategy == "splitlora":           # one split, one rank everywhere (= server_rank)
        clients = [{"id": c, "device": "d", "split_layer": 2, "ranks": {"q_proj": 4, "v_proj": 4, "down_proj": 4}}
                   for c in ("a", "b", "c")]
    path = make_plan(env, f"resume-{strategy}.yaml", strategy=strategy, clients=clients, rounds=3, lora_dropout=0.1)
    full = run(path, opts(env, name=f"full-{strategy}"))

    def kill(r, k, s):
        if (r, k, s) == (1, 1, 2):
            raise Killed

    with pytest.raises(Killed), monkeypatch.context() as m:
        at_step(m, kill)
        run(path, opts(env, name=f"cut-{strategy}"))
    cut_dir = env[0] / "runs" / f"cut-{strategy}"
    assert checkpoint.complete_rounds(cut_dir) == [0, 1]
    resumed = run(path, opts(env, name=f"cut-{strategy}", resume=True))
    assert resumed.rows == full.rows or [r["train_loss"] for r in resumed.rows] == [r["train_loss"] for r in full.rows]
    _, a = checkpoint.load(full.run_dir, 3)
    _, b = checkpoint.load(cut_dir, 3)
    for f in checkpoint.FILES:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    # state that matters was compared: merged factors, optimizer moments, or (flexlora) the global adapter
    assert a["merged.safetensors"] or a["optimizer.safetensors"] or any(k.startswith("global/") for k in a["adapters.safetensors"])
    with open(cut_dir / "metrics.csv") as f1, open(full.run_dir / "metrics.csv") as f2:
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "aggregate_s")} for r in rows]
        assert strip(list(csv.DictReader(f1))) == strip(list(csv.DictReader(f2)))


def test_keep_checkpoints_prunes_old_rounds_and_resume_eval_export_still_work(env, monkeypatch):
    """--keep-checkpoints 1: only the newest round keeps adapters + optimizer state; a killed run still
    resumes to the uninterrupted run's state, and export/eval (which replay every merge) still work."""
    from hsplit.runtime.outputs.evaluate import evaluate_run
    from hsplit.runtime.outputs.export import total_update

    path = make_plan(env, "keep.yaml", rounds=3)
    full = run(path, opts(env, name="keep-full"))

    def kill(r, k, s):
        if (r, k, s) == (2, 0, 1):
            raise Killed

    with pytest.raises(Killed), monkeypatch.context() as m:
        at_step(m, kill)
        run(path, opts(env, name="keep-cut", keep_checkpoints=1))
    cut = env[0] / "runs" / "keep-cut"
    assert checkpoint.complete_rounds(cut) == [0, 1, 2]
    for r in (0, 1):
        d = checkpoint.round_dir(cut, r)
        assert sorted(f.name for f in d.iterdir()) == ["merged.safetensors", "state.json"]
        assert checkpoint.read_state(cut, r)["pruned"] == list(checkpoint.PRUNABLE)
    with pytest.raises(ConfigError, match="pruned"):
        checkpoint.load(cut, 1)
    run(path, opts(env, name="keep-cut", resume=True, keep_checkpoints=1))
    _, a = checkpoint.load(full.run_dir, 3)
    _, b = checkpoint.load(cut, 3)
    for f in checkpoint.FILES:
        assert a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f
    assert not (checkpoint.round_dir(cut, 2) / "adapters.safetensors").exists()
    # every round's merge is still there: the exported update and the evaluation equal the full run's
    ua, _, _ = total_update(full.run_dir)
    ub, _, _ = total_update(cut)
    assert ua.keys() == ub.keys() and all(torch.equal(ua[m][0], ub[m][0]) for m in ua)
    assert evaluate_run(cut)["eval_loss"] == evaluate_run(full.run_dir)["eval_loss"]


def test_resume_of_a_corrupt_checkpoint_is_one_clear_error(env):
    path = make_plan(env, "corrupt.yaml", rounds=1)
    res = run(path, opts(env))
    f = checkpoint.round_dir(res.run_dir, 1) / "adapters.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checkpoint is corrupt") as e:
        run(path, opts(env, resume=True, rounds=2))
    assert "round-0001/adapters.safetensors" in str(e.value)


def _no_run(env, name):
    return not (env[0] / "runs" / name).exists()


def test_bad_inputs_fail_with_one_clear_error_and_write_nothing(env):
    root = env[0]
    # plan made for another architecture
    p = make_plan(env, "hash.yaml")
    plan = Plan.load(p)
    plan.inputs["model_hash"] = "f" * 64
    plan.save(p)
    with pytest.raises(ConfigError, match="another model architecture"):
        run(p, opts(env))
    assert _no_run(env, "hash")
    # missing data path
    p = make_plan(env, "nodata.yaml")
    plan = Plan.load(p)
    plan.data.path = str(root / "missing.jsonl")
    plan.save(p)
    with pytest.raises(ConfigError, match="no such file"):
        run(p, opts(env))
    assert _no_run(env, "nodata")
    # a module this model lacks
    p = make_plan(env, "nomod.yaml", clients=[{"device": "x", "split_layer": 2, "ranks": {"c_attn": 4}}])
    with pytest.raises(ConfigError, match="c_attn"):
        run(p, opts(env))
    assert _no_run(env, "nomod")
    # split beyond the model's blocks (fails validation against the model)
    p = make_plan(env, "split.yaml", clients=[{"device": "x", "split_layer": 9, "ranks": {"q_proj": 4}}])
    with pytest.raises(ConfigError, match="outside 1..4"):
        run(p, opts(env))
    assert _no_run(env, "split")
    # a plan file that fails validation on its own
    bad = root / "bad.yaml"
    bad.write_text("model: x\nstrategy: nope\nclients: []\n")
    with pytest.raises(ConfigError, match="strategy"):
        run(bad, opts(env))
    assert _no_run(env, "bad")
    # splitlora with heterogeneous ranks
    p = make_plan(env, "mixed.yaml", strategy="splitlora")
    with pytest.raises(ConfigError, match="needs one rank"):
        run(p, opts(env))
    assert _no_run(env, "mixed")
    # an existing run without --resume
    p = make_plan(env, "twice.yaml", rounds=1)
    run(p, opts(env))
    with pytest.raises(ConfigError, match="--resume"):
        run(p, opts(env))


def test_centralized_trains_one_model_on_pooled_data(env):
    p = make_plan(env, "central.yaml", strategy="centralized", rounds=2, local_steps=4, learning_rate=2e-2)
    res = run(p, opts(env))
    rows = [r for r in res.rows if r["client"] == "central"]
    assert len(rows) == 2 and rows[0]["tokens"] == 2 * 4 * 2 * 31       # local_steps x clients steps
    assert rows[0]["bytes_up"] == 0
    assert res.eval_after < res.eval_before


# ------------------------------------------------------------------ QA fixes: device, Ctrl-C, finished runs, pruning

def _no_model_loading(monkeypatch):
    """Make loading the model an immediate failure: the checks under test must come first."""
    import hsplit.runtime.train.simulation as train

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(train, "load_lm", boom)


def _cli():
    from hsplit.cli import app
    return app


def test_device_is_checked_before_loading_anything(env, monkeypatch):
    from typer.testing import CliRunner
    from hsplit.runtime.common import pick_device
    _no_model_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("cpu") == torch.device("cpu") and pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"(?s)--device gpu.*use auto, cpu or cuda"):
        pick_device("gpu")
    with pytest.raises(ConfigError, match=r"(?s)--device cuda.*CUDA is not available.*use --device cpu or auto"):
        pick_device("cuda")
    path = make_plan(env, "dev.yaml", rounds=1)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run(path, opts(env, device="cuda"))
    assert _no_run(env, "dev")
    for dev, msg in (("cuda", "CUDA is not available"), ("gpu", "use auto, cpu or cuda")):
        res = CliRunner().invoke(_cli(), ["run", str(path), "--device", dev, "--runs-dir", str(env[0] / "runs")])
        assert res.exit_code == 2, res.output
        assert "error:" in res.output and msg in res.output and "Traceback" not in res.output
    assert _no_run(env, "dev")


class _Recorder:
    """A loop.Reporter that writes down what it is told."""

    def __init__(self):
        self.calls = []

    def start_rounds(self, total, done):
        self.calls.append(("start_rounds", total, done))

    def start_round(self, r, steps):
        self.calls.append(("start_round", r, steps))

    def advance(self):
        self.calls.append(("advance",))

    def end_round(self, row):
        self.calls.append(("end_round", row["round"], row["client"]))


def test_run_tells_its_reporter_every_round_and_step_and_the_cli_draws_them_only_as_text(env):
    from typer.testing import CliRunner
    path = make_plan(env, "reported.yaml", rounds=2)          # 2 clients x 3 local steps
    rec = _Recorder()
    res = run(path, opts(env), reporter=rec)
    steps = []
    for r in range(2):
        steps += [("start_round", r, 6)] + [("advance",)] * 6 + [("end_round", r + 1, "all")]
    assert rec.calls == [("start_rounds", 2, 0)] + steps
    rec = _Recorder()
    run(path, opts(env, resume=True, rounds=3), reporter=rec)           # resumed: the done rounds are counted
    assert rec.calls[:2] == [("start_rounds", 3, 2), ("start_round", 2, 6)] and len(rec.calls) == 9
    assert run(path, opts(env, name="silent")).rounds_done == 2        # reporter=None: silent
    base = ["run", str(path), "--runs-dir", str(res.run_dir.parent), "--rounds", "1"]
    text = CliRunner().invoke(_cli(), base + ["--name", "as-text"])
    assert text.exit_code == 0 and "round 1: train loss" in text.stderr, text.output
    js = CliRunner().invoke(_cli(), base + ["--name", "as-json", "--format", "json"])
    assert js.exit_code == 0 and "round 1" not in js.stderr, js.output


def test_resume_of_a_finished_run_says_so_before_loading_and_rounds_below_done_is_an_error(env, monkeypatch, capsys):
    from typer.testing import CliRunner
    from hsplit.runtime.outputs.rundir import RunFinished
    path = make_plan(env, "done.yaml", rounds=1)
    run(path, opts(env))
    run_dir = env[0] / "runs" / "done"
    # a normal resume (more rounds) says where it resumes from, once
    run(path, RunOptions(runs_dir=env[0] / "runs", resume=True, rounds=2, progress=True))
    err = capsys.readouterr().err
    assert err.count(f"resuming {run_dir} from round 1") == 1, err
    _no_model_loading(monkeypatch)
    with pytest.raises(RunFinished, match=r"already finished its 2 rounds; pass --rounds N \(N > 2\)"):
        run(path, opts(env, resume=True))
    with pytest.raises(RunFinished):
        run(path, opts(env, resume=True, rounds=2))
    with pytest.raises(ConfigError, match=r"(?s)--rounds 1.*completed 2 rounds") as e:
        run(path, opts(env, resume=True, rounds=1))
    assert not isinstance(e.value, RunFinished)
    base = ["run", str(path), "--name", "done", "--resume", "--runs-dir", str(env[0] / "runs")]
    res = CliRunner().invoke(_cli(), base)
    assert res.exit_code == 0 and f"{run_dir} already finished its 2 rounds" in res.output, res.output
    res = CliRunner().invoke(_cli(), base + ["--rounds", "1"])
    assert res.exit_code == 2 and "error:" in res.output and "--rounds 1" in res.output, res.output
    assert checkpoint.complete_rounds(run_dir) == [0, 1, 2]


def test_corrupt_newest_checkpoint_advice_knows_when_the_previous_round_was_pruned(env):
    path = make_plan(env, "prunedcorrupt.yaml", rounds=2)
    for name, keep in (("pc-keep1", 1), ("pc-all", None)):
        res = run(path, opts(env, name=name, keep_checkpoints=keep))
        f = checkpoint.round_dir(res.run_dir, 2) / "adapters.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        with pytest.raises(ConfigError, match="checkpoint is corrupt") as e:
            checkpoint.load(res.run_dir, 2)
        msg = str(e.value)
        if keep == 1:       # round 1 was pruned: deleting round 2 would only lead to another error
            assert "no complete earlier round" in msg and "pruned" in msg and "restore" in msg, msg
            assert "to resume from" not in msg, msg
        else:
            assert f"delete {checkpoint.round_dir(res.run_dir, 2)} to resume from round 1" in msg, msg


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(env):
    import re
    import signal
    import subprocess
    import sys
    import time
    root = env[0]
    path = make_plan(env, "sigint.yaml", rounds=500)
    runs = root / "sigruns"
    run_dir = runs / "sig"
    cmd = [sys.executable, "-c", "from hsplit.cli import app; app()", "run", str(path), "--name", "sig",
           "--runs-dir", str(runs), "--threads", "1"]
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_vars)
    try:
        deadline = time.monotonic() + 120
        while not (checkpoint.round_dir(run_dir, 1) / "state.json").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint of round 1 within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    m = re.search(r"interrupted (in|after) round (\d+); the last complete checkpoint is round (\d+) in (\S+); "
                  r"resume with: (.*)$", err, re.M)
    assert m, err
    n, last = int(m.group(2)), int(m.group(3))
    assert m.group(4) == str(run_dir)
    assert (m.group(1), n) in (("in", last + 1), ("after", last)), m.group(0)
    assert checkpoint.complete_rounds(run_dir)[-1] == last
    assert m.group(5).strip() == f"hsplit run {path} --name sig --resume --runs-dir {runs}"
    assert not [d for d in (run_dir / "checkpoints").iterdir() if d.name.startswith(".tmp-")]


def test_ctrl_c_right_after_a_checkpoint_says_after_that_round(monkeypatch, tmp_path):
    """Between round N's checkpoint and round N+1's start the run is not 'in round N' any more."""
    from hsplit.runtime.outputs import rundir as train
    monkeypatch.setattr(train.checkpoint, "complete_rounds", lambda run_dir: [0, 1])
    opts = RunOptions(runs_dir=tmp_path, name="x")
    assert "interrupted after round 1; the last complete checkpoint is round 1" in \
        train.interrupted(tmp_path / "p.yaml", tmp_path / "x", opts, 1).message
    assert "interrupted in round 2; the last complete checkpoint is round 1" in \
        train.interrupted(tmp_path / "p.yaml", tmp_path / "x", opts, 2).message
