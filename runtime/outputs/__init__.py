"""runtime/outputs/: What a run leaves: its folder and metrics, logs, held-out evaluation, generation metrics, export, model card."""
