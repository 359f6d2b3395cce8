"""hsplit.runtime: executes plans (torch + transformers + peft). The layout, one line per file, and a
glossary are in docs/runtime.md: loop.py (the round loop) over step.py (the split step),
simulation.py (what a process holds), strategies/ (one class per strategy), distributed/ (the same
loop as processes). The CLI (cli.py) calls these library functions.
"""
