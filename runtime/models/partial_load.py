"""Load only one process's part of a causal LM: a client's embeddings + blocks, or the server's blocks + head.

    lm = load_part("path/to/model", blocks=range(0, 3), embeddings=True, head=False)   # client, split 3
    lm = load_part("path/to/model", blocks=range(1, 30), embeddings=False, head=True)  # server, min split 1

Used by the distributed runtime (runtime/distributed/): a client process must not hold the whole
model. The skeleton is built from config.json with parameters on the meta device (no memory); the
tensors the process owns are then read one by one from the safetensors file(s) with
`safetensors.safe_open` (lazy: only the requested tensors are read). Every other parameter becomes a
*placeholder*: a zero-strided view of one scalar (`torch.zeros(()).expand(shape)`, 4 bytes) with the
right shape, dtype and device, so that peft can still put LoRA layers on every planned module (the
adapters of other parts are tiny and keep the Simulation's bookkeeping identical) but no memory is
spent on weights the process never runs. `is_placeholder(t)` tells them apart; running a placeholder
block would compute with zeros, which the split forward never does (a client runs [0, s), the server
[min s, L)). Tied embeddings: the server reads the embedding tensor once as its LM head.
"""
from __future__ import annotations

import json
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn

from hsplit.planner.errors import ConfigError
from hsplit.planner.model import ModelProfile
from hsplit.runtime.models.causal_lm import LoadedLM, locate_model


def is_placeholder(t: torch.Tensor) -> bool:
    """A weight this process does not hold (zero strides over a one-element storage)."""
    return t.numel() > 1 and t.untyped_storage().nbytes() <= t.element_size()


def placeholder(shape, dtype, device="cpu") -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file (single file or sharded with model.safetensors.index.json)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ConfigError(str(folder), ["partial loading needs model.safetensors (or a sharded index); "
                                        "re-save the model with save_pretrained(safe_serialization=True)"])
    from safetensors import safe_open
    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def owned_prefixes(profile: ModelProfile, blocks, embeddings: bool, head: bool) -> list[str]:
    fam = profile.family
    out = [f"{fam.blocks}.{i}." for i in blocks]
    if embeddings:
        out += [p + "." for p in fam.embeddings]
    if head:
        out += [fam.final_norm + ".", fam.lm_head + "."]
    return out


def load_part(ref: str, blocks, embeddings: bool, head: bool, progress: bool = False,
              device: str | torch.device = "cpu") -> LoadedLM:
    """The model with only `blocks` (+ embeddings / final norm + head) loaded; the rest placeholders."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = locate_model(ref, progress)
    path = src.path
    folder = Path(path)                     # always a local folder (a hub id: its cached snapshot)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):         # parameters on meta, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    profile = ModelProfile.from_config(config.to_dict(), name=ref, source=path)
    prefixes = owned_prefixes(profile, blocks, embeddings, head)
    files = _tensor_files(folder)
    fam = profile.family
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_name = fam.lm_head + ".weight"
    embed_name = fam.embeddings[0] + ".weight"

    from safetensors import safe_open
    handles: dict[Path, object] = {}

    def read(name: str) -> torch.Tensor:
        key = name
        if key not in files and tied and name == head_name:
            key = embed_name                                  # tied head: the embedding tensor
        if key not in files:
            raise ConfigError(path, [f"tensor {name} is not in the model's safetensors file(s)"])
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(str(f), "pt", device="cpu")
        return handles[f].get_tensor(key).to(device=device, dtype=torch.float32)

    seen: dict[int, nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        mod_name, _, attr = name.rpartition(".")
        module = attrgetter(mod_name)(model) if mod_name else model
        if id(param) in seen:                                 # tied: the same Parameter object
            module._parameters[attr] = seen[id(param)]
            continue
        own = any(name.startswith(p) for p in prefixes)
        if tied and name in (head_name, embed_name):
            own = (embeddings and name == embed_name) or (head and name in (head_name, embed_name)) or own
        data = read(name) if own else placeholder(param.shape, torch.float32, device)
        new = nn.Parameter(data, requires_grad=False)
        module._parameters[attr] = new
        seen[id(param)] = new
    handles.clear()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedLM(model=model, tokenizer=tokenizer, profile=profile, path=path, hub_id=src.hub_id,
                    origin=src.origin)


def held_bytes(model: nn.Module) -> int:
    """Bytes of real (non-placeholder) parameter storage, each storage counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        s = p.untyped_storage()
        if s.data_ptr() in seen or is_placeholder(p):
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total
