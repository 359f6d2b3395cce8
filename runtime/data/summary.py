"""The one data-summary line `hsplit plan` and `hsplit run` print; torch-free (`hsplit plan` computes it).

    s = data_summary(spec, seq_len=256, weights=[1, 1, 2], seed=0, model="smollm2-135m")   # plan time
    print(summary_line(s))          # also of FederatedData.summary (runtime/data/federated.py), at run time

data: PATH (format F, record kind K): N records; training S sequences / T tokens, held out S' sequences /
T' tokens; per client A-B sequences. At plan time the hold-out and the partition are the run's own
functions over the run's items; "about" marks token counts estimated at about 4 characters a token
(text documents are counted with the model's tokenizer where its tokenizer.json is on disk).
"""
from __future__ import annotations

import json
from pathlib import Path

from hsplit.planner.plan import DataSpec
from hsplit.runtime.data.source import (FULL_READ_BYTES, _cache, _document_tokens, _read_records, inspect,
                                       open_dataset, resolve)


def tokenizer_file(model: str | None) -> Path | None:
    """The model's tokenizer.json where it already is on disk (a model folder, the embedded default's converted
    folder, the Hugging Face cache), read with `tokenizers` alone (no torch); None when it is not there."""
    if not model:
        return None
    p = Path(model).expanduser()
    if (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    if model == "smollm2-135m":
        f = Path(_cache("models")) / model / "tokenizer.json"
        return f if f.is_file() else None
    from hsplit.planner.model import is_hub_id, shipped_hub_id
    hub = shipped_hub_id(model) or (model if is_hub_id(model) else None)
    if hub is None:
        return None
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(hub, "tokenizer.json")
    return Path(found) if isinstance(found, str) else None


def _tokenizer(model: str | None):
    f = tokenizer_file(model)
    if f is None:
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(f))


def data_summary(spec: DataSpec, seq_len: int, weights: list[float], seed: int, model: str | None = None) -> dict:
    """What `hsplit plan` can tell of the run's data: records, training and held-out sequences and tokens,
    sequences per client, format, record kind. The hold-out and the partition are the run's own
    (partition.holdout, partition.partition) over the run's items: text documents cut into seq_len chunks
    per source (tokens counted with the model's tokenizer where it is on disk, else about 4 characters per
    token: `estimated`), or one sequence per record (tokens estimated unless classification with the
    tokenizer). Sequences are None when the data is not read whole here (hub ids, saved folders, files over
    FULL_READ_BYTES)."""
    from hsplit.runtime.data.partition import holdout, partition
    src = resolve(spec)
    info = inspect(src, spec)
    out = {"path": spec.path, "format": src.reader, "kind": info.kind, "records": info.rows, "estimated": True,
           "train_sequences": None}
    tok = _tokenizer(model)
    if info.kind == "documents":
        items = {s: [seq_len] * int(t // seq_len) for s, t in _document_tokens(src, tok).items()}
        out["estimated"] = tok is None
    elif spec.task == "classification":
        from hsplit.runtime.data.classification import grouped, read_records
        recs = read_records(open_dataset(src, spec), spec, spec.path)
        lens = [min(seq_len, len(tok.encode(t).ids) if tok is not None else len(t) // 4 + 1) for t in recs.texts]
        items = {s: [lens[i] for i in ix] for s, ix in grouped(recs).items()}
        out["estimated"] = tok is None
    elif src.where in ("file", "folder") and sum(f.stat().st_size for f in src.files) <= FULL_READ_BYTES:
        from hsplit.runtime.data.tokenise import _source_of
        found: dict[str, list[int]] = {}
        for f in src.files:
            rs = _read_records(f, src.reader)
            named = any(spec.partition_by in r for r in rs)
            for r in rs:
                s = f.stem if src.where == "folder" and not named else \
                    _source_of({k: [v] for k, v in r.items()}, 0, info.kind, spec.partition_by)
                found.setdefault(s, []).append(min(seq_len, len(json.dumps(r, default=str)) // 4 + 1))
        items = dict(sorted(found.items()))
    else:
        return out
    train, evals = holdout({s: len(v) for s, v in items.items()}, spec.eval_fraction, seed)
    parts = partition({s: len(i) for s, i in train.items()}, weights, spec.partition, spec.alpha, seed,
                      spec.sources_per_client)
    per_client = [sum(len(ix) for ix in p.values()) for p in parts]
    out.update(train_sequences=sum(per_client), eval_sequences=sum(len(i) for _, i in evals),
               train_tokens=int(sum(items[s][train[s][j]] for p in parts for s, ix in p.items() for j in ix)),
               eval_tokens=int(sum(items[s][j] for s, ix in evals for j in ix)), client_sequences=per_client)
    return out


def summary_line(s: dict) -> str:
    """The one data-summary line `hsplit plan` and `hsplit run` print (data_summary, FederatedData.summary)."""
    head = f"data: {s['path']} (format {s['format']}, record kind {s['kind']})" + \
        (f": {s['records']:,} records" if s.get("records") is not None else "")
    if s.get("train_sequences") is None:
        return head + "; sequences and tokens are counted when `hsplit run` reads it"
    about = "about " if s.get("estimated") else ""
    c = s.get("client_sequences") or [0]
    return (f"{head}; training {about}{s['train_sequences']:,} sequences / {about}{s['train_tokens']:,} tokens, "
            f"held out {about}{s['eval_sequences']:,} sequences / {about}{s['eval_tokens']:,} tokens; per client "
            f"{min(c):,}-{max(c):,} sequences")
