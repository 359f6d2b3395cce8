"""File formats: validation names the file, the field and the fix; plan.yaml round-trips."""
from __future__ import annotations

import pytest

from hsplit.planner.api import make_plan
from hsplit.planner.errors import ConfigError
from hsplit.planner.fleet import Fleet
from hsplit.planner.importance import Importance
from hsplit.planner.model import load_model_profile
from hsplit.planner.plan import Plan


def test_fleet_errors_are_reported_together_with_file_and_field(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text("server: {device: a100-80gb}\nclients:\n"
                   "  - {device: no-such-device, count: 2}\n"
                   "  - {device: raspberry-pi-5-8gb, count: -1, budget: {memory_gib: 99}}\n")
    with pytest.raises(ConfigError) as e:
        Fleet.load(bad)
    text = str(e.value)
    assert str(bad) in text
    assert "clients[0].device" in text and "no-such-device" in text and "shipped:" in text
    assert "clients[1].count" in text
    assert "clients[1].budget.memory_gib" in text and "exceeds" in text


def test_inline_device_profile_is_validated(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("server: {device: a100-80gb}\nclients:\n  - device: {name: x, kind: toaster, memory_gib: 1,"
                 " uplink_mbps: 1, downlink_mbps: 1, peak_flops: {fp32: 1e9}}\n")
    with pytest.raises(ConfigError) as e:
        Fleet.load(f)
    assert "clients[0].device.kind" in str(e.value)
    assert "efficiency" in str(e.value)


def test_missing_dtype_throughput_is_an_error_not_a_default():
    with pytest.raises(ConfigError, match="no throughput for dtype bf16"):
        make_plan("example", "smollm2-135m", training=__import__("hsplit.planner.plan", fromlist=["Training"]).Training(dtype="bf16"))


def test_plan_round_trips(tmp_path):
    plan = make_plan("example", "smollm2-135m")
    path = tmp_path / "plan.yaml"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_dict() == Plan.from_dict(again.to_dict(), "x").to_dict()
    assert [c.split_layer for c in again.clients] == [c.split_layer for c in plan.clients]
    assert [c.ranks for c in again.clients] == [c.ranks for c in plan.clients]
    assert again.training == plan.training
    again.save(tmp_path / "plan2.yaml")
    assert (tmp_path / "plan2.yaml").read_text() == path.read_text()


def test_hand_written_plan_shorthand_ranks_expand_to_client_blocks():
    model = load_model_profile("smollm2-135m")
    plan = Plan.from_dict({"model": "smollm2-135m", "strategy": "splitlora", "modules": ["q_proj", "v_proj"],
                           "clients": [{"device": "x", "split_layer": 3, "ranks": {"q_proj": 8, "v_proj": 8}}]}, "h.yaml")
    ranks = plan.client_ranks(plan.clients[0], model)
    assert set(ranks) == {f"model.layers.{l}.self_attn.{m}_proj" for l in range(3) for m in "qv"}
    assert len(plan.server_ranks(plan.clients[0], model)) == 2 * (30 - 3)


def test_plan_validation_lists_every_problem(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("model: smollm2-135m\nstrategy: fedsgd\nclients:\n"
                 "  - {device: x, split_layer: 0, ranks: {q_proj: -1}}\n"
                 "  - {device: y, split_layer: 2, ranks: {model.layers.5.self_attn.q_proj: 4}, colour: red}\n")
    with pytest.raises(ConfigError) as e:
        Plan.load(p)
    text = str(e.value)
    for field in ("strategy", "clients[0].split_layer", "clients[0].ranks.q_proj", "clients[1].colour"):
        assert field in text
    good = Plan.from_dict({"model": "smollm2-135m", "strategy": "hsplitlora", "clients": [
        {"device": "y", "split_layer": 2, "ranks": {"model.layers.5.self_attn.q_proj": 4, "w_proj": 2}}]}, "p.yaml")
    with pytest.raises(ConfigError) as e:
        good.validate_for(load_model_profile("smollm2-135m"))
    assert "block 5 is on the server" in str(e.value) and "w_proj" in str(e.value)


def test_importance_for_another_model_is_refused(tmp_path):
    imp = Importance(scores={"model.layers.0.self_attn.q_proj": 1.0}, model="gpt2", model_hash="abc",
                     method="sensitivity", source=str(tmp_path / "imp.yaml"))
    imp.save(tmp_path / "imp.yaml")
    with pytest.raises(ConfigError, match="computed for gpt2"):
        make_plan("example", "smollm2-135m", importance=tmp_path / "imp.yaml")


def test_importance_file_typos_are_errors(tmp_path):
    """A misspelt field (normalisation) must not load silently as the default (raw)."""
    f = tmp_path / "imp.yaml"
    f.write_text("scores: {model.layers.0.self_attn.q_proj: 1.0}\nnormalisation: per-parameter\nschema_version: 2\n")
    with pytest.raises(ConfigError) as e:
        Importance.load(f)
    assert "normalisation: unknown field; expected one of" in str(e.value)
    assert "schema_version: 2 is not supported" in str(e.value)


def test_unknown_module_names_the_choices():
    with pytest.raises(ConfigError, match="does not exist in smollm2-135m"):
        make_plan("example", "smollm2-135m", modules=["c_attn"])


def test_replan_resolves_with_new_importance_and_refuses_a_changed_fleet(tmp_path):
    import shutil

    from hsplit.planner.api import replan
    from hsplit.planner.device import PROFILE_DIR
    from hsplit.planner.importance import shift
    fleet = tmp_path / "fleet.yaml"
    shutil.copy(PROFILE_DIR / "fleets" / "example.yaml", fleet)
    model = load_model_profile("smollm2-135m")
    plan = make_plan(fleet, "smollm2-135m")
    # Importance concentrated in the top blocks pulls the adapters (and the RTX's split) upwards.
    mods = model.resolve_modules(None)
    scores = {model.module_name(l, m): (10.0 if l >= 20 else 0.1) for l in range(30) for m in mods}
    imp = Importance(scores=scores, method="test", model_hash=model.arch_hash(), source="<drift>")
    assert shift(Importance(scores={}), imp, model, mods) > 0.5
    new = replan(plan, imp)
    assert new.inputs["importance_method"].startswith("test")
    assert [c.ranks for c in new.clients] != [c.ranks for c in plan.clients]
    assert new.training == plan.training and new.modules == plan.modules
    fleet.write_text(fleet.read_text().replace("count: 2", "count: 3", 1))
    with pytest.raises(ConfigError, match="changed since this plan was made"):
        replan(plan, imp)


# ---- QA pass: messages name the file, the field and the fix, once ----

def _fleet_error(tmp_path, text, name="fleet.yaml"):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        Fleet.load(f)
    return str(e.value), f


def test_unknown_dtype_is_refused_where_the_instance_is_built():
    from hsplit.planner.plan import Training
    with pytest.raises(ConfigError, match=r"--dtype.*must be one of fp32, bf16, fp16, got 'fp64'"):
        make_plan("example", "smollm2-135m", training=Training(dtype="fp64"))


def test_negative_ranks_are_refused_in_one_place():
    with pytest.raises(ConfigError, match="-4: ranks must be whole numbers >= 0"):
        make_plan("example", "smollm2-135m", ranks=(0, -4, 8))


def test_splits_are_checked_at_load_and_against_the_model(tmp_path):
    text, f = _fleet_error(tmp_path, "server: {device: a100-80gb}\nclients:\n"
                                     "  - {device: rtx-3060-12gb, splits: [20, 5]}\n")
    assert "clients[0].splits: must be [min, max] with whole numbers 1 <= min <= max" in text and "[20, 5]" in text
    for bad in ("[1, 100]", "[50, 100]", "[1, 30]"):
        f.write_text(f"server: {{device: a100-80gb}}\nclients:\n  - {{device: rtx-3060-12gb, splits: {bad}}}\n")
        with pytest.raises(ConfigError) as e:
            make_plan(f, "smollm2-135m")
        assert str(f) in str(e.value)
        assert f"clients[0].splits: {bad} is outside 1..29 for smollm2-135m (30 blocks" in str(e.value)
    f.write_text("server: {device: a100-80gb}\nclients:\n  - {device: rtx-3060-12gb, splits: [28, 29]}\n")
    assert {c.split_layer for c in make_plan(f, "smollm2-135m", ranks=(0, 2)).clients} <= {28, 29}


def test_inline_device_errors_have_one_prefix_and_no_spurious_missing(tmp_path):
    text, _ = _fleet_error(tmp_path, "server: {device: a100-80gb}\nclients:\n  - device: {name: x, kind: soc, "
                                     "memory_gib: 0, uplink_mbps: 1, downlink_mbps: 1, peak_flops: {fp32: -1}, "
                                     "efficiency: 2}\n")
    assert "  - clients[0].device.memory_gib: must be > 0, got 0" in text
    assert "clients[0].device: clients[0].device" not in text
    assert "clients[0].device.peak_flops.fp32: must be > 0" in text and "efficiency: is sustained/peak" in text
    assert "missing" not in text


def test_device_profile_file_errors_name_the_file(tmp_path):
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "board.yaml").write_text("name: board\nkind: soc\nmemory_gib: 0\nuplink_mbps: 1\n"
                                                     "downlink_mbps: 1\nflops: {fp32: 1.0e9}\n")
    text, _ = _fleet_error(tmp_path, "server: {device: a100-80gb}\nclients:\n  - device: devices/board.yaml\n"
                                     "  - device: ./devices/my-board.yaml\n")
    assert "clients[0].device: in " in text and "board.yaml: memory_gib: must be > 0" in text
    missing = (tmp_path / "devices" / "my-board.yaml").resolve()
    assert f"clients[1].device: file not found: {missing}" in text and "no profile named" not in text


def test_clients_written_as_a_mapping_says_it_must_be_a_list(tmp_path):
    text, _ = _fleet_error(tmp_path, "server: {device: a100-80gb}\nclients:\n  device: rtx-3060-12gb\n")
    assert "clients: must be a list of client groups" in text and "e.g." in text and "missing" not in text


def test_importance_hash_mismatch_for_the_same_name_says_the_architecture_differs(tmp_path):
    imp = Importance(scores={"model.layers.0.self_attn.q_proj": 1.0}, model="smollm2-135m", model_hash="abc123",
                     method="sensitivity", source=str(tmp_path / "imp.yaml"))
    imp.save(tmp_path / "imp.yaml")
    with pytest.raises(ConfigError) as e:
        make_plan("example", "smollm2-135m", importance=tmp_path / "imp.yaml")
    text = str(e.value)
    assert "not smollm2-135m" not in text
    assert "model_hash abc123" in text and "different architecture" in text


def test_duplicate_client_ids_are_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        Plan.from_dict({"model": "smollm2-135m", "clients": [
            {"id": "a", "device": "x", "split_layer": 1}, {"id": "b", "device": "x", "split_layer": 1},
            {"id": "a", "device": "x", "split_layer": 1}]}, "p.yaml")
    assert "id 'a' is used by clients[0], clients[2]" in str(e.value)
