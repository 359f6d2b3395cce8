"""The split step, written once: the client's half and the server's half of one local step.

    server = LocalServer(ServerSide(sim))            # in-process: the server half is a call away
    client_step(sim, p, batch, r, s, server)         # client forward -> server -> client backward -> steps

One step (DESIGN.md "Runtime semantics"):
    client:  h = forward of embeddings + blocks [0, s_k) with its adapters
    server:  loss = forward of blocks [s_k, L) + head on h; backward to the cut -> dL/dh   (ServerSide)
    client:  backward(dL/dh)
    both:    global-norm clipping (the client's per-parameter norms go up, the total comes back),
             each side's AdamW step, the strategy's hooks before and after it
`server` is the one interface between the halves: LocalServer here (a direct call), RemoteServer in
a distributed client process (runtime/distributed/client.py: messages ACT -> GRAD, NORM -> TOTAL),
and the distributed server process drives the same ServerSide from those messages. The arithmetic
is the same everywhere, so in-process and distributed runs give the same adapters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hsplit.runtime.common import derive_seed, lr_at


def set_lr(sim, opts, r: int, s: int) -> float:
    """The schedule's learning rate at step s of round r, set on `opts` (None entries skipped)."""
    t = sim.training
    lr = lr_at(r * sim.steps_per_round + s, sim.total_rounds * sim.steps_per_round, t.learning_rate,
               t.warmup_steps, t.lr_schedule)
    for o in opts:
        if o is not None:
            for g in o.param_groups:
                g["lr"] = lr
    return lr


def grad_norms(opt) -> torch.Tensor:
    """The 2-norm of every gradient of `opt`'s parameters (global-norm clipping: one side's part)."""
    gs = [q.grad for g in opt.param_groups for q in g["params"] if q.grad is not None] if opt is not None else []
    return torch.stack(torch._foreach_norm(gs, 2.0)) if gs else torch.zeros(0)


def clip_and_step(sim, p, opt, total: torch.Tensor | None, snap) -> None:
    """Clip `opt`'s gradients with the global norm, step, clear them, then the strategy's post-step hook."""
    if opt is not None:
        if total is not None:
            torch.nn.utils.clip_grads_with_norm_([q for g in opt.param_groups for q in g["params"]],
                                                 sim.training.max_grad_norm, total)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sim.strategy.after_step(p, snap)


def clips(sim, p) -> bool:
    return sim.training.max_grad_norm > 0 and bool(p.optimizers())


def end_local_steps(sim, opt) -> None:
    """After a party's last local step: strategies whose adapters restart drop the AdamW moments."""
    if sim.strategy.clears_moments and opt is not None:
        opt.state.clear()


@dataclass
class PartyRound:
    """What the server counts of one party's local steps in a round (its metrics row)."""
    losses: list = field(default_factory=list)
    tokens: int = 0
    up: int = 0
    down: int = 0
    lr: float = 0.0
    start: float = 0.0
    wall: float = 0.0

    def row(self, r: int, p) -> dict:
        return {"round": r + 1, "client": p.id, "device": p.device, "split_layer": p.split,
                "train_loss": float(np.mean(self.losses)), "tokens": self.tokens, "wall_s": self.wall,
                "fleet_s": p.predicted_round_s, "bytes_up": self.up, "bytes_down": self.down, "lr": self.lr}


class ServerSide:
    """The server's half of every split step, for any party (in-process and in the server process)."""

    def __init__(self, sim):
        self.sim = sim
        self.rounds: dict[int, PartyRound] = {}

    def begin_round(self, parties) -> None:
        """Every party's round starts now (wall_s: from here to its last step)."""
        now = time.perf_counter()
        self.rounds = {p.index: PartyRound(start=now) for p in parties}

    def forward_backward(self, p, r: int, s: int, h, mask, labels, needs_grad: bool):
        """Server forward from the cut, loss, backward: dL/dh (None when the client trains nothing)."""
        sim, st = self.sim, self.rounds[p.index]
        st.lr = set_lr(sim, [p.opt_server], r, s)
        sim.bank.activate(p.adapter, sim.strategy.offset(p))
        h_server = h.detach().requires_grad_(needs_grad)
        with sim.autocast():        # the task's loss (runtime/models/task.py): next-token or classification
            loss, n_tok = sim.task.loss(sim.split, h_server, mask, p.split, labels)
        loss.backward()
        st.losses.append(float(loss.detach()))
        st.tokens += n_tok
        if sim.strategy.traits.split:  # activations + mask (1 byte/token) + labels (int32) up, their gradients down
            act = h.numel() * h.element_size()
            st.up += act + mask.numel() + 4 * labels.numel()
            st.down += act
        return h_server.grad if needs_grad else None

    def finish(self, p, r: int, s: int, client_norms: torch.Tensor | None):
        """The server side's optimizer step; with the client's gradient norms, the global norm both clip
        with (returned). After the last local step of the round, the party's round is complete."""
        sim = self.sim
        snap = sim.strategy.before_step(p, s, p.server_modules)
        total = None
        if client_norms is not None:
            server_norms = grad_norms(p.opt_server).to(client_norms.device)
            total = torch.linalg.vector_norm(torch.cat([client_norms, server_norms]), 2.0)
        clip_and_step(sim, p, p.opt_server, total, snap)
        if s + 1 == sim.steps_per_round:
            end_local_steps(sim, p.opt_server)
            self.rounds[p.index].wall = time.perf_counter() - self.rounds[p.index].start
        return total

    def rows(self, r: int, parties) -> list[dict]:
        return [self.rounds[p.index].row(r, p) for p in parties]


class LocalServer:
    """The server half a call away (the in-process simulation)."""

    def __init__(self, side: ServerSide):
        self.side = side

    def forward_backward(self, p, r, s, h, mask, labels):
        return self.side.forward_backward(p, r, s, h, mask, labels, h.requires_grad)

    def finish(self, p, r, s, client_norms):
        return self.side.finish(p, r, s, client_norms)


def client_step(sim, p, batch, r: int, s: int, server) -> None:
    """One local step of party p, from the client's side; `server` runs the other half."""
    t = sim.training
    set_lr(sim, [p.opt_client], r, s)
    torch.manual_seed(derive_seed(t.seed, 3, r, p.index, s))      # dropout
    ids, mask, labels = (x.to(sim.device) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    with sim.autocast():
        h = sim.split.client_forward(ids, mask, p.split)
    grad = server.forward_backward(p, r, s, h, mask, labels)       # activations up, their gradient back
    if h.requires_grad:
        h.backward(grad.to(h.device, h.dtype))
    snap = sim.strategy.before_step(p, s, p.client_modules)
    total = server.finish(p, r, s, grad_norms(p.opt_client) if clips(sim, p) else None)
    clip_and_step(sim, p, p.opt_client, total, snap)


def client_round(sim, p, r: int, server, on_step=None) -> None:
    """Party p's local steps of round r (its client's side; the server half through `server`)."""
    sim.lm.model.train()
    sim.bank.activate(p.adapter, sim.strategy.offset(p))
    for s in range(sim.steps_per_round):
        if on_step:
            on_step(r, p.index, s)
        client_step(sim, p, p.data.batch(sim.training.batch_size, sim.training.seed, r, p.index, s), r, s, server)
    end_local_steps(sim, p.opt_client)
    sim.lm.model.eval()
    sim.bank.activate(None)


def count_update_traffic(strategy, parties, rows: list[dict], update) -> None:
    """Add to each party's metrics row the bytes its adapters go up and the aggregate comes down at the end of
    the round (strategy.traffic), for the in-process and the distributed executor alike."""
    for p, row in zip(parties, rows):
        up, down = strategy.traffic(p, update)
        row["bytes_up"] += up
        row["bytes_down"] += down
        row.update(strategy.round_metrics(p))
