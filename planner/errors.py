"""Errors raised for bad input: one error lists every problem, each naming file, field and fix.

Used by every loader in hsplit.planner (device, fleet, model, importance, plan) and by the CLI,
which prints `str(error)` and exits non-zero.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Every problem found in one input file, reported together. Problems with the same message for
    several fields are grouped on one line, and at most MAX_SHOWN lines are printed (`problems` keeps all)."""

    MAX_SHOWN = 20

    def __init__(self, source: str, problems: list[str], shown: int | None = None):
        self.source = source
        self.problems = list(problems)
        lines = group_problems(self.problems)
        limit = shown or self.MAX_SHOWN          # shown: fewer lines (e.g. one problem per record of a file)
        if len(lines) > limit:
            hidden = len(lines) - limit
            lines = lines[:limit] + [f"... and {hidden} more (fix the ones above first)"]
        if len(lines) == 1:           # one problem: one line
            super().__init__(f"{source}: {lines[0]}")
        else:
            body = "\n".join(f"  - {p}" for p in lines)
            super().__init__(f"{source}: {len(self.problems)} problems:\n{body}")


def group_problems(problems: list[str]) -> list[str]:
    """`field: message` lines with one message for many fields become one line naming the fields
    (the first three and how many more), in the order first seen; other lines are kept as they are."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        field, sep, message = p.partition(": ")
        if not sep or " " in field or "=" in field:     # not a field name (e.g. what-if `seq_len=0`)
            groups.setdefault(p, []).append("")
            continue
        groups.setdefault(message, []).append(field)
    out = []
    for message, fields in groups.items():
        named = [f for f in dict.fromkeys(fields) if f]
        if not named:
            out.append(message)
            continue
        if len(named) == 1:
            out.append(f"{named[0]}: {message}")
            continue
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        out.append(f"{', '.join(named[:3])}{more}: {message}")
    return out


class Problems:
    """Collects field problems while a file is validated; `raise_if_any` raises one ConfigError."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(f"{field}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.source, self.items)


class InfeasibleError(RuntimeError):
    """No plan satisfies the constraints; `reasons` has one line per offending client."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"no feasible plan: {len(self.reasons)} client(s) cannot be placed:\n{lines}")
