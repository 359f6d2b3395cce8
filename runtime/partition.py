"""Partitions of the training items across clients, and their picture (partition.png in the run folder).

    parts = partition({"comedy": 900, "tragedy": 700}, weights=[1, 1, 2], how="flower-dirichlet", alpha=0.5, seed=0)
    parts[k]          # {source: sorted item indices} of client k
    draw_partition(data, "runs/x/partition.png", "by-source")

hsplit's own partitions (pure functions of sizes, weights and seed; unchanged since they were written):
- by-source: whole sources per client (largest first onto the least-loaded client); with fewer sources
  than clients, clients share a source round-robin and split its items.
- iid: shuffled, split in proportion to the clients' data weights.
- dirichlet: per source, client shares ~ Dirichlet(alpha) (one source: quantity skew).
Flower Datasets' partitioners (flwr_datasets.partitioner), over a table of (source, item) with
partition_by = source, client k = Flower partition k:
- flower-iid: the table shuffled with the seed, then IidPartitioner (equal contiguous shards).
- flower-dirichlet: DirichletPartitioner(alpha, min_partition_size = min(10, items // clients),
  self_balancing False, shuffle, seed).
- flower-natural-id: NaturalIdPartitioner: one client per source (sorted names); needs as many sources
  as clients.
- flower-pathological: PathologicalPartitioner(num_classes_per_partition = sources_per_client,
  class_assignment_mode "first-deterministic", seed): each client holds that many sources.
The Flower partitions size clients by the data, not by the plan's data_weight (which stays the
clients' aggregation weight); `iid` alone sizes shares by data_weight.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

from hsplit.planner.errors import ConfigError

FLOWER = ("flower-iid", "flower-dirichlet", "flower-natural-id", "flower-pathological")


def partition(sizes: dict[str, int], weights: list[float], how: str, alpha: float, seed: int,
              sources_per_client: int = 2) -> list[dict[str, np.ndarray]]:
    """Per client: {source: item indices}. Pure function of sizes, weights and seed."""
    if how in FLOWER:
        return _flower(sizes, len(weights), how, alpha, seed, sources_per_client)
    k = len(weights)
    rng = np.random.default_rng([seed, 15485863])
    out: list[dict[str, np.ndarray]] = [{} for _ in range(k)]
    sources = list(sizes)
    if how == "by-source":
        if len(sources) >= k:
            load = [0] * k
            for s in sorted(sources, key=lambda s: (-sizes[s], s)):
                c = min(range(k), key=lambda j: (load[j], j))
                out[c][s] = np.arange(sizes[s])
                load[c] += sizes[s]
        else:
            for s_i, s in enumerate(sources):
                holders = [c for c in range(k) if c % len(sources) == s_i]
                for j, part in enumerate(np.array_split(np.arange(sizes[s]), len(holders))):
                    out[holders[j]][s] = part
    elif how == "iid":
        items = [(s, i) for s in sources for i in range(sizes[s])]
        perm = rng.permutation(len(items))
        cuts = np.round(np.cumsum(np.asarray(weights) / sum(weights)) * len(items)).astype(int)[:-1]
        for c, part in enumerate(np.split(perm, cuts)):
            for j in part:
                s, i = items[j]
                out[c].setdefault(s, []).append(i)
        out = [{s: np.sort(np.asarray(v)) for s, v in d.items()} for d in out]
    elif how == "dirichlet":
        for s in sources:
            q = rng.dirichlet(np.full(k, alpha))
            perm = rng.permutation(sizes[s])
            cuts = np.round(np.cumsum(q) * sizes[s]).astype(int)[:-1]
            for c, part in enumerate(np.split(perm, cuts)):
                if len(part):
                    out[c][s] = np.sort(part)
    else:
        raise ConfigError("data.partition", [f"must be one of by-source, iid, dirichlet, {', '.join(FLOWER)}, got {how!r}"])
    return out


def _flower(sizes: dict[str, int], k: int, how: str, alpha: float, seed: int,
            sources_per_client: int) -> list[dict[str, np.ndarray]]:
    import datasets
    from flwr_datasets import partitioner as fp

    datasets.disable_progress_bars()
    n = sum(sizes.values())
    table = datasets.Dataset.from_dict({"source": [s for s, m in sizes.items() for _ in range(m)],
                                        "item": [i for m in sizes.values() for i in range(m)]})
    if how == "flower-iid":
        table = table.shuffle(seed=seed % 2 ** 32)
        part = fp.IidPartitioner(num_partitions=k)
    elif how == "flower-dirichlet":
        part = fp.DirichletPartitioner(num_partitions=k, partition_by="source", alpha=alpha,
                                       min_partition_size=min(10, n // k), self_balancing=False, shuffle=True,
                                       seed=seed)
    elif how == "flower-natural-id":
        if len(sizes) != k:
            raise ConfigError("data.partition", [
                f"flower-natural-id gives each client one source: the data has {len(sizes)} source(s) "
                f"({', '.join(sorted(sizes)[:6])}{' ...' if len(sizes) > 6 else ''}) and the plan {k} clients; "
                "use by-source to put several sources on a client, or another partition"])
        part = fp.NaturalIdPartitioner(partition_by="source")
    else:
        if sources_per_client > len(sizes):
            raise ConfigError("data.sources_per_client", [
                f"{sources_per_client} is more than the data's {len(sizes)} source(s); use at most {len(sizes)}"])
        part = fp.PathologicalPartitioner(num_partitions=k, partition_by="source",
                                          num_classes_per_partition=sources_per_client,
                                          class_assignment_mode="first-deterministic", seed=seed)
    part.dataset = table
    out = []
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():   # tqdm bars, Dirichlet re-draws
            warnings.simplefilter("ignore")
            for c in range(k):
                p = part.load_partition(c).to_dict()        # plain lists (a Column iterates row by row)
                got: dict[str, list[int]] = {}
                for s, i in zip(p["source"], p["item"]):
                    got.setdefault(s, []).append(i)
                out.append({s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in sorted(got.items())})
    except ValueError as e:          # e.g. Dirichlet draws that leave a client below min_partition_size
        fix = {"flower-dirichlet": "a larger data.alpha (hsplit plan --dirichlet-alpha)",
               "flower-pathological": "another data.sources_per_client (--sources-per-client)"}.get(how, "")
        raise ConfigError("data.partition", [f"{how}: {str(e).splitlines()[0]} ({n} training items, {k} clients); "
                                             f"use more data, {fix + ', ' if fix else ''}or another partition"]) from None
    return out


def draw_partition(client_counts: list[dict[str, int]], client_ids: list[str], path: str | Path, title: str,
                   max_sources: int = 12) -> Path:
    """A stacked bar chart: training items per client, stacked by source (the largest max_sources - 1
    sources by name, the rest as `other`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals: dict[str, int] = {}
    for d in client_counts:
        for s, n in d.items():
            totals[s] = totals.get(s, 0) + n
    ranked = sorted(totals, key=lambda s: (-totals[s], s))
    shown = ranked if len(ranked) <= max_sources else ranked[:max_sources - 1]
    rest = [s for s in ranked if s not in shown]
    layers = [(s, [d.get(s, 0) for d in client_counts]) for s in shown]
    if rest:
        layers.append((f"other ({len(rest)} sources)", [sum(d.get(s, 0) for s in rest) for d in client_counts]))
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(client_ids) + 3.0), 3.8), dpi=100)
    x = np.arange(len(client_ids))
    bottom = np.zeros(len(client_ids))
    cmap = plt.get_cmap("tab20")
    for j, (name, vals) in enumerate(layers):
        ax.bar(x, vals, bottom=bottom, label=name, color=cmap(j % 20), width=0.7)
        bottom += np.asarray(vals, dtype=float)
    ax.set_xticks(x, client_ids, rotation=45 if len(client_ids) > 8 else 0, ha="right" if len(client_ids) > 8 else "center")
    ax.set_ylabel("training sequences")
    ax.set_title(title, fontsize=9)
    if len(layers) > 1:
        ax.legend(title="source", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_data_partition(sim, plan, path: str | Path) -> Path:
    """partition.png of a run: the simulation's training data per client, stacked by source."""
    s = sim.data.summary
    title = (f"{Path(str(plan.data.path)).name}: partition {plan.data.partition}\n"
             f"{sum(s['client_sequences'])} training, {s['eval_sequences']} held-out sequences of {s['seq_len']} tokens")
    return draw_partition(sim.data.client_counts, [c.id for c in plan.clients], path, title)
