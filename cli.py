"""The `hsplit` command line (Typer). Thin: parse, call a library function, render.

Planner commands live here; runtime commands (run, eval, export, demo, ...) are registered from
hsplit.runtime.commands, which imports torch only inside the commands that need it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from hsplit import __version__
from hsplit.cliutil import check_format, console_for, fail
from hsplit.planner.errors import ConfigError, InfeasibleError
from hsplit.planner.yamlio import output_problem

app = typer.Typer(help="Plan and run heterogeneous split-federated LoRA fine-tuning.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Piped output (files, CI logs) is not wrapped at 80 columns: tables stay readable.
console = console_for()
err = console_for(stderr=True)


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{flag}: expected comma-separated whole numbers like 0,2,4,8,16, got {text!r}")


def _print_version(value: bool) -> None:
    if value:
        console.print(__version__, highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")):
    """Eager --version: `hsplit --version` works without a command."""


def seconds(x: float) -> str:
    """Seconds for people, with the unit: `25.58 s`, `1,234 s (20.6 min)`, `39,220 s (10.9 h)`;
    never scientific notation."""
    if abs(x) < 1000:
        return f"{x:.4g} s"
    if abs(x) < 3600:
        return f"{x:,.0f} s ({x / 60:.1f} min)"
    return f"{x:,.0f} s ({x / 3600:.1f} h)"


@app.command()
def plan(
    fleet: str = typer.Option("example", "--fleet", "-f", help="Fleet YAML path or shipped fleet name."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Shipped model name, HF folder, or config.json."),
    importance: Optional[Path] = typer.Option(None, "--importance", "-i", help="importance.yaml (default: uniform)."),
    ranks: str = typer.Option("0,2,4,8,16", help="Allowed LoRA ranks, comma-separated (0 = no adapter)."),
    modules: Optional[str] = typer.Option(None, help="Adaptable modules, comma-separated (e.g. q_proj,v_proj); default all."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", min=1),
    seq_len: int = typer.Option(256, "--seq-len", "-T", min=1),
    local_steps: int = typer.Option(10, "--local-steps", min=1, help="Local steps per round (tau)."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Rounds `hsplit run` will train."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16: dtype of frozen weights and activations."),
    server_rank: Optional[int] = typer.Option(None, "--server-rank", min=0, help="LoRA rank of server-side adapters (default 8; splitlora: its one rank)."),
    objective: str = typer.Option("utility", help="utility: max adapted importance, then fastest round; "
                                                  "latency: fastest round reaching --min-utility."),
    min_utility: Optional[float] = typer.Option(None, "--min-utility", help="Utility floor for --objective latency "
                                                "(default 90% of the best achievable)."),
    solver: str = typer.Option("cbc", help="cbc | highs | exhaustive (small instances only)."),
    method: str = typer.Option("decomposed", help="decomposed (exact, fast) | full (one MILP over all clients)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds for the MILP solver."),
    strategy: str = typer.Option("hsplitlora", help="hsplitlora | splitlora | hetlora | flexlora | "
                                                    "hafl-truncation | hafl-freezing | centralized."),
    data: str = typer.Option("shakespeare", help="Training data the run will use (recorded in the plan)."),
    output: Path = typer.Option(Path("plan.yaml"), "--output", "-o", help="Where to write the plan."),
    check: Optional[Path] = typer.Option(None, "--check", help="Validate this plan.yaml against --fleet instead of planning."),
    fmt: str = typer.Option("table", "--format", help="table | json"),
):
    """Choose every client's split point and LoRA ranks (an integer program solved to optimality).

    Example: hsplit plan --fleet example --model smollm2-135m -o plan.yaml
    Check a hand-written plan: hsplit plan --check splitlora.yaml --fleet example
    """
    from hsplit.planner.api import check_options, check_plan, full_time_limit, make_plan
    from hsplit.planner.plan import DataSpec, Plan, Training
    check_format(fmt)
    if check is None and (problem := output_problem(output, "--output")):
        fail(problem)
    try:
        if check is not None:
            p = Plan.load(check)
            ev, inst = check_plan(p, fleet, model if model != "smollm2-135m" else None, importance)
            _render_check(p, ev, inst, fmt)
            raise typer.Exit(1 if ev.violations else 0)
        training = Training(batch_size=batch_size, seq_len=seq_len, local_steps=local_steps, rounds=rounds,
                            dtype=dtype)
        check_options(strategy=strategy, objective=objective, solver=solver, method=method, time_limit=time_limit,
                      min_utility=min_utility)
        if method == "full" and strategy == "hsplitlora" and solver != "exhaustive" and fmt != "json":
            err.print(f"solving the full MILP with {solver}, time limit {full_time_limit(method, time_limit):g} s"
                      + ("" if time_limit else " (default; change with --time-limit)"), highlight=False)
        if strategy == "splitlora" and server_rank is not None:
            err.print("note: --server-rank does not apply to splitlora: SplitLoRA uses one rank on both sides, "
                      "the one it picks for the clients", highlight=False, markup=False)
        p = make_plan(fleet, model, importance=importance, ranks=parse_ints(ranks, "--ranks"),
                      modules=modules.split(",") if modules else None, training=training, strategy=strategy,
                      objective=objective, min_utility=min_utility, solver=solver, method=method,
                      time_limit=time_limit, server_rank=8 if server_rank is None else server_rank, data=DataSpec(path=data))
        try:
            p.save(output)
        except OSError as e:
            fail(f"--output: cannot write {output}: {e.strerror or e}", 1)
    except (ConfigError, InfeasibleError) as e:
        fail(str(e), 1)
    except ValueError as e:
        fail(str(e), 1)
    except OSError as e:        # reading an input: name the file, not --output
        fail(f"{e.filename or 'input'}: cannot read: {e.strerror or e}", 1)
    if fmt == "json":
        from hsplit.planner.plan import _plain
        console.print_json(json.dumps(_plain({"plan": str(output), **p.to_dict()})))
        return
    _render_plan(p)
    console.print(f"plan written to [bold]{output}[/]")


def _render_plan(p) -> None:
    if p.strategy == "centralized":      # a reference, nothing to plan: no split, no fleet timing
        ranks = p.clients[0].ranks if p.clients else {}
        adapted, rank = len(ranks), max(ranks.values(), default=p.server_rank)
        console.print(f"centralized reference for {p.model}: the {len(p.clients)} clients' data pooled and trained on "
                      f"one machine, the whole model unsplit ({adapted} matrices adapted, rank {rank}); "
                      "nothing is planned or predicted (compare its runs with the federated strategies')",
                      highlight=False, markup=False)
        return
    t = Table(title=f"{p.strategy} plan for {p.model} ({len(p.clients)} clients)", show_lines=False)
    for col, just in [("client", "left"), ("device", "left"), ("split", "right"), ("matrices", "right"),
                      ("Σ rank", "right"), ("step s", "right"), ("round s", "right"),
                      ("mem/budget GiB", "right"), ("MB/round", "right")]:
        t.add_column(col, justify=just, no_wrap=True)
    rows = _group_rows(p)
    for ids, c in rows:
        pr = c.predicted
        t.add_row(ids, c.device, str(c.split_layer), f"{len(c.ranks)}", f"{sum(c.ranks.values())}",
                  _num(pr.get('step_s', 0), 3), _num(pr.get('round_s', 0), 4),
                  f"{pr.get('memory_gib', 0):.2f}/{pr.get('memory_budget_gib', 0):.2f}",
                  f"{pr.get('traffic_mb_per_round', 0):.1f}")
    console.print(t)
    s, pr = p.solver, p.predicted
    gap = s.get("gap")
    gap_s = "n/a" if gap is None else f"{100 * gap:.3g}%"
    status = s.get("status")
    if status == "time-limit":
        status = "time-limit (stopped early: not proven optimal)"
    console.print(f"solver: {s.get('method')} | status {status} | utility {pr.get('utility', 0):.4f} | "
                  f"round {seconds(pr.get('round_s', 0))} (straggler {pr.get('straggler')}) | proven gap {gap_s} | "
                  f"wall {seconds(s.get('wall_s', 0))}", highlight=False, markup=False)
    srv = p.server.get("predicted", {})
    console.print(f"server: {p.server.get('device')} x{p.server.get('count')} | busy {seconds(srv.get('busy_s', 0))} "
                  f"({100 * srv.get('busy_share', 0):.1f}% of the round) | memory {srv.get('memory_gib', 0):.2f} GiB",
                  highlight=False)
    merges = [c for c in p.clients if "merge_download_s" in c.predicted]
    if merges:
        worst = max(merges, key=lambda c: c.predicted["merge_download_s"])
        mb = max(c.predicted["merge_download_mb"] for c in merges)
        console.print(f"not in the round times above: hsplitlora's merge download, up to {mb:,.1f} MB per client per "
                      f"round ({worst.id}: +{seconds(worst.predicted['merge_download_s'])} on its downlink); "
                      "see docs/formulation.md, Refinements", highlight=False, markup=False)


def _num(x: float, digits: int) -> str:
    """A table cell with `digits` significant digits, never in scientific notation (39,220 not 3.922e+04)."""
    return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


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


def _render_check(p, ev, inst, fmt) -> None:
    from hsplit.planner.cost import GIB
    # Adapted matrices, with shorthand keys (q_proj = every client block) expanded: as `hsplit plan` counts.
    matrices = [len(p.client_ranks(c, inst.model)) for c in p.clients]
    if fmt == "json":
        console.print_json(json.dumps({
            "plan": p.source, "valid": not ev.violations, "violations": ev.violations,
            "utility": ev.utility, "round_s": ev.round_s, "straggler": ev.straggler,
            "server_busy_s": ev.server_busy_s,
            "clients": [{"id": c.id, "split_layer": e.split, "matrices": m, "step_s": e.step_s, "round_s": e.round_s,
                         "memory_gib": e.memory_bytes / GIB, "utility": e.utility}
                        for c, e, m in zip(p.clients, ev.clients, matrices)]}))
        return
    t = Table(title=f"check of {p.source} against {inst.fleet.source}")
    for col in ("client", "device", "split", "matrices", "step s", "round s", "mem/budget GiB", "utility"):
        t.add_column(col, justify="left" if col in ("client", "device") else "right", no_wrap=True)
    class_of = inst.class_of()
    for k, (c, e) in enumerate(zip(p.clients, ev.clients)):
        cap = inst.classes[class_of[k]].mem_cap / GIB
        t.add_row(c.id, inst.clients[k].device.name, str(e.split), str(matrices[k]), _num(e.step_s, 3),
                  _num(e.round_s, 4), f"{e.memory_bytes / GIB:.2f}/{cap:.2f}", f"{e.utility:.4f}")
    console.print(t)
    console.print(f"utility {ev.utility:.4f} | round {seconds(ev.round_s)} (straggler {ev.straggler}) | "
                  f"server busy {seconds(ev.server_busy_s)}", highlight=False)
    if ev.violations:
        console.print(f"[bold red]{len(ev.violations)} violated constraint(s):[/]")
        for v in ev.violations:
            console.print(f"  - {escape(v)}", highlight=False)
    else:
        console.print("[green]all constraints satisfied[/]")


@app.command()
def whatif(
    fleets: list[str] = typer.Argument(..., help="Fleet YAML paths or shipped fleet names."),
    vary: list[str] = typer.Option([], "--vary", help="PATH=V1,V2,... (repeatable); e.g. "
                                   "clients.*.uplink_mbps=10,50,200, server.device=a100-80gb,h100-80gb, "
                                   "ranks=0,4,8|0,2,4,8,16. Paths: docs/whatif.md."),
    zip_vary: bool = typer.Option(False, "--zip", help="Walk the --vary lists in lockstep instead of all combinations."),
    model: str = typer.Option("smollm2-135m", "--model", "-m"),
    importance: Optional[Path] = typer.Option(None, "--importance", "-i"),
    objective: str = typer.Option("utility", help="utility | latency"),
    ranks: str = typer.Option("0,2,4,8,16", help="Allowed ranks (when not varied)."),
    modules: Optional[str] = typer.Option(None, help="Modules (when not varied); default all."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", min=1),
    seq_len: int = typer.Option(256, "--seq-len", "-T", min=1),
    local_steps: int = typer.Option(10, "--local-steps", min=1),
    dtype: str = typer.Option("fp32"),
    output: Path = typer.Option(Path("whatif"), "--output", "-o", help="Folder for the table and plots."),
    fmt: str = typer.Option("table", "--format", help="table | json"),
):
    """Plan many fleet scenarios and compare them: a table (CSV, JSON, markdown) and plots.

    Example: hsplit whatif example edge-100 --vary 'clients.*.uplink_mbps=10,50,200' -o whatif/
    """
    from rich.progress import Progress

    from hsplit.planner.plan import Training
    from hsplit.planner.plots import write_plots
    from hsplit.planner.whatif import markdown_table, run_whatif, write_table
    check_format(fmt)
    if problem := output_problem(output, "--output", folder=True):
        fail(problem)
    training = Training(batch_size=batch_size, seq_len=seq_len, local_steps=local_steps, dtype=dtype)
    try:
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("planning scenarios", total=None)
            df = run_whatif(fleets, vary, zip_vary=zip_vary, model=model, importance=importance, objective=objective,
                            ranks=parse_ints(ranks, "--ranks"), modules=modules.split(",") if modules else None,
                            training=training,
                            progress=lambda i, n, name: progress.update(task, completed=i, total=n,
                                                                        description=_short(name)))
    except (ConfigError, InfeasibleError, ValueError) as e:
        fail(str(e), 1)
    files = write_table(df, output) + write_plots(df, output)
    if fmt == "json":
        console.print_json(json.dumps({"output": str(output), "files": [str(f) for f in files],
                                       "scenarios": json.loads(df.to_json(orient="records"))}))
        return
    typer.echo(markdown_table(df))          # plain text: a markdown table is never wrapped
    for _, r in df[df["status"] == "infeasible"].iterrows():
        typer.echo(f"{r['scenario']}: infeasible: {r['infeasible']}")
    typer.echo(f"{len(df)} scenarios; wrote {', '.join(str(f) for f in files)}")


def _short(text: str, limit: int = 50) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _register_runtime() -> None:
    """Add the runtime's commands (their modules import torch only inside the commands)."""
    import importlib
    import importlib.util
    for name in ("hsplit.runtime.commands", "hsplit.runtime.measure_commands"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(app)


_register_runtime()

if __name__ == "__main__":
    app()
