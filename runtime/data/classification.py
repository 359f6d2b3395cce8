"""Sequence classification data (`data.task: classification`): text + label records, the label set, the
plan-time checks, token sets for the split step, and the metrics `hsplit eval` reports.

    recs = read_records(ds, spec, "data.csv")         # texts, labels (None: missing), sources, columns used
    labels = check_records(recs, spec, seed, weights)  # the label set (ConfigError: missing/unknown labels,
                                                       #   one class, a held-out split without some class)
    arrays = token_arrays(recs, labels, tokenizer, seq_len)   # {source: (ids, mask, labels)}: class at the last token
    report = metrics(y_true, y_pred, labels)           # accuracy, macro-F1 (scikit-learn), per class

Columns: the text is `data.text_column`, or the first of TEXT_COLUMNS present (`text`, `sentence`,
`content`, ...; E2E's `ref`); the label is `data.label_column`, or the first of LABEL_COLUMNS present
(`label`, `labels`, `label_text`, `class`, `category`, `intent`, ...). In E2E data (`mr` + `ref`) the
label may be an attribute of the meaning representation: `label_column: eatType` reads `pub` from
`eatType[pub]`. String and integer labels alike become text; the label set is sorted (numerically
when every label is a whole number) and written into the plan (`data.labels`), whose order is the
class index. Each record is one sequence: the text's tokens as `tokenizer(text)` gives them, cut to
seq_len; its labels row is -100 except at the last text token, which holds the class index (the
position a `*ForSequenceClassification` head reads). `data.partition_by: label` makes the label each
record's source, so that `dirichlet` partitions over labels (the standard non-IID classification split).
Torch-free at import (`hsplit plan` reads data with it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from hsplit.planner.errors import ConfigError

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "utterance", "question", "query", "body",
                "tweet", "comment", "ref", "human_reference")
LABEL_COLUMNS = ("label", "labels", "label_text", "class", "category", "intent", "sentiment", "topic", "target",
                 "coarse_label", "fine_label")
MR_COLUMNS = ("mr", "meaning_representation")


@dataclass
class Records:
    texts: list[str]
    labels: list[str | None]        # None: the record has no label
    sources: list[str]              # each record's source (partition_by; `label`: its label)
    text_column: str
    label_column: str               # a column, or `mr:ATTRIBUTE` (an E2E meaning-representation attribute)


def _names(columns) -> str:
    return ", ".join(map(str, list(columns)[:20])) + (" ..." if len(columns) > 20 else "") if columns else "none"


def pick_columns(columns: list[str], spec, where: str) -> tuple[str, str, str | None]:
    """(text column, label column, MR attribute or None) of a table, from data.text_column / label_column."""
    cols = list(columns)
    if spec.text_column != "auto":
        if spec.text_column not in cols:
            raise ConfigError(where, [f"data.text_column: no column {spec.text_column!r}; found {_names(cols)}"])
        text = spec.text_column
    else:
        text = next((c for c in TEXT_COLUMNS if c in cols), None)
        if text is None:
            raise ConfigError(where, [f"classification needs a text column ({', '.join(TEXT_COLUMNS[:6])}, ...); "
                                      f"found {_names(cols)}: name it with --text-column (data.text_column)"])
    mr = next((c for c in MR_COLUMNS if c in cols), None)
    if spec.label_column != "auto":
        if spec.label_column in cols:
            return text, spec.label_column, None
        if mr is not None:                      # E2E: an attribute of the meaning representation
            return text, mr, spec.label_column
        raise ConfigError(where, [f"data.label_column: no column {spec.label_column!r}; found {_names(cols)}"])
    label = next((c for c in LABEL_COLUMNS if c in cols and c != text), None)
    if label is None:
        raise ConfigError(where, [f"classification needs a label column ({', '.join(LABEL_COLUMNS[:6])}, ...); "
                                  f"found {_names(cols)}: name it with --label-column (data.label_column; in E2E "
                                  "data an attribute of the MR, e.g. eatType)"])
    return text, label, None


def _label(v) -> str | None:
    if v is None or isinstance(v, bool):
        return None if v is None else str(v).lower()
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    s = str(v).strip()
    return s or None


def read_records(ds, spec, where: str) -> Records:
    """The texts, labels and sources of a `datasets.Dataset` of classification records."""
    text_col, label_col, attr = pick_columns(ds.column_names, spec, where)
    texts = ["" if t is None else str(t) for t in ds[text_col]]
    raw = ds[label_col]
    if attr is not None:
        pat = re.compile(re.escape(attr) + r"\[([^\]]*)\]")
        labels = [_label(m.group(1)) if (m := pat.search(str(v or ""))) else None for v in raw]
    else:
        names = getattr(ds.features.get(label_col), "names", None)      # datasets.ClassLabel: its names
        labels = [_label(names[v] if names and isinstance(v, int) and 0 <= v < len(names) else v) for v in raw]
    if spec.partition_by == "label":
        sources = [lab if lab is not None else "" for lab in labels]
    elif spec.partition_by in ds.column_names:
        sources = [str(v) if v is not None and str(v) != "" else "data" for v in ds[spec.partition_by]]
    elif any(c in ds.column_names for c in MR_COLUMNS):     # E2E: the restaurant's name
        mr = ds[next(c for c in MR_COLUMNS if c in ds.column_names)]
        sources = [m.group(1) if (m := re.search(r"name\[([^\]]*)\]", str(v or ""))) else "e2e" for v in mr]
    else:
        sources = ["data"] * len(texts)
    return Records(texts, labels, sources, text_col, f"mr:{attr}" if attr else label_col)


def label_order(values) -> list[str]:
    """The distinct labels sorted: numerically when every one is a whole number, else as text."""
    distinct = set(values)
    if all(re.fullmatch(r"-?\d+", v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def check_labels(recs: Records, spec, where: str) -> list[str]:
    """The label set (spec.labels when the plan names one, else read from the records). ConfigError: records
    without a label or without text, labels the plan does not know, a single class."""
    what = recs.label_column.replace("mr:", "the MR attribute ")
    missing = [i + 1 for i, lab in enumerate(recs.labels) if lab is None]
    problems = []
    if missing:
        problems.append(f"{len(missing)} record{'s' if len(missing) != 1 else ''} without a label in {what} (record"
                        f"{'s' if len(missing) != 1 else ''} {', '.join(map(str, missing[:5]))}"
                        f"{' ...' if len(missing) > 5 else ''}): give every record a label, or drop those records")
    empty = [i + 1 for i, t in enumerate(recs.texts) if not t.strip()]
    if empty:
        problems.append(f"{len(empty)} record{'s' if len(empty) != 1 else ''} without text in {recs.text_column} "
                        f"(records {', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}): drop them")
    found = label_order(lab for lab in recs.labels if lab is not None)
    if spec.labels:
        unknown = [lab for lab in found if lab not in spec.labels]
        if unknown:
            problems.append(f"label{'s' if len(unknown) != 1 else ''} {', '.join(map(repr, unknown[:10]))} in {what} "
                            f"not among the plan's data.labels ({', '.join(spec.labels)}): add "
                            f"{'them' if len(unknown) != 1 else 'it'} to data.labels, or re-plan")
    elif len(found) == 1:
        problems.append(f"{what} has one class only ({found[0]!r}): a classifier needs at least two; choose "
                        "another --label-column")
    if problems:
        raise ConfigError(where, problems)
    return list(spec.labels) if spec.labels else found


def grouped(recs: Records) -> dict[str, list[int]]:
    """{source: record indices in order}, sources sorted: the order the run holds out and partitions."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(recs.sources):
        out.setdefault(s, []).append(i)
    return dict(sorted(out.items()))


def heldout_problem(recs: Records, labels: list[str], fraction: float, seed: int) -> str | None:
    """The held-out split (the run's own: partition.holdout per source) missing some class, said with the fix."""
    from hsplit.runtime.data.partition import holdout
    if fraction <= 0:
        return None
    groups = grouped(recs)
    _, evals = holdout({s: len(ix) for s, ix in groups.items()}, fraction, seed)
    held = {recs.labels[groups[s][i]] for s, idx in evals for i in idx}
    absent = [lab for lab in labels if lab not in held]
    if not absent:
        return None
    return (f"the held-out split (eval_fraction {fraction:g}) has no record of class{'es' if len(absent) > 1 else ''} "
            f"{', '.join(map(repr, absent[:10]))}: accuracy would not measure {'them' if len(absent) > 1 else 'it'}; "
            "use --partition-by label (the hold-out is then per class) or a larger --eval-fraction")


def check_plan(ds, spec, seed: int, weights: list[float] | None, seq_len: int, where: str) -> list[str]:
    """`hsplit plan`'s check of classification data (ds: the whole data set): the label set (returned; the plan
    records it), the held-out split holding every class, and the partition over the plan's clients."""
    from hsplit.runtime.data.partition import holdout, partition, split_problems
    recs = read_records(ds, spec, where)
    labels = check_labels(recs, spec, where)
    if (why := heldout_problem(recs, labels, spec.eval_fraction, seed)) is not None:
        raise ConfigError(where, [why])
    if weights:
        groups = grouped(recs)
        train, evals = holdout({s: len(ix) for s, ix in groups.items()}, spec.eval_fraction, seed)
        parts = partition({s: len(i) for s, i in train.items()}, weights, spec.partition, spec.alpha, seed,
                          spec.sources_per_client)
        problems = split_problems(spec.partition, parts, sum(map(len, train.values())), seq_len, spec.eval_fraction,
                                  sum(len(i) for _, i in evals))
        if problems:
            raise ConfigError(f"data ({spec.path})", problems)
    return labels


def token_arrays(recs: Records, labels: list[str], tokenizer, seq_len: int) -> dict:
    """{source: (input_ids, attention_mask, labels)} int64 arrays (N, seq_len), sources sorted, records in order
    (runtime/data/federated.py makes them TokenSets): each record's text as `tokenizer(text)` gives it, cut to seq_len and
    padded on the right; labels -100 except the class index at the last text token."""
    import numpy as np

    index = {lab: i for i, lab in enumerate(labels)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = tokenizer(recs.texts, truncation=True, max_length=seq_len)["input_ids"]
    out = {}
    for src, rows in grouped(recs).items():
        ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        lab = np.full_like(ids, -100)
        for r, i in enumerate(rows):
            x = enc[i][:seq_len] or [pad]
            ids[r, :len(x)] = x
            mask[r, :len(x)] = 1
            lab[r, len(x) - 1] = index[recs.labels[i]]
        out[src] = (ids, mask, lab)
    return out


def metrics(y_true: list[int], y_pred: list[int], labels: list[str], per_class: bool = False) -> dict:
    """Accuracy and macro-F1 over the label set (scikit-learn); per class: precision, recall, F1, support."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
    classes = list(range(len(labels)))
    out = {"examples": len(y_true), "accuracy": float(accuracy_score(y_true, y_pred)) if y_true else float("nan"),
           "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0))
           if y_true else float("nan")}
    if per_class:
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
        out["per_class"] = [{"label": lab, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, lab in enumerate(labels)]
    return out
