"""Shared by the `hsplit` command modules (cli.py, runtime/commands.py, runtime/measure_commands.py):
consoles that do not wrap piped output at 80 columns, one way to fail, one check of --format."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

FORMATS = ("table", "text", "json")  # table and text are the same human-readable output


def console_for(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # emoji=False: text such as `nowhere:x:` in a message is data, not an emoji code
    return Console(stderr=stderr, width=None if stream.isatty() else 160, emoji=False)


def fail(message: str, code: int = 2) -> None:
    """Print one error line on stderr and exit with `code` (1: bad input or infeasible, 2: usage)."""
    # escape(): text like `[min, max]` in a message is data, not rich markup.
    console_for(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
