"""The README's "A short tour" runs as written: every command of its code block, in order, in a scratch folder
that holds the repository's examples/ (the tour runs from the repository root), offline, with the real
default model (slow: a few minutes on a 2-core CPU; the converted model is cached in $HSPLIT_CACHE).
Nothing is shrunk: the README's commands are sized for a CPU."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tour_commands(readme: str) -> list[list[str]]:
    """The shell commands of the first ```bash block under "## A short tour" (comments, blank lines and
    `source` left out; backslash continuations joined)."""
    section = readme.split("## A short tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] != "source":
            commands.append(argv)
    return commands


def test_the_tour_block_is_parsed_into_hsplit_commands():
    cmds = tour_commands((ROOT / "README.md").read_text())
    assert len(cmds) >= 10 and all(c[0] == "hsplit" for c in cmds)
    assert ["hsplit", "plan", "--check", "examples/splitlora.yaml", "--fleet", "example"] in cmds
    assert (ROOT / "examples" / "splitlora.yaml").is_file()
    # every run/eval/export names a run folder that an earlier command creates (no placeholders)
    assert not any("<" in a for c in cmds for a in c)


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    hsplit = [sys.executable, "-m", "hsplit.cli"]          # the `hsplit` of this interpreter
    for argv in tour_commands((ROOT / "README.md").read_text()):
        t0 = time.perf_counter()
        res = subprocess.run(hsplit + argv[1:], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{shlex.join(argv)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        print(f"{time.perf_counter() - t0:6.1f} s  {shlex.join(argv)}")     # shown with -s: where the minutes go
    run = work / "runs" / "tour"
    assert (run / "metrics.csv").is_file() and any((run / "tb").glob("events.out.tfevents.*"))
    card = (work / "out" / "adapter" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    config = json.loads((work / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (work / "runs" / "tour-dist" / "metrics.csv").is_file() and (work / "whatif").is_dir()
