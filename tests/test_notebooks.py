"""notebooks/whatif.ipynb runs top to bottom and tells the capacity-planning story it claims."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "whatif.ipynb"


def test_whatif_notebook_executes_and_its_findings_hold(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    line = next(l for l in text.splitlines() if l.startswith("SUMMARY "))
    s = json.loads(line.removeprefix("SUMMARY "))
    # Replacing half the Pis leaves a Pi as straggler; replacing all of them shortens the round.
    assert s["round_s_8_pis"] == s["round_s_15_pis"]
    assert s["round_s_0_pis"] < s["round_s_15_pis"]
    # The phones stop being stragglers at a finite uplink inside the swept range.
    assert 1 < s["phone_uplink_threshold_mbps"] <= 50
    # Less memory: the split point moves down, monotonically, and utility falls.
    splits = list(s["jetson_split_by_budget"].values())
    assert splits == sorted(splits, reverse=True) and splits[0] > splits[-1]
    util = list(s["utility_by_budget"].values())
    assert util[0] > util[-1]
    # Plots were produced (display_data PNG outputs).
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3 and all(len(o["data"]["image/png"]) > 1000 for o in pngs)
