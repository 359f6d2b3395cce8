"""Plots for what-if results (matplotlib, Agg backend): written as PNG files by `hsplit whatif`.

    round_time.png    predicted round time per scenario, bars coloured by who is the straggler
    pareto.png        utility against round time, the Pareto-optimal scenarios marked and labelled
    splits_ranks.png  per device kind: chosen split points and total ranks across scenarios
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hsplit.planner.whatif import pareto_front  # noqa: E402


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot_round_time(df: pd.DataFrame, path: Path) -> Path:
    n = len(df)
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.32 * n + 1.2)))
    ok = df["status"] != "infeasible"
    colours = ["#c0392b" if str(s) == "server" else "#2e86c1" for s in df["straggler"].fillna("")]
    y = range(n)
    ax.barh(list(y), df["round_s"].where(ok, 0).fillna(0), color=colours)
    for i, (is_ok, r) in enumerate(zip(ok, df["round_s"])):
        ax.text((r if is_ok else 0), i, f" {r:.3g} s" if is_ok else " infeasible", va="center", fontsize=8,
                color="black" if is_ok else "#7f8c8d")
    ax.set_yticks(list(y), [_short(s) for s in df["label"]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("predicted round time (s)")
    ax.set_title("Predicted round time per scenario")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="#2e86c1", label="straggler: a client"),
                       Patch(color="#c0392b", label="straggler: the server")], fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(df: pd.DataFrame, path: Path) -> Path:
    ok = df["status"] != "infeasible"
    front = pareto_front(df)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(df.loc[ok & ~front, "round_s"], df.loc[ok & ~front, "utility"], color="#95a5a6", label="scenario")
    f = df[front].sort_values("round_s")
    ax.plot(f["round_s"], f["utility"], "-o", color="#e67e22", label="Pareto front")
    for _, r in f.iterrows():
        ax.annotate(_short(r["label"], 40), (r["round_s"], r["utility"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("predicted round time (s)  (lower is better)")
    ax.set_ylabel("utility: share of importance adapted  (higher is better)")
    ax.set_title("Utility against round time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_splits_ranks(clients: pd.DataFrame, path: Path) -> Path:
    kinds = sorted(clients["device"].unique()) if len(clients) else []
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(kinds) + 4), 5))
    for ax, col, label in ((axes[0], "split", "split point (client blocks)"), (axes[1], "total_rank", "total LoRA rank")):
        data = [clients.loc[clients["device"] == k, col].values for k in kinds]
        if kinds:
            ax.boxplot(data, tick_labels=kinds, showmeans=True)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Split points per device kind, all scenarios")
    axes[1].set_title("Total rank per device kind, all scenarios")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(df: pd.DataFrame, outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    return [plot_round_time(df, outdir / "round_time.png"), plot_pareto(df, outdir / "pareto.png"),
            plot_splits_ranks(df.attrs.get("clients", pd.DataFrame(columns=["device", "split", "total_rank"])),
                              outdir / "splits_ranks.png")]
