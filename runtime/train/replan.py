"""Re-planning during a run (`replan: {every: N, threshold: t}` in the plan; DESIGN.md "Importance
drifts while training").

Scoring. In the last round of every window of N rounds (rounds N, 2N, ...), the base weight of
every planned matrix (all blocks x the plan's `modules`) gets a post-accumulate-grad hook for the
local steps of that round: the clients' (client-side blocks) and the server's (blocks above each
client's cut) backward passes also produce dL/dW, the hook folds the step's score of the matrix into
one scalar and frees the gradient at once (one matrix's gradient exists at a time, no per-weight
state). No extra pass over data: the gradients are those of the round's training steps; w is the
frozen base weight in the model during the step. The step's score is the one the plan's importance
was made with (`scoring_method`: `inputs.importance_method`):

- rngwp (a plan made from `hsplit importance --method rngwp`, or re-planned from such a run):
  |sum_w w * dL/dw| / C(W), C(W) = finetune_bytes(d_in, d_out) = 16 (d_in + d_out) bytes, the same
  per-step score as `hsplit importance --method rngwp` (`rngwp_step_score`).
- sensitivity (anything else: sensitivity, uniform, hand-written scores): AdaLoRA's sensitivity
  reduced per matrix, I = sum_w |w * dL/dw|; the uncertainty term U of `hsplit importance` needs
  per-weight state and is left out.

Window score of matrix j = sum_k p_k * mean over k's steps of the step score, normalised to sum 1
over the planned matrices (p_k: data weights renormalised over the clients). In a deployment, a
client reports one scalar per matrix of its blocks, and in a scoring round runs its backward through
all its blocks (weight gradients of frozen matrices: extra compute in 1 round of N only).

Smoothing over windows: S <- beta * S + (1 - beta) * window (beta = BETA = 0.5). rngwp starts from
S = 0, as `hsplit importance --method rngwp` does over its steps (so S after window t is the
exponentially weighted mean of windows 1..t, up to a common factor); sensitivity lets the first window
initialise S (unchanged from before rngwp existed).
The reference is S at the last re-plan; the first window sets it (the plan's own scores were
measured differently - frozen base model, and for sensitivity Ibar*Ubar - so comparing them with S
would count a change of measurement as drift). When shift(reference, S) > threshold (total-variation distance of the
normalised scores, `hsplit.planner.importance.shift`), the plan is re-solved with
`hsplit.planner.api.replan(plan, S)` on the plan's fleet (`inputs.fleet`) and the adapters move:

- hsplitlora: the round's aggregate was already merged into the base weights and adapters
  re-initialised, so the new adapters (new splits / ranks, fresh init with the round's seed) just
  take effect in the next round.
- splitlora: the FedAvg global adapter keeps its first min(r_old, r_new) components; components
  beyond a smaller new rank (or of a module that lost its adapter) are merged into the base weights
  (W += s B[:, r:] A[r:], recorded in the round's merged.safetensors so resume replays it), so the
  aggregated model is unchanged; components beyond the old rank are padded with a fresh A row and a
  zero B column (zero update, trainable). AdamW moments restart.
- other strategies: refused at start-up (not implemented).

Every scoring round writes `replan_shift` on the round's `client=all` metrics row; a re-plan also
writes `replan` ("c0: split 1->3, rank 6->30; ...", total client-side rank) and the new plan,
atomically, as `plan-round-<r>.yaml` in the run folder. The smoothed scores, the reference and the
plan in force are kept in every checkpoint's state.json (floats round-trip exactly), so a resumed
run re-plans exactly as an uninterrupted one.
"""
from __future__ import annotations

from operator import attrgetter
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.importance import Importance, shift
from hsplit.planner.plan import Plan
from hsplit.planner.strategies import STRATEGIES, traits
from hsplit.runtime.train import checkpoint
from hsplit.runtime.common import GLOBAL, derive_seed
from hsplit.runtime.measure.importance import rngwp_step_score
from hsplit.runtime.train.party import move_party

BETA = 0.5
RNGWP_METHODS = ("rngwp", "runtime-rngwp")     # importance methods whose plans are re-scored with rngwp


def scoring_method(plan: Plan) -> str:
    """rngwp when the plan's importance was made with rngwp (`hsplit importance --method rngwp`, or a
    re-plan of a run that scored with it), sensitivity otherwise."""
    made_with = str(plan.inputs.get("importance_method") or "").split(" ", 1)[0]
    return "rngwp" if made_with in RNGWP_METHODS else "sensitivity"


def check(plan: Plan) -> tuple[int, float] | None:
    """(every, threshold) of a plan that re-plans, None otherwise; a clear error when it cannot."""
    cfg = plan.replan
    if not cfg:
        return None
    problems = []
    every, threshold = cfg.get("every", 1), cfg.get("threshold", 0.1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        problems.append(f"replan.every: must be an integer >= 1, got {every!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        problems.append(f"replan.threshold: must be a number in [0, 1] (total-variation distance), got {threshold!r}")
    if not plan.inputs.get("fleet"):
        problems.append("replan: re-planning needs the fleet the plan was made for, and inputs.fleet is missing "
                        "(a hand-written plan); make the plan with `hsplit plan --fleet ...`, add inputs.fleet, "
                        "or remove replan")
    if not traits(plan.strategy).replannable:
        supported = ", ".join(t.name for t in STRATEGIES.values() if t.replannable)
        problems.append(f"replan: not supported with strategy {plan.strategy} (supported: {supported})")
    if problems:
        raise ConfigError(plan.source, problems)
    return int(every), float(threshold)


def _base_weight(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    mod = attrgetter(name)(model)
    if hasattr(mod, "get_base_layer"):
        mod = mod.get_base_layer()
    return mod.weight


def _total_rank(plan: Plan, c, profile) -> int:
    return sum(plan.client_ranks(c, profile).values())


def describe(old: Plan, new: Plan, profile) -> str:
    parts = []
    for a, b in zip(old.clients, new.clients):
        ra, rb = _total_rank(old, a, profile), _total_rank(new, b, profile)
        if a.split_layer == b.split_layer and old.client_ranks(a, profile) == new.client_ranks(b, profile):
            parts.append(f"{a.id}: unchanged")
        else:
            parts.append(f"{a.id}: split {a.split_layer}->{b.split_layer}, rank {ra}->{rb}")
    return "; ".join(parts)


@torch.no_grad()
def apply_plan(sim, new: Plan, r: int, update=None) -> None:
    """Move every adapter of the simulation to `new`'s splits and ranks after round r (0-based).
    With `update` (a live re-plan), splitlora's global adapter is carried over (see module doc) and
    merged residuals are added to update.merge; without it (resume) only the structure is rebuilt,
    the values come from the checkpoint."""
    bank, prof, t = sim.bank, sim.lm.profile, sim.training
    old_global = None
    if sim.global_ranks and update is not None:
        old_global = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in bank.factors(GLOBAL).items()}
    carried = sim.strategy.before_move()
    for p in sim.parties:
        bank.delete(p.adapter)
    if sim.global_ranks is not None:
        bank.delete(GLOBAL)
    new.training.rounds = sim.plan.training.rounds
    sim.plan = new
    for p, c in zip(sim.parties, new.clients):
        move_party(p, new, c, prof)
        bank.add(p.adapter, p.ranks)
    sim.global_ranks = sim.strategy.global_ranks()
    if sim.global_ranks is not None:
        bank.add(GLOBAL, sim.global_ranks)
    seed = derive_seed(t.seed, 2, r + 1)
    for p in sim.parties:
        bank.reinit(p.adapter, seed)
    if sim.global_ranks:
        bank.reinit(GLOBAL, seed)
    if old_global is not None:
        s = t.lora_alpha_over_rank
        new_f = bank.factors(GLOBAL)
        for m, (a, b) in old_global.items():
            keep = min(a.shape[0], sim.global_ranks.get(m, 0))
            if keep:
                new_f[m][0][:keep].copy_(a[:keep])
                new_f[m][1][:, :keep].copy_(b[:, :keep])
            if a.shape[0] > keep:                  # truncated components: into the base weights
                rb, ra = s * b[:, keep:], a[keep:]
                bank.merge_into_base(m, rb, ra)
                if m in update.merge:
                    ob, oa = update.merge[m]
                    rb, ra = torch.cat([ob, rb.to(ob.dtype)], 1), torch.cat([oa, ra.to(oa.dtype)], 0)
                update.merge[m] = (rb, ra)
        for p in sim.parties:
            for m, (a, b) in bank.factors(p.adapter).items():
                a.copy_(new_f[m][0])
                b.copy_(new_f[m][1])
    for p in sim.parties:
        sim.new_optimizers(p)
    sim.strategy.after_move(carried)
    bank.activate(None)


def restore(sim, run_dir: Path, state: dict, r: int) -> None:
    """On resume (before loading round r's tensors): rebuild the adapters of the plan in force."""
    rp = state.get("replan") or {}
    if rp.get("plan_file"):
        apply_plan(sim, Plan.load(Path(run_dir) / rp["plan_file"]), r - 1)


class Replanner:
    """Scores importance in the last round of every window and re-plans when it drifted."""

    def __init__(self, sim, run_dir: Path, every: int, threshold: float):
        self.sim, self.run_dir, self.every, self.threshold = sim, Path(run_dir), every, threshold
        prof = sim.lm.profile
        self.modules = tuple(prof.resolve_modules(sim.plan.modules or None))
        self.names = [prof.module_name(l, m) for l in range(prof.layers) for m in self.modules]
        self.method = scoring_method(sim.plan)
        self.smoothed: dict[str, float] | None = None
        self.reference: dict[str, float] | None = None
        self.plan_file: str | None = None
        self._handles, self._acc, self._party = [], {}, None

    @classmethod
    def start(cls, sim, run_dir: Path, resume_round: int | None = None) -> "Replanner | None":
        """None when the plan does not re-plan; raises ConfigError before anything is written."""
        cfg = check(sim.plan)
        if cfg is None:
            return None
        rp = cls(sim, run_dir, *cfg)
        if resume_round is not None:
            st = checkpoint.read_state(run_dir, resume_round).get("replan") or {}
            rp.smoothed, rp.reference, rp.plan_file = st.get("smoothed"), st.get("reference"), st.get("plan_file")
        return rp

    def scoring(self, r: int) -> bool:
        return (r + 1) % self.every == 0

    def state(self) -> dict:
        return {"replan": {"smoothed": self.smoothed, "reference": self.reference, "plan_file": self.plan_file}}

    # ---- scoring during the round's own training steps ----
    def begin_round(self, r: int, on_step=None):
        """Install the gradient hooks when round r scores; returns the on_step callback to use."""
        if not self.scoring(r):
            return on_step
        sim = self.sim
        total_w = sum(p.weight for p in sim.parties)
        self._acc = {n: 0.0 for n in self.names}
        rngwp = self.method == "rngwp"
        for n in self.names:
            w = _base_weight(sim.lm.model, n)
            w.requires_grad_(True)

            def hook(param, n=n):
                p = self._party
                k = p.weight / total_w / sim.steps_per_round if p is not None else 0.0
                if rngwp:                     # |sum w dL/dw| / C(W)
                    score = rngwp_step_score(param, param.grad)
                else:                         # sum |w dL/dw|
                    score = float((param.detach().double() * param.grad.double()).abs().sum())
                self._acc[n] += k * score
                param.grad = None
            self._handles.append((w, w.register_post_accumulate_grad_hook(hook)))

        def step_hook(rr, i, s):
            self._party = sim.parties[i]
            if on_step:
                on_step(rr, i, s)
        return step_hook

    def _stop(self) -> None:
        for w, h in self._handles:
            h.remove()
            w.requires_grad_(False)
            w.grad = None
        self._handles.clear()
        self._party = None

    # ---- between rounds ----
    def window_scores(self, round_no: int, window: dict[str, float]) -> dict[str, float]:
        """The scores of the window that ends with round `round_no` (1-based), as measured."""
        return window

    def end_round(self, r: int, update, row: dict) -> None:
        """After round r's aggregation: smooth, compare, maybe re-plan (row: the round's `all` row)."""
        if not self.scoring(r):
            return
        self._stop()
        window = self.window_scores(r + 1, dict(self._acc))
        total = sum(window.values())
        if total <= 0:
            return
        window = {n: v / total for n, v in window.items()}
        previous = self.smoothed
        if previous is None and self.method == "rngwp":
            previous = dict.fromkeys(self.names, 0.0)          # rngwp: S_0 = 0
        if previous is None:
            self.smoothed = window
        else:
            self.smoothed = {n: BETA * previous[n] + (1 - BETA) * window[n] for n in self.names}
        if self.reference is None:
            self.reference = dict(self.smoothed)
            return
        sim, prof = self.sim, self.sim.lm.profile
        h = prof.arch_hash()
        moved = shift(Importance(scores=self.reference, method="runtime", model_hash=h),
                      Importance(scores=self.smoothed, method="runtime", model_hash=h), prof, self.modules)
        row["replan_shift"] = moved
        if not moved > self.threshold:
            return
        from hsplit.planner.api import replan
        imp = Importance(scores=dict(self.smoothed), model=prof.name, model_hash=h, method=f"runtime-{self.method}",
                         normalization="per-byte" if self.method == "rngwp" else "raw",
                         settings={"round": r + 1, "beta": BETA, "every": self.every}, source=f"<round {r + 1}>")
        old = sim.plan
        new = replan(old, imp)
        row["replan"] = describe(old, new, prof)
        apply_plan(sim, new, r, update)
        self.plan_file = f"plan-round-{r + 1}.yaml"
        new.save(self.run_dir / self.plan_file)
        self.reference = dict(self.smoothed)


__all__ = ["Replanner", "check", "apply_plan", "restore", "describe", "scoring_method", "BETA"]
