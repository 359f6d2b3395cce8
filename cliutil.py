"""What the `hsplit` commands in cli.py share: consoles, exit codes and one way to fail, the options
several commands declare, rendering of results, and the rich progress bars (the runtime reports
progress through callbacks and loop.Reporter; it never imports typer or rich).
"""
from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hsplit.planner.errors import ConfigError, InfeasibleError
from hsplit.planner.strategies import traits
from hsplit.planner.units import num, seconds

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


def checked_data(spec, output: Path, seq_len: int, seed: int = 0):
    """`hsplit plan`'s data: a FORMAT:PATH prefix split off, the data checked (it resolves, its records are of
    a known kind: ConfigError otherwise), a tiny held-out split warned about on stderr, and a relative local
    path rewritten relative to the plan file's folder (where `hsplit run` reads it from; an absolute one stays).
    check_plan_data(plan, output) then checks the records against the plan's clients. Imports `datasets`
    only for folders saved by it, dataset ids and Flower partitions; never torch."""
    from hsplit.planner.plan_refs import written_data_path
    from hsplit.runtime.datasource import check_classification, check_data, split_data_ref
    if spec.format == "auto":
        spec.path, spec.format = split_data_ref(spec.path)
    for line in check_data(spec, seq_len):
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    if spec.task == "classification":       # the label set, read once, goes into the plan (data.labels)
        spec.labels = check_classification(spec, seed, None, seq_len)
    spec.path = written_data_path(spec.path, output)
    return spec


def save_plan(plan, output: Path) -> None:
    """Write `hsplit plan`'s plan: a local model folder and fleet file given relative to the current folder are
    written relative to the plan file's folder (as data.path), so that the plan works from any folder."""
    from hsplit.planner.plan_refs import written_fleet_ref, written_model_ref
    plan.model = written_model_ref(plan.model, output)
    plan.inputs["model"] = written_model_ref(plan.inputs.get("model", plan.model), output)
    if isinstance(plan.inputs.get("fleet"), str):
        plan.inputs["fleet"] = written_fleet_ref(plan.inputs["fleet"], output)
    try:
        plan.save(output)
    except OSError as e:
        fail(f"--output: cannot write {output}: {e.strerror or e}")


def check_fleet(plan, fleet: str | None) -> str:
    """The fleet `hsplit plan --check` checks against: --fleet when given, else the plan's own (inputs.fleet,
    read from the plan file's folder by Plan.load; a shipped fleet recorded by another install's path is
    found by its name), else `example` with a note (a hand-written plan names none)."""
    from hsplit.planner.fleet import resolve_fleet_path
    if fleet is not None:
        return fleet
    ref = plan.inputs.get("fleet")
    if not isinstance(ref, str) or not ref:
        err.print(f"note: {plan.source} records no fleet (inputs.fleet): checking against the shipped fleet "
                  "example; pass --fleet FLEET to choose", highlight=False, markup=False, soft_wrap=True)
        return "example"
    for cand in (ref, Path(ref).stem):
        try:
            return str(resolve_fleet_path(cand))
        except ConfigError:
            pass
    raise ConfigError(plan.source, [f"inputs.fleet: the plan's fleet {ref} is not found (read from the plan "
                                    f"file's folder and the current folder); pass --fleet FLEET"])


def device_profile_path(ref: Path) -> Path:
    """`--profile`: a device profile file, or a shipped profile's name (as fleets name devices); else one
    error naming the shipped names and how to write one."""
    from hsplit.planner.device import PROFILE_DIR, shipped_device_names
    if ref.is_file():
        return ref
    shipped = PROFILE_DIR / "devices" / f"{ref}.yaml"
    if shipped.is_file() and "/" not in str(ref):
        return shipped
    fail(f"--profile {ref}: no such file, nor a shipped profile ({', '.join(shipped_device_names())}); "
         "write one for this machine with `hsplit profile`")


def check_plan_data(plan, written_to: Path | None = None) -> None:
    """What `hsplit run` would refuse about a plan's data and clients (datasource.check_records: records, roles,
    the partition over the plan's clients), and notes. `hsplit plan --check` (written_to None): also the checks
    of checked_data, the plan's data.path already read from the plan file's folder, errors naming the plan
    file. `hsplit plan` (written_to: the plan file to be): after checked_data, the plan's client count known."""
    from dataclasses import replace

    from hsplit.planner.plan_refs import resolve_data_path
    from hsplit.runtime.datasource import check_data, check_records
    from hsplit.runtime.datasummary import data_summary, summary_line
    spec = plan.data if written_to is None else replace(plan.data, path=resolve_data_path(
        plan.data.path, Path(written_to).parent))
    weights = [c.data_weight for c in plan.clients]
    try:
        lines = check_data(spec, plan.training.seq_len) if written_to is None else []
        lines += check_records(spec, plan.training.seq_len, weights, plan.training.seed)
        lines.append(summary_line(data_summary(spec, plan.training.seq_len, weights, plan.training.seed,
                                               plan.model)))
    except ConfigError as e:
        if written_to is not None:
            raise
        raise ConfigError(plan.source, [f"{e.source}: {x}" if not x.startswith(e.source) else x
                                        for x in e.problems]) from None
    for line in lines:
        err.print(line, highlight=False, markup=False, soft_wrap=True)


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


# ---- options several commands declare (one object each; typer reads them per command) ----

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
    """Give a command the flags of options dataclasses (runtime/options.py: declared once, for the CLI, the
    launcher and the worker). fields_of: (dataclass, names or None for all) pairs; the command gets each
    field as a keyword argument (its dataclass default, or None for fields listed as `unset`, so that the
    command can tell "not given"). Use `options_from(cls, kwargs)` to build the dataclass back."""
    import inspect

    from hsplit.runtime.options import flag, flags

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
    from hsplit.runtime.options import flags
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


# ---- rendering ----

def ppl(loss) -> str:
    """Perplexity of a loss for people; n/a when it is missing (no held-out token was scored)."""
    return f"{math.exp(loss):.2f}" if loss is not None and loss == loss else "n/a"


def table(title: str, columns, left=(), **kw) -> Table:
    """A table whose columns are right-aligned (numbers) except those named in `left`."""
    t = Table(title=title, **kw)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    return t


PLAN_ROWS = 60      # rows of `hsplit plan`'s table (runs of identical clients share a row)


def render_plan(p) -> None:
    if traits(p.strategy).ranks == "reference":      # nothing to plan: no split, no fleet timing
        ranks = p.clients[0].ranks if p.clients else {}
        adapted, rank = len(ranks), max(ranks.values(), default=p.server_rank)
        say(f"centralized reference for {p.model}: the {len(p.clients)} clients' data pooled and trained on "
            f"one machine, the whole model unsplit ({adapted} matrices adapted, rank {rank}); "
            "nothing is planned or predicted (compare its runs with the federated strategies')")
        return
    merges = [c for c in p.clients if "merge_download_charged_s" in c.predicted]
    cols = ("client", "device", "split", "matrices", "Σ rank", "step s", "round s") \
        + (("merge s",) if merges else ()) + ("mem/budget GiB", "MB/round")
    rows = _group_rows(p)
    more = len(rows) - PLAN_ROWS if len(rows) > PLAN_ROWS else 0    # all-different fleets: one row per client
    t = table(f"{p.strategy} plan for {p.model} ({len(p.clients)} clients)", cols,
              left=("client", "device"), show_lines=False,
              caption=f"... and {more:,} more rows: every client is in the plan file (or --format json)" if more else None)
    for ids, c in rows[:PLAN_ROWS]:
        pr = c.predicted
        t.add_row(ids, c.device, str(c.split_layer), f"{len(c.ranks)}", f"{sum(c.ranks.values())}",
                  num(pr.get('step_s', 0), 3), num(pr.get('round_s', 0), 4),
                  *((num(pr.get('merge_download_charged_s', 0), 3),) if merges else ()),
                  f"{pr.get('memory_gib', 0):.2f}/{pr.get('memory_budget_gib', 0):.2f}",
                  f"{pr.get('traffic_mb_per_round', 0):.1f}")
    console.print(t)
    s, pr = p.solver, p.predicted
    gap = s.get("gap")
    gap_s = "n/a" if gap is None else f"{100 * gap:.3g}%"
    status = s.get("status")
    if status == "time-limit":
        status = "time-limit (stopped early: not proven optimal)"
    say(f"solver: {s.get('method')} | status {status} | utility {pr.get('utility', 0):.4f} | "
        f"round {seconds(pr.get('round_s', 0))} (straggler {pr.get('straggler')}) | proven gap {gap_s} | "
        f"wall {seconds(s.get('wall_s', 0))}")
    if p.sampling is not None and "clients_per_round" in pr:
        say(f"client sampling: {pr['clients_per_round']} of {len(p.clients)} clients per round (by "
            f"{p.sampling.by}); round time above: the mean of this run's {p.training.rounds} sampled rounds "
            f"(slowest {seconds(pr['round_s_max'])}; all clients at once {seconds(pr.get('round_s_all_clients', 0))}); "
            f"fleet time {seconds(pr['fleet_time_s'])}")
    srv = p.server.get("predicted", {})
    console.print(f"server: {p.server.get('device')} x{p.server.get('count')} | busy {seconds(srv.get('busy_s', 0))} "
                  f"({100 * srv.get('busy_share', 0):.1f}% of the round) | memory {srv.get('memory_gib', 0):.2f} GiB",
                  highlight=False)
    if merges:
        say(merge_note(merges, pr.get("round_s_exact_merge")))


def merge_note(merges, exact_round) -> str:
    """`hsplit plan`'s merge-download note: the largest charged download with its client and that client's
    time, and the longest charged time with its client (a slow link may take longest for fewer MB)."""
    def mb_s(c):
        return c.predicted["merge_download_charged_mb"], c.predicted["merge_download_charged_s"]
    big = max(merges, key=lambda c: mb_s(c)[0])
    slow = max(merges, key=lambda c: mb_s(c)[1])
    text = (f"round times include the merge download (merge s, on each client's downlink), charged as its upper "
            f"bound: the largest is {mb_s(big)[0]:,.1f} MB per round for {big.id} (+{seconds(mb_s(big)[1])})")
    if slow.predicted["merge_download_charged_s"] > mb_s(big)[1]:
        text += f"; the longest is +{seconds(mb_s(slow)[1])} for {slow.id} ({mb_s(slow)[0]:,.1f} MB)"
    exact = max(c.predicted["merge_download_mb"] for c in merges)
    return (text + f"; this plan's exact download is up to {exact:,.1f} MB"
            + (f" (round {seconds(exact_round)} with it)" if exact_round is not None else "")
            + "; see docs/formulation.md, Merge download")


def _group_rows(p):
    """Consecutive clients with the same device and configuration share one table row."""
    rows = []
    for c in p.clients:
        key = (c.device, c.split_layer, tuple(sorted(c.ranks.items())))
        if rows and rows[-1][0] == key:
            rows[-1][1].append(c.id)
        else:
            rows.append((key, [c.id], c))
    return [((ids[0] if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"), c) for _, ids, c in rows]


def render_check(p, ev, inst, fmt) -> None:
    from hsplit.planner.cost import GIB
    # Adapted matrices, with shorthand keys (q_proj = every client block) expanded: as `hsplit plan` counts.
    counted: dict[tuple[int, int], int] = {}           # the clients of one plan entry share their ranks
    matrices = []
    for c in p.clients:
        key = (c.split_layer, id(c.ranks))
        if key not in counted:
            counted[key] = len(p.client_ranks(c, inst.model))
        matrices.append(counted[key])
    sampled = None
    if p.sampling is not None:          # the rounds `hsplit run` trains with this plan's seed
        from hsplit.planner.sampling import checked_rounds
        sampled = checked_rounds(p, ev.clients)
    if fmt == "json":
        console.print_json(json.dumps({
            "plan": p.source, "valid": not ev.violations, "violations": ev.violations,
            "utility": ev.utility, "round_s": ev.round_s, "straggler": ev.straggler,
            **({"sampling": sampled} if sampled else {}),
            "server_busy_s": ev.server_busy_s,
            "clients": [{"id": c.id, "split_layer": e.split, "matrices": m, "step_s": e.step_s, "round_s": e.round_s,
                         "memory_gib": e.memory_bytes / GIB, "utility": e.utility,
                         **({"merge_download_charged_mb": e.merge_charged_bytes / 1e6,
                             "merge_download_charged_s": e.merge_charged_s,
                             "merge_download_mb": ev.merge_bytes[k] / 1e6} if ev.merge_bytes is not None else {})}
                        for k, (c, e, m) in enumerate(zip(p.clients, ev.clients, matrices))]}))
        return
    class_of = inst.class_of()
    rows: list[list] = []       # consecutive clients with the same device, class and evaluation share a row
    for k, (c, e) in enumerate(zip(p.clients, ev.clients)):
        key = (int(class_of[k]), id(e), matrices[k])
        if rows and rows[-1][0] == key:
            rows[-1][2] = c.id
            rows[-1][3] += 1
        else:
            rows.append([key, c.id, c.id, 1, k, e])
    more = len(rows) - PLAN_ROWS if len(rows) > PLAN_ROWS else 0
    t = table(f"check of {p.source} against {inst.fleet.source}",
              ("client", "device", "split", "matrices", "step s", "round s", "mem/budget GiB", "utility"),
              left=("client", "device"),
              caption=f"... and {more:,} more rows (every client: --format json)" if more else None)
    for (cls, _, m), first, last, n, k, e in rows[:PLAN_ROWS]:
        cap = inst.classes[cls].mem_cap / GIB
        t.add_row(first if n == 1 else f"{first}-{last}", inst.clients[k].device.name, str(e.split), str(m),
                  num(e.step_s, 3), num(e.round_s, 4), f"{e.memory_bytes / GIB:.2f}/{cap:.2f}", f"{e.utility:.4f}")
    console.print(t)
    console.print(f"utility {ev.utility:.4f} | round {seconds(ev.round_s)} (straggler {ev.straggler}) | "
                  f"server busy {seconds(ev.server_busy_s)}", highlight=False)
    if sampled:
        say(f"client sampling: {sampled['clients_per_round']} of {len(p.clients)} clients per round; the run's "
            f"{sampled['rounds']} sampled rounds take {seconds(sampled['round_s'])} on average (slowest "
            f"{seconds(sampled['round_s_max'])}), fleet time {seconds(sampled['fleet_time_s'])}; the round above "
            "is every client at once")
    if ev.merge_bytes is not None:
        charged = max(e.merge_charged_bytes for e in ev.clients)
        say(f"round times include the merge download, charged as its upper bound (up to {charged / 1e6:,.1f} MB per "
            f"client per round); this plan's exact download is up to {max(ev.merge_bytes) / 1e6:,.1f} MB; see "
            "docs/formulation.md, Merge download")
    if ev.violations:
        console.print(f"[bold red]{len(ev.violations)} violated constraint(s):[/]")
        for v in ev.violations:
            console.print(f"  - {escape(v)}", highlight=False)
    else:
        console.print("[green]all constraints satisfied[/]")


def render_whatif(df, output: Path, files, fmt: str) -> None:
    """`hsplit whatif`'s output: one JSON object, or the markdown table (plain text: never wrapped), the
    scenarios left out or infeasible, the budget in words; a --curve from another set-up is warned about
    on stderr (and is `curve.warning` in the JSON)."""
    from hsplit.planner.whatif import budget_text, markdown_table
    if (curve := df.attrs.get("curve")) and curve.get("warning"):
        err.print(f"[bold yellow]warning:[/] {escape(curve['warning'])}", highlight=False)
    if fmt == "json":
        console.print_json(json.dumps({"output": str(output), "files": [str(f) for f in files],
                                       "budget": df.attrs["budget"], "curve": df.attrs.get("curve"),
                                       "scenarios": json.loads(df.to_json(orient="records"))}))
        return
    typer.echo(markdown_table(df))
    for _, r in df.iterrows():
        if r["status"] == "infeasible":
            typer.echo(f"{r['scenario']}: infeasible: {r['infeasible']}")
        elif r["excluded"]:
            typer.echo(f"{r['scenario']}: {r['participating']} of {r['clients']} clients take part; left out: "
                       f"{r['excluded']}")
    typer.echo(budget_text(df))
    typer.echo(f"{len(df)} scenario{'' if len(df) == 1 else 's'}; wrote {', '.join(str(f) for f in files)}")


def samples_table(jsonl: str, n: int) -> Table:
    """The first n generated outputs next to their prompt and one reference (the rest are in the .jsonl file)."""
    with open(jsonl) as fh:
        rows = [json.loads(line) for line, _ in zip(fh, range(n))]
    t = Table(title=escape(f"first {len(rows)} outputs (all in {Path(jsonl).name})"), show_lines=True)
    for col in ("prompt", "generated", "a reference"):
        t.add_column(col, overflow="fold")
    for row in rows:
        # escape(): prompts such as `eatType[coffee shop]` are data, not rich markup
        t.add_row(escape(row["prompt"]), escape(row["generated"]),
                  escape(row["references"][0]) if row["references"] else "")
    return t


def plural(n: int, noun: str, many: str | None = None) -> str:
    """`1 prompt`, `2 prompts` (many: an irregular plural)."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


def generate_summary(run_dir, rep: dict) -> str:
    """`hsplit eval --generate`'s last line: the scores, what they were on (and what was skipped), the outputs."""
    what = "the held-out split" if rep["split"] == "held-out" else rep["data"]
    cut = rep.get("skipped_cut_at_seq_len") or 0
    skipped = f"; {plural(cut, 'held-out sequence')} skipped: cut at seq_len {rep.get('seq_len', '')}" if cut else ""
    return (f"{run_dir} (round {rep['round']}) on {plural(rep['prompts'], 'prompt')} of {what} ({rep['kind']}, "
            f"{plural(rep['references'], 'reference')}, {rep['decoding']}{skipped}): BLEU {rep['bleu']:.2f}, "
            f"ROUGE-L {rep['rouge_l']:.2f}, perplexity {ppl(rep['eval_loss'])}; outputs {', '.join(rep['outputs'])}")


def calibration_table(res, batch_size: int, seq_len: int) -> Table:
    t = table(f"{res.settings['model']} b={batch_size} T={seq_len} on {res.settings['device']}",
              ("split", "rank", "client pred", "client meas", "err", "server pred", "server meas", "err", "spread"))
    for r in res.rows:           # spread: the larger of client's and server's (max - min) / median over the repetitions
        t.add_row(str(r["split"]), str(r["rank"]), f"{r['predicted_client_s']:.3f}", f"{r['measured_client_s']:.3f}",
                  f"{r['error_client']:+.0%}", f"{r['predicted_server_s']:.3f}", f"{r['measured_server_s']:.3f}",
                  f"{r['error_server']:+.0%}", f"{max(r['spread_client'], r['spread_server']):.0%}")
    return t


# ---- progress on stderr (never with --format json, so stdout stays one object) ----

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
