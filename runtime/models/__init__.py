"""runtime/models/: The model: loading (shipped names, folders, hub ids), the split causal LM, LoRA adapters, tiny test models."""
