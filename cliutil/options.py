"""Options several commands declare (one object each), and the flags of the runtime's options dataclasses."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hsplit.cliutil.console import fail

FORMAT_HELP = "table | text | json (table = text: human-readable)"


FORMAT = typer.Option("text", "--format", help=FORMAT_HELP)


FORMAT_TABLE = typer.Option("table", "--format", help=FORMAT_HELP)


THREADS = typer.Option(None, "--threads", min=1, help="torch CPU threads.")


# Client sampling, as `hsplit plan` writes it into the plan and `hsplit whatif` plans every scenario with it.
CLIENTS_PER_ROUND = typer.Option(None, "--clients-per-round", help="Client sampling: clients that train each round, "
                                 "a count (10), fraction (0.01) or percentage (1%); default every client.")


MIN_CLIENTS_PER_ROUND = typer.Option(None, "--min-clients-per-round", min=1,
                                     help="With a fraction: at least this many clients per round.")


SAMPLE_BY = typer.Option("data_weight", "--sample-by", help="data_weight (a client is drawn with probability "
                                                           "growing with its data weight) | uniform.")


def sampling_from_flags(clients_per_round, min_clients_per_round, sample_by):
    """The Sampling the three flags ask for (None: every client, every round; ConfigError when bad)."""
    from hsplit.planner.sampling import from_flags
    if clients_per_round is not None:
        return from_flags(clients_per_round, min_clients_per_round, sample_by)
    if min_clients_per_round is not None or sample_by != "data_weight":
        fail("--min-clients-per-round and --sample-by go with --clients-per-round (client sampling)")
    return None


_TYPES = {"int": int, "int | None": Optional[int], "float": float, "float | None": Optional[float], "str": str,
          "str | None": Optional[str], "str | Path": Path, "bool": bool}


def with_options(*fields_of):
    """Give a command the flags of options dataclasses (runtime/train/options.py: declared once, for the CLI, the
    launcher and the worker). fields_of: (dataclass, names or None for all) pairs; the command gets each
    field as a keyword argument (its dataclass default, or None for fields listed as `unset`, so that the
    command can tell "not given"). Use `options_from(cls, kwargs)` to build the dataclass back."""
    import inspect

    from hsplit.runtime.train.options import flag, flags

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        for cls, names, unset in fields_of:
            for f in flags(cls):
                if names is not None and f.name not in names:
                    continue
                default = None if f.name in unset else f.default
                kind = _TYPES[f.type] if f.name not in unset else Optional[_TYPES[f.type.replace(" | None", "")]]
                lo = f.metadata.get("min")
                text = f.metadata["help"] + (f" (default: {f.default:g})" if f.name in unset else "")
                opt = typer.Option(default, flag(f), help=text + ".", **({"min": lo} if lo is not None else {}))
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind))
        fn.__signature__ = sig.replace(parameters=params)
        return fn
    return decorate


def options_from(cls, values: dict, **extra):
    """The options dataclass `cls` from a command's keyword arguments (None: the dataclass default)."""
    from hsplit.runtime.train.options import flags
    given = {f.name: values[f.name] for f in flags(cls) if values.get(f.name) is not None}
    return cls(**given, **extra)


def model_option(default: str | None = "smollm2-135m", help: str | None = None):
    return typer.Option(default, "--model", "-m", help=help)


def batch_option(default: int = 4, help: str | None = None):
    return typer.Option(default, "--batch-size", "-b", min=1, help=help)


def seq_option(default: int):
    return typer.Option(default, "--seq-len", "-T", min=1)


def device_option(default: str | None, help: str = "auto | cpu | cuda"):
    return typer.Option(default, "--device", help=help)


def output_option(default: Path | None, help: str):
    return typer.Option(default, "--output", "-o", help=help)
