"""Progress on stderr (never with --format json, so stdout stays one object): bars with ETAs."""
from __future__ import annotations

from hsplit.cliutil.console import err
from hsplit.cliutil.render import ppl


class Bar:
    """One transient bar: `with Bar("scoring") as bar: work(on_step=bar.update)`; nothing when disabled."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled, self.p, self.task = label, enabled, None, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
            self.p.start()
            self.task = self.p.add_task(self.label, total=None)
        return self

    def update(self, done: int, total: int) -> None:
        if self.p is not None:
            self.p.update(self.task, completed=done, total=total)

    def describe(self, text: str) -> None:
        if self.p is not None:
            self.p.update(self.task, description=text if len(text) <= 50 else text[:49] + "…")

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.stop()
        return False


def run_eta(elapsed_s: float, done: float, total: float) -> str:
    """The whole run's time left at the average pace so far (training, evaluation and checkpoints alike)."""
    if done <= 0 or total <= done:
        return "ETA -:--:--" if total > done else "ETA 0:00:00"
    left = int(elapsed_s * (total - done) / done + 0.5)
    return f"ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"


class RoundBars:
    """`hsplit run`'s progress (a runtime.loop.Reporter): a bar for the whole run (rounds, advanced step by step)
    with the run's ETA at its average pace so far, one for the current round's steps with that round's ETA,
    and one line per finished round. The bars start with the first round (after the model has loaded); use
    as a context manager so they stop on errors."""

    def __init__(self):
        from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        from rich.text import Text

        class Eta(ProgressColumn):
            def render(self, task):
                if "t0" not in task.fields:             # the round's steps: rich's own estimate
                    return TimeRemainingColumn().render(task)
                done = task.completed - task.fields["c0"]
                return Text(run_eta(task.get_time() - task.fields["t0"], done, task.total - task.fields["c0"]),
                            style="progress.remaining")

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                          TimeElapsedColumn(), Eta(), console=err)
        self.rounds = self.steps = None
        self.total = self.per_step = self.step_total = self.step_done = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.p.stop()
        return False

    def start_rounds(self, total: int, done: int) -> None:
        self.p.start()
        self.total = total
        self.rounds, self.steps = self.p.add_task("rounds", total=total, completed=done, count=f"{done}/{total}",
                                                  t0=self.p.get_time(), c0=done), None

    def start_round(self, r: int, steps: int) -> None:
        if self.steps is not None:
            self.p.remove_task(self.steps)
        self.per_step, self.step_total, self.step_done = (1.0 / steps if steps else 0.0), steps, 0
        self.p.update(self.rounds, completed=r)
        self.steps = self.p.add_task(f"round {r + 1} steps", total=steps, count=f"0/{steps}")

    def advance(self) -> None:
        if self.steps is not None:
            self.step_done += 1
            self.p.update(self.steps, advance=1, count=f"{self.step_done}/{self.step_total}")
            self.p.advance(self.rounds, self.per_step)

    def end_round(self, g: dict) -> None:
        self.p.update(self.rounds, completed=g["round"], count=f"{g['round']}/{self.total}")
        fleet = f", fleet {g['fleet_s']:.1f} s" if g.get("fleet_s") is not None else ""
        err.print(f"round {g['round']}: train loss {g['train_loss']:.4f}, eval loss {g['eval_loss']:.4f} "
                  f"(ppl {ppl(g['eval_loss'])}), wall {g['wall_s']:.1f} s{fleet}")
