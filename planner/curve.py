"""Measured convergence curves for what-if: rounds to a target perplexity, read from a run's metrics.csv.

    curve = read_curve("runs/first/metrics.csv", target_ppl=9.0)
    curve.rounds_to_target        # first round whose held-out perplexity is <= 9.0

`hsplit whatif --curve runs/NAME/metrics.csv [--target-ppl P]` multiplies `rounds_to_target` by each
scenario's predicted round time (docs/whatif.md, "Time to a target perplexity"). The file is the one
`hsplit run` writes (docs/runtime.md, Run folder): the `client=all` rows carry the held-out `eval_ppl`
of the aggregated model after each round (round 0: before training). A hand-made CSV needs only the
columns `round` and `eval_ppl` (or `eval_loss`, perplexity = exp(loss)); with a `client` column, only
its `all` rows are read. Rows without a perplexity (not evaluated that round) are skipped.
`setup_warning` compares the run's set-up (its config.yaml next to metrics.csv: model, batch size, seq
len, local steps) with the what-if's and says what differs.
Pure Python (csv module, planner/yamlio): the planner never imports torch.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from hsplit.planner.errors import ConfigError
from hsplit.planner.yamlio import read_yaml


@dataclass(frozen=True)
class Curve:
    source: str
    points: tuple[tuple[int, float], ...]   # (round, held-out perplexity), rounds ascending
    target_ppl: float
    target_given: bool                      # False: the target is the run's final perplexity
    rounds_to_target: int                   # first round r with perplexity <= target_ppl

    @property
    def final_ppl(self) -> float:
        return self.points[-1][1]

    def describe(self) -> str:
        how = "" if self.target_given else " (the run's final held-out perplexity)"
        return (f"{self.source}: held-out perplexity {self.target_ppl:.4g}{how} first reached after round "
                f"{self.rounds_to_target}")


def read_curve(path: str | Path, target_ppl: float | None = None) -> Curve:
    """The (round, held-out perplexity) curve of `path` and the first round that reaches `target_ppl`
    (default: the last round's perplexity). One ConfigError, naming the file, the field and the fix,
    for a missing file, missing columns, bad values, or a target the curve never reaches."""
    src = str(path)
    if target_ppl is not None and not (isinstance(target_ppl, (int, float)) and math.isfinite(target_ppl)
                                       and target_ppl > 0):
        raise ConfigError("--target-ppl", [f"must be a perplexity > 0, got {target_ppl!r}"])
    points = _points(Path(path), src)
    given = target_ppl is not None
    target = float(target_ppl) if given else points[-1][1]
    reached = [r for r, ppl in points if ppl <= target]
    if not reached:
        best_r, best = min(points, key=lambda p: p[1])
        raise ConfigError(src, [f"eval_ppl: the run never reaches the target perplexity {target:.6g} (best "
                                f"{best:.6g} after round {best_r}, final {points[-1][1]:.6g} after round "
                                f"{points[-1][0]}); pass --target-ppl {best:.6g} or higher, or a curve of a run "
                                f"trained for more rounds"])
    return Curve(src, tuple(points), target, given, reached[0])


def _points(path: Path, src: str) -> list[tuple[int, float]]:
    try:
        text = path.read_text(encoding="utf-8-sig")      # a spreadsheet's byte-order mark is no column name
    except FileNotFoundError:
        raise ConfigError(src, ["no such file; pass the metrics.csv of a run (runs/NAME/metrics.csv, written "
                                "by hsplit run)"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(src, [f"cannot read it as text: {e}; pass the metrics.csv of a run"]) from None
    rows = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (rows.fieldnames or [])]
    rows.fieldnames = header
    missing = [c for c in ("round",) if c not in header]
    if "eval_ppl" not in header and "eval_loss" not in header:
        missing.append("eval_ppl")
    if missing:
        found = ", ".join(header) if header else "no header line"
        raise ConfigError(src, [f"{', '.join(missing)}: missing column(s); a convergence curve needs the columns "
                                f"round and eval_ppl (or eval_loss), as in the metrics.csv hsplit run writes; "
                                f"found: {found}"])
    problems: list[str] = []
    seen: dict[int, int] = {}
    points = []
    for line, row in enumerate(rows, start=2):
        if "client" in header and (row.get("client") or "").strip() != "all":
            continue
        ppl = _ppl(row, line, problems)
        if ppl is None:
            continue
        r_text = (row.get("round") or "").strip()
        try:
            r = int(float(r_text)) if float(r_text) == int(float(r_text)) else -1
        except (ValueError, OverflowError):
            r = -1
        if r < 0:
            problems.append(f"line {line}: round: must be a whole number >= 0, got {r_text!r}")
            continue
        if r in seen:
            problems.append(f"line {line}: round: round {r} appears twice (also on line {seen[r]}); keep one "
                            f"held-out perplexity per round")
            continue
        seen[r] = line
        points.append((r, ppl))
    if problems:
        raise ConfigError(src, problems)
    if not points:
        raise ConfigError(src, ["eval_ppl: no row has a held-out perplexity (the client=all rows of a run's "
                                "metrics.csv carry it); pass the metrics.csv of a run that evaluated its rounds"])
    return sorted(points)


def _ppl(row: dict, line: int, problems: list[str]) -> float | None:
    """The row's held-out perplexity (eval_ppl, else exp(eval_loss)); None when the row has none."""
    for col, convert in (("eval_ppl", float), ("eval_loss", lambda x: math.exp(float(x)))):
        text = (row.get(col) or "").strip()
        if not text:
            continue
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            problems.append(f"line {line}: {col}: must be a finite number{' > 0' if col == 'eval_ppl' else ''}, "
                            f"got {text!r}")
            return None
        return value
    return None


SETUP = (("batch_size", "batch size", "--batch-size"), ("seq_len", "seq len", "--seq-len"),
         ("local_steps", "local steps", "--local-steps"))


def run_setup(metrics: str | Path) -> dict | None:
    """The training set-up of the run that wrote `metrics` (its config.yaml in the same folder): model,
    model_hash, batch_size, seq_len, local_steps; None when there is no readable config.yaml (a hand-made
    CSV)."""
    cfg = Path(metrics).parent / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        data = read_yaml(cfg)
    except ConfigError:
        return None
    plan = data.get("plan") if isinstance(data.get("plan"), dict) else {}
    training = plan.get("training") if isinstance(plan.get("training"), dict) else {}
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    inputs = plan.get("inputs") if isinstance(plan.get("inputs"), dict) else {}
    model = plan.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and "/" in model and run.get("model_path"):
        model = run["model_path"]       # a path relative to the folder the run was started from
    return {"config": str(cfg), "model": model,
            "model_hash": run.get("model_hash") or inputs.get("model_hash"),
            **{k: training.get(k) for k, _, _ in SETUP}}


def setup_warning(curve: Curve, used: dict[str, list], model_hashes: dict[str, str | None]) -> str | None:
    """One line when the curve's run trained another set-up than the what-if plans: `used` maps batch_size /
    seq_len / local_steps to the values the scenarios use; `model_hashes` each scenario model to its
    architecture hash. None when everything matches (or the run's config.yaml is not there)."""
    setup = run_setup(curve.source)
    if setup is None:
        return None
    diffs, fix = [], []
    other = [m for m, h in model_hashes.items() if setup["model_hash"] and h and h != setup["model_hash"]]
    if other:
        diffs.append(f"model {setup['model']} (what-if: {', '.join(other)})")
        fix.append(f"--model {setup['model']}")
    for key, words, flag in SETUP:
        values = sorted(set(used.get(key, ())))
        if setup[key] is not None and values and values != [setup[key]]:
            diffs.append(f"{words} {setup[key]} (what-if: {', '.join(str(v) for v in values)})")
            fix.append(f"{flag} {setup[key]}")
    if not diffs:
        return None
    return (f"--curve {curve.source}: the run ({setup['config']}) trained with {'; '.join(diffs)}: its rounds to "
            f"the target may not carry over to these scenarios; to match it, pass {' '.join(fix)}")
