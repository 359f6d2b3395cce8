"""cliutil/: what the `hsplit` commands in cli.py share, by concern: console.py (consoles, exit codes,
fail), options.py (options several commands declare), checks.py (plan-time input checks),
render.py (tables and summaries), progress.py (bars with ETAs), flower.py (`hsplit flower ...`).
The runtime reports progress through callbacks and loop.Reporter; it never imports typer or rich."""
