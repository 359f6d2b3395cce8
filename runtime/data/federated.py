"""Training data: read, tokenise (cached), hold out an eval split, partition across clients, batch.

    data = load_federated_data(plan.data, tokenizer, seq_len=256, weights=[1, 1, 2], seed=0)
    data.clients[k]       # TokenSet: input_ids / attention_mask / labels, (N_k, seq_len)
    data.eval             # TokenSet no client trains on
    batch = data.clients[k].batch(batch_size, seed, round_idx, client_idx, step)   # stateless

Where data comes from and its record kinds: runtime/data/source.py (`shakespeare`, local files and
folders read with Hugging Face `datasets`, `save_to_disk` folders, hub ids; chat, text,
prompt/completion, E2E, documents); token ids and loss masks: runtime/data/tokenise.py (chat template,
cached by `datasets`). Here: documents (text files) are joined with EOS per source and cut into
seq_len chunks; other records are one example each, truncated or padded (mask 0, label -100).

Hold-out: eval_fraction of each source's items (chunks or examples), chosen with the seed; sources too
small for their own share (eval_fraction x items < 0.5) are pooled and hold out the pool's share.
The remaining items are partitioned across clients by runtime/data/partition.py (hsplit's by-source,
iid, dirichlet; Flower Datasets' flower-iid, flower-dirichlet, flower-natural-id, flower-pathological).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import DataSpec
from hsplit.runtime.data.source import (check_data_ref, open_dataset, record_kind, resolve, shakespeare_root,  # noqa: F401
                                       split_data_ref)
from hsplit.runtime.data import classification
from hsplit.runtime.models.causal_lm import cache_dir
from hsplit.runtime.data.partition import holdout, partition, split_problems, unassigned_note
from hsplit.runtime.data.tokenise import cache_key, chat_record, encode_dataset, no_assistant_problem


@dataclass
class TokenSet:
    input_ids: torch.Tensor        # (N, T) long
    attention_mask: torch.Tensor   # (N, T) long
    labels: torch.Tensor           # (N, T) long, -100 = no loss

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tokens(self) -> int:
        """Labelled (loss-bearing) next-token targets."""
        return int((self.labels[:, 1:] != -100).sum())

    def subset(self, idx) -> "TokenSet":
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return TokenSet(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    @staticmethod
    def cat(sets: list["TokenSet"], seq_len: int) -> "TokenSet":
        sets = [s for s in sets if len(s)]
        if not sets:
            z = torch.zeros(0, seq_len, dtype=torch.long)
            return TokenSet(z, z.clone(), z.clone())
        return TokenSet(torch.cat([s.input_ids for s in sets]), torch.cat([s.attention_mask for s in sets]),
                        torch.cat([s.labels for s in sets]))

    def batch(self, batch_size: int, seed: int, round_idx: int, client_idx: int, step: int) -> "TokenSet":
        """The batch of `step` in round `round_idx`: a per-round permutation, cycled (resume-safe)."""
        n = len(self)
        per_round = np.random.default_rng([seed, round_idx, client_idx, 7919]).permutation(n)
        start = step * batch_size
        epoch, offset = divmod(start, n)
        idx = []
        while len(idx) < batch_size:
            perm = per_round if epoch == 0 else np.random.default_rng(
                [seed, round_idx, client_idx, 7919, epoch]).permutation(n)
            take = perm[offset:offset + batch_size - len(idx)]
            idx.extend(take.tolist())
            epoch, offset = epoch + 1, 0
        return self.subset(idx)


@dataclass
class FederatedData:
    clients: list[TokenSet]
    eval: TokenSet
    client_sources: list[list[str]]
    summary: dict
    client_counts: list[dict[str, int]] = field(default_factory=list)   # per client: {source: sequences}
    note: str | None = None         # sources the partition puts on no client (partition.unassigned_note)


# ---------------------------------------------------------------- reading and tokenising (cached)

def _data_key(src, ds) -> list:
    """What the tokenised cache depends on in the data: every local file's path, size and mtime; for a hub
    dataset its `datasets` fingerprint."""
    if src.where == "hub":
        return [src.ref, ds._fingerprint]
    return [src.reader, *[(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in src.files]]


def token_sets(enc, documents: bool, tokenizer, seq_len: int) -> dict[str, TokenSet]:
    """{source: TokenSet} (sources sorted, records in order) from encoded rows (source, ids, loss).
    documents: a source's token streams joined and cut into seq_len chunks (the remainder dropped);
    otherwise one row per record, truncated or padded (mask 0, label -100)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_all, starts = _flat(enc, "ids")
    loss_all, _ = _flat(enc, "loss")
    by_source: dict[str, list[int]] = {}
    for i, src in enumerate(enc.data.column("source").to_pylist()):
        by_source.setdefault(src, []).append(i)
    out = {}
    for src in sorted(by_source):
        rows = by_source[src]
        if documents:
            stream = np.concatenate([ids_all[starts[i]:starts[i + 1]] for i in rows])
            n = len(stream) // seq_len
            ids = torch.from_numpy(stream[:n * seq_len].copy()).view(n, seq_len)
            out[src] = TokenSet(ids, torch.ones_like(ids), ids.clone())
            continue
        ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        labels = np.full_like(ids, -100)
        for r, i in enumerate(rows):
            a, b = starts[i], min(starts[i + 1], starts[i] + seq_len)
            x, keep = ids_all[a:b], loss_all[a:b].astype(bool)
            ids[r, :len(x)] = x
            mask[r, :len(x)] = 1
            labels[r, :len(x)] = np.where(keep, x, -100)
        out[src] = TokenSet(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels))
    return out


def _flat(enc, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of encoded rows as (all values as int64, row starts with the end appended)."""
    col = enc.data.column(column).combine_chunks()          # (Dataset.map's output: no indices mapping)
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def tokenised_sources(spec: DataSpec, tokenizer, seq_len: int, use_cache: bool = True) -> tuple[str, dict[str, TokenSet]]:
    """(record kind, {source: TokenSet}); the tokenisation comes from the `datasets` map cache
    ($HSPLIT_CACHE/tokens/) when the data and tokenizer are unchanged."""
    kind, sets, _ = _tokenised(spec, tokenizer, seq_len, use_cache)
    return kind, sets


def _tokenised(spec: DataSpec, tokenizer, seq_len: int, use_cache: bool = True) -> tuple[str, dict[str, TokenSet], int]:
    """tokenised_sources, and the number of records read (documents: files)."""
    src = resolve(spec)
    ds = open_dataset(src, spec)
    if len(ds) == 0:
        raise ConfigError("data.path", [f"{spec.path}: no records"])
    if spec.task == "classification":       # text + label records (runtime/data/classification.py)
        recs = classification.read_records(ds, spec, spec.path)
        if not spec.labels:                 # a hand-written plan without data.labels: read them now
            spec.labels = classification.check_labels(recs, spec, spec.path)
        classification.check_labels(recs, spec, spec.path)
        arrays = classification.token_arrays(recs, spec.labels, tokenizer, seq_len)
        return "classification", {s: TokenSet(*(torch.from_numpy(a) for a in arr)) for s, arr in arrays.items()}, len(ds)
    kind = "documents" if src.reader in ("shakespeare", "text") else record_kind(
        ds.column_names, ds[0], spec, spec.path)
    if spec.partition_by != "source" and spec.partition_by not in ds.column_names:
        raise ConfigError(spec.path, [f"data.partition_by: no column {spec.partition_by!r}; found "
                                      f"{', '.join(ds.column_names)}"])
    cache = None
    if use_cache:
        cache = cache_dir() / "tokens" / f"{cache_key(kind, tokenizer, spec.partition_by, _data_key(src, ds))}.arrow"
    enc = encode_dataset(ds, kind, tokenizer, spec.partition_by, cache, where=spec.path)
    sets = token_sets(enc, kind == "documents", tokenizer, seq_len)
    if kind == "chat" and not any(int((ts.labels != -100).sum()) for ts in sets.values()):
        roles = {m["role"] for i, rec in enumerate(ds) for m in chat_record(rec, f"record {i + 1}")[0]}
        if (why := no_assistant_problem(roles)) is not None:
            raise ConfigError(spec.path, [why])
        raise ConfigError(spec.path, [f"no assistant tokens within seq_len {seq_len}: every conversation's assistant "
                                      "turns are cut off or missing; use a longer seq_len"])
    return kind, sets, len(ds)


def _tokenise(records, fmt: str, tokenizer, seq_len: int) -> dict[str, TokenSet]:
    """(source, prompt, completion) records -> {source: TokenSet}, uncached (fmt shakespeare/text: documents,
    joined and chunked; otherwise prompt/completion examples)."""
    import datasets
    documents = fmt in ("shakespeare", "text")
    ds = datasets.Dataset.from_dict({"source": [r[0] for r in records], "prompt": [r[1] for r in records],
                                     "completion": [r[2] for r in records]})
    if documents:
        ds = ds.rename_column("completion", "text").remove_columns("prompt")
    enc = encode_dataset(ds, "documents" if documents else "prompt-completion", tokenizer, "source", None)
    return token_sets(enc, documents, tokenizer, seq_len)


# ---------------------------------------------------------------- split and partition

def _holdout(sets: dict[str, TokenSet], fraction: float, seed: int):
    """(train {source: TokenSet}, [eval TokenSets]): partition.holdout over the sources' sequences."""
    train, evals = holdout({s: len(ts) for s, ts in sets.items()}, fraction, seed)
    return {s: sets[s].subset(idx) for s, idx in train.items()}, [sets[s].subset(idx) for s, idx in evals]


def load_federated_data(spec: DataSpec, tokenizer, seq_len: int, weights: list[float], seed: int,
                        use_cache: bool = True) -> FederatedData:
    kind, sets, records = _tokenised(spec, tokenizer, seq_len, use_cache)
    train, evals = _holdout(sets, spec.eval_fraction, seed)
    parts = partition({s: len(ts) for s, ts in train.items()}, weights, spec.partition, spec.alpha, seed,
                      spec.sources_per_client)
    clients = [TokenSet.cat([train[s].subset(idx) for s, idx in sorted(p.items())], seq_len) for p in parts]
    eval_set = TokenSet.cat(evals, seq_len)
    problems = split_problems(spec.partition, parts, sum(len(t) for t in train.values()), seq_len,
                              spec.eval_fraction, len(eval_set))
    if problems:
        raise ConfigError(f"data ({spec.path})", problems)
    summary = {"path": spec.path, "format": resolve(spec).reader, "kind": kind, "partition": spec.partition,
               "seq_len": seq_len, "records": records,
               "sources": {s: len(ts) for s, ts in sets.items()}, "eval_sequences": len(eval_set),
               "client_sequences": [len(c) for c in clients], "train_sequences": sum(len(c) for c in clients),
               "train_tokens": int(sum(int(c.attention_mask.sum()) for c in clients)),
               "eval_tokens": int(eval_set.attention_mask.sum())}
    return FederatedData(clients=clients, eval=eval_set,
                         client_sources=[sorted(p) for p in parts], summary=summary,
                         client_counts=[{s: len(idx) for s, idx in sorted(p.items())} for p in parts],
                         note=unassigned_note({s: len(ts) for s, ts in train.items()}, parts))


def load_eval_data(path: str, tokenizer, seq_len: int, fmt: str = "auto", like: DataSpec | None = None) -> TokenSet:
    """A whole data set as an evaluation set (`hsplit eval RUN --data PATH`); `like`: the run's data section,
    whose task, text and label columns and label set apply (a label outside the run's set is an error)."""
    spec = DataSpec(path=path, format=fmt)
    if like is not None and like.task == "classification":
        spec = DataSpec(path=path, format=fmt, task=like.task, text_column=like.text_column,
                        label_column=like.label_column, labels=list(like.labels))
    _, sets = tokenised_sources(spec, tokenizer, seq_len)
    return TokenSet.cat(list(sets.values()), seq_len)
