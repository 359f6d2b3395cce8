"""Results as people read them: plan and check tables, what-if, generation and calibration summaries."""
from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from hsplit.cliutil.console import console, err, say
from hsplit.planner.strategies import traits
from hsplit.planner.units import num, seconds


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


def render_eval(run_dir, rep: dict) -> None:
    """`hsplit eval`'s result in words: accuracy and macro-F1 (per class on request) for a classification run,
    loss and perplexity otherwise."""
    if rep.get("task") == "classification":
        console.print(escape(f"{run_dir} (round {rep['round']}) on {rep['data']} ({rep['sequences']} sequences, "
                             f"{len(rep['labels'])} classes, {rep['device']}): accuracy {rep['accuracy']:.4f}, "
                             f"macro-F1 {rep['macro_f1']:.4f}, loss {rep['eval_loss']:.4f}; predictions in "
                             f"{rep['predictions']}"))
        for c in rep.get("per_class", []):
            console.print(escape(f"  {c['label']}: precision {c['precision']:.3f}, recall {c['recall']:.3f}, "
                                 f"F1 {c['f1']:.3f}, support {c['support']}"))
    else:
        console.print(escape(f"{run_dir} (round {rep['round']}) on {rep['data']} ({rep['sequences']} sequences, "
                             f"{rep['device']}): loss {rep['eval_loss']:.4f}, perplexity {ppl(rep['eval_loss'])}"))


def render_calibration(res, batch_size: int, seq_len: int) -> None:
    """`hsplit calibrate`'s table and its error summary (predicted vs measured step times)."""
    from hsplit.runtime.measure.calibrate import planner_label
    console.print(calibration_table(res, batch_size, seq_len))
    s = res.summary
    console.print(f"planner ({planner_label(res.settings)}): median |error| {s['median_abs_error']:.1%}, "
                  f"worst {s['worst_signed_error']:+.1%}")
    if "flops_median_abs_error" in s:
        console.print(f"FLOPs / throughput model alone (without the profile's block times): median |error| "
                      f"{s['flops_median_abs_error']:.1%}, worst {s['flops_worst_signed_error']:+.1%}")
    if "median_spread" in s:
        console.print(f"repetition spread (max - min) / median: median {s['median_spread']:.1%}, worst "
                      f"{s['worst_spread']:.1%} (limit {s['spread_limit']:.0%})", highlight=False)
