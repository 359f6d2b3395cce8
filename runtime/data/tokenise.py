"""Records -> token ids and a loss mask, one row per record, cached by `datasets` (Dataset.map).

    enc = encode_dataset(ds, kind, tokenizer, spec, key)   # Dataset: source, ids, loss (0/1 per token)
    ids, loss = chat_tokens(tokenizer, messages)           # chat template; loss on assistant turns only

Per record kind (runtime/data/source.py):
- documents (text files, Shakespeare): the text's tokens + EOS, loss on every token (data.py joins a
  source's documents and cuts them into seq_len chunks);
- text: the text's tokens + EOS, loss on every token (a record without text: its prompt and completion,
  so one file may mix the two); prompt-completion and E2E (prompt = MR + newline,
  completion = the reference): prompt tokens + completion tokens + EOS, loss on the completion and EOS;
- chat: the tokenizer's chat template over the messages; loss on the assistant turns' tokens (their
  content and end-of-turn token, not the whitespace after it), none on system or user turns. TRL's
  conversational prompt/completion (lists of messages): the loss is on the completion's assistant turns.
The assistant spans come from rendering the conversation up to each assistant turn (with the generation
prompt) and up to its end: the characters between are the turn, and the tokens of the whole rendering
whose offsets start inside a span carry the loss (no `{% generation %}` block needed).
The map result is cached under $HSPLIT_CACHE/tokens/<key>.arrow; the key covers the data (file paths,
sizes, mtimes, or the dataset's fingerprint), the record kind and the tokenizer (vocabulary and chat template).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from hsplit.planner.errors import ConfigError

CACHE_VERSION = 2


def clean_markdown(text: str) -> str:
    text = text.replace("**", "").replace("  \n", "\n")
    text = re.sub(r"(?m)^_(.*)_$", r"\1", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    text += "\0" + str(getattr(tokenizer, "chat_template", None) or "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- chat

def _messages(raw, where: str) -> list[dict]:
    """A list of {role, content} (ShareGPT's {from, value} read too; content parts joined)."""
    roles = {"human": "user", "gpt": "assistant", "model": "assistant"}
    if not isinstance(raw, list):
        raise ConfigError(where, [f"messages must be a list of {{role, content}}, found {type(raw).__name__}"])
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not ({"role", "content"} <= set(m) or {"from", "value"} <= set(m)):
            raise ConfigError(where, [f"message {i}: needs role and content, found {m!r:.120}"])
        role = m["role"] if "role" in m else roles.get(m["from"], m["from"])
        content = m["content"] if "content" in m else m["value"]
        if isinstance(content, list):           # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": str(role), "content": "" if content is None else str(content)})
    return out


def chat_record(rec: dict, where: str) -> tuple[list[dict], int]:
    """(messages, index of the first turn that carries loss) of one chat record: `messages` or `conversations`
    (from index 0), or TRL's conversational `prompt` + `completion` (the completion's turns)."""
    if "messages" in rec or "conversations" in rec:
        return _messages(rec["messages"] if rec.get("messages") is not None or "conversations" not in rec
                         else rec["conversations"], where), 0
    prompt = _messages(rec.get("prompt"), where)
    return prompt + _messages(rec.get("completion"), where), len(prompt)


def record_problem(rec: dict, kind: str) -> str | None:
    """Why the run cannot tokenise this record of a table of `kind` (chat, text, prompt-completion), or None."""
    if kind == "chat":
        try:
            chat_record(rec, "")
        except ConfigError as e:
            return "; ".join(e.problems)
        return None
    if kind in ("text", "prompt-completion"):
        if rec.get("text") is not None or all(rec.get(k) is not None for k in ("prompt", "completion")):
            return None
        has = [f"`{k}`" for k in ("text", "prompt", "completion") if rec.get(k) is not None]
        return ("needs a `text` field or `prompt` and `completion` fields" +
                (f"; it has only {', '.join(has)} (the other missing or null)" if has else "; it has none of them"))
    return None


def no_assistant_problem(roles: set[str]) -> str | None:
    """The error when no chat record has an assistant turn (no tokens to train on), naming the roles found."""
    if "assistant" in roles:
        return None
    return (f"no record has an assistant turn (roles found: {', '.join(sorted(roles)) or 'none'}; expected "
            "system, user, assistant, or ShareGPT's human, gpt): there is nothing to train on; rename the roles")


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_tokens(tokenizer, messages: list[dict], loss_from: int = 0, where: str = "data") -> tuple[list[int], list[int]]:
    """(ids, loss) of a conversation rendered with the tokenizer's chat template; loss 1 on the tokens of
    assistant turns at index >= loss_from (content and end-of-turn token), 0 elsewhere."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(where, ["chat records (messages) need a tokenizer with a chat template; this model's "
                                  "tokenizer has none: use an instruct model, or give prompt/completion records"])
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < loss_from:
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[:i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ConfigError(where, ["the tokenizer's chat template renders a conversation differently from its "
                                      "beginning (e.g. it rewrites earlier turns), so the assistant turns cannot be "
                                      "located; give prompt/completion records instead"])
        end = len(upto.rstrip())
        spans.append((len(before), end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    loss = [int(any(a <= s < b for a, b in spans)) for s, _ in offsets]
    return list(ids), loss


# ---------------------------------------------------------------- every kind, batched for Dataset.map

def _source_of(batch: dict, i: int, kind: str, partition_by: str) -> str:
    v = batch.get(partition_by, [None] * (i + 1))[i] if partition_by in batch else None
    if v is not None and str(v) != "":
        return str(v)
    if kind == "e2e":
        mr = batch["mr"][i] if "mr" in batch else batch["meaning_representation"][i]
        m = re.search(r"name\[([^\]]*)\]", str(mr or ""))
        return m.group(1) if m else "e2e"
    return "data"


def _encoder(kind: str, tokenizer, partition_by: str, where: str):
    eos = tokenizer.eos_token_id

    def encode(batch: dict, indices: list[int]) -> dict:
        n = len(indices)
        sources = [_source_of(batch, i, kind, partition_by) for i in range(n)]
        out_ids, out_loss = [], []
        if kind == "chat":
            for i in range(n):
                try:
                    msgs, start = chat_record({k: v[i] for k, v in batch.items()}, where)
                except ConfigError as e:
                    raise ConfigError(where, [f"record {indices[i] + 1}: {p}" for p in e.problems]) from None
                ids, loss = chat_tokens(tokenizer, msgs, start, where)
                out_ids.append(ids)
                out_loss.append(loss)
            return {"source": sources, "ids": out_ids, "loss": out_loss}
        if kind == "documents":
            prompts, completions = [""] * n, [_text(t) for t in batch["text"]]
        elif kind == "e2e":
            mrs = batch["mr"] if "mr" in batch else batch["meaning_representation"]
            refs = batch["ref"] if "ref" in batch else batch["human_reference"]
            prompts, completions = [_text(m).strip() + "\n" for m in mrs], [_text(r).strip() for r in refs]
        else:                   # per record: `text`, else `prompt` and `completion` (a file may mix them)
            prompts, completions = [], []
            for i in range(n):
                if batch.get("text", [None] * n)[i] is not None:
                    prompts.append("")
                    completions.append(str(batch["text"][i]))
                elif all(batch.get(k, [None] * n)[i] is not None for k in ("prompt", "completion")):
                    prompts.append(str(batch["prompt"][i]))
                    completions.append(str(batch["completion"][i]))
                else:
                    row = {k: batch[k][i] for k in ("text", "prompt", "completion") if k in batch}
                    raise ConfigError(where, [f"record {indices[i] + 1}: {record_problem(row, 'text')}"])
        if kind == "documents":
            p_ids = [[] for _ in prompts]
            c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        else:
            p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        for p, c in zip(p_ids, c_ids):
            out_ids.append(list(p) + list(c) + [eos])
            out_loss.append([0] * len(p) + [1] * (len(c) + 1))
        return {"source": sources, "ids": out_ids, "loss": out_loss}
    return encode


def _text(v) -> str:
    return "" if v is None else str(v)


def cache_key(kind: str, tokenizer, partition_by: str, data_key) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, kind, partition_by, tokenizer_fingerprint(tokenizer), data_key],
                                  default=str).encode())
    return h.hexdigest()[:32]


def encode_dataset(ds, kind: str, tokenizer, partition_by: str, cache_file: Path | None, where: str = "data"):
    """ds (raw records) -> Dataset of (source, ids, loss), from `cache_file` when it exists."""
    import datasets
    datasets.disable_progress_bars()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(cache_file), "load_from_cache_file": True,
                  "new_fingerprint": cache_file.stem}
    else:
        kwargs = {"load_from_cache_file": False, "keep_in_memory": True,
                  "new_fingerprint": hashlib.sha256(repr((kind, partition_by)).encode()).hexdigest()[:16]}
    return ds.map(_encoder(kind, tokenizer, partition_by, where), batched=True, batch_size=256, with_indices=True,
                  remove_columns=ds.column_names, **kwargs)
