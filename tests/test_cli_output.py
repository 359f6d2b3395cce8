"""Human output of the commands: notes and errors are single unwrapped lines (copyable, grep-able), the
merge-download note pairs each number with its own client, what-if numbers are never in scientific
notation and its plots name fleets as the table does."""
from __future__ import annotations

import os

import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsplit.cli import app  # noqa: E402
from hsplit.planner.plan import Plan  # noqa: E402

runner = CliRunner()

MIXED = """name: mixed
server: {device: h100-80gb, count: 1}
clients:
  - device: snapdragon-8-gen3-phone
    count: 2
    budget: {round_s: 900, memory_gib: 4.0}
    downlink_mbps: 30
  - device: rtx-4090-24gb
    count: 2
"""


def test_merge_note_pairs_each_number_with_its_own_client(tmp_path):
    fleet = tmp_path / "mixed.yaml"
    fleet.write_text(MIXED)
    r = runner.invoke(app, ["plan", "--fleet", str(fleet), "--model", "llama-2-7b", "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 0, r.output
    p = Plan.load(tmp_path / "p.yaml")
    big = max(p.clients, key=lambda c: c.predicted["merge_download_charged_mb"])
    slow = max(p.clients, key=lambda c: c.predicted["merge_download_charged_s"])
    assert big.id != slow.id                    # the fleet is made so: a fast GPU downloads most, a phone longest
    (note,) = [line for line in r.output.splitlines() if "merge download" in line]     # one unwrapped line
    mb = f"{big.predicted['merge_download_charged_mb']:,.1f} MB per round for {big.id} ("
    assert mb in note, note
    assert f"for {slow.id} ({slow.predicted['merge_download_charged_mb']:,.1f} MB)" in note, note


def test_errors_are_one_unwrapped_line_when_piped(tmp_path):
    long_id = "someone/" + "x" * 150
    r = runner.invoke(app, ["plan", "--data", long_id, "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and len(lines[0]) > 200, r.output
    assert f"datasets.load_dataset('{long_id}')" in lines[0]


def test_notes_are_unwrapped(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    r = runner.invoke(app, ["plan", "--check", str(_handwritten(deep))])
    (note,) = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(note) > 200 and "pass --fleet FLEET to choose" in note, r.output


def _handwritten(tmp_path):
    out = tmp_path / "h.yaml"
    r = runner.invoke(app, ["plan", "-o", str(out)])
    assert r.exit_code == 0, r.output
    p = yaml.safe_load(out.read_text())
    del p["inputs"]["fleet"]
    out.write_text(yaml.safe_dump(p))
    return out
