"""Model profiles: the architecture facts of a decoder-only LM, read from a Hugging Face config.json.

No weights are needed to plan. A profile knows its family (how modules are named), the shape
(d_in, d_out) of every adaptable weight matrix, and parameter counts; cost formulas live in
hsplit.planner.cost. Shipped configs (facts only) live in profiles/models/<name>.json and are
selectable by name (`--model llama-2-7b`); each names the Hugging Face hub id the runtime loads
(`hub_id`, e.g. meta-llama/Llama-2-7b-hf). Any folder with a config.json, a config.json path, or a
hub id whose config.json is in the local Hugging Face cache works too. The runtime uses the same
`Family` descriptions to find blocks and modules.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsplit.planner.device import PROFILE_DIR
from hsplit.planner.errors import ConfigError, Problems
from hsplit.planner.yamlio import cut, is_dir, is_file, sha256_text, short, whole


@dataclass(frozen=True)
class Family:
    """How one architecture family names its parts (paths are attribute paths in the HF model)."""
    name: str
    blocks: str                 # the ModuleList of transformer blocks
    embeddings: tuple[str, ...]  # modules the client runs before block 0
    final_norm: str             # run by the server after the last block
    lm_head: str
    modules: tuple[str, ...]     # adaptable linear layers inside a block, as suffixes
    default_modules: tuple[str, ...]


LLAMA = Family(
    name="llama", blocks="model.layers", embeddings=("model.embed_tokens",), final_norm="model.norm",
    lm_head="lm_head",
    modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    default_modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
GPT2 = Family(
    name="gpt2", blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f", lm_head="lm_head",
    modules=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    default_modules=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
FAMILY_OF_MODEL_TYPE = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt2": GPT2}

SHIPPED_MODELS = ("smollm2-135m", "gpt2", "gpt2-medium", "gpt2-large", "llama-2-7b", "llama-3-8b",
                  "qwen2.5-0.5b", "qwen2.5-7b")
# owner/name as the hub spells repositories (no leading dot, no `..`, exactly one slash)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def shipped_hub_id(name: str) -> str | None:
    """The Hugging Face hub id a shipped model name loads (`qwen2.5-0.5b` -> Qwen/Qwen2.5-0.5B); None
    for anything else."""
    if name not in SHIPPED_MODELS:
        return None
    return json.loads((PROFILE_DIR / "models" / f"{name}.json").read_text())["hub_id"]


def is_hub_id(ref: str) -> bool:
    return bool(HUB_ID.match(ref)) and ".." not in ref


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it: $HF_HUB_CACHE, $HF_HOME/hub,
    $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                               / "huggingface")
    return Path(home).expanduser() / "hub"


def cached_hub_config(hub_id: str, cache: Path | None = None) -> Path | None:
    """config.json of `hub_id` in the local hub cache (the `main` snapshot), or None."""
    repo = (cache or hub_cache()) / ("models--" + hub_id.replace("/", "--"))
    try:
        sha = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    config = repo / "snapshots" / sha / "config.json"
    return config if is_file(config) else None


@dataclass(frozen=True)
class ModelProfile:
    name: str
    family: Family
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_positions: int
    qkv_bias: bool = False
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every adaptable matrix of one block, keyed by module suffix."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        if self.family is GPT2:
            return {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, i), "mlp.c_proj": (i, h)}
        return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i),
                "mlp.down_proj": (i, h)}

    def block_matmul_params(self) -> int:
        return sum(a * b for a, b in self.module_shapes().values())

    def block_params(self) -> int:
        """Matmul weights + biases + norm parameters of one block."""
        h, i = self.hidden, self.intermediate
        if self.family is GPT2:
            return self.block_matmul_params() + (3 * h + h + i + h) + 2 * 2 * h
        bias = (h + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.block_matmul_params() + bias + 2 * h

    def embedding_params(self) -> int:
        """Parameters the client holds besides its blocks (token and position embeddings)."""
        pos = self.max_positions * self.hidden if self.family is GPT2 else 0
        return self.vocab * self.hidden + pos

    def head_params(self) -> int:
        """Final norm + LM head held by the server (the head matrix is a copy when tied)."""
        norm = 2 * self.hidden if self.family is GPT2 else self.hidden
        return norm + self.vocab * self.hidden

    def total_params(self) -> int:
        head = self.head_params() - (self.vocab * self.hidden if self.tied_embeddings else 0)
        return self.embedding_params() + self.layers * self.block_params() + head

    def module_name(self, block: int, suffix: str) -> str:
        return f"{self.family.blocks}.{block}.{suffix}"

    def resolve_modules(self, names: list[str] | tuple[str, ...] | None, source: str = "--modules") -> tuple[str, ...]:
        """Map user module names (`q_proj`, `self_attn.q_proj`, `all`) onto this family's suffixes."""
        if not names or list(names) == ["all"]:
            return self.family.default_modules
        out, bad = [], []
        for n in names:
            hits = [m for m in self.family.modules if m == n or m.endswith("." + n)]
            if len(hits) != 1:
                bad.append(n)
            elif hits[0] not in out:
                out.append(hits[0])
        if bad:
            raise ConfigError(source, [
                f"module {b!r} " + ("is ambiguous" if any(m.endswith('.' + b) for m in self.family.modules)
                                    else "does not exist") + f" in {self.name} ({self.family.name} family); "
                f"use one of {', '.join(self.family.modules)}" for b in bad])
        return tuple(m for m in self.family.modules if m in out)

    def arch_hash(self) -> str:
        """Hash of the architecture facts the planner uses (stable across config.json formatting)."""
        facts = [self.family.name, self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate,
                 self.vocab, self.tied_embeddings, self.qkv_bias]
        return sha256_text(json.dumps(facts))

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str, source: str) -> "ModelProfile":
        p = Problems(source)
        mtype = config.get("model_type")
        family = FAMILY_OF_MODEL_TYPE.get(mtype) if isinstance(mtype, str) else None
        if family is None:
            p.add("model_type", f"{short(mtype)} is not supported; supported: {', '.join(FAMILY_OF_MODEL_TYPE)}")
            p.raise_if_any()

        def get(*keys, default=None):
            for k in keys:
                if config.get(k) is not None:
                    return whole(config[k], k, p, minimum=1, maximum=2 ** 31 - 1)
            if default is None:
                p.add(keys[0], "missing from config.json")
            return default

        hidden = get("hidden_size", "n_embd")
        layers = get("num_hidden_layers", "n_layer")
        heads = get("num_attention_heads", "n_head")
        p.raise_if_any()
        kv = get("num_key_value_heads", default=heads)
        inter = get("intermediate_size", "n_inner", default=4 * hidden)
        vocab = get("vocab_size")
        pos = get("max_position_embeddings", "n_positions", default=2048)
        tied = bool(config.get("tie_word_embeddings", family is GPT2))
        p.raise_if_any()
        if hidden % heads:
            p.add("hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}")
        p.raise_if_any()
        bias = bool(config.get("attention_bias", mtype == "qwen2"))
        return cls(name=name, family=family, hidden=int(hidden), layers=int(layers), heads=int(heads),
                   kv_heads=int(kv), intermediate=int(inter), vocab=int(vocab), tied_embeddings=tied,
                   max_positions=int(pos), qkv_bias=bias, source=source)


def load_model_profile(ref: str | Path, field: str = "--model", source: str | None = None) -> ModelProfile:
    """A model by shipped name (`llama-2-7b`), folder with config.json, or config.json path.
    `field` and `source` say where the reference was written (a plan's `model:` field names the plan)."""
    ref_s = str(ref)
    path = Path(ref_s)
    shipped = PROFILE_DIR / "models" / f"{ref_s}.json"
    if is_dir(path):
        path = path / "config.json"
    elif not is_file(path) and is_file(shipped):
        path = shipped
    elif not is_file(path) and is_hub_id(ref_s) and (cached := cached_hub_config(ref_s)):
        path = cached
    if not is_file(path):
        hub = (f"; {ref_s} is not in the local Hugging Face cache ({hub_cache()}): fetch it with "
               f"`hf download {ref_s}`" if is_hub_id(ref_s) else "")
        raise ConfigError(source or cut(ref_s), [
            f"{field}: {cut(ref_s) + ' is ' if source else ''}not a shipped model ({', '.join(SHIPPED_MODELS)}), "
            f"nor a folder with config.json, nor a config.json file, nor a cached hub id{hub}"])
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text: cannot decode byte {e.start}"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), [f"not valid JSON: {e}"]) from None
    if not isinstance(config, dict):
        raise ConfigError(str(path), ["not a model config: the top level must be a JSON object"])
    name = ref_s if path == shipped else str(ref)
    return ModelProfile.from_config(config, name=name, source=str(path))
