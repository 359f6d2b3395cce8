"""Runtime commands of the `hsplit` CLI: run, eval, export, demo.

cli.py calls `register(app)`. Nothing here imports torch at module level (each command imports
the runtime inside its body), so `hsplit --help` stays fast. Commands print a short human summary,
or one JSON object with `--format json`; bad input is one `error:` line and exit code 2.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from hsplit.cliutil import check_format as _check_format
from hsplit.cliutil import console_for as _console
from hsplit.cliutil import fail as _fail


def _ppl(loss) -> str:
    return f"{math.exp(loss):.2f}" if loss is not None and loss == loss else "n/a"


def _fmt(x, spec: str) -> str:
    """A metric for a progress line: n/a when it is missing (no held-out token was scored)."""
    return format(x, spec) if x is not None and x == x else "n/a"


class _RunBars:
    """Rich progress bars for rounds and steps, with an ETA (the runtime's reporter interface)."""

    def __init__(self, enabled: bool):
        self.p, self.enabled, self.steps = None, enabled, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.console = _console(stderr=True)
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)
        return False

    def start_rounds(self, total: int, done: int) -> None:
        if self.p:
            self.rounds = self.p.add_task("rounds", total=total, completed=done)

    def start_round(self, r: int, steps: int) -> None:
        if self.p:
            if self.steps is not None:
                self.p.remove_task(self.steps)
            self.steps = self.p.add_task(f"round {r + 1} steps", total=steps)

    def advance(self) -> None:
        if self.p and self.steps is not None:
            self.p.advance(self.steps)

    def end_round(self, g: dict) -> None:
        if self.p:
            self.p.advance(self.rounds)
            fleet = f", fleet {g['fleet_s']:.1f} s" if g.get("fleet_s") is not None else ""
            self.console.print(f"round {g['round']}: train loss {g['train_loss']:.4f}, eval loss "
                               f"{g['eval_loss']:.4f} (ppl {_fmt(g['eval_ppl'], '.2f')}), wall {g['wall_s']:.1f} s{fleet}",
                               highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add `run`, `eval`, `export` and `demo` to the hsplit Typer app."""

    @app.command("run")
    def run_cmd(
        plan: Path = typer.Argument(..., help="plan.yaml written by `hsplit plan` (or by hand)."),
        rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Rounds to train (default: the plan's)."),
        name: Optional[str] = typer.Option(None, "--name", help="Run folder name under --runs-dir (default: plan file stem)."),
        resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last complete round."),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders are written."),
        eval_seqs: int = typer.Option(64, "--eval-seqs", min=1, help="Held-out sequences evaluated after each round."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", min=1, help="Keep adapters + optimizer state of only the newest K rounds (merged factors and metrics of every round stay; default: all)."),
        fmt: str = typer.Option("text", "--format", help="text | json"),
        distributed: bool = typer.Option(False, "--distributed", help="Server and clients as separate local processes on torch.distributed (loopback); torchrun on several machines: docs/runtime.md."),
        min_clients: Optional[int] = typer.Option(None, "--min-clients", min=1, help="--distributed: finish a round with this many clients when one is lost (default: all)."),
        timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="--distributed: seconds to wait for an answer (a client's next step, the server's reply) before naming the silent process lost; above the slowest client's step time (default 300)."),
    ):
        """Train a plan: split-federated LoRA rounds, in-process simulation of the fleet.

        Writes runs/NAME/: metrics.csv, config.yaml (resolved), checkpoints/round-NNNN/.

        Example: hsplit run plan.yaml --rounds 2 --name first   (then: hsplit run plan.yaml --name first --resume)
        """
        _check_format(fmt)
        from hsplit.planner.errors import ConfigError
        from hsplit.runtime.loop import run
        from hsplit.runtime.options import RunOptions
        from hsplit.runtime.rundir import RunFinished

        def finished(e: RunFinished) -> None:
            # --resume of a finished run: nothing to do, said plainly; exit 0 (docs/runtime.md, Resume)
            if fmt == "json":
                print(json.dumps({"run": str(e.run_dir), "rounds": e.rounds, "already_finished": True,
                                  "message": e.message}))
            else:
                _console().print(e.message, highlight=False, markup=False)
            raise typer.Exit(0)

        opts = RunOptions(rounds=rounds, name=name, runs_dir=runs_dir, resume=resume, eval_max_seqs=eval_seqs,
                          progress=fmt == "text" and not distributed, device=device, threads=threads,
                          keep_checkpoints=keep_checkpoints)
        if not distributed and (min_clients is not None or timeout is not None):
            _fail(f"{'--min-clients' if min_clients is not None else '--timeout'} applies to --distributed runs only: "
                  "add --distributed, or leave it out")
        try:
            if distributed:
                from hsplit.runtime.distributed.launcher import run_local_cli
                from hsplit.runtime.options import DistOptions
                code, res = run_local_cli(plan, opts, min_clients, DistOptions.timeout_s if timeout is None else timeout)
                if code != 0:
                    raise typer.Exit(code)
            else:
                with _RunBars(opts.progress) as bars:
                    res = run(plan, opts, bars)
        except RunFinished as e:
            finished(e)
        except ConfigError as e:
            _fail(str(e))
        except KeyboardInterrupt as e:      # Ctrl-C: where it stopped and how to resume (train.RunInterrupted)
            import sys
            print(getattr(e, "message", None) or "interrupted before the run started; nothing was written",
                  file=sys.stderr, flush=True)
            raise typer.Exit(130)
        faults = json.loads((res.run_dir / "faults.json").read_text()) if (res.run_dir / "faults.json").is_file() else []
        out = {"run": str(res.run_dir), "rounds": res.rounds_done, "eval_loss_before": res.eval_before,
               "eval_loss_after": res.eval_after, "metrics": str(res.run_dir / "metrics.csv"),
               **({"distributed": True, "lost_clients": faults} if distributed else {})}
        if fmt == "json":
            print(json.dumps(out))
        else:
            if faults:
                lost = ", ".join(f"{f['client']} (round {f['round']})" for f in faults)
                _console().print(f"finished without {lost}: see {res.run_dir / 'faults.json'}", highlight=False,
                                 markup=False)
            _console().print(f"held-out perplexity {_ppl(res.eval_before)} -> {_ppl(res.eval_after)}; "
                             f"outputs in {res.run_dir}/ (metrics.csv, checkpoints/)", highlight=False, markup=False)

    @app.command("eval")
    def eval_cmd(
        run_dir: Path = typer.Argument(..., metavar="RUN", help="A run folder (runs/NAME)."),
        data: Optional[str] = typer.Option(None, "--data", help="Evaluate on this data file instead of the held-out split (FORMAT:PATH names the format, e.g. e2e:test.csv)."),
        max_seqs: Optional[int] = typer.Option(None, "--max-seqs", min=1, help="Evaluate at most this many sequences (default: held-out split: the run's --eval-seqs; --data: all)."),
        generate: bool = typer.Option(False, "--generate", help="Decode every MR of --data e2e:PATH: BLEU, ROUGE-L against all its references, perplexity."),
        beams: int = typer.Option(1, "--beams", min=1, help="--generate: 1 = greedy, >1 = beam search."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="--generate: longest output."),
        max_mrs: Optional[int] = typer.Option(None, "--max-mrs", min=1, help="--generate: only the first N MRs."),
        device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda: where the model runs (perplexity and --generate)."),
        fmt: str = typer.Option("text", "--format", help="table | text | json (table = text: human-readable)"),
    ):
        """Held-out perplexity of a run's aggregated model (latest checkpoint); --generate: BLEU/ROUGE-L.

        Example: hsplit eval runs/demo --format json
        Example: hsplit eval runs/demo --data e2e:testset_w_refs.csv --generate --beams 4
        (writes runs/demo/generate-testset_w_refs-beam4.{jsonl,json})
        """
        _check_format(fmt)
        from rich.markup import escape
        from hsplit.planner.errors import ConfigError
        from hsplit.runtime.evaluate import evaluate_run
        from hsplit.runtime.common import pick_device

        try:
            pick_device(device)                     # before any model is loaded
        except ConfigError as e:
            _fail(str(e))
        if generate:
            if not data:
                _fail("--generate needs --data e2e:PATH (an E2E CSV with mr, ref columns)")
            from hsplit.runtime.generate import generate_run
            try:
                rep = generate_run(run_dir, data, max_mrs=max_mrs, beams=beams, max_new_tokens=max_new_tokens,
                                   device=device)
            except ConfigError as e:
                _fail(str(e))
            if fmt == "json":
                print(json.dumps(rep))
            else:
                _console().print(_samples_table(rep["outputs"][0], 3))
                _console().print(escape(f"{run_dir} (round {rep['round']}) on {rep['mrs']} MRs ({rep['decoding']}): "
                                        f"BLEU {rep['bleu']:.2f}, ROUGE-L {rep['rouge_l']:.2f}, perplexity "
                                        f"{_ppl(rep['eval_loss'])}; outputs {', '.join(rep['outputs'])}"))
            return
        try:
            rep = evaluate_run(run_dir, data=data, max_seqs=max_seqs, device=device)
        except ConfigError as e:
            _fail(str(e))
        if fmt == "json":
            print(json.dumps(rep))
        else:
            _console().print(escape(f"{run_dir} (round {rep['round']}) on {rep['data']} ({rep['sequences']} sequences, "
                                    f"{rep['device']}): loss {rep['eval_loss']:.4f}, perplexity {_ppl(rep['eval_loss'])}"))

    @app.command("export")
    def export_cmd(
        run_dir: Path = typer.Argument(..., metavar="RUN", help="A run folder (runs/NAME)."),
        adapter: Optional[Path] = typer.Option(None, "--adapter", help="Write a PEFT adapter folder here."),
        merged: Optional[Path] = typer.Option(None, "--merged", help="Write a full merged HF model here."),
        rank: Optional[int] = typer.Option(None, "--rank", min=1, help="SVD rank of the adapter (default: exact)."),
        fmt: str = typer.Option("text", "--format", help="table | text | json (table = text: human-readable)"),
    ):
        """Export the learned update as a PEFT adapter (SVD-factored) and/or a merged model.

        Example: hsplit export runs/demo --adapter out/adapter --rank 16
        Load it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "out/adapter")
        """
        _check_format(fmt)
        from hsplit.planner.errors import ConfigError
        from hsplit.runtime.export import export_run

        try:
            rep = export_run(run_dir, adapter=adapter, merged=merged, rank=rank)
        except ConfigError as e:
            _fail(str(e))
        if fmt == "json":
            print(json.dumps(rep))
            return
        from rich.markup import escape
        c = _console()
        if "adapter" in rep:
            c.print(escape(f"adapter: {rep['adapter']} ({rep['modules']} modules, rank {rep['rank']}, max "
                           f"{rep['max_rank']}); relative error {rep['relative_error']:.3g} (worst "
                           f"{rep['worst_module']}: {rep['max_module_error']:.3g}); base model {rep['base_model']}"))
        if "merged" in rep:
            c.print(escape(f"merged model: {rep['merged']}"))

    @app.command("demo")
    def demo_cmd(
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where the plan and run folder go."),
        rounds: int = typer.Option(2, "--rounds", min=1),
        local_steps: int = typer.Option(2, "--local-steps", min=1),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        fmt: str = typer.Option("text", "--format", help="text | json"),
    ):
        """Plan the example fleet for SmolLM2-135M, train 2 short rounds on Shakespeare, report perplexity.

        Everything is embedded (no downloads). Takes a few minutes on a laptop CPU.

        Example: hsplit demo
        """
        _check_format(fmt)
        from hsplit.planner.errors import ConfigError, InfeasibleError
        from hsplit.runtime.demo import demo

        try:
            with _RunBars(fmt == "text") as bars:
                rep = demo(runs_dir=runs_dir, rounds=rounds, local_steps=local_steps, threads=threads,
                           progress=fmt == "text", say=None if fmt == "json" else _console().print, reporter=bars)
        except (ConfigError, InfeasibleError) as e:
            _fail(str(e))
        if fmt == "json":
            print(json.dumps(rep))


def _samples_table(jsonl: str, n: int):
    """The first n decoded MRs next to one of their references (the rest are in the .jsonl file)."""
    from rich.markup import escape
    from rich.table import Table
    with open(jsonl) as fh:
        rows = [json.loads(line) for line, _ in zip(fh, range(n))]
    table = Table(title=escape(f"first {len(rows)} outputs (all in {Path(jsonl).name})"), show_lines=True)
    for col in ("MR", "output", "a reference"):
        table.add_column(col, overflow="fold")
    for row in rows:
        # escape(): MRs such as `eatType[coffee shop]` are data, not rich markup
        table.add_row(escape(row["mr"]), escape(row["hypothesis"]),
                      escape(row["references"][0]) if row["references"] else "")
    return table
