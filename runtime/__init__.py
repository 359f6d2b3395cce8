"""hsplit.runtime: executes plans (torch + transformers + peft).

model.py (load + split), lora.py (per-client adapters), aggregate.py (strategies), data.py,
train.py (the round loop), checkpoint.py, evaluate.py, export.py, demo.py; commands.py adds the
`run`, `eval`, `export` and `demo` commands to the CLI. See docs/runtime.md.
"""
