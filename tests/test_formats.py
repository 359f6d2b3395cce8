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
    plan = make_plan(fleet, "smollm2-135m", modules=["q_proj", "v_proj"])
    # Importance concentrated in the top blocks pulls the Pis' adapters upwards.
    scores = {model.module_name(l, m): (10.0 if l >= 20 else 0.1) for l in range(30)
              for m in ("self_attn.q_proj", "self_attn.v_proj")}
    imp = Importance(scores=scores, method="test", model_hash=model.arch_hash(), source="<drift>")
    assert shift(Importance(scores={}), imp, model, ("self_attn.q_proj", "self_attn.v_proj")) > 0.5
    new = replan(plan, imp)
    assert new.inputs["importance_method"].startswith("test")
    assert [c.ranks for c in new.clients] != [c.ranks for c in plan.clients]
    assert new.training == plan.training and new.modules == plan.modules
    fleet.write_text(fleet.read_text().replace("count: 2", "count: 3", 1))
    with pytest.raises(ConfigError, match="changed since this plan was made"):
        replan(plan, imp)
