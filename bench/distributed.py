"""Distributed (server + clients as processes on loopback) vs the in-process simulation, on this machine.

    .venv/bin/python bench/distributed.py [--steps 4] [--seq-len 64] [--model smollm2-135m] [--device cpu]
    # -> bench/results/distributed.json (summarised in docs/benchmarks.md "Distributed vs in-process")

Measures, for one hand-written 2-client plan (splits 2 and 4, q_proj/v_proj rank 8, server rank 8):
- per-step and per-round training time, distributed vs in-process (ratio), threads=1 per process;
- bytes per training step on the wire (ACT + GRAD + clipping messages, headers included, counted by
  runtime/distributed/link.py Link) vs the planner's prediction 2 * cut_bytes = 2 * b*T*h*act_bytes
  (planner/evaluate.py traffic_bytes);
- peak RSS of a process that loads a client's part (embeddings + 2 blocks) vs one that loads the
  whole model (each in a fresh subprocess, after importing torch + transformers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_MEM = r"""
import sys, torch, transformers
from hsplit.runtime.models.partial_load import load_part, held_bytes
from hsplit.runtime.models.causal_lm import load_lm
def hwm():   # peak RSS of this process image in KiB (VmHWM resets on exec, unlike ru_maxrss)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
if sys.argv[1] == "whole":
    m = load_lm(sys.argv[2], progress=False).model
else:
    m = load_part(sys.argv[2], range(0, int(sys.argv[3])), embeddings=True, head=False).model
with torch.no_grad():      # touch every weight, as the first forward would (from_pretrained mmaps the file)
    for p in m.parameters():
        p.sum()
print(base, hwm(), held_bytes(m))
"""


def peak_rss(kind: str, model: str, split: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEM, kind, model, str(split)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.split()
    base, peak, held = (int(x) for x in out[-3:])
    return {"rss_after_imports_mib": base / 1024, "peak_rss_mib": peak / 1024,
            "added_by_model_mib": (peak - base) / 1024, "held_weights_mib": held / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (every process on this device; messages via gloo)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)
    from hsplit.planner.plan import Plan
    from hsplit.runtime.distributed.launcher import launch_local
    from hsplit.runtime.train.options import DistOptions
    from hsplit.runtime.models.causal_lm import resolve_model_path
    from hsplit.runtime.train.loop import run
    from hsplit.runtime.train.options import RunOptions
    from transformers import AutoConfig

    work = ROOT / "bench" / "results" / "distributed-work"
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model = resolve_model_path(a.model, progress=False)
    hidden = AutoConfig.from_pretrained(model).hidden_size
    corpus = work / "corpus"
    corpus.mkdir()
    lines = ["To be, or not to be, that is the question.", "The Eagle is a coffee shop near the river.",
             "Now is the winter of our discontent.", "Whether 'tis nobler in the mind to suffer."]
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        (corpus / f"{name}.txt").write_text(" ".join(lines[(i + j) % 4] for j in range(400)))
    plan = Plan.from_dict({
        "model": model, "strategy": "hsplitlora", "server_rank": 8, "modules": ["q_proj", "v_proj"],
        "training": {"batch_size": a.batch, "seq_len": a.seq_len, "local_steps": a.steps, "rounds": 1,
                     "dtype": "fp32", "learning_rate": 1e-3, "seed": 0},
        "data": {"path": str(corpus), "partition": "by-source", "eval_fraction": 0.1},
        "clients": [{"id": "a", "device": "d", "split_layer": 2, "ranks": {"q_proj": 8, "v_proj": 8}},
                    {"id": "b", "device": "d", "split_layer": 4, "ranks": {"q_proj": 8, "v_proj": 8}}]},
        "bench.yaml")
    path = work / "bench.yaml"
    plan.save(path)
    opts = RunOptions(runs_dir=work / "runs", progress=False, threads=1, eval_max_seqs=4, device=a.device)

    t0 = time.perf_counter()
    ref = run(path, RunOptions(**{**opts.__dict__, "name": "inproc"}))
    inproc_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    code = launch_local(path, RunOptions(**{**opts.__dict__, "name": "dist"}), DistOptions(timeout_s=600),
                        env=dict(os.environ, OMP_NUM_THREADS="1"), logs=work, deadline_s=1800)
    dist_total = time.perf_counter() - t0
    assert code == 0, (work / "rank0.log").read_text()
    import csv
    with open(work / "runs" / "dist" / "metrics.csv") as f:
        drows = [r for r in csv.DictReader(f) if r["round"] == "1" and r["client"] != "all"]
    irows = [r for r in ref.rows if r["round"] == 1 and r["client"] != "all"]
    steps = a.steps * len(irows)
    in_round = sum(float(r["wall_s"]) for r in irows)           # clients one after the other
    d_round = max(float(r["wall_s"]) for r in drows)            # clients served concurrently
    traffic = json.loads((work / "runs" / "dist" / "traffic.json").read_text())
    predicted = 2 * a.batch * a.seq_len * hidden * 4           # 2 * cut_bytes (fp32 activations)
    measured = traffic["step_bytes"] / traffic["training_steps"]
    res = {
        "model": a.model, "plan": "2 clients, splits 2 and 4, q/v rank 8, server rank 8",
        "batch": a.batch, "seq_len": a.seq_len, "local_steps": a.steps, "threads_per_process": 1,
        "cpu_cores": os.cpu_count(), "load_average": os.getloadavg()[0],
        "in_process": {"round_train_s": in_round, "per_step_s": in_round / steps, "total_s": inproc_total},
        "distributed": {"round_train_s": d_round,
                        "per_client_step_s": {r["client"]: float(r["wall_s"]) / a.steps for r in drows},
                        "total_s_incl_startup": dist_total},
        "ratio_round_train_time_dist_over_inproc": d_round / in_round,
        "ratio_per_step_dist_over_inproc": (sum(float(r["wall_s"]) for r in drows) / steps) / (in_round / steps),
        "bytes_per_step": {"measured": measured, "predicted_2x_cut_bytes": predicted, "ratio": measured / predicted,
                           "by_message": traffic["bytes_by_message"]},
        "memory": {"client_split2": peak_rss("client", model, 2), "whole_model": peak_rss("whole", model)},
    }
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
