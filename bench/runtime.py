"""Runtime benchmark: split step vs plain PEFT step, peak memory vs simulated clients, aggregation time.

    .venv/bin/python bench/runtime.py                   # default model (SmolLM2-135M), ~5-10 min on 2 cores
    .venv/bin/python bench/runtime.py --model tiny      # seconds; smoke test of the script

1. Throughput: tokens/s of one hsplit client+server step (split at --split, rank --rank on every
   module, client and server side) vs one plain single-process peft LoRA step of the same model,
   ranks, batch and data, in the same process, steps interleaved (A B A B ...) so machine noise hits
   both alike; medians over --steps. Target ratio >= 0.95.
2. Peak memory (ru_maxrss of a fresh subprocess) of build + one round (1 local step per client) +
   hsplitlora aggregation, for 1, 2, 5, 10 simulated clients. Target: 10 clients <= 1.3x one client.
3. Aggregation time (exact merge incl. merging into the base; FedAvg) for 10 clients.
Writes bench/results/runtime.json and replaces the "## Runtime" section of docs/benchmarks.md.

    .venv/bin/python bench/runtime.py --sampling        # client sampling memory only (~2 min on 2 cores)

4. Client sampling (--sampling): peak memory (fresh subprocess, VmHWM reset after loading) of
   `hsplit run` rounds (hsplitlora warm, 1 local step) of a 1,000-client plan with 10 clients per
   round vs a 10-client plan without sampling. Target <= 1.5x. Writes bench/results/sampling.json and
   the "## Client sampling memory" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Runtime (bench/runtime.py)"
AGGREGATIONS = ("warm", "bounded", "restart")     # hsplitlora's, timed side by side
SAMPLING_HEADING = "## Client sampling memory (bench/runtime.py --sampling)"


def _plan(model: str, clients: int, split: int, rank: int, batch: int, seq: int, strategy="hsplitlora",
          aggregation: str = "warm"):
    from hsplit.planner.plan import Plan
    return Plan.from_dict({
        "model": model, "strategy": strategy, "server_rank": rank, "aggregation": aggregation,
        "training": {"batch_size": batch, "seq_len": seq, "local_steps": 1, "rounds": 1, "dtype": "fp32",
                     "learning_rate": 1e-4, "max_grad_norm": 1.0},
        "data": {"path": "shakespeare", "partition": "iid"},
        "clients": [{"id": f"c{i}", "device": "bench", "split_layer": split, "ranks": {"all_modules": rank}}
                    for i in range(clients)]}, "<bench>")


def _model_ref(args) -> str:
    if args.model != "tiny":
        return args.model
    from hsplit.runtime.models.tiny import save_tiny_model
    path = Path(tempfile.gettempdir()) / "hsplit-bench-tiny"
    if not (path / "config.json").is_file():
        save_tiny_model(path, "llama", layers=8, hidden=64)
    return str(path)


def _expand_all(plan, profile):
    """'all_modules: r' shorthand for the bench: rank r on every module of the client's blocks."""
    for c in plan.clients:
        r = c.ranks.pop("all_modules")
        c.ranks.update({m: r for m in profile.family.modules})
    return plan


def throughput(args) -> dict:
    import torch
    from peft import get_peft_model

    from hsplit.runtime.models.lora import lora_config
    from hsplit.runtime.models.causal_lm import lm_loss, load_lm
    from hsplit.runtime.train.simulation import build
    from hsplit.runtime.train.step import LocalServer, ServerSide, client_step

    model = _model_ref(args)
    lm0 = load_lm(model, progress=False)
    split = args.split or lm0.profile.layers // 2
    steps = {}            # hsplit's split step, with hsplitlora's warm / bounded (base offset adapter) and restart
    for agg in AGGREGATIONS:
        plan = _expand_all(_plan(model, 1, split, args.rank, args.batch, args.seq, aggregation=agg), lm0.profile)
        sim = build(plan, progress=False, device="cpu")
        party = sim.parties[0]
        side = ServerSide(sim)
        side.begin_round([party])
        sim.lm.model.train()
        steps[agg] = (sim, party, LocalServer(side))
    # plain peft: the same model (a second copy), the same ranks, one AdamW, the unsplit forward
    ranks = dict(party.ranks)
    plain = get_peft_model(lm0.model, lora_config(ranks, 2.0, 0.0, lm0.profile.family))
    plain.train()
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def plain_step(b):
        loss, _ = lm_loss(plain(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {**{agg: [] for agg in AGGREGATIONS}, "peft": []}
    for s in range(args.steps + 1):                       # step 0 is warm-up
        b = party.data.batch(args.batch, 0, 0, 0, s)
        n = len(times)
        order = list(times)[s % n:] + list(times)[:s % n]     # rotate, so that machine noise hits all alike
        for which in order:
            t = time.perf_counter()
            if which == "peft":
                plain_step(b)
            else:
                sim, p, server = steps[which]
                sim.bank.activate(p.adapter, sim.strategy.offset(p))
                client_step(sim, p, b, 0, s, server)
            if s > 0:
                times[which].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": args.model, "split": split, "rank": args.rank, "batch": args.batch, "seq_len": args.seq,
            "adapted_modules": len(ranks), "steps": args.steps,
            "hsplit_step_s": med["warm"], "hsplit_restart_step_s": med["restart"], "peft_step_s": med["peft"],
            "hsplit_tokens_per_s": tokens / med["warm"], "hsplit_restart_tokens_per_s": tokens / med["restart"],
            "peft_tokens_per_s": tokens / med["peft"],
            "ratio": med["peft"] / med["warm"], "ratio_restart": med["peft"] / med["restart"],
            "hsplit_bounded_step_s": med["bounded"], "hsplit_bounded_tokens_per_s": tokens / med["bounded"],
            "ratio_bounded": med["peft"] / med["bounded"],
            "bounded_offset_rank": max(steps["bounded"][0].bank.ranks[steps["bounded"][0].strategy.offset(
                steps["bounded"][1])].values())}


def memory_child(args) -> dict:
    """One subprocess: build K clients, one round, exact aggregation; peak RSS."""
    from hsplit.runtime.train.loop import InProcess, Silent
    from hsplit.runtime.models.causal_lm import load_lm
    from hsplit.runtime.train.simulation import build
    from hsplit.runtime.strategies.splitlora import SplitLoRA

    model = _model_ref(args)
    profile = load_lm(model, progress=False).profile if args.model == "tiny" else None
    if profile is None:
        from hsplit.planner.model import load_model_profile
        profile = load_model_profile(model)
    split = args.split or profile.layers // 2
    plan = _expand_all(_plan(model, args.clients, split, args.rank, args.batch, args.seq,
                             aggregation=args.aggregation), profile)
    t0 = time.perf_counter()
    sim = build(plan, progress=False, device="cpu")
    t1 = time.perf_counter()
    _reset_peak()                          # measure the training phase separately from loading
    ex = InProcess(sim, None)
    rows = ex.train_round(0, Silent())
    t2 = time.perf_counter()
    fed = time.perf_counter()
    SplitLoRA().aggregate(sim.strategy.collect(sim.parties))
    fed = time.perf_counter() - fed
    t3 = time.perf_counter()
    update, _ = ex.aggregate(0, rows)
    t4 = time.perf_counter()
    ckpt = sum(v.numel() * v.element_size() for f in sim.tensors(update).values() for v in f.values())
    return {"clients": args.clients, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "train_peak_rss_gib": _vm_hwm_gib(),
            "build_s": t1 - t0, "round_s": t2 - t1, "exact_aggregate_s": t4 - t3, "fedavg_s": fed,
            "checkpoint_mb": ckpt / 1e6,
            "adapter_params_per_client": sum(a.numel() + b.numel() for a, b in sim.bank.factors("k0").values())}


def sampling_child(args) -> dict:
    """One subprocess: a K-client plan (10 per round when K > 10) run for --rounds rounds through the
    round loop of `hsplit run` (run folder, client store, checkpoints); peak RSS after loading."""
    from hsplit.planner.model import load_model_profile
    from hsplit.planner.sampling import Sampling
    from hsplit.runtime.train.loop import InProcess, rounds_loop
    from hsplit.runtime.train.options import RunOptions
    from hsplit.runtime.outputs.rundir import prepare_run_dir
    from hsplit.runtime.train.simulation import build

    model = _model_ref(args)
    profile = load_model_profile(model) if args.model != "tiny" else None
    layers = profile.layers if profile else 8
    split = args.split or layers // 2
    plan = _expand_all(_plan(model, args.clients, split, args.rank, args.batch, args.seq), profile or _tiny_profile())
    plan.training.rounds = args.rounds
    if args.clients > args.per_round:
        plan.sampling = Sampling(clients_per_round=args.per_round)
    with tempfile.TemporaryDirectory(prefix="hsplit-bench-sampling-") as tmp:
        path = Path(tmp) / "plan.yaml"
        plan.save(path)
        opts = RunOptions(runs_dir=Path(tmp) / "runs", name="bench", progress=False, eval_max_seqs=4)
        run_dir, done, rounds = prepare_run_dir(plan, path, opts)
        t0 = time.perf_counter()
        sim = build(plan, progress=False, device="cpu")
        load_peak = _vm_hwm_gib()
        t1 = time.perf_counter()
        _reset_peak()
        rounds_loop(InProcess(sim, 4), plan, path, opts, run_dir, done, rounds, [None])
        t2 = time.perf_counter()
        store_mb = sum(f.stat().st_size for f in (run_dir / "clients").rglob("*") if f.is_file()) / 1e6 \
            if (run_dir / "clients").is_dir() else 0.0
    return {"clients": args.clients, "per_round": min(args.clients, args.per_round), "rounds": args.rounds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "load_peak_rss_gib": load_peak, "train_peak_rss_gib": _vm_hwm_gib(), "build_s": t1 - t0,
            "rounds_s": t2 - t1, "store_mb": store_mb}


def _tiny_profile():
    from hsplit.runtime.models.causal_lm import load_lm
    return load_lm(_model_ref(argparse.Namespace(model="tiny")), progress=False).profile


def _child(cmd: list[str], what: str) -> dict:
    """Run a measuring child process (a fresh process: its peak RSS is its own) and return the JSON of its
    last stdout line."""
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        raise SystemExit(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def sampling_memory(args) -> dict:
    out = []
    for k in (10, args.fleet):
        cmd = [sys.executable, __file__, "--child-sampling", "--clients", str(k), "--per-round", "10",
               "--rounds", str(args.rounds), "--model", args.model, "--rank", str(args.rank), "--batch",
               str(args.batch), "--seq", str(args.seq), "--split", str(args.split or 0), "--threads", str(args.threads)]
        out.append(_child(cmd, f"sampling child for {k} clients"))
        print(f"  {k} clients ({out[-1]['per_round']} per round): peak {out[-1]['peak_rss_gib']:.2f} GiB, "
              f"training-phase peak {out[-1]['train_peak_rss_gib']:.2f} GiB", file=sys.stderr)
    base, big = out
    return {"runs": out, "peak_ratio": big["peak_rss_gib"] / base["peak_rss_gib"],
            "train_peak_ratio": big["train_peak_rss_gib"] / base["train_peak_rss_gib"],
            "model": args.model, "rank": args.rank, "batch": args.batch, "seq": args.seq,
            "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores"}


def write_sampling_section(res: dict, command: str) -> None:
    base, big = res["runs"]
    lines = [SAMPLING_HEADING, "",
             f"Command: `{command}`  ",
             f"Machine: {res['machine']}; {res['threads']} thread(s); date {res['date']}. Timings are noisy on a "
             "shared machine; memory is not.", "",
             f"`hsplit run`'s round loop (run folder, checkpoints, the client store) for {big['rounds']} rounds of "
             f"{res['model']} (hsplitlora warm, split at half the blocks, rank {res['rank']} on every module, "
             f"batch {res['batch']} x {res['seq']} tokens, 1 local step), in a fresh process each:", "",
             "| plan | clients per round | peak RSS (GiB) | training-phase peak (GiB) | rounds (s) | client store (MB) |",
             "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['clients']} clients | {r['per_round']} | {r['peak_rss_gib']:.2f} | "
                     f"{r['train_peak_rss_gib']:.2f} | {r['rounds_s']:.1f} | {r['store_mb']:.0f} |")
    lines += ["", f"**{big['clients']:,} clients with {big['per_round']} per round use {res['peak_ratio']:.2f}x the "
              f"peak memory of a {base['clients']}-client plan** (training phase: {res['train_peak_ratio']:.2f}x; "
              "target <= 1.5x). Only the round's sampled clients' adapters and AdamW moments are in memory; "
              "the others' wait in runs/<name>/clients/ (written when a client finishes a round).", ""]
    write_docs_section(SAMPLING_HEADING, lines)


def write_docs_section(heading: str, lines: list[str]) -> None:
    """Replace the section of docs/benchmarks.md that starts at `heading` (up to the next `## `) with `lines`,
    or append it when the file has none."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + "\n".join(lines) + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _vm_hwm_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def memory(args, aggregation: str = "warm") -> list[dict]:
    out = []
    for k in args.clients_list:
        cmd = [sys.executable, __file__, "--child-memory", "--clients", str(k), "--model", args.model,
               "--rank", str(args.rank), "--batch", str(args.batch), "--seq", str(args.seq),
               "--split", str(args.split or 0), "--threads", str(args.threads), "--aggregation", aggregation]
        out.append(_child(cmd, f"memory child for {k} clients"))
        print(f"  {k} clients: peak {out[-1]['peak_rss_gib']:.2f} GiB, training-phase peak "
              f"{out[-1]['train_peak_rss_gib']:.2f} GiB", file=sys.stderr)
    for key in ("peak_rss_gib", "train_peak_rss_gib"):
        base = out[0][key]
        for r in out:
            r[key.replace("_rss_gib", "") + "_ratio_vs_1"] = r[key] / base if base else None
    return out


def write_section(result: dict, command: str) -> None:
    t = result["throughput"]
    lines = [HEADING, "",
             f"Command: `{command}`  ",
             f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} thread(s); "
             f"date {result['date']}. Timings are noisy on a shared machine.", "",
             "**Split step vs plain PEFT step** (same process, same model, ranks, batch and data; "
             "steps interleaved; medians):", "",
             "| model | split | rank (all modules) | batch x seq | hsplit tokens/s (warm / bounded / restart) "
             "| peft tokens/s | ratio warm / bounded / restart (target >= 0.95) |",
             "|---|---|---|---|---|---|---|",
             f"| {t['model']} | {t['split']} | {t['rank']} ({t['adapted_modules']} modules) | {t['batch']} x {t['seq_len']} "
             f"| {t['hsplit_tokens_per_s']:.1f} / {t['hsplit_bounded_tokens_per_s']:.1f} / "
             f"{t['hsplit_restart_tokens_per_s']:.1f} | {t['peft_tokens_per_s']:.1f} "
             f"| {t['ratio']:.3f} / {t['ratio_bounded']:.3f} / {t['ratio_restart']:.3f} |", "",
             "warm: hsplitlora's warm aggregation, whose holders train with their frozen base offset adapter "
             "(one more rank-r LoRA path per matrix, no gradient); bounded: the same offset with the owed part "
             f"(rank r + owed_rank = {t['bounded_offset_rank']} per matrix, default owed_rank 4 x the largest "
             "allowed rank); restart: the aggregation every strategy but hsplitlora warm/bounded runs (the split "
             "step alone).", "",
             "**Peak memory vs simulated clients** (fresh process: build + one round of 1 local step per "
             "client + hsplitlora aggregation; one copy of the base weights). warm keeps every "
             "holder's factors, AdamW moments and frozen base offset (4x its adapter's fp32 bytes) between "
             "rounds; bounded (what `hsplit plan` writes) keeps in addition each client's owed part (rank "
             "owed_rank factors on every matrix of its blocks); restart drops the moments and re-initialises:", "",
             "| aggregation | clients | peak RSS (GiB) | vs 1 client (target 10 <= 1.3x) | training-phase peak (GiB) "
             "| vs 1 client | round (s) | exact aggregation (s) | FedAvg (s) | checkpoint per round (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    mem = result["memory"]
    for label, rows in (("warm", result["memory"]), ("bounded", result.get("memory_bounded", [])),
                        ("restart", result.get("memory_restart", []))):
        for m in rows:
            lines.append(f"| {label} | {m['clients']} | {m['peak_rss_gib']:.2f} | {m['peak_ratio_vs_1']:.2f}x "
                         f"| {m['train_peak_rss_gib']:.2f} | {m['train_peak_ratio_vs_1']:.2f}x | {m['round_s']:.1f} "
                         f"| {m['exact_aggregate_s']:.3f} | {m['fedavg_s']:.3f} | {m.get('checkpoint_mb', 0):.1f} |")
    lines += ["", "Peak RSS is the whole process (dominated by loading the model and data); the "
              "training-phase peak resets the kernel's high-water mark (VmHWM) after loading and covers "
              "the round and the aggregation, where per-client state lives.",
              "", f"Adapter parameters per client: {mem[0]['adapter_params_per_client']:,}. Exact aggregation "
              "= stacking the factors, forming sum_k p_k B_k A_k per module and adding it to the base weight.", ""]
    write_docs_section(HEADING, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) | tiny | HF folder")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--split", type=int, default=0, help="split layer (default: half the blocks)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients-list", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 5, 10])
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--aggregation", default="warm", help=argparse.SUPPRESS)
    ap.add_argument("--sampling", action="store_true", help="only the client sampling memory case (4.)")
    ap.add_argument("--fleet", type=int, default=1000, help="--sampling: clients of the sampled plan")
    ap.add_argument("--rounds", type=int, default=2, help="--sampling: rounds")
    ap.add_argument("--child-sampling", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--per-round", type=int, default=10, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    if args.child_memory:
        print(json.dumps(memory_child(args)))
        return
    if args.child_sampling:
        print(json.dumps(sampling_child(args)))
        return
    if args.sampling:
        res = sampling_memory(args)
        out = ROOT / "bench" / "results" / "sampling.json"
        out.write_text(json.dumps(res, indent=1))
        if not args.no_docs:
            write_sampling_section(res, ("python bench/runtime.py " + " ".join(sys.argv[1:])).strip())
        print(json.dumps(res, indent=1))
        return
    print("throughput ...", file=sys.stderr)
    thr = throughput(args)
    print(f"  hsplit warm {thr['hsplit_tokens_per_s']:.1f} tok/s, restart {thr['hsplit_restart_tokens_per_s']:.1f} "
          f"tok/s, peft {thr['peft_tokens_per_s']:.1f} tok/s, ratio {thr['ratio']:.3f} / {thr['ratio_restart']:.3f}",
          file=sys.stderr)
    print("memory ...", file=sys.stderr)
    mem = memory(args, "warm")
    print("memory (aggregation: restart) ...", file=sys.stderr)
    mem_restart = memory(args, "restart")
    print("memory (aggregation: bounded) ...", file=sys.stderr)
    mem_bounded = memory(args, "bounded")
    result = {"throughput": thr, "memory": mem, "memory_restart": mem_restart, "memory_bounded": mem_bounded, "torch": torch.__version__, "threads": args.threads,
              "machine": f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
              "date": time.strftime("%Y-%m-%d")}
    out = ROOT / "bench" / "results" / "runtime.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    command = "python bench/runtime.py " + " ".join(sys.argv[1:])
    if not args.no_docs:
        write_section(result, command.strip())
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
