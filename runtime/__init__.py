"""hsplit.runtime: executes plans (torch + transformers + peft). Folders by concern, one line per file and a
glossary in docs/runtime.md: data/ (what is trained on), models/ (what is trained), train/ (the recipe:
train/loop.py, the round loop, over train/step.py, the split step), strategies/ (one class per strategy),
distributed/ and flower/ (the same loop as processes), measure/ and outputs/. The CLI (cli.py) calls these
library functions.
"""
