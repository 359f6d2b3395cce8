"""The `hsplit` command line (Typer). Thin: parse, call a library function, render.

Every command is here; what they share (consoles, exit codes, options, rendering, progress bars) is in
cliutil/. The runtime (torch) is imported inside the commands that need it, so `hsplit --help` and
`hsplit plan` stay fast and torch-free. Exit codes: cliutil (OK, NO_SOLUTION, BAD_INPUT, ...).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from hsplit import __version__
from hsplit.cliutil.checks import check_fleet, check_plan_data, checked_data, device_profile_path, save_plan
from hsplit.cliutil.console import (INTERRUPTED, NO_SOLUTION, check_format, console, err, fail, input_errors,
                                    parse_ints, print_json, reported, say, set_threads)
from hsplit.cliutil.flower import flower_app  # hsplit flower ...: real device fleets
from hsplit.cliutil.options import (CLIENTS_PER_ROUND, FORMAT, FORMAT_TABLE, MIN_CLIENTS_PER_ROUND, SAMPLE_BY, THREADS,
                                    batch_option, device_option, model_option, options_from, output_option,
                                    sampling_from_flags, seq_option, with_options)
from hsplit.cliutil.progress import Bar, RoundBars
from hsplit.cliutil.render import (generate_summary, ppl, render_calibration, render_check, render_eval, render_plan,
                                   render_whatif, samples_table)
from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import DEFAULT_AGGREGATION, PARTITIONS
from hsplit.planner.strategies import DEFAULT as STRATEGY_DEFAULT
from hsplit.planner.strategies import NAMES as STRATEGY_NAMES
from hsplit.planner.strategies import traits
from hsplit.planner.yamlio import output_problem
from hsplit.runtime.train.options import DistOptions, RunOptions

app = typer.Typer(help="Plan and run heterogeneous split-federated LoRA fine-tuning.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _print_version(value: bool) -> None:
    if value:
        console.print(__version__, highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")):
    """Eager --version: `hsplit --version` works without a command."""


def _modules(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",")] if text else None


# ---- planning (pure Python) ----

@app.command()
def plan(
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="Fleet YAML path or shipped fleet name (default "
                                        "example; with --check, the plan's own fleet, inputs.fleet)."),
    model: str = model_option(help="Shipped model name, HF folder, config.json, or hub id; a local path is "
                                   "written relative to the plan file."),
    importance: Optional[Path] = typer.Option(None, "--importance", "-i", help="importance.yaml (default: uniform)."),
    ranks: str = typer.Option("0,2,4,8,16", help="Allowed LoRA ranks, comma-separated (0 = no adapter)."),
    modules: Optional[str] = typer.Option(None, help="Adaptable modules, comma-separated (e.g. q_proj,v_proj); default all."),
    batch_size: int = batch_option(),
    seq_len: int = seq_option(256),
    local_steps: int = typer.Option(10, "--local-steps", min=1, help="Local steps per round (tau)."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Rounds `hsplit run` will train."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16: dtype of frozen weights and activations."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate, > 0 (plan training.learning_rate; default 2e-4)."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant | linear | cosine (default), after warm-up."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Steps of linear warm-up, counted over all rounds (default 0)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay, >= 0 (default 0)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Gradient clipping norm; 0 = none (default 1)."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout in [0, 1) (default 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the run: adapters, batches, hold-out, partition (default 0)."),
    partition: Optional[str] = typer.Option(None, "--partition", help=f"How clients split the data: {' | '.join(PARTITIONS)} (default {PARTITIONS[0]}; docs/runtime.md, Data)."),
    dirichlet_alpha: Optional[float] = typer.Option(None, "--dirichlet-alpha", help="--partition dirichlet or flower-dirichlet: concentration, > 0 (default 0.5; small = skewed)."),
    partition_by: Optional[str] = typer.Option(None, "--partition-by", help="The column naming each record's source, the natural id partitions use (default: source)."),
    sources_per_client: Optional[int] = typer.Option(None, "--sources-per-client", help="--partition flower-pathological: sources each client holds (default 2)."),
    eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction", help="Held-out share no client trains on, in [0, 1) (default 0.05)."),
    server_rank: Optional[int] = typer.Option(None, "--server-rank", min=0, help="LoRA rank of server-side adapters (default 8; splitlora: its one rank)."),
    objective: str = typer.Option("utility", help="utility: max adapted importance, then fastest round; "
                                                  "latency: fastest round reaching --min-utility."),
    min_utility: Optional[float] = typer.Option(None, "--min-utility", help="Utility floor for --objective latency "
                                                "(default 90% of the best achievable)."),
    solver: str = typer.Option("cbc", help="cbc | highs | exhaustive (small instances only)."),
    method: str = typer.Option("decomposed", help="decomposed (exact, fast) | full (one MILP over all clients)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds for the MILP solver."),
    strategy: str = typer.Option(STRATEGY_DEFAULT, help=" | ".join(STRATEGY_NAMES) + "."),
    aggregation: str = typer.Option(DEFAULT_AGGREGATION, help="hsplitlora: bounded (adapters and AdamW moments carry "
                                    "on; each client downloads a rank q + floor truncation of what its blocks lack) | "
                                    "warm (carry on; each client downloads every holder's update) | restart (fresh "
                                    "adapters every round); sizes the merge download."),
    floor_rank: Optional[int] = typer.Option(None, "--floor-rank", min=0, help="aggregation bounded: the download rank "
                                             "on a matrix of a client's blocks it does not adapt (default: the smallest "
                                             "positive of --ranks; 0: those stay stale)."),
    data: str = typer.Option("shakespeare", help="Training data the run will use, checked now and recorded in the "
                             "plan: shakespeare (embedded), a .jsonl/.json/.csv/.parquet/.arrow/.txt file, a folder "
                             "(datasets' save_to_disk, or data files), or a hub dataset id; FORMAT:PATH names the "
                             "format. A relative local path is written relative to the plan file; an absolute one stays absolute."),
    task: Optional[str] = typer.Option(None, "--task", help="lm (next-token, default) | classification (text + label; the label set goes into the plan)."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="--task classification: the text column (default: text, sentence, ...)."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="--task classification: the label column (default: label, ...), or an E2E MR attribute (eatType)."),
    clients_per_round: Optional[str] = CLIENTS_PER_ROUND,
    min_clients_per_round: Optional[int] = MIN_CLIENTS_PER_ROUND,
    sample_by: str = SAMPLE_BY,
    output: Path = output_option(Path("plan.yaml"), "Where to write the plan."),
    check: Optional[Path] = typer.Option(None, "--check", help="Validate this plan.yaml against its own fleet "
                                         "(or --fleet) instead of planning."),
    fmt: str = FORMAT_TABLE,
):
    """Choose every client's split point and LoRA ranks (an integer program solved to optimality).

    Example: hsplit plan --fleet example --model smollm2-135m -o plan.yaml
    Training settings go into the plan, which `hsplit run` follows:
      hsplit plan --lr 5e-4 --lr-schedule linear --warmup 4 --partition dirichlet --dirichlet-alpha 0.3
    Sample 10 clients per round: hsplit plan --fleet big.yaml --clients-per-round 10
    Check a plan against its fleet: hsplit plan --check plan.yaml (another fleet: --fleet big.yaml)
    """
    from hsplit.planner.api import check_options, check_plan, full_time_limit, make_plan
    from hsplit.planner.plan import Plan, settings_from_flags
    check_format(fmt)
    if check is None and (problem := output_problem(output, "--output")):
        fail(problem)
    with reported(ValueError), input_errors():
        if check is not None:
            p = Plan.load(check)
            ev, inst = check_plan(p, check_fleet(p, fleet), model if model != "smollm2-135m" else None, importance)
            check_plan_data(p)
            render_check(p, ev, inst, fmt)
            raise typer.Exit(NO_SOLUTION if ev.violations else 0)
        training, data_spec, notes = settings_from_flags({
            "--batch-size": batch_size, "--seq-len": seq_len, "--local-steps": local_steps, "--rounds": rounds,
            "--dtype": dtype, "--lr": lr, "--lr-schedule": lr_schedule, "--warmup": warmup,
            "--weight-decay": weight_decay, "--max-grad-norm": max_grad_norm, "--lora-dropout": lora_dropout,
            "--seed": seed, "--partition": partition, "--dirichlet-alpha": dirichlet_alpha, "--partition-by": partition_by,
            "--sources-per-client": sources_per_client, "--eval-fraction": eval_fraction, "--data": data,
            "--task": task, "--text-column": text_column, "--label-column": label_column})
        for note in notes if fmt != "json" else ():
            err.print(f"note: {note}", highlight=False, markup=False)
        sampling = sampling_from_flags(clients_per_round, min_clients_per_round, sample_by)
        check_options(strategy=strategy, objective=objective, solver=solver, method=method, time_limit=time_limit,
                      min_utility=min_utility)
        how = traits(strategy).ranks
        if method == "full" and how == "milp" and solver != "exhaustive" and fmt != "json":
            err.print(f"solving the full MILP with {solver}, time limit {full_time_limit(method, time_limit):g} s"
                      + ("" if time_limit else " (default; change with --time-limit)"), highlight=False)
        if how == "one" and server_rank is not None:
            err.print(f"note: --server-rank does not apply to {strategy}: it uses one rank on both sides, "
                      "the one it picks for the clients", highlight=False, markup=False)
        p = make_plan(fleet or "example", model, importance=importance, ranks=parse_ints(ranks, "--ranks"),
                      modules=_modules(modules), training=training, strategy=strategy,
                      objective=objective, min_utility=min_utility, solver=solver, method=method,
                      time_limit=time_limit, server_rank=8 if server_rank is None else server_rank,
                      data=checked_data(data_spec, output, training.seq_len, training.seed),
                      aggregation=aggregation, sampling=sampling, floor_rank=floor_rank)
        check_plan_data(p, output)
        save_plan(p, output)
    if fmt == "json":
        from hsplit.planner.plan import _plain
        console.print_json(json.dumps(_plain({"plan": str(output), **p.to_dict()})))
        return
    render_plan(p)
    console.print(f"plan written to [bold]{output}[/]")


@app.command()
def whatif(
    fleets: list[str] = typer.Argument(..., help="Fleet YAML paths or shipped fleet names."),
    vary: list[str] = typer.Option([], "--vary", help="PATH=V1,V2,... (repeatable); e.g. "
                                   "clients.*.uplink_mbps=10,50,200, server.device=a100-80gb,h100-80gb, "
                                   "ranks=0,4,8|0,2,4,8,16. Paths: docs/whatif.md."),
    zip_vary: bool = typer.Option(False, "--zip", help="Walk the --vary lists in lockstep instead of all combinations."),
    model: str = model_option(),
    importance: Optional[Path] = typer.Option(None, "--importance", "-i"),
    objective: str = typer.Option("utility", help="utility | latency"),
    ranks: str = typer.Option("0,2,4,8,16", help="Allowed ranks (when not varied)."),
    modules: Optional[str] = typer.Option(None, help="Modules (when not varied); default all."),
    batch_size: int = batch_option(),
    seq_len: int = seq_option(256),
    local_steps: int = typer.Option(10, "--local-steps", min=1),
    dtype: str = typer.Option("fp32"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Training budget in rounds (default 100): "
                                         "fleet_hours = rounds x predicted round time / 3600."),
    examples: Optional[int] = typer.Option(None, "--examples", help="Training budget in examples (sequences of "
                                           "--seq-len tokens) instead of --rounds: rounds = ceil(examples / "
                                           "(batch size x local steps x clients per round))."),
    curve: Optional[Path] = typer.Option(None, "--curve", help="A run's metrics.csv (rounds against held-out "
                                         "perplexity): adds fleet_hours_to_target = rounds the run took to reach "
                                         "--target-ppl x each scenario's round time (assumes convergence in rounds "
                                         "carries over to every scenario)."),
    target_ppl: Optional[float] = typer.Option(None, "--target-ppl", help="Held-out perplexity to reach (with "
                                               "--curve; default: the run's final perplexity)."),
    clients_per_round: Optional[str] = CLIENTS_PER_ROUND,
    min_clients_per_round: Optional[int] = MIN_CLIENTS_PER_ROUND,
    sample_by: str = SAMPLE_BY,
    output: Path = output_option(Path("whatif"), "Folder for the table and plots."),
    fmt: str = FORMAT_TABLE,
):
    """Plan many fleet scenarios and compare them: a table (CSV, JSON, markdown) and plots.

    Per scenario: fleet_share (clients that can take part / all; groups that cannot are left out,
    with the reason), round_s, utility, fleet_hours (wall-clock hours of the fleet for the budget),
    client_mb_per_round / _per_run (MB a client moves; mean, and _max over clients), server_busy_share
    (server compute per round / round time). Definitions: docs/whatif.md.

    Example: hsplit whatif example edge-100 --vary 'clients.*.uplink_mbps=10,50,200' -o whatif/
    Time to a target: hsplit whatif example --curve runs/first/metrics.csv --target-ppl 12
    """
    from hsplit.planner.plan import Training
    from hsplit.planner.plots import write_plots
    from hsplit.planner.whatif import run_whatif, write_table
    check_format(fmt)
    if problem := output_problem(output, "--output", folder=True):
        fail(problem)
    training = Training(batch_size=batch_size, seq_len=seq_len, local_steps=local_steps, dtype=dtype)
    with reported():
        sampling = sampling_from_flags(clients_per_round, min_clients_per_round, sample_by)

    def progress(i: int, n: int, name: str) -> None:
        bar.update(i, n)
        bar.describe(name)
    with reported(ValueError), Bar("planning scenarios", err.is_terminal) as bar:
        df = run_whatif(fleets, vary, zip_vary=zip_vary, model=model, importance=importance, objective=objective,
                        ranks=parse_ints(ranks, "--ranks"), modules=_modules(modules), training=training,
                        rounds=rounds, examples=examples, curve=curve, target_ppl=target_ppl, sampling=sampling,
                        progress=progress)
    render_whatif(df, output, write_table(df, output) + write_plots(df, output), fmt)


# ---- training and its results (torch, imported inside each command) ----

@app.command("run")
@with_options((RunOptions, None, ()), (DistOptions, ("timeout_s", "min_clients"), ("timeout_s",)))
def run_cmd(
    plan: Path = typer.Argument(..., help="plan.yaml written by `hsplit plan` (or by hand)."),
    fmt: str = FORMAT,
    distributed: bool = typer.Option(False, "--distributed", help="Server and clients as separate local processes on torch.distributed (loopback); torchrun on several machines: docs/runtime.md. --timeout and --min-clients apply to it."),
    **options,
):
    """Train a plan: split-federated LoRA rounds, in-process simulation of the fleet.

    Writes runs/NAME/: metrics.csv, config.yaml (resolved), checkpoints/round-NNNN/.

    Example: hsplit run plan.yaml --rounds 2 --name first   (then: hsplit run plan.yaml --name first --resume)
    """
    check_format(fmt)
    from hsplit.runtime.train.loop import run
    from hsplit.runtime.outputs.rundir import RunFinished

    opts = options_from(RunOptions, options, progress=fmt == "text" and not distributed)
    given = [f for f, v in (("--min-clients", options["min_clients"]), ("--timeout", options["timeout_s"])) if v is not None]
    if not distributed and given:
        fail(f"{given[0]} applies to --distributed runs only: add --distributed, or leave it out")
    try:
        if distributed:
            from hsplit.runtime.distributed.launcher import run_local_cli
            code, res = run_local_cli(plan, opts, options_from(DistOptions, options))
            if code != 0:               # BAD_INPUT (refused) or PEER_LOST, as the processes exited
                raise typer.Exit(code)
        else:
            with RoundBars() if opts.progress else nullcontext() as bars:
                res = run(plan, opts, bars)
    except RunFinished as e:
        # --resume of a finished run: nothing to do, said plainly; exit 0 (docs/runtime.md, Resume)
        if fmt == "json":
            print_json({"run": str(e.run_dir), "rounds": e.rounds, "already_finished": True, "message": e.message})
        else:
            say(e.message)
        return
    except KeyboardInterrupt as e:      # Ctrl-C: where it stopped and how to resume (rundir.RunInterrupted)
        import sys
        print(getattr(e, "message", None) or "interrupted before the run started; nothing was written",
              file=sys.stderr, flush=True)
        raise typer.Exit(INTERRUPTED)
    except ConfigError as e:            # after RunFinished, a ConfigError that is no error
        fail(str(e))
    faults = json.loads((res.run_dir / "faults.json").read_text()) if (res.run_dir / "faults.json").is_file() else []
    if fmt == "json":
        print_json({"run": str(res.run_dir), "rounds": res.rounds_done, "eval_loss_before": res.eval_before,
                    "eval_loss_after": res.eval_after, "metrics": str(res.run_dir / "metrics.csv"),
                    **({"distributed": True, "lost_clients": faults} if distributed else {})})
        return
    if faults:
        lost = ", ".join(f"{f['client']} (round {f['round']})" for f in faults)
        say(f"finished without {lost}: see {res.run_dir / 'faults.json'}")
    say(f"held-out perplexity {ppl(res.eval_before)} -> {ppl(res.eval_after)}; "
        f"outputs in {res.run_dir}/ (metrics.csv, tb/ for TensorBoard, checkpoints/)")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run folder (runs/NAME)."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluate on this data file instead of the held-out split (FORMAT:PATH names the format, e.g. e2e:test.csv)."),
    max_seqs: Optional[int] = typer.Option(None, "--max-seqs", min=1, help="Evaluate at most this many sequences (default: held-out split: the run's --eval-seqs; --data: all)."),
    generate: bool = typer.Option(False, "--generate", help="Decode the prompts of the held-out split (or of --data: E2E CSV, prompt/completion JSONL/CSV, chat JSONL): BLEU, ROUGE-L against all references of each prompt, perplexity; outputs saved in the run folder."),
    beams: int = typer.Option(1, "--beams", min=1, help="--generate: 1 = greedy, >1 = beam search."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="--generate: longest output (default: 1.5 x the longest reference in tokens, at least 16)."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", "--max-mrs", min=1, help="--generate: only the first N prompts (E2E: MRs)."),
    device: str = device_option("cpu", "auto | cpu | cuda: where the model runs (perplexity and --generate)."),
    per_class: bool = typer.Option(False, "--per-class", help="Classification runs: precision, recall and F1 of every class too."),
    fmt: str = FORMAT,
):
    """Held-out perplexity of a run's aggregated model (latest checkpoint); --generate: BLEU/ROUGE-L.

    Example: hsplit eval runs/demo --format json
    Example: hsplit eval runs/cls --per-class          (a classification run: accuracy, macro-F1, per class)
    Example: hsplit eval runs/demo --generate          (the held-out split: writes runs/demo/generate-heldout.{jsonl,json})
    Example: hsplit eval runs/demo --data e2e:testset_w_refs.csv --generate --beams 4
    (writes runs/demo/generate-testset_w_refs.csv-beam4.{jsonl,json}; --data test.jsonl: prompt/completion or chat)
    """
    check_format(fmt)
    from hsplit.runtime.outputs.evaluate import evaluate_run
    from hsplit.runtime.common import pick_device

    with reported():
        pick_device(device)                     # before any model is loaded
    if generate and max_seqs is not None:
        fail("--max-seqs applies to the perplexity-only evaluation; with --generate use --max-prompts N")
    if not generate and (given := [f for f, v in (("--beams", beams != 1), ("--max-new-tokens", max_new_tokens),
                                                  ("--max-prompts", max_prompts)) if v]):
        fail(f"{given[0]} applies to --generate: add --generate, or leave it out")
    with reported():
        if generate:
            from hsplit.runtime.outputs.generate import generate_run
            rep = generate_run(run_dir, data, max_prompts=max_prompts, beams=beams, max_new_tokens=max_new_tokens,
                               device=device)
        else:
            rep = evaluate_run(run_dir, data=data, max_seqs=max_seqs, device=device, per_class=per_class)
    if fmt == "json":
        print_json(rep)
    elif generate:
        console.print(samples_table(rep["outputs"][0], 3))
        console.print(escape(generate_summary(run_dir, rep)))
    else:
        render_eval(run_dir, rep)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run folder (runs/NAME)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Write a PEFT adapter folder (with a model card) here."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Write a full merged HF model here."),
    rank: Optional[int] = typer.Option(None, "--rank", min=1, help="SVD rank of the adapter (default: the plan's largest rank; the truncation error is reported)."),
    exact: bool = typer.Option(False, "--exact", help="Keep every rank: the adapter is the learned update exactly (larger)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id written as the adapter's base model (default: the run's model's hub id)."),
    fmt: str = FORMAT,
):
    """Export the learned update as a PEFT adapter (SVD-factored, with a model card) and/or a merged model.

    The adapter names its base model by hub id (e.g. Qwen/Qwen2.5-0.5B), so it loads anywhere:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HUB_ID), "out/adapter")

    Example: hsplit export runs/demo --adapter out/adapter
    Example: hsplit export runs/demo --adapter out/exact --exact --merged out/merged
    """
    check_format(fmt)
    from hsplit.runtime.outputs.export import export_run

    with reported():
        rep = export_run(run_dir, adapter=adapter, merged=merged, rank=rank, exact=exact, base_model=base_model)
    if fmt == "json":
        print_json(rep)
        return
    if "adapter" in rep:
        cut = ("exact" if rep["rank"] == "exact" else
               f"{rep['rank']}, {rep['rank_source']}; --exact keeps all (up to {rep['exact_max_rank']})")
        say(f"adapter: {rep['adapter']} ({rep['modules']} modules, rank {cut}; {rep['size_mb']:.1f} MB); "
            f"truncation error {rep['relative_error']:.3g} of the update (relative Frobenius; worst "
            f"{rep['worst_module']}: {rep['max_module_error']:.3g})")
        say(f"base model {rep['base_model']}; model card {rep['model_card']}")
        if not rep["base_model_hub_id"]:
            say("note: the base model is a local folder: pass --base-model ORG/NAME to name its hub id")
    if "merged" in rep:
        say(f"merged model: {rep['merged']}")


@app.command("demo")
def demo_cmd(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where the plan and run folder go."),
    rounds: int = typer.Option(2, "--rounds", min=1),
    local_steps: int = typer.Option(2, "--local-steps", min=1),
    threads: Optional[int] = THREADS,
    fmt: str = FORMAT,
):
    """Plan the example fleet for SmolLM2-135M, train 2 short rounds on Shakespeare, report perplexity.

    Everything is embedded (no downloads). Takes a few minutes on a laptop CPU.

    Example: hsplit demo
    """
    check_format(fmt)
    from hsplit.runtime.demo import demo

    text = fmt == "text"
    with reported(), RoundBars() if text else nullcontext() as bars:
        rep = demo(runs_dir=runs_dir, rounds=rounds, local_steps=local_steps, threads=threads, progress=text,
                   say=None if fmt == "json" else console.print, reporter=bars)
    if fmt == "json":
        print_json(rep)


# ---- measuring (torch; docs/measurement.md) ----

@app.command("importance")
def importance_cmd(
    model: str = model_option(help="smollm2-135m (embedded), an HF folder, or a hub id."),
    data: str = typer.Option("shakespeare", "--data", "-d", help="shakespeare (embedded), a data file or folder "
                             "(JSONL, CSV, Parquet, Arrow, text, E2E; datasets' save_to_disk), or a hub dataset id."),
    data_format: str = typer.Option("auto", "--data-format", help="auto | jsonl | csv | parquet | arrow | text | e2e | "
                                    "shakespeare"),
    steps: int = typer.Option(16, "--steps", help="Warm-up batches the scores are smoothed over."),
    batch_size: int = batch_option(),
    seq_len: int = seq_option(128),
    method: str = typer.Option("sensitivity", "--method",
                               help="sensitivity (AdaLoRA: |w*dL/dw| x uncertainty) | rngwp (HSplitLoRA: "
                                    "|sum w*dL/dw| / C(W) per matrix)."),
    beta1: Optional[float] = typer.Option(None, "--beta1", help="sensitivity: smoothing of |w*dL/dw| (default 0.85)."),
    beta2: Optional[float] = typer.Option(None, "--beta2", help="sensitivity: smoothing of the uncertainty (default 0.85)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="rngwp: I_t = gamma I_{t-1} + (1-gamma) score_t (default 0.85)."),
    normalization: Optional[str] = typer.Option(None, "--normalization",
                                                help="sensitivity: raw (default) | per-parameter (score / (d_in + d_out)); "
                                                     "rngwp is always per-byte."),
    modules: Optional[str] = typer.Option(None, "--modules", help="Modules to score, comma-separated (default all)."),
    blocks_per_pass: Optional[int] = typer.Option(None, "--blocks-per-pass",
                                                  help="Blocks scored together (default 1: group inputs are cached on disk)."),
    seed: int = typer.Option(0, "--seed", help="Selects the batches (and the held-out split, as `hsplit run`)."),
    threads: Optional[int] = THREADS,
    output: Path = output_option(Path("importance.yaml"), "Where to write the scores."),
    fmt: str = FORMAT,
):
    """Score every adaptable matrix: AdaLoRA's smoothed sensitivity (default) or HSplitLoRA's rngwp.

    sensitivity: sum over the matrix of Ibar*Ubar (|w*dL/dw| smoothed, x its uncertainty).
    rngwp: |sum w*dL/dw| / C(W), C(W) = 16 (d_in + d_out) bytes, smoothed over the steps with
    gamma (docs/measurement.md). Writes importance.yaml for `hsplit plan --importance`; records
    the method, model hash, data, steps and settings. Gradients are folded into the scores as they
    are produced, so the whole model's gradients are never held.

    Example: hsplit importance --model smollm2-135m --data shakespeare --steps 16 -o importance.yaml
    Example: hsplit importance --method rngwp --steps 16 -o importance.yaml
    """
    check_format(fmt)
    from hsplit.runtime.measure.importance import ImportanceSettings, compute_importance
    set_threads(threads)
    mods = _modules(modules)
    smoothing = {"beta1": beta1, "beta2": beta2} if method != "rngwp" else {"gamma": gamma}
    settings = ImportanceSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed, method=method,
                                  normalization=normalization, blocks_per_pass=blocks_per_pass,
                                  modules=tuple(mods) if mods else None,
                                  **{k: v for k, v in smoothing.items() if v is not None})
    with reported():               # every problem in one error, before the model is loaded
        problems = [f"--{k}: applies to --method {'rngwp' if k == 'gamma' else 'sensitivity'}, not {method}"
                    for k, v in {"beta1": beta1, "beta2": beta2, "gamma": gamma}.items()
                    if v is not None and k not in smoothing]
        try:
            settings.check()
        except ConfigError as e:
            problems += e.problems
        if problems:
            raise ConfigError("hsplit importance", problems)
    with reported(), Bar("scoring", fmt == "text") as bar:
        imp, info = compute_importance(model, settings, data=data, data_format=data_format,
                                       progress=fmt == "text", on_step=bar.update)
    imp.save(output)
    top = sorted(imp.scores.items(), key=lambda kv: -kv[1])[:5]
    if fmt == "json":
        print_json({"output": str(output), "model": imp.model, "model_hash": imp.model_hash,
                    "normalization": imp.normalization, "matrices": len(imp.scores), "top": dict(top), **info})
        return
    console.print(f"wrote {output}: {len(imp.scores)} matrices of {imp.model} ({imp.method}, {imp.normalization}), "
                  f"{steps} steps, {info['passes']} pass(es) of {info['blocks_per_pass']} blocks, {info['wall_s']:.0f} s, "
                  f"peak memory {info['peak_over_weights']:.2f}x the weights")
    total = sum(imp.scores.values()) or 1.0
    for name, v in top:
        console.print(f"  {name}: {v / total:.2%}")


@app.command("profile")
def profile_cmd(
    name: str = typer.Option("this-machine", "--name", help="Device name written into the profile."),
    model: Optional[str] = model_option(None, "Also time one block of this model (per-block times)."),
    batch_size: int = batch_option(4, "Shape of the per-block timing."),
    seq_len: int = seq_option(64),
    dtypes: str = typer.Option("fp32,bf16,fp16", "--dtypes", help="Matmul dtypes to measure (unsupported ones are skipped)."),
    repetitions: int = typer.Option(7, "--repetitions", "-r", min=1, help="Timed runs per measurement (median)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed runs before timing."),
    uplink_mbps: float = typer.Option(1000.0, "--uplink-mbps", help="Not measured: written as given."),
    downlink_mbps: float = typer.Option(1000.0, "--downlink-mbps", help="Not measured: written as given."),
    device: Optional[str] = device_option(None, "auto | cpu | cuda (auto, the default: cuda when present)."),
    threads: Optional[int] = THREADS,
    output: Optional[Path] = output_option(None, "Default: profiles/devices/NAME.yaml."),
    fmt: str = FORMAT,
):
    """Measure this machine: matmul FLOP/s per dtype, usable memory, optionally per-block times.

    Writes a device profile (loads with DeviceProfile) usable in a fleet file.

    Example: hsplit profile --name my-laptop --model smollm2-135m -b 4 -T 64 -o profiles/devices/my-laptop.yaml
    """
    check_format(fmt)
    from hsplit.planner.device import DTYPES
    from hsplit.runtime.measure.profiling import profile_device, save_profile
    dts = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    if not dts or any(d not in DTYPES for d in dts):
        fail(f"--dtypes: use some of {', '.join(DTYPES)}, got {dtypes!r}")
    set_threads(threads)
    out = output or Path("profiles/devices") / f"{name}.yaml"
    count, steps = [0], len(dts) + (1 if model else 0)

    def on_step(text: str) -> None:
        bar.describe(text)
        bar.update(count[0], steps)
        count[0] += 1
    with reported(), Bar("profiling", fmt == "text") as bar:
        data = profile_device(name, model=model, batch_size=batch_size, seq_len=seq_len, dtypes=dts, warmup=warmup,
                              reps=repetitions, uplink_mbps=uplink_mbps, downlink_mbps=downlink_mbps, device=device,
                              on_step=on_step)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_profile(data, out)
    if fmt == "json":
        print_json({"output": str(out), **data})
        return
    console.print(f"wrote {out}")
    for dt, v in data["flops"].items():
        console.print(f"  {dt}: {v / 1e9:.1f} GFLOP/s (spread {data['measured']['matmul'][dt]['spread']:.1%})")
    console.print(f"  memory: {data['memory_gib']} GiB usable of {data['memory_total_gib']} GiB")
    for bt in data.get("block_times", []):
        console.print(f"  {bt['model']} block at b={bt['batch_size']} T={bt['seq_len']}: forward "
                      f"{bt['forward_s'] * 1e3:.1f} ms, backward {bt['backward_s'] * 1e3:.1f} ms, "
                      f"head {bt['head_s'] * 1e3:.1f} ms")


@app.command("calibrate")
def calibrate_cmd(
    model: str = model_option(),
    profile: Path = typer.Option(..., "--profile", "-p", help="Device profile of this machine (from `hsplit profile`), "
                                 "or a shipped profile name."),
    batch_size: int = batch_option(),
    seq_len: int = seq_option(64),
    ranks: str = typer.Option("8", "--ranks", help="LoRA ranks timed at every split."),
    extra_ranks: str = typer.Option("2,16", "--extra-ranks", help="Ranks timed at --extra-splits only."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Split points, e.g. 1,8,15, or `all` (1..L-1); "
                                         "default: 5 spread over the model's blocks."),
    extra_splits: Optional[str] = typer.Option(None, "--extra-splits", help="Default: 1, L/2, L-1."),
    repetitions: int = typer.Option(3, "--repetitions", "-r", min=1, help="Timings per point (their spread says "
                                    "whether the errors can be trusted; at least 3)."),
    warmup: int = typer.Option(1, "--warmup", min=0),
    threads: Optional[int] = THREADS,
    output: Path = output_option(Path("calibration"), "Writes OUTPUT.csv and OUTPUT.png."),
    fmt: str = FORMAT,
):
    """Predicted (planner) vs measured client and server step time at a handful of split points.

    Writes a CSV table and a PNG plot; prints the median and worst relative error, and a warning when the
    repetitions of a point differ too much for the errors to be trusted.

    Example: hsplit calibrate --model smollm2-135m --profile profiles/devices/this-machine.yaml -o calibration
    """
    check_format(fmt)
    from hsplit.runtime.measure.calibrate import calibrate
    profile = device_profile_path(profile)
    set_threads(threads)
    with reported(), Bar("calibrating", fmt == "text") as bar:
        res = calibrate(model, profile, batch_size=batch_size, seq_len=seq_len, ranks=parse_ints(ranks, "--ranks"),
                        extra_ranks=parse_ints(extra_ranks, "--extra-ranks"),
                        splits="all" if (splits or "").strip().lower() == "all" else parse_ints(splits or None, "--splits"),
                        extra_splits=parse_ints(extra_splits or None, "--extra-splits"), reps=repetitions, warmup=warmup,
                        on_step=bar.update)
    output.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = output.with_suffix(".csv"), output.with_suffix(".png")
    res.write_csv(csv_path)
    res.plot(png_path)
    warnings = [f"[bold yellow]warning:[/] {escape(w)}" for w in res.summary.get("warnings", [])]
    if fmt == "json":                                   # stdout: one object (summary.warnings); stderr: the warnings
        for w in warnings:
            err.print(w, highlight=False)
        print_json({"csv": str(csv_path), "png": str(png_path), "settings": res.settings,
                    "summary": res.summary, "rows": res.rows})
        return
    render_calibration(res, batch_size, seq_len)
    for w in warnings:
        err.print(w, highlight=False)
    console.print(f"wrote {csv_path} and {png_path}")


app.add_typer(flower_app, name="flower")

if __name__ == "__main__":
    app()
