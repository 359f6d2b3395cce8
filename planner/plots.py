"""Plots for what-if results (matplotlib): written as PNG files by `hsplit whatif`.

    round_time.png    predicted round time per scenario, bars coloured by who is the straggler,
                      hatched when some client groups cannot take part; infeasible scenarios are
                      marked "infeasible"
    pareto.png        utility against round time, one colour per fleet; each fleet's Pareto front
                      joins only that fleet's scenarios and is labelled
    splits_ranks.png  per device name: chosen split points and total ranks across scenarios

`FIGURES[name](df)` builds the figure of one file (tests inspect them). `plot_vs_value(df, metric)`
draws one metric against the varied value when exactly one field is varied (notebooks/whatif.ipynb
uses it; the CLI does not write it). Every mark drawn has a legend entry, and every figure has its
own title, wrapped to its axes. A plot with nothing to show (no feasible scenario) is
still written, and says so in its middle. Each file is written to a temporary name and renamed, so
a failed run leaves no half-written PNG.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import blended_transform_factory

from hsplit.planner.units import num, seconds
from hsplit.planner.whatif import CLIENT_COLUMNS, pareto_front, short_path

NOTHING_FEASIBLE = "no feasible scenario: nothing to plot\n(the reasons are in scenarios.csv)"
CLIENT, SERVER, GREY = "#2e86c1", "#c0392b", "#7f8c8d"
FLEET_COLOURS = ("#e67e22", "#2e86c1", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#d35400", "#2c3e50")
# Axis labels of the result columns (docs/whatif.md, "Decision units"); other columns use their name.
METRIC_LABELS = {
    "round_s": "predicted round time (s)",
    "utility": "utility: share of importance adapted",
    "fleet_hours": "fleet hours for the training budget",
    "fleet_hours_to_target": "fleet hours to the target perplexity",
    "fleet_share": "share of the fleet that can take part",
    "server_busy_share": "server busy share of the round",
    "client_mb_per_round": "MB per client per round (mean)",
    "client_mb_per_round_max": "MB per client per round (max)",
    "client_mb_per_run": "MB per client per run (mean)",
    "client_mb_per_run_max": "MB per client per run (max)",
    "traffic_mb_per_round": "MB per round, all clients",
    "server_memory_gib": "server memory (GiB)",
    "headroom_gib_min": "smallest client memory headroom (GiB)",
    "rounds": "rounds for the training budget",
}


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _feasible(df: pd.DataFrame) -> pd.Series:
    return df["status"] != "infeasible"


def _partial(df: pd.DataFrame) -> pd.Series:
    """Feasible scenarios in which some client groups cannot take part (fleet_share < 1)."""
    share = df["fleet_share"] if "fleet_share" in df else pd.Series(1.0, index=df.index)
    return _feasible(df) & (share.fillna(1.0) < 1.0)


def _fit(ax, title: str) -> str:
    """The title wrapped to the width of its axes (about 0.6 em per character), so that the titles of
    axes side by side never run into each other."""
    size = matplotlib.rcParams["axes.titlesize"]
    em = FontProperties(size=size).get_size_in_points() * ax.figure.dpi / 72
    width = max(16, int(ax.get_window_extent().width / (0.6 * em)))
    return "\n".join(textwrap.wrap(title, width, break_on_hyphens=False))


def _save(fig, path: Path) -> Path:
    """Write the figure to `path` via a temporary file and a rename. The figures are plain `Figure`s
    (no pyplot): they render with Agg whatever backend a notebook or the user has chosen."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")   # legends beside the axes included
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _say_nothing(ax, text: str = NOTHING_FEASIBLE) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color=GREY, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def round_time_figure(df: pd.DataFrame):
    n = len(df)
    fig = Figure(figsize=(9, max(2.5, 0.32 * n + 1.4)))
    ax = fig.subplots()
    ok, partial = _feasible(df), _partial(df)
    colours = [SERVER if str(s) == "server" else CLIENT for s in df["straggler"]]
    y = list(range(n))
    bars = ax.barh(y, df["round_s"].where(ok, 0).fillna(0), color=colours)
    for bar, is_partial in zip(bars, partial):
        if is_partial:
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    for i, (is_ok, r) in enumerate(zip(ok, df["round_s"])):
        ax.text((r if is_ok else 0), i, f" {seconds(r)}" if is_ok else " infeasible", va="center", fontsize=8,
                color="black" if is_ok else GREY)
    ax.set_yticks(y, [_short(s) for s in df["label"]], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)                  # first scenario on top, no empty band
    ax.set_xlabel("predicted round time (s)")
    ax.xaxis.set_major_formatter(PLAIN)
    if not ok.any():
        ax.set_xlim(0, 1)
        ax.set_xticks([])
        ax.set_title("Predicted round time per scenario: every scenario is infeasible")
    else:
        ax.set_title("Predicted round time per scenario")
        server = (df["straggler"] == "server") & ok
        handles = [Patch(color=CLIENT, label="straggler: a client")] if (ok & ~server).any() else []
        handles += [Patch(color=SERVER, label="straggler: the server")] if server.any() else []
        if partial.any():
            handles.append(Patch(facecolor=GREY, edgecolor="white", hatch="///",
                                 label="some client groups cannot take part"))
        if (~ok).any():
            handles.append(Patch(color="none", label="infeasible: no client can take part"))
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_xlim(0, float(df["round_s"].max()) * 1.3)    # room for the value labels (`86,301 s (24.0 h)`)
    ax.grid(axis="x", alpha=0.3)
    return fig


PLAIN = FuncFormatter(lambda v, _: num(v, 4))     # axis ticks: 20,000 not 2e4 (planner/units.py)


def _fleet_name(df: pd.DataFrame, fleet: str) -> str:
    """A fleet as the table and the point labels name it (its `name`); its path when another fleet of the
    what-if has the same name (or the table has no fleet_name column)."""
    if "fleet_name" not in df:
        return fleet
    names = df.drop_duplicates("fleet").set_index("fleet")["fleet_name"]
    name = str(names.get(fleet) or "")
    return name if name and (names == name).sum() == 1 else fleet


def pareto_figure(df: pd.DataFrame):
    ok = _feasible(df)
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    ax.set_title("Utility against predicted round time, Pareto front per fleet")
    if not ok.any():
        _say_nothing(ax)
        return fig
    front, partial = pareto_front(df, per_fleet=True), _partial(df)
    fleets = list(dict.fromkeys(df.loc[ok, "fleet"]))
    middle = (df.loc[ok, "round_s"].min() + df.loc[ok, "round_s"].max()) / 2
    for n, fleet in enumerate(fleets):
        colour = FLEET_COLOURS[n % len(FLEET_COLOURS)]
        mine = ok & (df["fleet"] == fleet)
        name = f"{_fleet_name(df, fleet)}: " if len(fleets) > 1 else ""
        rest = mine & ~front
        if rest.any():
            ax.scatter(df.loc[rest, "round_s"], df.loc[rest, "utility"], facecolors="none", edgecolors=colour,
                       label=f"{name}other scenarios")
        f = df[mine & front].sort_values("round_s")
        ax.plot(f["round_s"], f["utility"], "-o", color=colour, label=f"{name}Pareto front")
        # one label per point: scenarios with the same round time and utility share it
        points = f.groupby([f["round_s"].round(6), f["utility"].round(9)], sort=True)["label"].agg(list)
        for k, ((x, y), names) in enumerate(points.items()):
            text = names[0].removeprefix(f"{_fleet_name(df, fleet)} ") if len(fleets) > 1 else names[0]
            text = _short(text, 70) + (f" (+{len(names) - 1} alike)" if len(names) > 1 else "")
            right = x > middle                       # label towards the middle, so it stays inside the axes
            ax.annotate(text, (x, y), fontsize=7, color=colour, xytext=(-6 if right else 6, -10 if k % 2 else 4),
                        textcoords="offset points", ha="right" if right else "left")
    if partial.any():
        ax.scatter(df.loc[partial, "round_s"], df.loc[partial, "utility"], marker="s", s=110, facecolors="none",
                   edgecolors=GREY, label="some client groups cannot take part")
    infeasible = int((~ok).sum())
    if infeasible:
        ax.scatter([], [], marker="x", color=GREY, label=f"{infeasible} infeasible scenario(s): not shown")
    ax.set_xlabel("predicted round time (s)  (lower is better)")
    ax.xaxis.set_major_formatter(PLAIN)
    ax.set_ylabel("utility: share of importance adapted  (higher is better)")
    ax.margins(x=0.12, y=0.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    return fig


BOX_LEGEND = [Patch(facecolor="white", edgecolor="black", label="middle half (quartiles)"),
              Line2D([], [], color="#ff7f0e", label="median"),
              Line2D([], [], marker="^", color="#2ca02c", ls="none", label="mean"),
              Line2D([], [], color="black", label="whiskers: furthest points within 1.5 IQR of the box"),
              Line2D([], [], marker="o", color="black", mfc="none", ls="none", label="outlier")]


def splits_ranks_figure(clients: pd.DataFrame):
    devices = sorted(clients["device"].unique()) if len(clients) else []
    fig = Figure(figsize=(max(10, 1.1 * len(devices) + 5), 5.5))
    axes = fig.subplots(1, 2)
    fig.suptitle("Split points and total LoRA ranks per device, over all feasible scenarios")
    for ax, col, label, title in ((axes[0], "split", "split point (client blocks)", "Split point"),
                                  (axes[1], "total_rank", "total LoRA rank", "Total LoRA rank")):
        ax.set_title(title)
        if not devices:
            _say_nothing(ax)
            continue
        data = [clients.loc[clients["device"] == d, col].values for d in devices]
        ax.boxplot(data, tick_labels=devices, showmeans=True)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if devices:
        fig.legend(handles=BOX_LEGEND, fontsize=8, loc="lower center", ncol=len(BOX_LEGEND),
                   bbox_to_anchor=(0.5, -0.06))
    return fig


def plot_vs_value(df: pd.DataFrame, metric: str = "fleet_hours", ax=None, label: str | None = None):
    """One metric against the varied value, one line per fleet, for a what-if table that varies
    exactly one field (`df.attrs["vary"]`). Numeric values are placed on a numeric axis (log when they
    span more than two decades), others in order. Infeasible scenarios are crosses (on the bottom edge
    when the metric has no value for them) and scenarios in which some client groups cannot take part
    are ringed; each has a legend entry. `label` names the metric on the axis, in the legend and the
    title (default: METRIC_LABELS, else the column name). Returns the axes."""
    vary = df.attrs.get("vary", [])
    if len(vary) != 1:
        raise ValueError(f"plot_vs_value needs a what-if table that varies exactly one field; this one varies "
                         f"{len(vary)} ({', '.join(vary) or 'none'}): plot the rows you want yourself")
    if metric not in df:
        raise ValueError(f"no column {metric!r} in the table; columns: {', '.join(map(str, df.columns))}")
    field = vary[0]
    numeric = pd.to_numeric(df[field], errors="coerce")
    x = numeric if numeric.notna().all() else pd.Series(range(len(df)), index=df.index, dtype=float)
    if ax is None:
        import matplotlib.pyplot as plt     # a new figure where pyplot shows it (a notebook's inline backend)
        _, ax = plt.subplots(figsize=(7, 4))
    ok, partial = _feasible(df), _partial(df)
    has = df[metric].notna()            # infeasible rows have no value, except fleet_share (0)
    fleets = list(dict.fromkeys(df["fleet"]))
    label = label or METRIC_LABELS.get(metric, metric)
    for n, fleet in enumerate(fleets):
        mine = has & (df["fleet"] == fleet)
        ax.plot(x[mine], df.loc[mine, metric], "-o", color=FLEET_COLOURS[n % len(FLEET_COLOURS)],
                label=_fleet_name(df, fleet) if len(fleets) > 1 else label)
    if partial.any():
        ax.scatter(x[partial], df.loc[partial, metric], s=140, facecolors="none", edgecolors=GREY,
                   label="some client groups cannot take part")
    if (~ok).any():
        ax.scatter(x[~ok & has], df.loc[~ok & has, metric], marker="x", s=60, color=SERVER, zorder=3,
                   label="infeasible: no client can take part")
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(x[~ok & ~has], [0.02] * int((~ok & ~has).sum()), marker="x", s=60, color=SERVER,
                   transform=edge, clip_on=False, label="infeasible: no client can take part" if
                   not (~ok & has).any() else None)
    if x is numeric and x.min() > 0 and x.max() >= 100 * x.min():
        ax.set_xscale("log")
    if x is not numeric:
        ax.set_xticks(list(x), [_short(str(v), 20) for v in df[field]], rotation=30, fontsize=8)
    ax.set_xlabel(field)
    ax.set_ylabel(label)
    ax.set_title(_fit(ax, f"{label[0].upper()}{label[1:]} against {short_path(field)}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def _clients(df: pd.DataFrame) -> pd.DataFrame:
    return df.attrs.get("clients", pd.DataFrame(columns=list(CLIENT_COLUMNS)))


# The figures `hsplit whatif` writes: file name -> builder (each figure with its own title).
FIGURES = {"round_time.png": round_time_figure, "pareto.png": pareto_figure,
           "splits_ranks.png": lambda df: splits_ranks_figure(_clients(df))}


def write_plots(df: pd.DataFrame, outdir: Path) -> list[Path]:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return [_save(build(df), outdir / name) for name, build in FIGURES.items()]
