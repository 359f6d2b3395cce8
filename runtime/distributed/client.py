"""A client process of a distributed run (rank k runs the plan's k-th client): its blocks, its adapters.

    code = client_main(plan_path, link, store, rank, dopts, device, compute, say)

It loads only embeddings + blocks [0, split), joins (auth.hello), then does what the server says:
    ROUND r     its local steps (step.client_round; the server half through RemoteServer: ACT -> GRAD,
                NORM -> TOTAL); with client sampling only the round's sampled clients get it, after
                sitting rounds out a client first catches up with the global state (strategy.enter)
    AGG         gather its client-side adapters, AdamW moments and the strategy's upload to the server
                (nothing when it sat the round out), receive its part of the update (scatter) and apply it
    EVAL        the activations at its cut of the held-out batches (EVAL_H)
    RESTORE     replay the run's checkpoints (--resume)
    FINISH / ABORT
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from hsplit.planner.plan import Plan
from hsplit.runtime.distributed.auth import hello, plan_hash
from hsplit.runtime.distributed.groups import gather_bytes, scatter_bytes, subgroup
from hsplit.runtime.distributed.wire import (ABORT, ACT, AGG, EVAL, EVAL_H, EXIT_FAULT, EXIT_REFUSED, FINISH,
                                             GRAD, KIND_NAMES, NORM, RESTORE, ROUND, TOTAL, PeerLost, Refused,
                                             decode_tree, encode_tree, size, text)
from hsplit.runtime.outputs.evaluate import client_activations
from hsplit.runtime.outputs.rundir import restore
from hsplit.runtime.train.simulation import build_part, optimizer_tensors
from hsplit.runtime.train.step import client_round
from hsplit.runtime.strategies import RoundUpdate


class RemoteServer:
    """The server half of the split step over the Link (the client's view of step.ServerSide)."""

    def __init__(self, sim, link):
        self.sim, self.link = sim, link
        self.send_rng = sim.training.lora_dropout > 0     # server-side dropout continues the client's stream

    def forward_backward(self, p, r, s, h, mask, labels):
        tensors = [h.detach(), mask, labels] + ([torch.get_rng_state()] if self.send_rng else [])
        self.link.send(0, ACT, [r, s, int(h.requires_grad), int(self.send_rng)], tensors)
        return self.link.expect(0, GRAD).tensors[0] if h.requires_grad else None

    def finish(self, p, r, s, client_norms):
        if client_norms is None:
            return None
        self.link.send(0, NORM, [r, s], [client_norms])
        return self.link.expect(0, TOTAL).tensors[0]


def upload(sim, p, trained: bool = True) -> torch.Tensor:
    """A client's round result for the server: its client-side factors, AdamW state, strategy state
    (nothing when it sat the round out: client sampling)."""
    if not trained:
        return encode_tree({})
    own = {m: (a.detach(), b.detach()) for m, (a, b) in sim.bank.factors(p.adapter).items() if m in p.client_modules}
    return encode_tree({"factors": own, "opt": optimizer_tensors(p.opt_client),
                        "strategy": sim.strategy.upload(p, p.client_modules)})


def restore_from(sim, p, blob: dict) -> None:
    """Replay the checkpoint files the server sent (--resume)."""
    with tempfile.TemporaryDirectory(prefix="hsplit-restore-") as tmp:
        for rel, data in blob["files"].items():
            f = Path(tmp) / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(bytes(data.numpy().tobytes()))
        restore(sim, Path(tmp), int(blob["last"]))
        if "party" in blob:       # client sampling: its own state as of the last round it trained
            from safetensors.torch import load
            sim.load_party(p, load(bytes(blob["party"].numpy().tobytes())))
        sim.strategy.restored(p)  # its copy of its blocks (the replay gave it the global model's)


class ClientProcess:
    def __init__(self, sim, p, link, store, rank: int, dopts, seq: int, say):
        self.sim, self.p, self.link, self.store, self.rank, self.dopts, self.seq = sim, p, link, store, rank, dopts, seq
        self.say = say
        self.progress = (lambda s: None) if dopts.quiet else say
        self.group, self.members, self.gen = None, None, 0
        self.rounds = self.adapters_up = self.adapters_down = 0     # adapter bytes of the aggregation collectives
        self.server = RemoteServer(sim, link)
        self.trained = None                    # the round it last trained (an idle one gets the update too)

    def handle(self, m) -> None:
        sim, p, link = self.sim, self.p, self.link
        if m.kind == ROUND:
            t0, sent, got = time.perf_counter(), link.bytes_sent, link.bytes_received
            sim.total_rounds = m.ints[1]          # the server's --rounds: the LR schedule's horizon
            if sim.sampling:                      # it may have sat rounds out: catch up with the global state
                sim.strategy.enter(p, m.ints[0])
            self.trained = m.ints[0]
            client_round(sim, p, m.ints[0], self.server)
            self.rounds += 1
            self.progress(f"round {m.ints[0] + 1}: {sim.steps_per_round} step(s) in {time.perf_counter() - t0:.1f} s; "
                          f"activations and gradients: {size(link.bytes_sent - sent)} sent, "
                          f"{size(link.bytes_received - got)} received")
        elif m.kind == AGG:
            live = m.tensors[0].tolist()
            if live != self.members:
                self.gen += 1
                self.group = subgroup(self.store, live, self.rank, f"{self.seq}.{self.gen}", self.dopts.timeout_s,
                                      self.dopts.bind)
                self.members = live
            trained = self.trained == m.ints[0]
            up = upload(sim, p, trained)
            gather_bytes(self.group, up, len(live), self.dopts.timeout_s)
            blob = scatter_bytes(self.group, None, self.dopts.timeout_s)
            self.adapters_up += up.numel()
            self.adapters_down += blob.numel()
            sim.apply(decode_tree(blob, RoundUpdate), m.ints[0], [p] if trained else [])
        elif m.kind == EVAL:
            if m.tensors:         # what its own copy lacks of the global model (hsplitlora bounded)
                sim.strategy.load_eval_state(p, decode_tree(m.tensors[0]))
            try:
                for i, h in enumerate(client_activations(sim, p, sim.data.eval, m.ints[0] or None)):
                    link.send(0, EVAL_H, [i], [h])
            finally:
                if m.tensors:
                    sim.strategy.clear_eval_state(p)
        elif m.kind == RESTORE:
            restore_from(sim, p, decode_tree(m.tensors[0]))
        else:
            raise PeerLost(0, f"protocol error: unexpected {KIND_NAMES.get(m.kind)}")

    def serve(self) -> int:
        """Until FINISH (0) or a fault (EXIT_FAULT, the reason said)."""
        p, link, rank, say = self.p, self.link, self.rank, self.say
        who = f"client {p.id} (rank {rank})"
        while True:
            try:
                m = link.next(time.monotonic() + self.dopts.timeout_s, {0})
                if m.kind == FINISH:
                    self.progress(f"done: {self.rounds} round(s) trained; sent {size(link.bytes_sent + self.adapters_up)}, "
                                  f"received {size(link.bytes_received + self.adapters_down)} in all (adapters: "
                                  f"{size(self.adapters_up)} up, {size(self.adapters_down)} down)")
                    return 0
                if m.kind == ABORT:
                    say(f"error: {who}: the server stopped the run: {text(m)}")
                    return EXIT_FAULT
                self.handle(m)
            except TimeoutError:
                say(f"error: {who}: the server sent nothing for {self.dopts.timeout_s:g} s; exiting")
                return EXIT_FAULT
            except PeerLost as e:
                why = link.pending_abort()
                say(f"error: {who}: the server stopped the run: {why}" if why is not None
                    else f"error: {who}: lost the server: {e.reason}")
                return EXIT_FAULT
            except Refused as e:
                say(f"error: {who}: the server stopped the run: {e}")
                return EXIT_FAULT


def client_main(plan_path: Path, link, store, rank: int, dopts, device: str, compute: str, say, seq: int = 0) -> int:
    plan = Plan.load(plan_path)
    refused = hello(link, rank, plan_hash(plan))
    if refused is not None:
        say(f"error: the server refused rank {rank}: {refused}")
        return EXIT_REFUSED
    sim = build_part(plan, rank, device, compute)
    p = sim.parties[rank - 1]
    sim.materialise([p], 0)           # client sampling: its own party only (without sampling, all are there)
    client = ClientProcess(sim, p, link, store, rank, dopts, seq, say)
    client.progress(f"joined as client {p.id} (device {p.device}): blocks 0-{p.split - 1} of {sim.lm.profile.layers} "
                    f"on {sim.device}, {len(p.data)} training sequences; rounds start when the server says")
    return client.serve()
