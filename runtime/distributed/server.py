"""The server process of a distributed run (rank 0): the blocks above the lowest split and the head, the
server-side adapters of every client, the strategy's state; the executor of the one round loop.

    result = Server(plan_path, opts, dopts, link, store, world, say).run()

It serves clients concurrently: one reader thread per client (link.py) queues their messages and the
server handles whichever arrives first with step.ServerSide (the same server half the in-process
simulation calls). A client that dies (connection lost) or does not answer within --timeout is
named; the round finishes with the remaining clients if at least --min-clients are left
(aggregation re-weighted over them, recorded in faults.json and the metrics), otherwise the server
keeps the last complete checkpoint, tells the other clients to stop and exits 3 with the exact
--resume command. Every wait has a deadline; no process waits forever.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.planner.yamlio import atomic_write_text
from hsplit.runtime.train import checkpoint
from hsplit.runtime.distributed.auth import admit, plan_hash
from hsplit.runtime.distributed.groups import gather_bytes, scatter_bytes, subgroup
from hsplit.runtime.distributed.wire import (ACT, AGG, EVAL, EVAL_H, FINISH, GRAD, KIND_NAMES, NORM, RESTORE, ROUND,
                                             TOTAL, PeerLost, bytes_tensor, decode_tree, encode_tree)
from hsplit.runtime.outputs.evaluate import eval_subset, evaluate
from hsplit.runtime.train.loop import rounds_loop
from hsplit.runtime.outputs.rundir import RunResult, prepare_run_dir, restore
from hsplit.runtime.train.simulation import build_part, load_optimizer_tensors
from hsplit.runtime.train.step import ServerSide, clips, count_update_traffic


class Stop(Exception):
    """The run cannot go on (too few clients left, a collective failed)."""
    def __init__(self, rank, reason):
        super().__init__(reason)
        self.rank, self.reason = rank, reason


def check_min_clients(plan: Plan, plan_path, dopts) -> None:
    if dopts.min_clients is not None and not 1 <= dopts.min_clients <= len(plan.clients):
        raise ConfigError(str(plan_path), [f"--min-clients {dopts.min_clients}: the plan has {len(plan.clients)} "
                                           f"clients; give 1..{len(plan.clients)}"])


def checkpoint_files(run_dir: Path, last: int) -> dict[str, torch.Tensor]:
    """What a client needs to replay the run: merged factors of rounds 1..last, everything of round last."""
    out = {}
    for r in range(0, last + 1):
        d = checkpoint.round_dir(run_dir, r)
        names = ["state.json"] + (["merged.safetensors"] if r < last else list(checkpoint.FILES))
        for n in names:
            out[str((d / n).relative_to(run_dir))] = bytes_tensor((d / n).read_bytes())
    return out


@dataclass
class Serving:
    """Where one client is in its local steps of the round."""
    step: int = 0
    waiting: str = "ACT"


class Server:
    replans = False       # re-planning scores importance on both sides of every cut: in-process only for now

    def __init__(self, plan_path: Path, opts, dopts, link, store, world: int, say, seq: int = 0):
        self.plan_path, self.opts, self.dopts, self.link, self.store, self.say = plan_path, opts, dopts, link, store, say
        self.seq, self.world = seq, world
        self.plan = Plan.load(plan_path)
        self.phash = plan_hash(self.plan)       # of the file as every process reads it (before --rounds)
        self.live = list(range(1, world))
        self.group, self.members, self.gen = None, None, 0
        self.faults: list[dict] = []
        self.sim = None
        self.current = []             # the parties of the round being trained (its sampled live clients)
        self.round = 0
        self.run_dir: Path | None = None

    def _name(self, k: int) -> str:
        c = self.plan.clients[k - 1] if 0 < k <= len(self.plan.clients) else None
        return f"client {c.id if c else '?'} (rank {k}{', ' + c.device if c is not None else ''})"

    def _party(self, k: int):
        return self.sim.parties[k - 1]

    def try_send(self, k, kind, ints=(), tensors=()) -> bool:
        try:
            self.link.send(k, kind, ints, tensors)
            return True
        except PeerLost:
            return False

    # ---- the run ----
    def run(self) -> RunResult:
        opts, plan, plan_path = self.opts, self.plan, self.plan_path
        if len(plan.clients) != self.world - 1:
            raise ConfigError(str(plan_path), [f"the plan has {len(plan.clients)} clients but {self.world} processes "
                                               f"were started: start {len(plan.clients) + 1} (rank 0 = server)"])
        check_min_clients(plan, plan_path, self.dopts)
        run_dir, done, rounds = prepare_run_dir(plan, plan_path, opts)
        plan.training.rounds = rounds
        self.warn_timeout()
        admit(self.link, self.live, self.phash, self._name, self.dopts.connect_timeout_s)
        self.say(f"{len(self.live)} client(s) joined with the run's token and plan (sha256 {self.phash[:12]}..)")
        stop = threading.Event()
        threading.Thread(target=self.link.heartbeat, args=(lambda: self.live, stop), daemon=True,
                         name="hsplit-heartbeat").start()
        try:
            self.run_dir = run_dir
            sim = self.sim = build_part(plan, 0, opts.device, opts.compute_dtype)
            self.side = ServerSide(sim)
            self.min_clients = self.dopts.min_clients or len(sim.parties)
            start = done[-1] if opts.resume else 0
            extra = {"distributed": {"processes": self.world, "backend": "gloo", "min_clients": self.min_clients,
                                     "timeout_s": self.dopts.timeout_s}}
            res = rounds_loop(self, plan, plan_path, opts, run_dir, done, rounds, [None], config_extra=extra)
            self.finish(rounds - start)
            return res
        finally:
            stop.set()

    def warn_timeout(self) -> None:
        """--timeout bounds the wait for a client's next message, i.e. one of its steps: say so when the plan
        predicts steps close to it (the prediction is for the real device; a local run may differ)."""
        steps = {c.id: float(c.predicted.get("step_s") or 0) for c in self.plan.clients}
        slow = max(steps, key=steps.get, default=None)
        if slow is not None and self.dopts.timeout_s < 3 * steps[slow]:
            self.say(f"warning: the plan predicts steps of {steps[slow]:.3g} s for client {slow}; with --timeout "
                     f"{self.dopts.timeout_s:g} s a slow step may be taken for a lost client: use --timeout "
                     f"{math.ceil(5 * steps[slow])} or more")

    def finish(self, rounds_trained: int) -> None:
        for k in self.live:
            self.try_send(k, FINISH)
        self.link.flush(self.live, self.dopts.timeout_s)
        steps = rounds_trained * self.sim.steps_per_round * len(self.sim.round_parties(0))
        by_kind = self.link.by_kind
        atomic_write_text(self.run_dir / "traffic.json", json.dumps(
            {"training_steps": steps, "bytes_by_message": by_kind,
             "step_bytes": sum(by_kind.get(k, 0) for k in ("ACT", "GRAD", "NORM", "TOTAL"))}, indent=1))

    def lose(self, k: int, reason: str) -> None:
        """A client is gone: continue without it when --min-clients allows, else stop with --resume."""
        if k not in self.live:
            return
        self.live.remove(k)
        r = self.round + 1
        name = self._name(k)
        self.faults.append({"round": r, "client": self._party(k).id if self.sim else str(k), "rank": k,
                            "reason": reason, "remaining": [self._party(j).id for j in self.live] if self.sim else []})
        if self.sim is not None and self.run_dir is not None:
            atomic_write_text(self.run_dir / "faults.json", json.dumps(self.faults, indent=1) + "\n")
        self.say(f"error: {name} was lost in round {r}: {reason}")
        if len(self.live) >= self.min_clients and self.live:
            self.say(f"continuing round {r} with {len(self.live)} client(s) (--min-clients {self.min_clients}); "
                     "aggregation is re-weighted over them")
            return
        raise Stop(k, f"{name} was lost: {reason}")

    def _each(self, fn) -> None:
        for k in list(self.live):
            try:
                fn(k)
            except PeerLost as e:
                self.lose(e.rank, e.reason)

    # ---- the executor of loop.rounds_loop ----
    def restore(self, run_dir: Path, last: int) -> list[dict]:
        rows = restore(self.sim, run_dir, last)
        files = checkpoint_files(run_dir, last)

        def send(k):
            own = self.sim.store.read_bytes(self._party(k).adapter) if self.sim.store is not None else None
            party = {"party": bytes_tensor(own)} if own is not None else {}     # client sampling: its own state
            self.link.send(k, RESTORE, [last], [encode_tree({"last": last, "files": files, **party})])
        self._each(send)
        return rows

    def serve_steps(self, source, active: set, state: dict, last: dict, timeout_s: float, r: int) -> None:
        """Serve the round's step messages (`source.next(deadline, ranks)`: a Link or Flower's stream hub) until
        every party in `active` has finished its steps or is lost: silence past `timeout_s` since its last message
        (`last`: rank -> time.monotonic()) or a broken link names it (self.lose). Every transport's server loop."""
        while active:
            deadline = min(last[k] for k in active) + timeout_s
            try:
                m = source.next(deadline, active)
            except TimeoutError:
                k = min(active, key=lambda j: last[j])
                active.discard(k)
                self.lose(k, f"no answer within {timeout_s:g} s (round {r + 1}, step "
                             f"{state[k].step + 1} of {self.sim.steps_per_round})")
                continue
            except PeerLost as e:
                active.discard(e.rank)
                self.lose(e.rank, e.reason)
                continue
            try:
                if self.serve(state[m.src], m, r):
                    active.discard(m.src)
                last[m.src] = time.monotonic()
            except PeerLost as e:
                active.discard(e.rank)
                self.lose(e.rank, e.reason)

    def train_round(self, r: int, reporter=None, on_step=None) -> list[dict]:
        sim, link = self.sim, self.link
        self.round = r
        sampled = {p.index + 1 for p in sim.round_parties(r)}      # client sampling: the others wait
        self.current = [self._party(k) for k in self.live if k in sampled]
        sim.materialise(self.current, r)
        sim.lm.model.train()
        self.side.begin_round(self.current)
        state = {k: Serving() for k in self.live}
        for k in [k for k in self.live if k in sampled]:
            try:
                link.send(k, ROUND, [r, sim.total_rounds])
            except PeerLost as e:
                self.lose(e.rank, e.reason)
        active = {k for k in self.live if k in sampled}
        self.serve_steps(link, active, state, {k: time.monotonic() for k in active}, self.dopts.timeout_s, r)
        sim.lm.model.eval()
        sim.bank.activate(None)
        return self.side.rows(r, [self._party(k) for k in self.live if k in sampled])

    def serve(self, st: Serving, m, r: int) -> bool:
        """One message of a client's local steps, through the server half of the split step; True when its
        round is complete."""
        sim, k = self.sim, m.src
        p = self._party(k)
        if m.kind == ACT and st.waiting == "ACT" and m.ints[:2] == [r, st.step]:
            _, s, needs_grad, has_rng = m.ints
            h, mask, labels = (x.to(sim.device) for x in m.tensors[:3])
            if has_rng:
                torch.set_rng_state(m.tensors[3])
            grad = self.side.forward_backward(p, r, s, h, mask, labels, bool(needs_grad))
            if needs_grad:
                self.link.send(k, GRAD, [r, s], [grad])
            if clips(sim, p):
                st.waiting = "NORM"
                return False
            self.side.finish(p, r, s, None)
        elif m.kind == NORM and st.waiting == "NORM" and m.ints[:2] == [r, st.step]:
            self.link.send(k, TOTAL, [r, st.step], [self.side.finish(p, r, st.step, m.tensors[0])])
        else:
            raise PeerLost(k, f"protocol error: unexpected {KIND_NAMES.get(m.kind)} {m.ints} while waiting "
                              f"for {st.waiting} of round {r + 1} step {st.step}")
        st.step += 1
        st.waiting = "ACT"
        return st.step == sim.steps_per_round

    def aggregate(self, r: int, rows: list[dict]):
        sim = self.sim
        while True:
            live = [0] + list(self.live)
            ok = True
            for k in list(self.live):
                try:
                    self.link.send(k, AGG, [r], [torch.tensor(live, dtype=torch.int64)])
                except PeerLost as e:
                    self.lose(e.rank, e.reason)
                    ok = False
            if not ok:
                continue
            if live != self.members:
                self.gen += 1
                self.group = subgroup(self.store, live, 0, f"{self.seq}.{self.gen}", self.dopts.timeout_s,
                                      self.dopts.bind)
                self.members = live
            try:
                blobs = gather_bytes(self.group, torch.empty(0, dtype=torch.uint8), len(live), self.dopts.timeout_s)
            except Exception as e:
                raise Stop(None, f"aggregation (gather) failed: {str(e).splitlines()[0][:200]}") from None
            break
        trained = {p.index + 1 for p in self.current}
        parties = [self._party(k) for k in self.live if k in trained]
        for k, blob in zip(self.live, blobs[1:]):      # a client that sat the round out sent nothing
            if k in trained:
                self.absorb(self._party(k), blob)
        rows = [row for row in rows if row["client"] in {p.id for p in parties}]
        update = sim.strategy.combine(parties)    # over the live clients (re-weighted), applied to every party
        # (with sampling: of the round): a lost client that comes back (--resume) starts from it; idle clients
        # receive it too (their global state)
        sim.apply(update, r, self.current if sim.sampling else None)
        count_update_traffic(sim.strategy, parties, rows, update)
        blobs = [torch.empty(0, dtype=torch.uint8)] + [encode_tree(sim.strategy.download(p, update))
                                                       for p in map(self._party, self.live)]
        try:
            scatter_bytes(self.group, blobs, self.dopts.timeout_s)
        except Exception as e:
            raise Stop(None, f"aggregation (scatter) failed: {str(e).splitlines()[0][:200]}") from None
        if sim.sampling:
            sim.release(self.current, r + 1)
        return update, rows

    @torch.no_grad()
    def absorb(self, p, blob: torch.Tensor) -> None:
        """A client's upload (client.upload) into the server's copy of its party."""
        up = decode_tree(blob)
        f = self.sim.bank.factors(p.adapter)
        for m, (a, b) in up["factors"].items():
            f[m][0].copy_(a)
            f[m][1].copy_(b)
        load_optimizer_tensors(p.opt_client, up["opt"])
        self.sim.strategy.absorb(p, up["strategy"])

    def evaluate(self) -> float:
        """Held-out loss of the aggregated model: a live client runs its part, the server the rest."""
        sim = self.sim
        if len(eval_subset(sim.data.eval, self.opts.eval_max_seqs)) == 0:
            return float("nan")
        while self.live:
            k = self.live[0]
            try:
                extra = sim.strategy.eval_state(self._party(k))     # what its copy lacks of the global model
                self.link.send(k, EVAL, [self.opts.eval_max_seqs or 0], [encode_tree(extra)] if extra else [])
                return evaluate(sim, sim.data.eval, self.opts.eval_max_seqs, split=self._party(k).split,
                                hidden=lambda: self.link.expect(k, EVAL_H).tensors[0])
            except PeerLost as e:
                self.lose(e.rank, e.reason)
        return float("nan")

    def checkpoint_state(self) -> dict:
        return {"live_clients": [self._party(k).id for k in self.live]}

    def round_done(self, g: dict) -> None:
        self.say(f"round {g['round']}: train loss {g['train_loss']:.4f}, eval loss {g['eval_loss']:.4f}, "
                 f"wall {g['wall_s']:.1f} s, clients {len(self.live)}/{len(self.sim.parties)}"
                 + (f" ({len(self.current)} sampled)" if self.sim.sampling else ""))
