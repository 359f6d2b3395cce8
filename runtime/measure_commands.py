"""Measurement commands of the `hsplit` CLI: importance, profile, calibrate.

cli.py calls `register(app)`. Nothing here imports torch at module level (each command imports the
runtime inside its body), so `hsplit --help` stays fast. Each command shows a rich progress bar on
stderr, prints a short summary (or one JSON object with `--format json`) on stdout, and reports
bad input as one `error:` line with exit code 2. See docs/measurement.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hsplit.cliutil import check_format as _check_format
from hsplit.cliutil import console_for as _console
from hsplit.cliutil import fail as _fail


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        _fail(f"{flag}: expected comma-separated whole numbers like 2,8,16, got {text!r}")


class _Bar:
    """A rich progress bar on stderr (disabled with --format json so stdout stays one object)."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled, self.p, self.task = label, enabled, None, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=_console(stderr=True), transient=True)
            self.p.__enter__()
            self.task = self.p.add_task(self.label, total=None)
        return self

    def update(self, done: int, total: int) -> None:
        if self.p is not None:
            self.p.update(self.task, completed=done, total=total)

    def describe(self, text: str) -> None:
        if self.p is not None:
            self.p.update(self.task, description=text)

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)
        return False


def register(app: typer.Typer) -> None:
    """Add `importance`, `profile` and `calibrate` to the hsplit Typer app."""

    @app.command("importance")
    def importance_cmd(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m (embedded), an HF folder, or a hub id."),
        data: str = typer.Option("shakespeare", "--data", "-d", help="shakespeare (embedded) or a JSONL/CSV/text/E2E path."),
        data_format: str = typer.Option("auto", "--data-format", help="auto | jsonl | csv | text | e2e | shakespeare"),
        steps: int = typer.Option(16, "--steps", help="Warm-up batches the scores are smoothed over."),
        batch_size: int = typer.Option(4, "--batch-size", "-b"),
        seq_len: int = typer.Option(128, "--seq-len", "-T"),
        beta1: float = typer.Option(0.85, "--beta1", help="Smoothing of the sensitivity (AdaLoRA beta1)."),
        beta2: float = typer.Option(0.85, "--beta2", help="Smoothing of the uncertainty (AdaLoRA beta2)."),
        normalization: str = typer.Option("raw", "--normalization", help="raw | per-parameter (score / (d_in + d_out))."),
        modules: Optional[str] = typer.Option(None, "--modules", help="Modules to score, comma-separated (default all)."),
        blocks_per_pass: Optional[int] = typer.Option(None, "--blocks-per-pass",
                                                      help="Blocks scored together (default: as many as fit in half the weights' memory)."),
        seed: int = typer.Option(0, "--seed", help="Selects the batches (and the held-out split, as `hsplit run`)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        output: Path = typer.Option(Path("importance.yaml"), "--output", "-o", help="Where to write the scores."),
        fmt: str = typer.Option("text", "--format", help="text | json"),
    ):
        """Score every adaptable matrix (AdaLoRA's smoothed sensitivity |w*dL/dw| x uncertainty).

        Writes importance.yaml for `hsplit plan --importance`; records the model hash, data, steps
        and settings. Gradients are folded into the scores as they are produced, block group by
        block group, so the whole model's gradients are never held.

        Example: hsplit importance --model smollm2-135m --data shakespeare --steps 16 -o importance.yaml
        """
        _check_format(fmt)
        from hsplit.planner.errors import ConfigError
        from hsplit.runtime.importance import ImportanceSettings, compute_importance
        if threads:
            import torch
            torch.set_num_threads(threads)
        settings = ImportanceSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, beta1=beta1, beta2=beta2,
                                      seed=seed, normalization=normalization, blocks_per_pass=blocks_per_pass,
                                      modules=tuple(m.strip() for m in modules.split(",")) if modules else None)
        try:
            with _Bar("scoring", fmt == "text") as bar:
                imp, info = compute_importance(model, settings, data=data, data_format=data_format,
                                               progress=fmt == "text", on_step=bar.update)
        except ConfigError as e:
            _fail(str(e))
        imp.save(output)
        top = sorted(imp.scores.items(), key=lambda kv: -kv[1])[:5]
        if fmt == "json":
            print(json.dumps({"output": str(output), "model": imp.model, "model_hash": imp.model_hash,
                              "normalization": imp.normalization, "matrices": len(imp.scores),
                              "top": dict(top), **info}))
            return
        c = _console()
        c.print(f"wrote {output}: {len(imp.scores)} matrices of {imp.model} ({imp.normalization}), "
                f"{steps} steps, {info['passes']} pass(es) of {info['blocks_per_pass']} blocks, {info['wall_s']:.0f} s, "
                f"peak memory {info['peak_over_weights']:.2f}x the weights")
        total = sum(imp.scores.values()) or 1.0
        for name, v in top:
            c.print(f"  {name}: {v / total:.2%}")

    @app.command("profile")
    def profile_cmd(
        name: str = typer.Option("this-machine", "--name", help="Device name written into the profile."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Also time one block of this model (per-block times)."),
        batch_size: int = typer.Option(4, "--batch-size", "-b", help="Shape of the per-block timing."),
        seq_len: int = typer.Option(64, "--seq-len", "-T"),
        dtypes: str = typer.Option("fp32,bf16,fp16", "--dtypes", help="Matmul dtypes to measure (unsupported ones are skipped)."),
        repetitions: int = typer.Option(7, "--repetitions", "-r", min=1, help="Timed runs per measurement (median)."),
        warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed runs before timing."),
        uplink_mbps: float = typer.Option(1000.0, "--uplink-mbps", help="Not measured: written as given."),
        downlink_mbps: float = typer.Option(1000.0, "--downlink-mbps", help="Not measured: written as given."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (auto, the default: cuda when present)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Default: profiles/devices/NAME.yaml."),
        fmt: str = typer.Option("text", "--format", help="text | json"),
    ):
        """Measure this machine: matmul FLOP/s per dtype, usable memory, optionally per-block times.

        Writes a device profile (loads with DeviceProfile) usable in a fleet file.

        Example: hsplit profile --name my-laptop --model smollm2-135m -b 4 -T 64 -o profiles/devices/my-laptop.yaml
        """
        _check_format(fmt)
        from hsplit.planner.device import DTYPES
        from hsplit.planner.errors import ConfigError
        from hsplit.runtime.profiling import profile_device, save_profile
        dts = tuple(d.strip() for d in dtypes.split(",") if d.strip())
        bad = [d for d in dts if d not in DTYPES]
        if bad or not dts:
            _fail(f"--dtypes: use some of {', '.join(DTYPES)}, got {dtypes!r}")
        if threads:
            import torch
            torch.set_num_threads(threads)
        out = output or Path("profiles/devices") / f"{name}.yaml"
        steps = len(dts) + (1 if model else 0)
        try:
            with _Bar("profiling", fmt == "text") as bar:
                count = [0]

                def on_step(text):
                    bar.describe(text)
                    bar.update(count[0], steps)
                    count[0] += 1
                data = profile_device(name, model=model, batch_size=batch_size, seq_len=seq_len, dtypes=dts,
                                      warmup=warmup, reps=repetitions, uplink_mbps=uplink_mbps,
                                      downlink_mbps=downlink_mbps, device=device, on_step=on_step)
        except ConfigError as e:
            _fail(str(e))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_profile(data, out)
        if fmt == "json":
            print(json.dumps({"output": str(out), **data}))
            return
        c = _console()
        c.print(f"wrote {out}")
        for dt, v in data["flops"].items():
            c.print(f"  {dt}: {v / 1e9:.1f} GFLOP/s (spread {data['measured']['matmul'][dt]['spread']:.1%})")
        c.print(f"  memory: {data['memory_gib']} GiB usable of {data['memory_total_gib']} GiB")
        for bt in data.get("block_times", []):
            c.print(f"  {bt['model']} block at b={bt['batch_size']} T={bt['seq_len']}: forward {bt['forward_s'] * 1e3:.1f} ms, "
                    f"backward {bt['backward_s'] * 1e3:.1f} ms, head {bt['head_s'] * 1e3:.1f} ms")

    @app.command("calibrate")
    def calibrate_cmd(
        model: str = typer.Option("smollm2-135m", "--model", "-m"),
        profile: Path = typer.Option(..., "--profile", "-p", help="Device profile of this machine (from `hsplit profile`)."),
        batch_size: int = typer.Option(4, "--batch-size", "-b"),
        seq_len: int = typer.Option(64, "--seq-len", "-T"),
        ranks: str = typer.Option("8", "--ranks", help="LoRA ranks timed at every split."),
        extra_ranks: str = typer.Option("2,16", "--extra-ranks", help="Ranks timed at --extra-splits only."),
        splits: Optional[str] = typer.Option(None, "--splits", help="Split points (default 1..L-1)."),
        extra_splits: Optional[str] = typer.Option(None, "--extra-splits", help="Default: 1, L/2, L-1."),
        repetitions: int = typer.Option(3, "--repetitions", "-r", min=1),
        warmup: int = typer.Option(1, "--warmup", min=0),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        output: Path = typer.Option(Path("calibration"), "--output", "-o", help="Writes OUTPUT.csv and OUTPUT.png."),
        fmt: str = typer.Option("text", "--format", help="text | json"),
    ):
        """Predicted (planner) vs measured client and server step time for every split point.

        Writes a CSV table and a PNG plot; prints the median and worst relative error.

        Example: hsplit calibrate --model smollm2-135m --profile profiles/devices/this-machine.yaml -o calibration
        """
        _check_format(fmt)
        from hsplit.planner.errors import ConfigError
        from hsplit.runtime.calibrate import calibrate, planner_label
        if not profile.is_file():
            _fail(f"--profile {profile}: no such file (write one with `hsplit profile`)")
        if threads:
            import torch
            torch.set_num_threads(threads)
        try:
            with _Bar("calibrating", fmt == "text") as bar:
                res = calibrate(model, profile, batch_size=batch_size, seq_len=seq_len,
                                ranks=_ints(ranks, "--ranks"), extra_ranks=_ints(extra_ranks, "--extra-ranks"),
                                splits=_ints(splits, "--splits") if splits else None,
                                extra_splits=_ints(extra_splits, "--extra-splits") if extra_splits else None,
                                reps=repetitions, warmup=warmup, on_step=bar.update)
        except ConfigError as e:
            _fail(str(e))
        output.parent.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = output.with_suffix(".csv"), output.with_suffix(".png")
        res.write_csv(csv_path)
        res.plot(png_path)
        if fmt == "json":
            print(json.dumps({"csv": str(csv_path), "png": str(png_path), "settings": res.settings,
                              "summary": res.summary, "rows": res.rows}))
            return
        from rich.table import Table
        t = Table(title=f"{res.settings['model']} b={batch_size} T={seq_len} on {res.settings['device']}")
        for col in ("split", "rank", "client pred", "client meas", "err", "server pred", "server meas", "err"):
            t.add_column(col, justify="right")
        for r in res.rows:
            t.add_row(str(r["split"]), str(r["rank"]), f"{r['predicted_client_s']:.3f}", f"{r['measured_client_s']:.3f}",
                      f"{r['error_client']:+.0%}", f"{r['predicted_server_s']:.3f}", f"{r['measured_server_s']:.3f}",
                      f"{r['error_server']:+.0%}")
        c = _console()
        c.print(t)
        s = res.summary
        c.print(f"planner ({planner_label(res.settings)}): median |error| {s['median_abs_error']:.1%}, "
                f"worst {s['worst_signed_error']:+.1%}")
        if "flops_median_abs_error" in s:
            c.print(f"FLOPs / throughput model alone (without the profile's block times): median |error| "
                    f"{s['flops_median_abs_error']:.1%}, worst {s['flops_worst_signed_error']:+.1%}")
        c.print(f"wrote {csv_path} and {png_path}")
