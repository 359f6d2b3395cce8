"""`hsplit run plan.yaml`: the split-federated training loop (in-process simulation).

    result = run("plan.yaml", RunOptions(rounds=2, name="demo"))
    # runs/demo/{config.yaml, metrics.csv, checkpoints/round-NNNN/}

The recipe, per round (DESIGN.md "Runtime semantics"):
  for every client k (one copy of the base weights; k's adapters + optimizers swapped in):
      for each of `local_steps` steps:
          h = client_forward(x)              embeddings + blocks [0, s_k), client adapters
          send h, attention mask, labels     (bytes up)
          loss = server_forward(h)           blocks [s_k, L) + head, server's adapters for k
          server backward -> dL/dh           (bytes down)
          client backward(dL/dh)
          clip (global norm: the client sends one scalar), both AdamW optimizers step
  aggregate every (block, module) over its holders with weights p_k (aggregate.py)
  evaluate the aggregated model on the held-out split
  checkpoint (atomic), append metrics.csv
Clients are independent within a round, so running them one after the other in one process
gives the same result as running them in parallel. Fleet time is what the planned fleet would
take: the plan's predicted round time (the straggler sets it).

All randomness is derived from (seed, round, client, step): same seed, same result, and a resumed
run ends with exactly the adapters of an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import ClientPlan, Plan, _plain
from hsplit.planner.yamlio import atomic_write_text, dump_yaml, read_yaml
from hsplit.runtime import checkpoint
from hsplit.runtime.aggregate import ClientFactors, RoundUpdate, strategy_for
from hsplit.runtime.strategies_het import HETEROGENEOUS, HetState
from hsplit.runtime.data import FederatedData, TokenSet, load_federated_data
from hsplit.runtime.evaluate import evaluate
from hsplit.runtime.lora import AdapterBank
from hsplit.runtime.model import LoadedLM, SplitLM, check_model_hash, lm_loss, load_lm
from hsplit.runtime import replan as replanning

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
METRIC_FIELDS = ["round", "client", "device", "split_layer", "train_loss", "eval_loss", "eval_ppl", "tokens",
                 "wall_s", "fleet_s", "fleet_total_s", "bytes_up", "bytes_down", "lr", "aggregate_s",
                 "replan_shift", "replan"]
GLOBAL = "global"


@dataclass
class RunOptions:
    rounds: int | None = None          # overrides plan.training.rounds
    name: str | None = None            # run folder name (default: the plan file's stem)
    runs_dir: str | Path = "runs"
    resume: bool = False
    eval_max_seqs: int = 64            # held-out sequences evaluated after each round
    progress: bool = True
    device: str = "auto"               # auto | cpu | cuda
    threads: int | None = None         # torch CPU threads (1 is fastest on a busy machine)
    compute_dtype: str = "auto"        # auto (plan dtype; fp32 on CPUs without fast bf16) | fp32 | bf16 | fp16
    keep_checkpoints: int | None = None   # newest rounds that keep adapters + optimizer files (None: all)
    on_step: Callable[[int, int, int], None] | None = None   # (round, client index, step): test hook


@dataclass
class RunResult:
    run_dir: Path
    rounds_done: int
    rows: list[dict]
    eval_before: float
    eval_after: float

    @classmethod
    def from_rows(cls, run_dir: Path, rounds: int, rows: list[dict]) -> "RunResult":
        final = [r for r in rows if r["client"] == "all"]
        return cls(run_dir=run_dir, rounds_done=rounds, rows=rows, eval_before=final[0]["eval_loss"],
                   eval_after=final[-1]["eval_loss"])

    @classmethod
    def of_run(cls, run_dir: Path) -> "RunResult":
        """From a run folder's checkpoints (e.g. one a distributed server wrote)."""
        done = checkpoint.complete_rounds(run_dir)
        rows = [row for r in done for row in checkpoint.read_state(run_dir, r).get("metrics", [])]
        return cls.from_rows(run_dir, done[-1], rows)


def compute_dtype(plan_dtype: str, device: torch.device, override: str = "auto") -> torch.dtype | None:
    """Autocast dtype for the simulation (None = fp32).

    `auto` follows the plan's dtype, except on a CPU without native bf16/fp16 matmuls (no AVX512-BF16
    or AMX), where low-precision autocast is emulated and ~8x slower than fp32: there it computes in fp32.
    Master weights are always fp32 (merged updates are exact); the dtype only affects compute.
    """
    name = plan_dtype if override == "auto" else override
    if name not in DTYPES:
        raise ConfigError("--compute-dtype", [f"must be auto, fp32, bf16 or fp16, got {override!r}"])
    if override == "auto" and device.type == "cpu" and name != "fp32" and not _cpu_has_fast_bf16():
        return None
    return DTYPES[name]


def _cpu_has_fast_bf16() -> bool:
    cpu = getattr(torch._C, "_cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return bool(cpu) and any(getattr(cpu, c, lambda: False)() for c in checks)


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    """Warm-up (linear from base/warmup) then constant, linear or cosine decay towards 0."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------ parties (one per client)

@dataclass
class Party:
    """One client of the simulation and the server-side state kept for it."""
    index: int
    id: str
    device: str
    adapter: str                      # peft adapter name in the shared model
    split: int
    ranks: dict[str, int]             # every adapter of this client: client side + server side
    client_modules: set[str]
    server_modules: set[str]
    data: TokenSet
    weight: float
    predicted_round_s: float | None
    opt_client: torch.optim.Optimizer | None = None
    opt_server: torch.optim.Optimizer | None = None


def _predicted_round(c: ClientPlan) -> float | None:
    v = c.predicted.get("round_s")
    return float(v) if isinstance(v, (int, float)) else None


class Simulation:
    """Everything a run holds: ONE base model, per-client adapters and optimizers, data."""

    def __init__(self, plan: Plan, lm: LoadedLM, data: FederatedData, device: torch.device,
                 compute: str = "auto"):
        self.plan, self.lm, self.data, self.device = plan, lm, data, device
        t = plan.training
        self.t = t
        self.strategy = strategy_for(plan.strategy, plan.source)
        self.autocast_dtype = compute_dtype(t.dtype, device, compute)
        self.split = SplitLM(lm.model, lm.profile.family)
        self.bank = AdapterBank(lm.model, lm.profile.family, t.lora_alpha_over_rank, t.lora_dropout, plan.source)
        self.parties = self._make_parties()
        self.steps_per_round = t.local_steps * (len(plan.clients) if plan.strategy == "centralized" else 1)
        self.total_rounds = t.rounds
        torch.manual_seed(derive_seed(t.seed, 1))
        # hetlora / flexlora / hafl-*: the server's global adapter, selections, importance
        self.het = HetState(self, plan.strategy) if plan.strategy in HETEROGENEOUS else None
        for p in self.parties:
            self.bank.add(p.adapter, self.het.held_ranks(p) if self.het else p.ranks)
        self.global_ranks = self.het.global_ranks if self.het else self._global_ranks()
        if self.global_ranks is not None:
            self.bank.add(GLOBAL, self.global_ranks)
        for p in self.parties:
            self.bank.reinit(p.adapter, derive_seed(t.seed, 2, 0))
            self._new_optimizers(p)
        if self.global_ranks:
            self.bank.reinit(GLOBAL, derive_seed(t.seed, 2, 0))
        if self.het:
            self.het.start()

    # ---- setup ----
    def _make_parties(self) -> list[Party]:
        plan, prof = self.plan, self.lm.profile
        if plan.strategy == "centralized":
            # one model: the first client's ranks expanded over every block (or server_rank on
            # plan.modules when it has none), trained on the pooled data of all clients
            c = plan.clients[0]
            whole = ClientPlan(id="central", device=c.device, split_layer=prof.layers, ranks=dict(c.ranks))
            plan.clients.append(whole)
            try:
                ranks = plan.client_ranks(whole, prof)
            finally:
                plan.clients.remove(whole)
            if not ranks and plan.server_rank > 0:
                mods = prof.resolve_modules(plan.modules, f"{plan.source}: modules")
                ranks = {prof.module_name(l, m): plan.server_rank for l in range(prof.layers) for m in mods}
            pooled = TokenSet.cat(self.data.clients, self.t.seq_len)
            fleet = plan.predicted.get("round_s")
            return [Party(0, "central", c.device, "k0", prof.layers, ranks, set(ranks), set(), pooled, 1.0,
                          float(fleet) if isinstance(fleet, (int, float)) else None)]
        out = []
        for i, c in enumerate(plan.clients):
            cr, sr = plan.client_ranks(c, prof), plan.server_ranks(c, prof)
            out.append(Party(i, c.id, c.device, f"k{i}", c.split_layer, {**cr, **sr}, set(cr), set(sr),
                             self.data.clients[i], c.data_weight, _predicted_round(c)))
        return out

    def _global_ranks(self) -> dict[str, int] | None:
        """The aggregated model's own adapter, for strategies that keep adapters (FedAvg)."""
        if self.plan.strategy != "splitlora":
            return None
        ranks: dict[str, set[int]] = {}
        for p in self.parties:
            for m, r in self.bank.ranks[p.adapter].items():
                ranks.setdefault(m, set()).add(r)
        problems = [f"{m}: splitlora averages A and B separately and needs one rank on every client "
                    f"(client or server side), got {sorted(rs)}; use strategy hsplitlora"
                    for m, rs in sorted(ranks.items()) if len(rs) > 1]
        if problems:
            raise ConfigError(self.plan.source, problems)
        return {m: next(iter(rs)) for m, rs in ranks.items()}

    def _new_optimizers(self, p: Party) -> None:
        t = self.t
        ps_c = self.bank.parameters(p.adapter, p.client_modules)
        ps_s = self.bank.parameters(p.adapter, p.server_modules)
        kw = dict(lr=t.learning_rate, weight_decay=t.weight_decay)
        p.opt_client = torch.optim.AdamW(ps_c, **kw) if ps_c else None
        p.opt_server = torch.optim.AdamW(ps_s, **kw) if ps_s else None

    def _autocast(self):
        dt = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dt or torch.float32, enabled=dt is not None)

    # ---- one training step (client forward -> server -> client backward) ----
    def step(self, p: Party, batch: TokenSet, global_step: int, round_idx: int, step_idx: int) -> dict:
        t = self.t
        lr = lr_at(global_step, self.total_rounds * self.steps_per_round, t.learning_rate, t.warmup_steps,
                   t.lr_schedule)
        opts = [o for o in (p.opt_client, p.opt_server) if o is not None]
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
        torch.manual_seed(derive_seed(t.seed, 3, round_idx, p.index, step_idx))    # dropout
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        labels = batch.labels.to(self.device)
        # client: forward to the cut
        with self._autocast():
            h = self.split.client_forward(ids, mask, p.split)
        # --- activations, mask and labels cross the link ---
        h_server = h.detach().requires_grad_(h.requires_grad)
        with self._autocast():
            logits = self.split.server_forward(h_server, mask, p.split)
        loss, n_tok = lm_loss(logits, labels)
        loss.backward()
        # --- activation gradients cross back ---
        if h.requires_grad:
            h.backward(h_server.grad)
        snap = self.het.before_step(p, step_idx) if self.het else None    # hafl: importance, freezing
        params = [q for o in opts for g in o.param_groups for q in g["params"]]
        if t.max_grad_norm > 0 and params:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        self.finish_step(p, opts, snap)
        # traffic: activations + mask (1 byte/token) + labels (int32) up, activation gradients down
        act = h.numel() * h.element_size()
        up, down = (0, 0) if self.plan.strategy == "centralized" else (act + mask.numel() + 4 * labels.numel(), act)
        return {"loss": float(loss.detach()), "tokens": n_tok, "lr": lr, "bytes_up": up, "bytes_down": down}

    def finish_step(self, p: Party, opts, snap) -> None:
        """Optimizer step(s), then the strategy's post-step hook (hafl: restore frozen components).
        Shared by the in-process step and both sides of the distributed one."""
        for o in opts:
            if o is not None:
                o.step()
                o.zero_grad(set_to_none=True)
        if snap:
            self.het.after_step(p, snap)

    def train_round(self, r: int, progress=None, on_step=None) -> list[dict]:
        """Every client's local steps of round r; one metrics row per client."""
        rows = []
        self.lm.model.train()
        for p in self.parties:
            self.bank.activate(p.adapter)
            start = time.perf_counter()
            losses, toks, up, down, lr = [], 0, 0, 0, 0.0
            for s in range(self.steps_per_round):
                if on_step:
                    on_step(r, p.index, s)
                batch = p.data.batch(self.t.batch_size, self.t.seed, r, p.index, s)
                out = self.step(p, batch, r * self.steps_per_round + s, r, s)
                losses.append(out["loss"])
                toks += out["tokens"]
                up += out["bytes_up"]
                down += out["bytes_down"]
                lr = out["lr"]
                if progress:
                    progress.advance()
            if self.strategy.resets_adapters:
                # adapters restart after aggregation: this client's AdamW moments are dead weight now
                for o in (p.opt_client, p.opt_server):
                    if o is not None:
                        o.state.clear()
            rows.append({"round": r + 1, "client": p.id, "device": p.device, "split_layer": p.split,
                         "train_loss": float(np.mean(losses)), "tokens": toks,
                         "wall_s": time.perf_counter() - start, "fleet_s": p.predicted_round_s,
                         "bytes_up": up, "bytes_down": down, "lr": lr})
        self.lm.model.eval()
        self.bank.activate(None)
        return rows

    # ---- aggregation ----
    def collect(self) -> dict[str, list[ClientFactors]]:
        """Per (block, module): every holder's factors, client- or server-held alike."""
        updates: dict[str, list[ClientFactors]] = {}
        for p in self.parties:
            for m, (a, b) in self.bank.factors(p.adapter).items():
                updates.setdefault(m, []).append(ClientFactors(p.weight, a, b, self.t.lora_alpha_over_rank,
                                                               party=p.adapter))
        return updates

    def aggregate(self, r: int, rows: list[dict]) -> RoundUpdate:
        update = self.combine()
        self.apply(update, r)
        self.count_traffic(update, rows)
        return update

    def combine(self) -> RoundUpdate:
        """The strategy's aggregate of every party's factors (nothing is changed yet)."""
        return (self.het.aggregate(self.strategy, self.collect()) if self.het
                else self.strategy.aggregate(self.collect()))

    def count_traffic(self, update: RoundUpdate, rows: list[dict]) -> None:
        """Bytes of the aggregation step: clients upload their own adapters, download the result."""
        for p, row in zip(self.parties, rows):
            if self.plan.strategy == "centralized":
                continue
            own = self.bank.factors(p.adapter)
            if self.het:      # up: the components it updated; down: what it holds next round
                up = self.het.updated_ranks(p)
                row["bytes_up"] += sum(4 * up[m] * (a.shape[1] + b.shape[0]) for m, (a, b) in own.items()
                                       if m in p.client_modules)
                row["bytes_down"] += sum(4 * (a.numel() + b.numel()) for m, (a, b) in own.items()
                                         if m in p.client_modules)
                continue
            row["bytes_up"] += sum(4 * (a.numel() + b.numel()) for m, (a, b) in own.items() if m in p.client_modules)
            got = update.merge if update.merge else update.assign
            row["bytes_down"] += sum(4 * (x.numel() + y.numel()) for m, (x, y) in got.items() if m in p.client_modules)

    @torch.no_grad()
    def apply(self, update: RoundUpdate, r: int) -> None:
        """Merge / assign / re-initialise, exactly as both a live run and a resumed run do it."""
        for m, (b_cat, a_cat) in update.merge.items():
            self.bank.merge_into_base(m, b_cat.to(self.device), a_cat.to(self.device))
        for m, (a, b) in update.assign.items():
            for name in [p.adapter for p in self.parties] + ([GLOBAL] if self.global_ranks else []):
                f = self.bank.factors(name).get(m)
                if f is not None:
                    f[0].copy_(a)
                    f[1].copy_(b)
        if self.het and (update.global_factors or update.assign_party):
            self.het.apply(update)
        if update.reinit:
            for p in self.parties:
                self.bank.reinit(p.adapter, derive_seed(self.t.seed, 2, r + 1))
                self._new_optimizers(p)

    def eval_adapter(self) -> str | None:
        """The adapter that represents the aggregated model (None: everything is in the base)."""
        if self.plan.strategy == "centralized":
            return self.parties[0].adapter
        return GLOBAL if self.global_ranks else None

    # ---- state for checkpoints ----
    def tensors(self, update: RoundUpdate | None) -> dict[str, dict[str, torch.Tensor]]:
        adapters, optim = {}, {}
        names = [(p.adapter, p) for p in self.parties] + ([(GLOBAL, None)] if self.global_ranks else [])
        for name, p in names:
            for k, v in self.bank.state(name, copy=False).items():
                adapters[f"{name}/{k}"] = v
            if p is None:
                continue
            for side, opt in (("client", p.opt_client), ("server", p.opt_server)):
                if opt is None:
                    continue
                for i, st in opt.state_dict()["state"].items():
                    for key, v in st.items():
                        optim[f"{name}/{side}/{i}/{key}"] = torch.as_tensor(v)
        merged = {}
        if update is not None:
            for m, (b, a) in update.merge.items():
                merged[f"{m}.B"] = b
                merged[f"{m}.A"] = a
        if self.het:
            optim.update(self.het.state_tensors())      # hafl: importance scores (selections follow)
        return {"adapters.safetensors": adapters, "optimizer.safetensors": optim, "merged.safetensors": merged}

    def load_tensors(self, adapters: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None:
        names = [(p.adapter, p) for p in self.parties] + ([(GLOBAL, None)] if self.global_ranks else [])
        for name, p in names:
            self.bank.load_state(name, {k[len(name) + 1:]: v for k, v in adapters.items() if k.startswith(name + "/")})
            if p is None:
                continue
            self._new_optimizers(p)
            for side, opt in (("client", p.opt_client), ("server", p.opt_server)):
                if opt is None:
                    continue
                sd = opt.state_dict()
                state: dict[int, dict] = {}
                prefix = f"{name}/{side}/"
                for k, v in optim.items():
                    if k.startswith(prefix):
                        i, key = k[len(prefix):].split("/")
                        state.setdefault(int(i), {})[key] = v
                sd["state"] = state
                opt.load_state_dict(sd)
        if self.het:
            self.het.load_state_tensors(optim)

    def replay_merge(self, merged: dict[str, torch.Tensor]) -> None:
        mods = sorted({k[:-2] for k in merged})
        self.apply(RoundUpdate(merge={m: (merged[f"{m}.B"], merged[f"{m}.A"]) for m in mods}), -1)


# ------------------------------------------------------------------ building and running

def pick_device(name: str) -> torch.device:
    """The torch device for --device auto | cpu | cuda[:N]; the one check of that flag (run, eval,
    profile), made before anything is loaded: a bad or unavailable device is a ConfigError."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"--device {name}", ["use auto, cpu or cuda"])
    if not torch.cuda.is_available():
        why = "this torch is CPU-only" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"--device {name}", [f"CUDA is not available ({why}); use --device cpu or auto"])
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}", [f"only {torch.cuda.device_count()} CUDA device(s) are visible "
                                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); use --device cuda"])
    return torch.device(name)


def build(plan: Plan, progress: bool = True, device: str = "auto", compute: str = "auto") -> Simulation:
    """Load and check everything a run needs (raises ConfigError before anything is written)."""
    dev = pick_device(device)                   # before the (slow) model load
    try:
        lm = load_lm(plan.model, progress=progress)
    except ConfigError as e:                    # the plan's `model:` could not be loaded: name the plan
        if e.source != plan.model:
            raise
        raise ConfigError(plan.source, [f"model: {x.removeprefix('model: ')}" for x in e.problems]) from None
    check_model_hash(plan.inputs.get("model_hash"), lm.profile, plan.source)
    plan.validate_for(lm.profile)
    strategy_for(plan.strategy, plan.source)
    lm.model.to(dev)
    lm.model.requires_grad_(False)
    weights = [c.data_weight for c in plan.clients]
    data = load_federated_data(plan.data, lm.tokenizer, plan.training.seq_len, weights, plan.training.seed)
    return Simulation(plan, lm, data, dev, compute)


def _run_dir(plan_path: Path, opts: RunOptions) -> Path:
    return Path(opts.runs_dir) / (opts.name or plan_path.stem)


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                    for k in METRIC_FIELDS})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


class RunFinished(ConfigError):
    """`--resume` of a run that has already trained all its rounds: nothing to do (the CLI says so
    and exits 0; raised before the model is loaded)."""

    def __init__(self, run_dir: Path, rounds: int):
        self.run_dir, self.rounds = run_dir, rounds
        problem = f"already finished its {rounds} rounds; pass --rounds N (N > {rounds}) to train more"
        self.message = f"{run_dir} {problem}"
        super().__init__(str(run_dir), [problem])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run`: `message` says where it stopped, the last complete checkpoint and the
    command that resumes it (the CLI prints it and exits 130)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def resume_command(plan_path: Path, run_dir: Path, opts: RunOptions, resume: bool = True, extra=()) -> str:
    """The `hsplit run ... --resume` that continues this run with the options it was started with
    (resume=False: the command that starts it again; extra: more options, e.g. --distributed ones)."""
    import shlex
    cmd = ["hsplit", "run", str(plan_path), "--name", run_dir.name] + (["--resume"] if resume else [])
    if Path(opts.runs_dir) != Path("runs"):
        cmd += ["--runs-dir", str(opts.runs_dir)]
    if opts.rounds:
        cmd += ["--rounds", str(opts.rounds)]
    if opts.keep_checkpoints is not None:
        cmd += ["--keep-checkpoints", str(opts.keep_checkpoints)]
    if opts.eval_max_seqs != RunOptions.eval_max_seqs:
        cmd += ["--eval-seqs", str(opts.eval_max_seqs)]
    return shlex.join(cmd + list(extra))


def interrupted(plan_path: Path, run_dir: Path, opts: RunOptions, round_no: int | None, extra=()) -> RunInterrupted:
    done = checkpoint.complete_rounds(run_dir)
    if round_no is None:
        where = "while starting"
    elif done and done[-1] >= round_no:          # between the round's checkpoint and the next round
        where = f"after round {round_no}"
    else:
        where = f"in round {round_no}"
    if not done:
        return RunInterrupted(f"interrupted {where}, before the first checkpoint; nothing was written; start "
                              f"again with: {resume_command(plan_path, run_dir, opts, False, extra)}")
    return RunInterrupted(f"interrupted {where}; the last complete checkpoint is round {done[-1]} in {run_dir}; "
                          f"resume with: {resume_command(plan_path, run_dir, opts, True, extra)}")


def prepare_run_dir(plan: Plan, plan_path: Path, opts: RunOptions) -> tuple[Path, list[int], int]:
    """The run folder, its complete rounds and the number of rounds to train. Refuses to resume a run
    that has no complete checkpoint or was started with another plan, and to overwrite a run."""
    run_dir = _run_dir(plan_path, opts)
    done = checkpoint.complete_rounds(run_dir)
    if opts.resume:
        if not (run_dir / "config.yaml").is_file() or not done:
            raise ConfigError(str(run_dir), ["--resume: no run with a complete checkpoint here; "
                                             "start it without --resume"])
        config = read_yaml(run_dir / "config.yaml")
        if config.get("plan") != _plain(plan.to_dict()):
            raise ConfigError(str(plan_path), [f"--resume: the plan differs from the one {run_dir} was started "
                                               "with (config.yaml); resume with that plan or use a new --name"])
        rounds = opts.rounds or int(config["run"]["rounds"])
        last = done[-1]
        if rounds < last:
            raise ConfigError(f"--rounds {rounds}", [f"{run_dir} has already completed {last} rounds, more than "
                                                     f"{rounds}; pass --rounds N (N > {last}) to train more"])
        if rounds == last:
            raise RunFinished(run_dir, last)
        return run_dir, done, rounds
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(str(run_dir), ["a run with this name exists: pass --resume to continue it, "
                                         "or --name NEW to start another"])
    return run_dir, done, opts.rounds or plan.training.rounds


def run(plan_path: str | Path, opts: RunOptions | None = None) -> RunResult:
    """Execute a plan (or resume it) and return where the outputs are."""
    opts = opts or RunOptions()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    plan_path = Path(plan_path)
    plan = Plan.load(plan_path)
    pick_device(opts.device)                    # a bad --device is an error before anything is loaded
    run_dir, done, rounds = prepare_run_dir(plan, plan_path, opts)
    plan.training.rounds = rounds
    if rounds < 1:
        raise ConfigError(str(plan_path), ["--rounds must be >= 1"])
    if opts.resume and opts.progress:
        print(f"resuming {run_dir} from round {done[-1]}", file=sys.stderr, flush=True)
    where: list[int | None] = [None]            # the round being trained, for the Ctrl-C message
    try:
        return _run(plan, plan_path, opts, run_dir, done, rounds, where)
    except KeyboardInterrupt:
        raise interrupted(plan_path, run_dir, opts, where[0]) from None


def _run(plan: Plan, plan_path: Path, opts: RunOptions, run_dir: Path, done: list[int], rounds: int,
         where: list[int | None]) -> RunResult:
    sim = build(plan, progress=opts.progress, device=opts.device, compute=opts.compute_dtype)  # all checks
    replanner = replanning.Replanner.start(sim, run_dir, done[-1] if opts.resume else None)  # None: no replan
    config = {"plan": Plan.load(plan_path).to_dict(),
              "run": {"rounds": rounds, "name": run_dir.name, "model_path": sim.lm.path,
                      "model_hash": sim.lm.profile.arch_hash(), "eval_max_seqs": opts.eval_max_seqs,
                      "device": str(sim.device), "torch": str(torch.__version__),
                      "compute_dtype": str(sim.autocast_dtype or torch.float32).removeprefix("torch.")},
              "data": sim.data.summary}
    rows: list[dict] = []
    if opts.resume:
        checkpoint.remove_stale(run_dir)
        start = done[-1]
        rows = _restore(sim, run_dir, start)
        if (run_dir / "config.yaml").is_file():
            old = read_yaml(run_dir / "config.yaml")
            old["run"]["rounds"] = rounds
            atomic_write_text(run_dir / "config.yaml", dump_yaml(old, "# Resolved run configuration (hsplit run)."))
    else:
        start = 0
        ev = evaluate(sim, sim.data.eval, opts.eval_max_seqs)
        rows = [_global_row(0, [], ev, 0.0, 0.0, 0.0, None)]
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_text(run_dir / "config.yaml", dump_yaml(config, "# Resolved run configuration (hsplit run)."))
            checkpoint.save(run_dir, 0, sim.tensors(None), {"metrics": rows, "strategy": plan.strategy})
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)      # nothing half-written
            raise
    write_metrics(run_dir, rows)

    fleet_total = next((r["fleet_total_s"] for r in reversed(rows) if r.get("fleet_total_s") is not None), 0.0)
    with _Progress(opts.progress) as bar:
        bar.start_rounds(rounds, start)
        for r in range(start, rounds):
            where[0] = r + 1
            t0 = time.perf_counter()
            bar.start_round(r, len(sim.parties) * sim.steps_per_round)
            client_rows = sim.train_round(r, bar, replanner.begin_round(r, opts.on_step) if replanner else opts.on_step)
            t1 = time.perf_counter()
            update = sim.aggregate(r, client_rows)
            agg_s = time.perf_counter() - t1
            ev = evaluate(sim, sim.data.eval, opts.eval_max_seqs)
            new_rows, fleet_total = round_rows(sim, r, client_rows, ev, time.perf_counter() - t0, agg_s, fleet_total)
            g = new_rows[-1]
            if replanner:      # re-score importance, maybe re-plan (runtime/replan.py)
                replanner.end_round(r, update, g)
            checkpoint.save(run_dir, r + 1, sim.tensors(update), {"metrics": new_rows, "strategy": plan.strategy,
                                                                 **(replanner.state() if replanner else {})},
                            keep=opts.keep_checkpoints)
            rows += new_rows
            write_metrics(run_dir, rows)
            bar.end_round(g)
    return RunResult.from_rows(run_dir, rounds, rows)


def _fleet_round(sim: Simulation, rows: list[dict]) -> float | None:
    planned = sim.plan.predicted.get("round_s")
    if isinstance(planned, (int, float)):
        return float(planned)
    times = [r["fleet_s"] for r in rows if r.get("fleet_s") is not None]
    return max(times) if times else None


def _fmt(x, spec: str) -> str:
    """A metric for a progress line: n/a when it is missing (no held-out token was scored)."""
    return format(x, spec) if x is not None and x == x else "n/a"


def round_rows(sim: Simulation, r: int, client_rows: list[dict], eval_loss: float, wall: float, agg_s: float,
               fleet_total: float | None) -> tuple[list[dict], float | None]:
    """Round r's metrics rows (every client's, then the fleet's "all" row, last) and the new fleet total."""
    fleet = _fleet_round(sim, client_rows)
    fleet_total = fleet_total + fleet if fleet is not None and fleet_total is not None else None
    g = _global_row(r + 1, client_rows, eval_loss, wall, agg_s, fleet_total, fleet)
    for row in client_rows:
        row.update(eval_loss=None, eval_ppl=None, fleet_total_s=None, aggregate_s=None)
    return client_rows + [g], fleet_total


def _global_row(r, client_rows, eval_loss, wall, agg_s, fleet_total, fleet) -> dict:
    toks = sum(c["tokens"] for c in client_rows)
    loss = (sum(c["train_loss"] * c["tokens"] for c in client_rows) / toks) if toks else None
    return {"round": r, "client": "all", "device": "", "split_layer": "", "train_loss": loss,
            "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss) if eval_loss == eval_loss else None,
            "tokens": toks, "wall_s": wall, "fleet_s": fleet, "fleet_total_s": fleet_total,
            "bytes_up": sum(c["bytes_up"] for c in client_rows),
            "bytes_down": sum(c["bytes_down"] for c in client_rows),
            "lr": client_rows[-1]["lr"] if client_rows else None, "aggregate_s": agg_s}


def _restore(sim: Simulation, run_dir: Path, last: int) -> list[dict]:
    """Replay rounds 1..last onto the fresh simulation; returns the metrics rows so far."""
    rows = []
    for r in range(0, last + 1):
        files = ("merged.safetensors",) if r < last else checkpoint.FILES
        state, tensors = checkpoint.load(run_dir, r, files)
        if r > 0 and tensors["merged.safetensors"]:
            sim.replay_merge(tensors["merged.safetensors"])
        rows += state.get("metrics", [])
        if r == last:
            replanning.restore(sim, run_dir, state, r)      # the plan in force after re-plans
            sim.load_tensors(tensors["adapters.safetensors"], tensors["optimizer.safetensors"])
    return rows


def load_run(run_dir: str | Path, progress: bool = False, device: str = "cpu") -> tuple[Simulation, dict, int]:
    """Rebuild a run's aggregated model from its latest checkpoint: (simulation, config, round)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(str(run_dir), ["not a run folder (no config.yaml); runs are under runs/<name>"])
    config = read_yaml(cfg_path)
    plan = Plan.from_dict(config["plan"], str(cfg_path))
    plan.training.rounds = int(config["run"]["rounds"])
    done = checkpoint.complete_rounds(run_dir)
    if not done:
        raise ConfigError(str(run_dir), ["the run has no complete checkpoint yet"])
    sim = build(plan, progress=progress, device=device)
    _restore(sim, run_dir, done[-1])
    return sim, config, done[-1]


class _Progress:
    """Rich progress bars for rounds and steps (or nothing when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.p = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.console = Console(stderr=True)
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=self.console)
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)
        return False

    def start_rounds(self, total: int, done: int) -> None:
        if self.p:
            self.rounds = self.p.add_task("rounds", total=total, completed=done)
            self.steps = None

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
                               f"{g['eval_loss']:.4f} (ppl {_fmt(g['eval_ppl'], '.2f')}), wall {g['wall_s']:.1f} s{fleet}")
