"""Plots for what-if results (matplotlib, Agg backend): written as PNG files by `hsplit whatif`.

    round_time.png    predicted round time per scenario, bars coloured by who is the straggler;
                      infeasible scenarios are marked "infeasible"
    pareto.png        utility against round time, the Pareto-optimal scenarios marked and labelled
    splits_ranks.png  per device name: chosen split points and total ranks across scenarios

A plot with nothing to show (no feasible scenario) is still written, and says so in its middle.
Each file is written to a temporary name and renamed, so a failed run leaves no half-written PNG.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from hsplit.planner.whatif import CLIENT_COLUMNS, pareto_front

NOTHING_FEASIBLE = "no feasible scenario: nothing to plot\n(the reasons are in scenarios.csv)"


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _feasible(df: pd.DataFrame) -> pd.Series:
    return df["status"] != "infeasible"


def _save(fig, path: Path) -> Path:
    """Write the figure to `path` via a temporary file and a rename; always closes the figure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _say_nothing(ax, text: str = NOTHING_FEASIBLE) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#7f8c8d", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_round_time(df: pd.DataFrame, path: Path) -> Path:
    n = len(df)
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.32 * n + 1.2)))
    ok = _feasible(df)
    colours = ["#c0392b" if str(s) == "server" else "#2e86c1" for s in df["straggler"]]
    y = range(n)
    ax.barh(list(y), df["round_s"].where(ok, 0).fillna(0), color=colours)
    for i, (is_ok, r) in enumerate(zip(ok, df["round_s"])):
        ax.text((r if is_ok else 0), i, f" {r:.3g} s" if is_ok else " infeasible", va="center", fontsize=8,
                color="black" if is_ok else "#7f8c8d")
    ax.set_yticks(list(y), [_short(s) for s in df["label"]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("predicted round time (s)")
    if not ok.any():
        ax.set_xlim(0, 1)
        ax.set_xticks([])
        ax.set_title("Predicted round time per scenario: every scenario is infeasible")
    else:
        ax.set_title("Predicted round time per scenario")
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color="#2e86c1", label="straggler: a client"),
                           Patch(color="#c0392b", label="straggler: the server")], fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_pareto(df: pd.DataFrame, path: Path) -> Path:
    ok = _feasible(df)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.set_title("Utility against round time")
    if not ok.any():
        _say_nothing(ax)
        return _save(fig, path)
    front = pareto_front(df)
    ax.scatter(df.loc[ok & ~front, "round_s"], df.loc[ok & ~front, "utility"], color="#95a5a6", label="scenario")
    f = df[front].sort_values("round_s")
    ax.plot(f["round_s"], f["utility"], "-o", color="#e67e22", label="Pareto front")
    for _, r in f.iterrows():
        ax.annotate(_short(r["label"], 40), (r["round_s"], r["utility"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    infeasible = int((~ok).sum())
    if infeasible:
        ax.text(0.99, 0.01, f"{infeasible} infeasible scenario(s) not shown", ha="right", va="bottom",
                fontsize=8, color="#7f8c8d", transform=ax.transAxes)
    ax.set_xlabel("predicted round time (s)  (lower is better)")
    ax.set_ylabel("utility: share of importance adapted  (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_splits_ranks(clients: pd.DataFrame, path: Path) -> Path:
    devices = sorted(clients["device"].unique()) if len(clients) else []
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(devices) + 4), 5))
    for ax, col, label in ((axes[0], "split", "split point (client blocks)"), (axes[1], "total_rank", "total LoRA rank")):
        if not devices:
            _say_nothing(ax)
            continue
        data = [clients.loc[clients["device"] == d, col].values for d in devices]
        ax.boxplot(data, tick_labels=devices, showmeans=True)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Split points per device, all feasible scenarios")
    axes[1].set_title("Total rank per device, all feasible scenarios")
    return _save(fig, path)


def write_plots(df: pd.DataFrame, outdir: Path) -> list[Path]:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    clients = df.attrs.get("clients", pd.DataFrame(columns=list(CLIENT_COLUMNS)))
    return [plot_round_time(df, outdir / "round_time.png"), plot_pareto(df, outdir / "pareto.png"),
            plot_splits_ranks(clients, outdir / "splits_ranks.png")]
