"""Import hygiene: the planner and `hsplit --help` never import torch; only cli.py and cliutil/ are
command-line code (typer, rich, argparse)."""
from __future__ import annotations

import subprocess
import sys


def _clean(body: str) -> None:
    """Run `body` (after importing the CLI) in a fresh interpreter; torch, transformers, peft never load."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom hsplit.cli import app\n" + body +
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "assert not bad, bad\nprint('clean')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "clean" in out.stdout


def test_planning_does_not_import_torch(tmp_path):
    _clean("import hsplit.planner, hsplit.planner.api\n"
           f"r = CliRunner().invoke(app, ['plan', '--fleet', 'example', '-o', r'{tmp_path / 'plan.yaml'}'])\n"
           "assert r.exit_code == 0, r.output\n")


def test_help_and_every_command_are_there_without_importing_torch():
    _clean("r = CliRunner().invoke(app, ['--help'])\n"
           "assert r.exit_code == 0, r.output\n"
           "names = ('plan', 'whatif', 'run', 'eval', 'export', 'demo', 'importance', 'profile', 'calibrate')\n"
           "assert all(n in r.output for n in names), r.output\n")


def test_command_line_code_lives_only_in_cli_and_cliutil():
    """typer, rich and argparse are imported by cli.py and cliutil/ only: the runtime and the planner are
    libraries (progress through callbacks and loop.Reporter). One exception: runtime/distributed/worker.py's
    argparse (torchrun's entry point `-m hsplit.runtime.distributed.worker`, parser built from runtime/train/options.py)."""
    import ast
    from pathlib import Path

    import hsplit
    root = Path(hsplit.__file__).parent
    allowed = {("runtime/distributed/worker.py", "argparse")}
    found = []
    for path in sorted([*(root / "runtime").rglob("*.py"), *(root / "planner").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ("typer", "rich", "argparse", "click") and (rel, top) not in allowed:
                    found.append(f"{rel}:{node.lineno} imports {name}")
    assert not found, found
    assert all((root / rel).is_file() for rel, _ in allowed)     # the exceptions name real files
