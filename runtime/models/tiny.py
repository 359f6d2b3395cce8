"""Tiny random models + a byte-level tokenizer, built offline, for tests and quick benchmarks.

    path = save_tiny_model(tmp_path / "tiny-llama", family="llama")   # or "gpt2", "qwen2", "mistral"
    # -> an HF folder (config.json, model.safetensors, tokenizer.json) that `hsplit run` can load
    save_tiny_model_in_hub_cache(tmp_path / "hf" / "hub", "Qwen/Qwen2.5-0.5B", family="qwen2")
    # -> the same, laid out as huggingface_hub caches a download of that hub id (for offline tests)

The tokenizer is a byte-level BPE trained on a few sentences (any text encodes, no unknown tokens),
so tests never touch the hub.
"""
from __future__ import annotations

from pathlib import Path

import torch

_CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside]",
    "The Eagle is a moderately priced coffee shop near the river serving French food.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
]


def tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str = "llama", vocab_size: int = 384, layers: int = 4, hidden: int = 32):
    import transformers as tf

    common = dict(vocab_size=vocab_size, eos_token_id=0, pad_token_id=1, bos_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_inner=2 * hidden, n_positions=256,
                             **common)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family]
    extra = {"tie_word_embeddings": family != "mistral"}
    if family == "mistral":
        extra["sliding_window"] = 16       # exercise the sliding-window mask path
    return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=2 * hidden, max_position_embeddings=256, **common, **extra)


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tok), **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_model_in_hub_cache(cache: str | Path, hub_id: str, family: str = "llama", **kw) -> Path:
    """A tiny model stored in a Hugging Face hub cache folder (models--ORG--NAME/{refs/main, snapshots/SHA/})
    as if `hf download hub_id` had fetched it, so that loading `hub_id` offline finds it. Returns the
    snapshot folder."""
    import hashlib
    repo = Path(cache) / ("models--" + hub_id.replace("/", "--"))
    sha = hashlib.sha1(hub_id.encode()).hexdigest()
    snapshot = save_tiny_model(repo / "snapshots" / sha, family, **kw)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot
