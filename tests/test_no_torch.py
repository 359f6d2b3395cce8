"""The planner never imports torch: importing hsplit.planner and planning leave sys.modules clean."""
from __future__ import annotations

import subprocess
import sys


def test_planning_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "import hsplit.planner, hsplit.planner.api\n"
        "from typer.testing import CliRunner\n"
        "from hsplit.cli import app\n"
        f"r = CliRunner().invoke(app, ['plan', '--fleet', 'example', '-o', r'{tmp_path / 'plan.yaml'}'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('clean')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "clean" in out.stdout
