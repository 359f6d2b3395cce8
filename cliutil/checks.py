"""What `hsplit plan` checks and writes about its inputs: the data, the fleet, profiles, the plan file."""
from __future__ import annotations

from pathlib import Path

from hsplit.cliutil.console import err, fail
from hsplit.planner.errors import ConfigError


def checked_data(spec, output: Path, seq_len: int, seed: int = 0):
    """`hsplit plan`'s data: a FORMAT:PATH prefix split off, the data checked (it resolves, its records are of
    a known kind: ConfigError otherwise), a tiny held-out split warned about on stderr, and a relative local
    path rewritten relative to the plan file's folder (where `hsplit run` reads it from; an absolute one stays).
    check_plan_data(plan, output) then checks the records against the plan's clients. Imports `datasets`
    only for folders saved by it, dataset ids and Flower partitions; never torch."""
    from hsplit.planner.plan_refs import written_data_path
    from hsplit.runtime.data.source import check_classification, check_data, split_data_ref
    if spec.format == "auto":
        spec.path, spec.format = split_data_ref(spec.path)
    for line in check_data(spec, seq_len):
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    if spec.task == "classification":       # the label set, read once, goes into the plan (data.labels)
        spec.labels = check_classification(spec, seed, None, seq_len)
    spec.path = written_data_path(spec.path, output)
    return spec


def save_plan(plan, output: Path) -> None:
    """Write `hsplit plan`'s plan: a local model folder and fleet file given relative to the current folder are
    written relative to the plan file's folder (as data.path), so that the plan works from any folder."""
    from hsplit.planner.plan_refs import written_fleet_ref, written_model_ref
    plan.model = written_model_ref(plan.model, output)
    plan.inputs["model"] = written_model_ref(plan.inputs.get("model", plan.model), output)
    if isinstance(plan.inputs.get("fleet"), str):
        plan.inputs["fleet"] = written_fleet_ref(plan.inputs["fleet"], output)
    try:
        plan.save(output)
    except OSError as e:
        fail(f"--output: cannot write {output}: {e.strerror or e}")


def check_fleet(plan, fleet: str | None) -> str:
    """The fleet `hsplit plan --check` checks against: --fleet when given, else the plan's own (inputs.fleet,
    read from the plan file's folder by Plan.load; a shipped fleet recorded by another install's path is
    found by its name), else `example` with a note (a hand-written plan names none)."""
    from hsplit.planner.fleet import resolve_fleet_path
    if fleet is not None:
        return fleet
    ref = plan.inputs.get("fleet")
    if not isinstance(ref, str) or not ref:
        err.print(f"note: {plan.source} records no fleet (inputs.fleet): checking against the shipped fleet "
                  "example; pass --fleet FLEET to choose", highlight=False, markup=False, soft_wrap=True)
        return "example"
    for cand in (ref, Path(ref).stem):
        try:
            return str(resolve_fleet_path(cand))
        except ConfigError:
            pass
    raise ConfigError(plan.source, [f"inputs.fleet: the plan's fleet {ref} is not found (read from the plan "
                                    f"file's folder and the current folder); pass --fleet FLEET"])


def device_profile_path(ref: Path) -> Path:
    """`--profile`: a device profile file, or a shipped profile's name (as fleets name devices); else one
    error naming the shipped names and how to write one."""
    from hsplit.planner.device import PROFILE_DIR, shipped_device_names
    if ref.is_file():
        return ref
    shipped = PROFILE_DIR / "devices" / f"{ref}.yaml"
    if shipped.is_file() and "/" not in str(ref):
        return shipped
    fail(f"--profile {ref}: no such file, nor a shipped profile ({', '.join(shipped_device_names())}); "
         "write one for this machine with `hsplit profile`")


def check_plan_data(plan, written_to: Path | None = None) -> None:
    """What `hsplit run` would refuse about a plan's data and clients (datasource.check_records: records, roles,
    the partition over the plan's clients), and notes. `hsplit plan --check` (written_to None): also the checks
    of checked_data, the plan's data.path already read from the plan file's folder, errors naming the plan
    file. `hsplit plan` (written_to: the plan file to be): after checked_data, the plan's client count known."""
    from dataclasses import replace

    from hsplit.planner.plan_refs import resolve_data_path
    from hsplit.runtime.data.source import check_data, check_records
    from hsplit.runtime.data.summary import data_summary, summary_line
    spec = plan.data if written_to is None else replace(plan.data, path=resolve_data_path(
        plan.data.path, Path(written_to).parent))
    weights = [c.data_weight for c in plan.clients]
    try:
        lines = check_data(spec, plan.training.seq_len) if written_to is None else []
        lines += check_records(spec, plan.training.seq_len, weights, plan.training.seed)
        lines.append(summary_line(data_summary(spec, plan.training.seq_len, weights, plan.training.seed,
                                               plan.model)))
    except ConfigError as e:
        if written_to is not None:
            raise
        raise ConfigError(plan.source, [f"{e.source}: {x}" if not x.startswith(e.source) else x
                                        for x in e.problems]) from None
    for line in lines:
        err.print(line, highlight=False, markup=False, soft_wrap=True)
