"""Errors raised for bad input: one error lists every problem, each naming file, field and fix.

Used by every loader in hsplit.planner (device, fleet, model, importance, plan) and by the CLI,
which prints `str(error)` and exits non-zero.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Every problem found in one input file, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:           # one problem: one line
            super().__init__(f"{source}: {self.problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{source}: {len(self.problems)} problems:\n{lines}")


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
