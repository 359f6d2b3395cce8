"""Property test of the four hand-written formats (device, fleet, importance, plan) with hypothesis.

Generate a valid file, mutate it (a value replaced by another type, NaN, inf, a huge or negative
number, a long text; a key removed, added or written twice; bytes that are not UTF-8; the file cut
short), then load it as hsplit does. Every mutation must be either accepted, and then valid (finite
numbers in range, `hsplit plan` / `--check` run on it without a traceback), or refused with one
ConfigError that names the file and the field. Never a traceback, never a hang (an alarm per
example), never a changed output file (`hsplit plan -o OUT` over an existing OUT).

Bounded and deterministic (derandomize=True, a fixed number of examples) so that CI is not flaky.
"""
from __future__ import annotations

import contextlib
import math
import signal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hsplit.cli import app
from hsplit.planner.device import KINDS, DeviceProfile
from hsplit.planner.errors import ConfigError, InfeasibleError
from hsplit.planner.fleet import Fleet
from hsplit.planner.importance import Importance
from hsplit.planner.model import load_model_profile
from hsplit.planner.plan import STRATEGIES, Plan

runner = CliRunner()
MODEL = load_model_profile("smollm2-135m")
MODULES = ("self_attn.q_proj", "self_attn.v_proj")
HANG_S = 60        # an example that takes this long is a hang (the slowest valid one takes ~1 s)
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@contextlib.contextmanager
def no_hang(seconds: int = HANG_S):
    def boom(signum, frame):
        raise AssertionError(f"hang: no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- valid files

finite = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@st.composite
def device(draw):
    d = {"name": draw(names), "kind": draw(st.sampled_from(KINDS)), "memory_gib": draw(finite(1.0, 64.0)),
         "uplink_mbps": draw(finite(1.0, 1e4)), "downlink_mbps": draw(finite(1.0, 1e4))}
    if draw(st.booleans()):
        d["peak_flops"] = {"fp32": draw(finite(1e10, 1e15))}
        d["efficiency"] = draw(finite(0.05, 1.0))
    else:
        d["flops"] = {"fp32": draw(finite(1e10, 1e15))}
    if draw(st.booleans()):
        d["memory_total_gib"] = d["memory_gib"] * 1.5
    if draw(st.booleans()):
        d["source"] = "https://example.com/datasheet"
    return d


@st.composite
def fleet(draw):
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        g = {"device": draw(st.sampled_from(["jetson-orin-nano-8gb", "raspberry-pi-5-8gb", "rtx-3060-12gb"]))
             if draw(st.booleans()) else draw(device()),
             "count": draw(st.integers(1, 3)), "data_weight": draw(finite(0.1, 10.0))}
        if draw(st.booleans()):
            g["budget"] = {"round_s": draw(finite(10.0, 1e4))}
        if draw(st.booleans()):
            lo = draw(st.integers(1, MODEL.layers - 1))
            g["splits"] = [lo, draw(st.integers(lo, MODEL.layers - 1))]
        if draw(st.booleans()):
            g["uplink_mbps"] = draw(finite(1.0, 1e4))          # the group's own links
        if draw(st.booleans()):
            g["downlink_mbps"] = draw(finite(1.0, 1e4))
        groups.append(g)
    return {"name": draw(names), "server": {"device": "a100-80gb", "count": draw(st.integers(1, 2))},
            "clients": groups}


@st.composite
def importance(draw):
    scores = {MODEL.module_name(l, m): draw(finite(0.0, 1e3)) for l in range(MODEL.layers) for m in MODULES}
    scores[MODEL.module_name(0, MODULES[0])] = 1.0
    return {"schema_version": 1, "model": "smollm2-135m", "model_hash": MODEL.arch_hash(), "method": "sensitivity",
            "normalization": draw(st.sampled_from(["raw", "per-parameter"])), "settings": {"steps": 4},
            "scores": scores}


FLEET_FOR_PLANS = {"server": {"device": "a100-80gb"},
                   "clients": [{"device": "jetson-orin-nano-8gb", "count": 2}, {"device": "raspberry-pi-5-8gb"}]}


@st.composite
def plan(draw):
    clients = []
    for i in range(3):                     # FLEET_FOR_PLANS has 3 clients
        split = draw(st.integers(1, MODEL.layers))
        clients.append({"id": f"c{i}", "device": "jetson-orin-nano-8gb" if i < 2 else "raspberry-pi-5-8gb",
                        "split_layer": split, "data_weight": draw(finite(0.1, 5.0)),
                        "ranks": {"q_proj": draw(st.sampled_from([0, 4, 8]))}})
    return {"model": "smollm2-135m", "strategy": draw(st.sampled_from(STRATEGIES)), "modules": ["q_proj", "v_proj"],
            "ranks_allowed": [0, 4, 8], "server_rank": draw(st.sampled_from([0, 4, 8])),
            "training": {"batch_size": draw(st.integers(1, 8)), "seq_len": draw(st.integers(8, 512)),
                         "local_steps": draw(st.integers(1, 10)), "rounds": draw(st.integers(1, 3)),
                         "learning_rate": draw(finite(1e-6, 1e-2)), "lora_dropout": draw(finite(0.0, 0.5)),
                         "warmup_steps": draw(st.integers(0, 5))},
            "data": {"path": "shakespeare", "partition": draw(st.sampled_from(["by-source", "iid", "dirichlet"])),
                     "alpha": draw(finite(0.01, 10.0)), "eval_fraction": draw(finite(0.0, 0.5))},
            "inputs": {"model": "smollm2-135m", "model_hash": MODEL.arch_hash()},
            "clients": clients}


# ---------------------------------------------------------------- mutations

BAD_VALUES = st.sampled_from([None, "", "text", True, -1, 0, -0.5, float("nan"), float("inf"), float("-inf"),
                              1e308, 10 ** 30, 2.5, [], [1, 2], {}, {"a": 1}, "x" * 5000, "1e12", "5.0e13",
                              "../../../no/such/file.yaml", "a\x00b"])


def paths(tree, prefix=()):
    """Every (path, value) of a YAML tree, containers included."""
    yield prefix, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths(v, prefix + (i,))


def _set(tree, path, value, delete=False):
    node = tree
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@st.composite
def mutated(draw, valid):
    """(bytes of a mutated file, the mutation in words)."""
    tree = draw(valid)
    where = [p for p, _ in paths(tree) if p]
    how = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "duplicate", "bytes", "cut",
                                "none"]))
    if how == "replace":
        path = draw(st.sampled_from(where))
        value = draw(BAD_VALUES)
        _set(tree, path, value)
        what = f"{'.'.join(map(str, path))} = {value!r:.40}"
    elif how == "delete":
        path = draw(st.sampled_from(where))
        _set(tree, path, None, delete=True)
        what = f"delete {'.'.join(map(str, path))}"
    elif how == "add":
        dicts = [p for p, v in paths(tree) if isinstance(v, dict)]
        path = draw(st.sampled_from(dicts)) + (draw(st.sampled_from(["typo", "clients", "x: y", "1e5"])),)
        _set(tree, path, draw(BAD_VALUES))
        what = f"add {'.'.join(map(str, path))}"
    else:
        what = how
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    raw = text.encode("utf-8")
    lines = text.splitlines(keepends=True)
    if how == "duplicate":
        top = [i for i, line in enumerate(lines) if line[:1].isalpha()]
        i = draw(st.sampled_from(top))
        raw = "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]).encode()
    elif how == "bytes":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.sampled_from([b"\xe9", b"\xff\xfe", bytes(range(128, 160))])) + raw[i:]
    elif how == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw, what


# ---------------------------------------------------------------- the property

def accepted_or_named(load, path, what):
    """load(path) either returns (accepted) or raises one ConfigError naming the file and the field."""
    try:
        with no_hang():
            return load(path)
    except ConfigError as e:
        text = str(e)
        assert str(path) in text.splitlines()[0], (what, text)
        assert e.problems and all(": " in p or p.startswith(("not ", "top level", "file not found"))
                                  for p in e.problems), (what, text)
        return None


def cli_ok(args, out=None, what=""):
    """The CLI answers with an exit code, never a traceback, and leaves an existing output alone on error."""
    before = out.read_bytes() if out is not None else None
    with no_hang():
        r = runner.invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), (what, r.output, r.exception)
    assert "Traceback" not in r.output, (what, r.output)
    if out is not None and r.exit_code != 0:
        assert out.read_bytes() == before, (what, "output file changed")
    return r


def _finite_tree(obj, what):
    for p, v in paths(obj):
        if isinstance(v, float):
            assert math.isfinite(v), (what, p, v)


@SETTINGS
@given(case=mutated(device()))
def test_any_mutated_device_profile_is_accepted_and_valid_or_refused_naming_file_and_field(tmp_path_factory, case):
    raw, what = case
    f = tmp_path_factory.mktemp("dev") / "board.yaml"
    f.write_bytes(raw)
    d = accepted_or_named(DeviceProfile.load, f, what)
    if d is not None:
        _finite_tree(d.to_dict(), what)
        assert d.memory_gib > 0 and d.uplink_mbps > 0 and d.downlink_mbps > 0, what
        try:
            assert math.isfinite(d.throughput("fp32")) and d.throughput("fp32") > 0, what
        except ConfigError as e:
            assert "flops.fp32" in str(e), what


@SETTINGS
@given(case=mutated(fleet()))
def test_any_mutated_fleet_is_accepted_and_plans_or_is_refused_naming_file_and_field(tmp_path_factory, case):
    raw, what = case
    d = tmp_path_factory.mktemp("fleet")
    f = d / "fleet.yaml"
    f.write_bytes(raw)
    out = d / "plan.yaml"
    out.write_text("# an earlier plan that a failed command must not touch\n")
    fl = accepted_or_named(Fleet.load, f, what)
    if fl is not None:
        _finite_tree(fl.to_dict(), what)
        assert fl.num_clients <= 10_000, what
    r = cli_ok(["plan", "--fleet", str(f), "--modules", "q_proj", "--ranks", "0,4", "-o", str(out)], out, what)
    assert r.exit_code in (0, 1, 2), (what, r.output)      # planned, no feasible plan, or refused
    if fl is None:
        assert r.exit_code == 2 and str(f) in " ".join(r.output.split()), (what, r.output)
    if r.exit_code == 0:
        assert len(Plan.load(out).clients) == fl.num_clients


@SETTINGS
@given(case=mutated(importance()))
def test_any_mutated_importance_file_is_accepted_and_valid_or_refused_naming_file_and_field(tmp_path_factory,
                                                                                              case):
    raw, what = case
    f = tmp_path_factory.mktemp("imp") / "importance.yaml"
    f.write_bytes(raw)
    imp = accepted_or_named(Importance.load, f, what)
    if imp is not None:
        try:
            w = imp.weights(MODEL, MODULES)
        except ConfigError as e:
            assert str(f) in str(e) and "scores" in str(e), (what, str(e))
        else:
            assert abs(w.sum() - 1) < 1e-9 and (w >= 0).all(), what


@SETTINGS
@given(case=mutated(plan()))
def test_any_mutated_plan_is_accepted_and_checks_or_is_refused_naming_file_and_field(tmp_path_factory, case):
    raw, what = case
    d = tmp_path_factory.mktemp("plan")
    f = d / "plan.yaml"
    f.write_bytes(raw)
    fleet_file = d / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(FLEET_FOR_PLANS))
    p = accepted_or_named(Plan.load, f, what)
    if p is not None:
        _finite_tree(p.to_dict(), what)
        t = p.training
        assert t.batch_size >= 1 and t.local_steps >= 1 and t.learning_rate > 0 and 0 <= t.lora_dropout < 1, what
        assert 0 <= p.data.eval_fraction < 1 and p.data.alpha > 0, what
        try:                                   # the check `hsplit run` makes before it loads torch
            with no_hang():
                p.validate_for(MODEL)
        except ConfigError as e:
            assert str(f) in str(e), (what, str(e))
        again = d / "again.yaml"               # what is accepted round-trips
        p.save(again)
        assert Plan.load(again).to_dict() == p.to_dict(), what
    r = cli_ok(["plan", "--check", str(f), "--fleet", str(fleet_file)], what=what)
    assert r.exit_code in (0, 1, 2), (what, r.output)      # valid, violates constraints, or refused
    if p is None:
        assert r.exit_code == 2 and str(f) in " ".join(r.output.split()), (what, r.output)
