"""Consoles, exit codes and the one way a command fails (one `error:` line), shared by every command."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from hsplit.planner.errors import ConfigError, InfeasibleError


FORMATS = ("table", "text", "json")  # table and text are the same human-readable output


# Exit codes, the same for every command (README.md "Exit codes"). BAD_INPUT and PEER_LOST are also
# what the distributed processes exit with (runtime/distributed.py EXIT_REFUSED, EXIT_FAULT).
OK, NO_SOLUTION, BAD_INPUT, PEER_LOST, INTERRUPTED = 0, 1, 2, 3, 130


def console_for(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # emoji=False: text such as `nowhere:x:` in a message is data, not an emoji code
    # soft_wrap on stderr: errors, notes and warnings are never broken into lines by rich (a command in
    # them stays copyable, a grep finds the whole line); the terminal wraps them for display.
    return Console(stderr=stderr, width=None if stream.isatty() else 160, emoji=False, soft_wrap=stderr)


# Piped output (files, CI logs) is not wrapped at 80 columns: tables stay readable.
console = console_for()


err = console_for(stderr=True)


def fail(message: str, code: int = BAD_INPUT) -> None:
    """Print one error line on stderr and exit with `code` (BAD_INPUT unless said)."""
    # escape(): text like `[min, max]` in a message is data, not rich markup.
    console_for(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def reported(*bad_input: type[Exception]):
    """Turn the library's errors into one `error:` line: ConfigError (and `bad_input`) exit BAD_INPUT,
    InfeasibleError (valid input, no plan satisfies it) exits NO_SOLUTION."""
    try:
        yield
    except InfeasibleError as e:
        fail(str(e), NO_SOLUTION)
    except (ConfigError, *bad_input) as e:
        fail(str(e))


@contextmanager
def input_errors():
    """An OSError while reading an input names that file (never --output: its errors are caught at save)."""
    try:
        yield
    except OSError as e:
        fail(f"{e.filename or 'input'}: cannot read: {e.strerror or e}")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def parse_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{flag}: expected comma-separated whole numbers like 0,2,4,8,16, got {text!r}")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def print_json(obj) -> None:
    """One JSON object on one line of stdout (what scripts read)."""
    print(json.dumps(obj))


def say(text: str) -> None:
    """A line of human output on stdout, printed as written (no markup, no highlighting, never wrapped)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)
