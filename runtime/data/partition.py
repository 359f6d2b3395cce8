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


def holdout(counts: dict[str, int], fraction: float, seed: int) -> tuple[dict[str, np.ndarray], list[tuple[str, np.ndarray]]]:
    """(train {source: kept item indices}, [(source, held-out item indices)]) of sources of `counts` items.
    Each source holds out round(fraction x its items), at least one and never all of them. Sources too small
    for that (fraction x items < 0.5, e.g. E2E restaurants with one or two references) are pooled and the
    pool holds out its share instead, so that many tiny sources neither give an empty eval split nor one
    far above `fraction`. A pure function of counts, fraction and seed (`hsplit plan` checks with it)."""
    def pick(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(round(fraction * n))
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        perm = np.random.default_rng([seed, 104729, stream]).permutation(n)
        return np.sort(perm[:k]), np.sort(perm[k:])

    train, evals = {}, []
    small = [s for s, n in counts.items() if fraction * n < 0.5]
    pooled = small if len(small) > 1 else []        # one small source alone keeps its own rule
    in_pool = set(pooled)
    for i, (src, n) in enumerate(counts.items()):
        if src not in in_pool:
            held, kept = pick(n, i)
            evals.append((src, held))
            train[src] = kept
    if pooled:                  # the pool: the small sources' items one after the other
        sizes = [counts[s] for s in pooled]
        held, _ = pick(sum(sizes), len(counts))
        is_held = np.zeros(sum(sizes), dtype=bool)
        is_held[held] = True
        start = 0
        for src, n in zip(pooled, sizes):
            flags = is_held[start:start + n]
            start += n
            evals.append((src, np.flatnonzero(flags)))
            if not flags.all():
                train[src] = np.flatnonzero(~flags)
    return train, evals


def split_problems(how: str, parts: list[dict], n_train: int, seq_len: int, eval_fraction: float,
                   n_eval: int) -> list[str]:
    """What the run refuses about a partition: clients without data, an empty held-out split."""
    empty = [i for i, p in enumerate(parts) if not any(len(v) for v in p.values())]
    problems = []
    if empty:
        problems.append(f"partition {how!r} left client(s) {empty} without data "
                        f"({n_train} training sequence{'s' if n_train != 1 else ''} of {seq_len} tokens for "
                        f"{len(parts)} clients); use more data, a shorter seq_len, or partition iid")
    if eval_fraction > 0 and n_eval == 0:
        problems.append("the held-out eval split is empty: use more data or a larger eval_fraction")
    return problems


def unassigned_note(train_counts: dict[str, int], parts: list[dict]) -> str | None:
    """A one-line note naming the sources no client trains on (flower-pathological can leave some out)."""
    held = {s for p in parts for s, v in p.items() if len(v)}
    left = {s: n for s, n in train_counts.items() if s not in held and n}
    if not left:
        return None
    names = ", ".join(f"{s} ({n} sequence{'s' if n != 1 else ''})" for s, n in sorted(left.items())[:8])
    return (f"note: the partition puts {len(left)} source{'s' if len(left) != 1 else ''} on no client: {names}"
            f"{' ...' if len(left) > 8 else ''}; no client trains on {'them' if len(left) != 1 else 'it'}")


def partition_problem(how: str, sources: list[str], k: int, sources_per_client: int) -> ConfigError | None:
    """The partitions that need a number of sources (flower-natural-id, flower-pathological): the error when the
    data's sources do not fit the plan's k clients (None otherwise)."""
    if how == "flower-natural-id" and len(sources) != k:
        return ConfigError("data.partition", [
            f"flower-natural-id gives each client one source: the data has {len(sources)} source(s) "
            f"({', '.join(sorted(sources)[:6])}{' ...' if len(sources) > 6 else ''}) and the plan {k} clients; "
            "use by-source to put several sources on a client, or another partition"])
    if how == "flower-pathological" and sources_per_client > len(sources):
        return ConfigError("data.sources_per_client", [
            f"{sources_per_client} is more than the data's {len(sources)} source(s); use at most {len(sources)} "
            "(hsplit plan --sources-per-client)"])
    return None


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
    elif (bad := partition_problem(how, list(sizes), k, sources_per_client)) is not None:
        raise bad
    elif how == "flower-natural-id":
        part = fp.NaturalIdPartitioner(partition_by="source")
    else:
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


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def draw_data_partition(sim, plan, path: str | Path) -> Path:
    """partition.png of a run: the simulation's training data per client, stacked by source."""
    s = sim.data.summary
    title = (f"{Path(str(plan.data.path)).name}: partition {plan.data.partition}\n"
             f"{_n(sum(s['client_sequences']), 'training sequence')}, {s['eval_sequences']} held-out, "
             f"of {s['seq_len']} tokens")
    return draw_partition(sim.data.client_counts, [c.id for c in plan.clients], path, title)
