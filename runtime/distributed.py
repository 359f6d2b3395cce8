"""Distributed execution of a plan: the server and every client as separate processes (torch.distributed).

    torchrun --nnodes 1 --nproc-per-node 3 -m hsplit.runtime.worker plan.yaml --name demo   # 2 clients
    hsplit run plan.yaml --distributed --name demo          # the same, launched locally by hsplit

Rank 0 is the server, rank k (1..K) runs the plan's k-th client. Each process loads only its own
part of the model (partial_load.py) but builds the same `train.Simulation` object around it, so the
step arithmetic, aggregation (`Simulation.combine` / `apply`, every strategy of aggregate.py),
checkpoints and metrics are the in-process code paths, and the result equals the in-process
simulation's (tests/test_distributed.py, every strategy, within 1e-5).

Wire protocol (point-to-point on a gloo process group; every message is an int64 header
[MAGIC, kind, n_ints, n_tensors, payload bytes, ints..., (dtype, ndim, shape...) per tensor] and one
uint8 payload with the tensors' bytes, 8-byte aligned):
    client -> server  HELLO   plan sha256 + HMAC-SHA256(HSPLIT_TOKEN, plan sha256 | rank)
    server -> client  VERDICT ok, or refused (the client prints why and exits 2)
    client -> server  ACT     (round, step) activations h, attention mask, labels [, CPU RNG state]
    server -> client  GRAD    dL/dh
    client -> server  NORM    per-parameter gradient norms of its side (global-norm clipping)
    server -> client  TOTAL   the global gradient norm; both sides clip with it and step
    server -> client  ROUND (round, total rounds) / AGG / EVAL / RESTORE / FINISH / ABORT   (control)
    client -> server  EVAL_H  activations of the held-out batches (evaluation after a round)
    server -> client  PING    every --timeout/4 s (at most 30 s) to a client with nothing queued: a
                              client waiting for a slower client's round knows the server is alive
Aggregation uses collectives on a process group of the live ranks: `gather` of every client's
client-side adapters (+ AdamW moments, hafl importance EMAs) to the server, which combines them
(`Simulation.combine`, over the live clients) and applies the result to every party it keeps (a lost
client included, so it rejoins from the aggregate on --resume), then `scatter` of the RoundUpdate:
each client gets the part for its own blocks and its own adapter (`for_client`; safetensors bytes,
never pickle) and applies it with `Simulation.apply`.

The server serves clients concurrently: one reader thread per client queues its messages and the
server handles whichever arrives first, keeping one adapter set and optimizer state per client (the
Simulation's parties). A client that dies (connection lost) or does not answer within `--timeout`
seconds is named; the round finishes with the remaining clients if at least `--min-clients` are
left (aggregation re-weighted over them, recorded in faults.json and the metrics), otherwise the
server keeps the last complete checkpoint, tells the other clients to stop and exits 3 printing the
exact `--resume` command. Every wait has a deadline; no process waits forever.

Deadlines are kept in Python, never by gloo: a gloo send/recv whose wait times out closes every
connection of the process group (gloo signals the timeout to all its pairs), which would turn one
silent client into the loss of all of them. So each peer has a reader and a sender thread that wait
without limit, sending never blocks the server's loop (a client that stopped reading holds up only its
own queue), and the waiting side names a peer that has not answered within --timeout.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan, _plain, block_of
from hsplit.planner.yamlio import atomic_write_text, dump_yaml, read_yaml
from hsplit.runtime import checkpoint
from hsplit.runtime.aggregate import RoundUpdate, strategy_for
from hsplit.runtime.data import load_federated_data
from hsplit.runtime.model import check_model_hash, lm_loss
from hsplit.runtime.partial_load import is_placeholder, load_part
from hsplit.runtime.train import (RunOptions, RunResult, Simulation, _global_row, _restore, _run_dir, derive_seed,
                                  interrupted, lr_at, pick_device, prepare_run_dir, round_rows, write_metrics)
from hsplit.runtime.train import resume_command as run_resume_command

TOKEN_ENV = "HSPLIT_TOKEN"
MAGIC = 0x5053504C   # "PSPL"
HDR = 96
(HELLO, VERDICT, ACT, GRAD, NORM, TOTAL, ROUND, AGG, EVAL, EVAL_H, RESTORE, FINISH, ABORT, PING) = range(1, 15)
KIND_NAMES = {v: k for k, v in dict(HELLO=HELLO, VERDICT=VERDICT, ACT=ACT, GRAD=GRAD, NORM=NORM, TOTAL=TOTAL,
                                    ROUND=ROUND, AGG=AGG, EVAL=EVAL, EVAL_H=EVAL_H, RESTORE=RESTORE,
                                    FINISH=FINISH, ABORT=ABORT, PING=PING).items()}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.float64]
EXIT_REFUSED, EXIT_FAULT = 2, 3


@dataclass
class DistOptions:
    timeout_s: float = 300.0          # longest wait for an answer (idle clients get PINGs meanwhile)
    min_clients: int | None = None    # finish a round with this many clients left (default: all)
    bind: str = "127.0.0.1"           # address this process's gloo device binds to
    connect_timeout_s: float = 120.0  # rendezvous + handshake
    quiet: bool = False               # a client prints errors only (the local launcher: the server speaks)


def check_min_clients(plan: Plan, plan_path, dopts: DistOptions) -> None:
    if dopts.min_clients is not None and not 1 <= dopts.min_clients <= len(plan.clients):
        raise ConfigError(str(plan_path), [f"--min-clients {dopts.min_clients}: the plan has {len(plan.clients)} "
                                           f"clients; give 1..{len(plan.clients)}"])


class PeerLost(Exception):
    def __init__(self, rank: int, reason: str):
        super().__init__(reason)
        self.rank, self.reason = rank, reason


class Refused(Exception):
    pass


# ------------------------------------------------------------------ messages

@dataclass
class Msg:
    src: int
    kind: int
    ints: list[int]
    tensors: list[torch.Tensor]
    nbytes: int


def _pack(kind: int, ints, tensors) -> tuple[torch.Tensor, torch.Tensor]:
    ints = [int(i) for i in ints]
    head = [MAGIC, kind, len(ints), len(tensors), 0] + ints
    chunks, off = [], 0
    for t in tensors:
        t = t.detach().contiguous().cpu()
        head += [DTYPES.index(t.dtype), t.dim(), *t.shape]
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        pad = (-raw.numel()) % 8
        chunks.append(raw)
        if pad:
            chunks.append(torch.zeros(pad, dtype=torch.uint8))
        off += raw.numel() + pad
    if len(head) > HDR:
        raise ValueError("message header too long")
    head[4] = off
    header = torch.zeros(HDR, dtype=torch.int64)
    header[:len(head)] = torch.tensor(head, dtype=torch.int64)
    payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return header, payload


def _unpack(src: int, header: torch.Tensor, payload: torch.Tensor) -> Msg:
    h = header.tolist()
    kind, n_ints, n_t = h[1], h[2], h[3]
    ints = h[5:5 + n_ints]
    i, off, tensors = 5 + n_ints, 0, []
    for _ in range(n_t):
        dtype, ndim = DTYPES[h[i]], h[i + 1]
        shape = h[i + 2:i + 2 + ndim]
        i += 2 + ndim
        n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        raw = payload[off:off + n]
        tensors.append(raw.view(dtype).reshape(shape).clone() if n else torch.empty(shape, dtype=dtype))
        off += n + (-n) % 8
    return Msg(src, kind, ints, tensors, HDR * 8 + payload.numel())


# A gloo wait that times out closes EVERY connection of its process group (gloo signals the timeout to
# all pairs of the context), so point-to-point waits never time out in gloo: readers and senders wait
# without limit on their own threads, and every deadline is kept here, in Python.
_FOREVER = datetime.timedelta(days=30)


class Link:
    """Point-to-point messages on a gloo process group, with deadlines kept in Python: one reader and one
    sender thread per peer, so sending never blocks the caller (a peer that stopped reading holds up
    only its own queue) and a silent peer is found by the deadline of whoever waits for its answer."""

    def __init__(self, pg, rank: int, peers: list[int], timeout_s: float):
        self.pg, self.rank, self.timeout_s = pg, rank, timeout_s
        self.inbox: queue.Queue = queue.Queue()
        self.held: list[Msg] = []                 # received but not yet asked for
        self.dead: dict[int, str] = {}            # peer -> why its connection failed
        self.lock = threading.Lock()
        self.outbox = {p: queue.Queue() for p in peers}
        self.bytes_sent = self.bytes_received = 0
        self.by_kind: dict[str, int] = {}         # bytes per message kind, both directions
        for p in peers:
            threading.Thread(target=self._reader, args=(p,), daemon=True, name=f"hsplit-recv-{p}").start()
            threading.Thread(target=self._sender, args=(p,), daemon=True, name=f"hsplit-send-{p}").start()

    def _reader(self, src: int) -> None:
        try:
            while True:
                header = torch.zeros(HDR, dtype=torch.int64)
                self.pg.recv([header], src, 0).wait(_FOREVER)
                if int(header[0]) != MAGIC:
                    raise RuntimeError("bad message header (not an hsplit peer?)")
                payload = torch.empty(int(header[4]), dtype=torch.uint8)
                if payload.numel():
                    self.pg.recv([payload], src, 1).wait(_FOREVER)
                self.inbox.put(_unpack(src, header, payload))
        except Exception as e:      # connection closed, process group torn down
            self._fail(src, _why(e))

    def _sender(self, dst: int) -> None:
        q = self.outbox[dst]
        while True:
            header, payload = q.get()
            try:
                if dst not in self.dead:
                    self.pg.send([header], dst, 0).wait(_FOREVER)
                    if payload.numel():
                        self.pg.send([payload], dst, 1).wait(_FOREVER)
            except Exception as e:
                self._fail(dst, _why(e))
            finally:
                q.task_done()

    def _fail(self, peer: int, why: str) -> None:
        if peer not in self.dead:
            self.dead[peer] = why
            self.inbox.put(PeerLost(peer, why))

    def pending_abort(self) -> str | None:
        """The reason of an ABORT that arrived but was not read yet (the peer may be gone since)."""
        for m in self.held:
            if m.kind == ABORT:
                return _text(m)
        while True:
            try:
                m = self.inbox.get_nowait()
            except queue.Empty:
                return None
            if isinstance(m, Msg) and m.kind == ABORT:
                return _text(m)

    def send(self, dst: int, kind: int, ints=(), tensors=()) -> int:
        """Queue a message for `dst` and return at once; PeerLost if `dst`'s connection already failed."""
        if dst in self.dead:
            raise PeerLost(dst, self.dead[dst])
        header, payload = _pack(kind, ints, tensors)
        self.outbox[dst].put((header, payload))
        n = HDR * 8 + payload.numel()
        with self.lock:                           # the heartbeat thread sends too
            self.bytes_sent += n
            self.by_kind[KIND_NAMES[kind]] = self.by_kind.get(KIND_NAMES[kind], 0) + n
        return n

    def idle(self, dst: int) -> bool:
        """Nothing queued for `dst` (it read everything sent to it so far)."""
        return self.outbox[dst].unfinished_tasks == 0

    def flush(self, peers, timeout_s: float) -> None:
        """Wait (at most timeout_s) until everything queued for `peers` went out, e.g. FINISH before exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(not self.idle(p) and p not in self.dead for p in peers):
            time.sleep(0.02)

    def next(self, deadline: float, want=None) -> Msg:
        """The next message (from `want` ranks if given) before `deadline`, else TimeoutError (PeerLost if
        a wanted peer's connection failed). A PING from a wanted peer moves the deadline: it is alive."""
        for i, m in enumerate(self.held):
            if want is None or m.src in want:
                return self.held.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                m = self.inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if isinstance(m, PeerLost):
                if want is None or m.rank in want:
                    raise m
                continue
            with self.lock:
                self.bytes_received += m.nbytes
                self.by_kind[KIND_NAMES[m.kind]] = self.by_kind.get(KIND_NAMES[m.kind], 0) + m.nbytes
            if m.kind == PING:
                if want is None or m.src in want:
                    deadline = max(deadline, time.monotonic() + self.timeout_s)
                continue
            if want is None or m.src in want:
                return m
            self.held.append(m)

    def expect(self, src: int, kind: int) -> Msg:
        try:
            m = self.next(time.monotonic() + self.timeout_s, {src})
        except TimeoutError:
            raise PeerLost(src, f"no answer within {self.timeout_s:g} s") from None
        if m.kind == ABORT:
            raise Refused(_text(m))
        if m.kind != kind:
            raise PeerLost(src, f"protocol error: expected {KIND_NAMES[kind]}, got {KIND_NAMES.get(m.kind)}")
        return m

    def heartbeat(self, peers, stop: threading.Event) -> None:
        """Until `stop`: PING every peer in peers() whose queue is empty, every timeout/4 s (at most 30 s),
        so a client that waits for a slower client's round does not take the server for dead."""
        interval = max(0.2, min(self.timeout_s / 4, 30.0))
        while not stop.wait(interval):
            for p in list(peers()):
                if p not in self.dead and self.idle(p):
                    self.send(p, PING)


def _why(e: Exception) -> str:
    text = str(e)
    if "Connection" in text or "closed" in text or "reset" in text:
        return "its connection closed (the process died or its machine went away)"
    return text.splitlines()[0][:200] if text else type(e).__name__


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _text_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(s.encode() or b" "), dtype=torch.uint8).clone()


def _text(m: Msg) -> str:
    return bytes(m.tensors[0].tolist()).decode(errors="replace").strip() if m.tensors else ""


# ------------------------------------------------------------------ tree <-> safetensors bytes (no pickle)

def encode_tree(obj) -> torch.Tensor:
    """Nested dicts/lists/tuples of tensors and plain values (or a dataclass of them) -> uint8 tensor."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def walk(x):
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"t": key}
        if dataclasses.is_dataclass(x):
            return {"c": {f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        if isinstance(x, dict):
            return {"d": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"l" if isinstance(x, list) else "u": [walk(v) for v in x]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"v": x}
        raise TypeError(f"cannot send a {type(x).__name__}")

    tree = walk(obj)
    data = save(tensors, metadata={"tree": json.dumps(tree)})
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_tree(buf: torch.Tensor, dataclass_type=None):
    from safetensors import safe_open  # noqa: F401  (format check)
    from safetensors.torch import load

    raw = bytes(buf.numpy().tobytes())
    tensors = load(raw)
    n = int.from_bytes(raw[:8], "little")
    tree = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["tree"])

    def build(node):
        (k, v), = node.items()
        if k == "t":
            return tensors[v]
        if k == "c":
            return dataclass_type(**{name: build(x) for name, x in v.items()})
        if k == "d":
            return {key: build(x) for key, x in v}
        if k == "l":
            return [build(x) for x in v]
        if k == "u":
            return tuple(build(x) for x in v)
        return v

    return build(tree)


# ------------------------------------------------------------------ identity and access

def plan_hash(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(_plain(plan.to_dict()), sort_keys=True).encode()).hexdigest()


def token_mac(token: str, phash: str, rank: int) -> bytes:
    return hmac.new(token.encode(), f"{phash}|rank={rank}".encode(), hashlib.sha256).digest()


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()


def connect(bind: str, timeout_s: float):
    """Rendezvous through torchrun's env:// variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE) and build
    a gloo process group whose device binds to `bind`. Returns (store, pg, rank, world)."""
    import torch.distributed as dist

    td = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=td))
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = td
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
    pg = dist.ProcessGroupGloo(dist.PrefixStore("hsplit/p2p", store), rank, world, opts)
    return store, pg, rank, world


def _subgroup(store, ranks: list[int], rank: int, gen: str, timeout_s: float):
    """A gloo group of `ranks` for collectives (only its members take part in creating it)."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_BIND[0])]
    prefix = f"hsplit/agg/{gen}/{'-'.join(map(str, ranks))}"
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), ranks.index(rank), len(ranks), opts)


_BIND = ["127.0.0.1"]


def _gather_bytes(pg, blob: torch.Tensor, n: int, timeout_s: float) -> list[torch.Tensor] | None:
    """Collective gather of variable-size uint8 blobs to group rank 0 (sizes first, then padded data)."""
    td = datetime.timedelta(seconds=timeout_s)
    size = torch.tensor([blob.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)] if pg.rank() == 0 else []
    pg.gather([sizes] if sizes else [], [size], _gopts(0)).wait(td)
    if pg.rank() == 0:
        m = max(int(s) for s in sizes)
    else:
        m = None
    mt = torch.tensor([m or 0], dtype=torch.int64)
    pg.broadcast([mt], _bopts(0)).wait(td)
    m = int(mt)
    padded = torch.zeros(m, dtype=torch.uint8)
    padded[:blob.numel()] = blob
    outs = [torch.zeros(m, dtype=torch.uint8) for _ in range(n)] if pg.rank() == 0 else []
    pg.gather([outs] if outs else [], [padded], _gopts(0)).wait(td)
    if pg.rank() != 0:
        return None
    return [o[:int(s)] for o, s in zip(outs, sizes)]


def _scatter_bytes(pg, blobs: list[torch.Tensor] | None, timeout_s: float) -> torch.Tensor:
    """Collective scatter of variable-size uint8 blobs from group rank 0 (blobs[i] to group rank i;
    sizes first, then data padded to the largest). Returns this rank's blob."""
    td = datetime.timedelta(seconds=timeout_s)
    root = pg.rank() == 0
    size = torch.zeros(1, dtype=torch.int64)
    sizes = [torch.tensor([b.numel()], dtype=torch.int64) for b in blobs] if root else []
    pg.scatter([size], [sizes] if root else [], _sopts(0)).wait(td)
    m = torch.tensor([max(b.numel() for b in blobs) if root else 0], dtype=torch.int64)
    pg.broadcast([m], _bopts(0)).wait(td)
    padded = []
    if root:
        for b in blobs:
            buf = torch.zeros(int(m), dtype=torch.uint8)
            buf[:b.numel()] = b
            padded.append(buf)
    out = torch.zeros(int(m), dtype=torch.uint8)
    pg.scatter([out], [padded] if root else [], _sopts(0)).wait(td)
    return out[:int(size)]


def for_client(update: RoundUpdate, party: str, split: int) -> RoundUpdate:
    """The part of a round's update a client process uses: entries of the blocks it holds ([0, split))
    and, of the per-party entries, its own. What it downloads then grows with its own blocks, not
    with the fleet (a broadcast of the whole update grew with every client's ranks and blocks)."""
    def mine(module: str) -> bool:
        block = block_of(module)
        return block is None or block < split

    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if mine(k)}

    return RoundUpdate(merge=keep(update.merge), assign=keep(update.assign), reinit=update.reinit,
                       global_factors=keep(update.global_factors),
                       assign_party={party: keep(update.assign_party[party])} if party in update.assign_party else {},
                       global_scores=keep(update.global_scores),
                       local_scores={party: keep(update.local_scores[party])} if party in update.local_scores else {})


def _gopts(root):
    import torch.distributed as dist
    o = dist.GatherOptions()
    o.rootRank = root
    return o


def _sopts(root):
    import torch.distributed as dist
    o = dist.ScatterOptions()
    o.rootRank = root
    return o


def _bopts(root):
    import torch.distributed as dist
    o = dist.BroadcastOptions()
    o.rootRank = root
    o.rootTensor = 0
    return o


# ------------------------------------------------------------------ building one process's Simulation

def build_part(plan: Plan, rank: int, device: str = "cpu", compute: str = "auto") -> Simulation:
    """The Simulation of one process, around only its part of the model (rank 0: the server)."""
    if plan.strategy == "centralized":
        raise ConfigError(plan.source, ["strategy centralized has no split: run it in-process (hsplit run)"])
    strategy_for(plan.strategy, plan.source)
    if rank == 0:
        lo = min(c.split_layer for c in plan.clients)
        lm = _load(plan, lambda L: range(lo, L), embeddings=False, head=True, device=device)
    else:
        s = plan.clients[rank - 1].split_layer
        lm = _load(plan, lambda L: range(0, s), embeddings=True, head=False, device=device)
    check_model_hash(plan.inputs.get("model_hash"), lm.profile, plan.source)
    plan.validate_for(lm.profile)
    lm.model.requires_grad_(False)
    weights = [c.data_weight for c in plan.clients]
    data = load_federated_data(plan.data, lm.tokenizer, plan.training.seq_len, weights, plan.training.seed)
    sim = Simulation(plan, lm, data, pick_device(device), compute)
    bank = sim.bank
    owned_merge = bank.merge_into_base

    def merge_owned(module, b_cat, a_cat):       # a merge into a block this process does not hold: skip
        if not is_placeholder(bank.layers()[module].get_base_layer().weight):
            owned_merge(module, b_cat, a_cat)

    bank.merge_into_base = merge_owned
    return sim


def _load(plan: Plan, blocks, embeddings: bool, head: bool, device: str):
    from transformers import AutoConfig
    from hsplit.runtime.model import resolve_model_path
    path = resolve_model_path(plan.model, progress=False)
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    return load_part(path, blocks(layers), embeddings=embeddings, head=head, device=pick_device(device))


def _set_lr(sim: Simulation, opts, r: int, s: int) -> float:
    t = sim.t
    lr = lr_at(r * sim.steps_per_round + s, sim.total_rounds * sim.steps_per_round, t.learning_rate,
               t.warmup_steps, t.lr_schedule)
    for o in opts:
        for g in o.param_groups:
            g["lr"] = lr
    return lr


def _grads(opt) -> list[torch.Tensor]:
    if opt is None:
        return []
    return [q.grad for g in opt.param_groups for q in g["params"] if q.grad is not None]


def _norms(opt) -> torch.Tensor:
    gs = _grads(opt)
    return torch.stack(torch._foreach_norm(gs, 2.0)) if gs else torch.zeros(0)


def _clip(opt, max_norm: float, total: torch.Tensor) -> None:
    if opt is None:
        return
    params = [q for g in opt.param_groups for q in g["params"]]
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def _upload(sim: Simulation, p) -> torch.Tensor:
    """A client's round result for the server: its client-side factors, AdamW state, hafl EMAs."""
    own = {m: (a.detach(), b.detach()) for m, (a, b) in sim.bank.factors(p.adapter).items() if m in p.client_modules}
    opt = {}
    if p.opt_client is not None:
        for i, st in p.opt_client.state_dict()["state"].items():
            opt[str(i)] = {k: torch.as_tensor(v) for k, v in st.items()}
    ema = {}
    if sim.het is not None:
        for (m, key), pair in sim.het._ema.get(p.adapter, {}).items():
            if m in p.client_modules:
                ema.setdefault(m, {})[key] = list(pair)
    return encode_tree({"factors": own, "opt": opt, "ema": ema})


@torch.no_grad()
def _absorb(sim: Simulation, p, blob: torch.Tensor) -> None:
    """The server side of _upload: the client's state into the server's copy of that party."""
    up = decode_tree(blob)
    f = sim.bank.factors(p.adapter)
    for m, (a, b) in up["factors"].items():
        f[m][0].copy_(a)
        f[m][1].copy_(b)
    if p.opt_client is not None:
        sd = p.opt_client.state_dict()
        sd["state"] = {int(i): dict(st) for i, st in up["opt"].items()}
        p.opt_client.load_state_dict(sd)
    if sim.het is not None:
        ema = sim.het._ema.setdefault(p.adapter, {})
        for m, keys in up["ema"].items():
            for key, pair in keys.items():
                ema[(m, key)] = [x.to(sim.device) for x in pair]


def _eval_subset(sim: Simulation, max_seqs: int | None):
    data = sim.data.eval
    if max_seqs and len(data) > max_seqs:
        data = data.subset(np.linspace(0, len(data) - 1, max_seqs).round().astype(int))
    return data


# ------------------------------------------------------------------ the client process

def client_main(plan_path: Path, link: Link, store, rank: int, dopts: DistOptions, device: str, compute: str,
                say, seq: int = 0) -> int:
    plan = Plan.load(plan_path)
    phash = plan_hash(plan)
    token = os.environ.get(TOKEN_ENV, "")
    mac = token_mac(token, phash, rank) if token else b""
    link.send(0, HELLO, [1 if token else 0], [_bytes_tensor(phash.encode()), _bytes_tensor(mac or b"\0")])
    try:
        verdict = link.expect(0, VERDICT)
    except Refused as e:
        say(f"error: the server refused rank {rank}: {e}")
        return EXIT_REFUSED
    if verdict.ints[0] != 1:
        say(f"error: the server refused rank {rank}: {_text(verdict)}")
        return EXIT_REFUSED
    sim = build_part(plan, rank, device, compute)
    p = sim.parties[rank - 1]
    progress = (lambda s: None) if dopts.quiet else say
    progress(f"joined as client {p.id} (device {p.device}): blocks 0-{p.split - 1} of {sim.lm.profile.layers} "
             f"on {sim.device}, {len(p.data)} training sequences; rounds start when the server says")
    group, members, gen = None, None, 0
    rounds, adapters_up, adapters_down = 0, 0, 0      # adapter bytes of the aggregation collectives
    while True:
        try:
            m = link.next(time.monotonic() + dopts.timeout_s, {0})
        except TimeoutError:
            say(f"error: client {p.id} (rank {rank}): the server sent nothing for {dopts.timeout_s:g} s; exiting")
            return EXIT_FAULT
        except PeerLost as e:
            say(f"error: client {p.id} (rank {rank}): lost the server: {e.reason}")
            return EXIT_FAULT
        if m.kind == FINISH:
            progress(f"done: {rounds} round(s) trained; sent {_size(link.bytes_sent + adapters_up)}, received "
                     f"{_size(link.bytes_received + adapters_down)} in all (adapters: {_size(adapters_up)} up, "
                     f"{_size(adapters_down)} down)")
            return 0
        if m.kind == ABORT:
            say(f"error: client {p.id} (rank {rank}): the server stopped the run: {_text(m)}")
            return EXIT_FAULT
        try:
            if m.kind == ROUND:
                t0, sent, got = time.perf_counter(), link.bytes_sent, link.bytes_received
                sim.total_rounds = m.ints[1]          # the server's --rounds: the LR schedule's horizon
                _client_round(sim, p, link, m.ints[0])
                rounds += 1
                progress(f"round {m.ints[0] + 1}: {sim.steps_per_round} step(s) in {time.perf_counter() - t0:.1f} s; "
                         f"activations and gradients: {_size(link.bytes_sent - sent)} sent, "
                         f"{_size(link.bytes_received - got)} received")
            elif m.kind == AGG:
                live = m.tensors[0].tolist()
                if live != members:
                    gen += 1
                    group, members = _subgroup(store, live, rank, f"{seq}.{gen}", dopts.timeout_s), live
                up = _upload(sim, p)
                _gather_bytes(group, up, len(live), dopts.timeout_s)
                blob = _scatter_bytes(group, None, dopts.timeout_s)
                adapters_up += up.numel()
                adapters_down += blob.numel()
                sim.apply(decode_tree(blob, RoundUpdate), m.ints[0])
            elif m.kind == EVAL:
                _client_eval(sim, p, link, m.ints[0] or None)
            elif m.kind == RESTORE:
                _client_restore(sim, decode_tree(m.tensors[0]))
            else:
                raise PeerLost(0, f"protocol error: unexpected {KIND_NAMES.get(m.kind)}")
        except PeerLost as e:
            why = link.pending_abort()
            if why is not None:
                say(f"error: client {p.id} (rank {rank}): the server stopped the run: {why}")
            else:
                say(f"error: client {p.id} (rank {rank}): lost the server: {e.reason}")
            return EXIT_FAULT
        except Refused as e:
            say(f"error: client {p.id} (rank {rank}): the server stopped the run: {e}")
            return EXIT_FAULT


class _parties:
    """Temporarily restrict sim.parties (aggregation over the live clients only)."""

    def __init__(self, sim, parties):
        self.sim, self.parties = sim, parties

    def __enter__(self):
        self.saved = self.sim.parties
        self.sim.parties = self.parties

    def __exit__(self, *exc):
        self.sim.parties = self.saved
        return False


def _client_round(sim: Simulation, p, link: Link, r: int) -> None:
    t = sim.t
    sim.lm.model.train()
    sim.bank.activate(p.adapter)
    clip = t.max_grad_norm > 0 and (p.opt_client is not None or p.opt_server is not None)
    send_rng = t.lora_dropout > 0
    for s in range(sim.steps_per_round):
        batch = p.data.batch(t.batch_size, t.seed, r, p.index, s)
        _set_lr(sim, [o for o in (p.opt_client,) if o is not None], r, s)
        torch.manual_seed(derive_seed(t.seed, 3, r, p.index, s))      # dropout, as Simulation.step
        ids = batch.input_ids.to(sim.device)
        mask = batch.attention_mask.to(sim.device)
        labels = batch.labels.to(sim.device)
        with sim._autocast():
            h = sim.split.client_forward(ids, mask, p.split)
        tensors = [h.detach(), mask, labels] + ([torch.get_rng_state()] if send_rng else [])
        link.send(0, ACT, [r, s, int(h.requires_grad), int(send_rng)], tensors)
        if h.requires_grad:
            g = link.expect(0, GRAD).tensors[0]
            h.backward(g.to(h.device, h.dtype))
        snap = sim.het.before_step(p, s) if sim.het else None
        if clip:
            link.send(0, NORM, [r, s], [_norms(p.opt_client)])
            total = link.expect(0, TOTAL).tensors[0]
            _clip(p.opt_client, t.max_grad_norm, total)
        sim.finish_step(p, [p.opt_client], snap)
    if sim.strategy.resets_adapters and p.opt_client is not None:
        p.opt_client.state.clear()
    sim.lm.model.eval()
    sim.bank.activate(None)


@torch.no_grad()
def _client_eval(sim: Simulation, p, link: Link, max_seqs: int | None) -> None:
    data = _eval_subset(sim, max_seqs)
    sim.lm.model.eval()
    sim.bank.activate(sim.eval_adapter())
    bs = max(1, sim.t.batch_size)
    for i in range(0, len(data), bs):
        ids = data.input_ids[i:i + bs].to(sim.device)
        mask = data.attention_mask[i:i + bs].to(sim.device)
        with sim._autocast():
            h = sim.split.client_forward(ids, mask, p.split)
        link.send(0, EVAL_H, [i], [h])
    sim.bank.activate(None)


def _client_restore(sim: Simulation, blob: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="hsplit-restore-") as tmp:
        for rel, data in blob["files"].items():
            f = Path(tmp) / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(bytes(data.numpy().tobytes()))
        _restore(sim, Path(tmp), int(blob["last"]))


# ------------------------------------------------------------------ the server process

@dataclass
class _Serving:
    party: object
    rank: int
    step: int = 0
    waiting: str = "ACT"
    losses: list = field(default_factory=list)
    tokens: int = 0
    up: int = 0
    down: int = 0
    lr: float = 0.0
    start: float = 0.0
    wall: float = 0.0
    pending: dict = field(default_factory=dict)


class Server:
    def __init__(self, plan_path: Path, opts: RunOptions, dopts: DistOptions, link: Link, store, world: int, say,
                 seq: int = 0):
        self.seq = seq
        self.plan_path, self.opts, self.dopts, self.link, self.store, self.say = plan_path, opts, dopts, link, store, say
        self.world = world
        self.plan = Plan.load(plan_path)
        self.phash = plan_hash(self.plan)       # of the file as every process reads it (before --rounds)
        self.live = list(range(1, world))
        self.group, self.members, self.gen = None, None, 0
        self.faults: list[dict] = []
        self.sim: Simulation | None = None

    # -- handshake --
    def handshake(self) -> None:
        phash = self.phash
        token = os.environ.get(TOKEN_ENV, "")
        deadline = time.monotonic() + self.dopts.connect_timeout_s
        hellos, problems = {}, []
        while len(hellos) < len(self.live):
            try:
                m = self.link.next(deadline, set(self.live) - set(hellos))
            except TimeoutError:
                missing = sorted(set(self.live) - set(hellos))
                raise ConfigError("distributed", [f"rank(s) {missing} did not say hello within "
                                                  f"{self.dopts.connect_timeout_s:g} s"]) from None
            except PeerLost as e:
                raise ConfigError("distributed", [f"rank {e.rank} left during the handshake: {e.reason}"]) from None
            hellos[m.src] = m
        for k in self.live:
            m = hellos[k]
            name = self._name(k)
            their_hash = bytes(m.tensors[0].tolist()).decode(errors="replace")
            if m.kind != HELLO:
                problems.append((k, f"{name}: protocol error (expected HELLO)"))
            elif their_hash != phash:
                problems.append((k, f"{name} runs a different plan (sha256 {their_hash[:12]}.. vs the server's "
                                    f"{phash[:12]}..): start every process with the same plan.yaml"))
            elif not token:
                problems.append((k, f"the server has no token: set {TOKEN_ENV} (the same secret in every process)"))
            elif m.ints[0] == 0:
                problems.append((k, f"{name} presented no token: set {TOKEN_ENV} to the run's shared token"))
            elif not hmac.compare_digest(bytes(m.tensors[1].tolist()), token_mac(token, phash, k)):
                problems.append((k, f"{name} presented a wrong token ({TOKEN_ENV} differs from the server's)"))
        bad = {k: why for k, why in problems}
        for k in self.live:
            if bad:
                why = bad.get(k) or ("another process was refused: " + "; ".join(bad.values()))
                self._try_send(k, VERDICT, [0], [_text_tensor(why)])
            else:
                self._try_send(k, VERDICT, [1], [_text_tensor("ok")])
        if bad:
            self.link.flush(self.live, 10.0)        # the refused learn why before this process exits
            raise Refused("; ".join(dict.fromkeys(bad.values())))

    def _name(self, k: int) -> str:
        c = self.plan.clients[k - 1] if 0 < k <= len(self.plan.clients) else None
        cid = c.id if c is not None else "?"
        return f"client {cid} (rank {k}{', ' + c.device if c is not None else ''})"

    def _try_send(self, k, kind, ints=(), tensors=()) -> bool:
        try:
            self.link.send(k, kind, ints, tensors)
            return True
        except PeerLost:
            return False

    # -- the run --
    def run(self) -> RunResult:
        opts, plan, plan_path = self.opts, self.plan, self.plan_path
        if len(plan.clients) != self.world - 1:
            raise ConfigError(str(plan_path), [f"the plan has {len(plan.clients)} clients but {self.world} processes "
                                               f"were started: start {len(plan.clients) + 1} (rank 0 = server)"])
        check_min_clients(plan, plan_path, self.dopts)
        run_dir, done, rounds = prepare_run_dir(plan, plan_path, opts)
        plan.training.rounds = rounds
        self.warn_timeout()
        self.handshake()
        self.say(f"{len(self.live)} client(s) joined with the run's token and plan (sha256 {self.phash[:12]}..)")
        stop = threading.Event()
        threading.Thread(target=self.link.heartbeat, args=(lambda: self.live, stop), daemon=True,
                         name="hsplit-heartbeat").start()
        try:
            return self._run(run_dir, done, rounds)
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

    def _run(self, run_dir: Path, done: list[int], rounds: int) -> RunResult:
        opts, plan, plan_path = self.opts, self.plan, self.plan_path
        self.run_dir = run_dir
        sim = self.sim = build_part(plan, 0, opts.device, opts.compute_dtype)
        self.min_clients = self.dopts.min_clients or len(sim.parties)
        rows: list[dict] = []
        if opts.resume:
            checkpoint.remove_stale(run_dir)
            start = done[-1]
            rows = _restore(sim, run_dir, start)
            blob = encode_tree({"last": start, "files": _checkpoint_files(run_dir, start)})
            self._each(lambda k: self.link.send(k, RESTORE, [start], [blob]))
            old = read_yaml(run_dir / "config.yaml")
            old["run"]["rounds"] = rounds
            atomic_write_text(run_dir / "config.yaml", dump_yaml(old, "# Resolved run configuration (hsplit run)."))
        else:
            start = 0
            ev = self.evaluate()
            rows = [_global_row(0, [], ev, 0.0, 0.0, 0.0, None)]
            config = {"plan": Plan.load(plan_path).to_dict(),
                      "run": {"rounds": rounds, "name": run_dir.name, "model_path": sim.lm.path,
                              "model_hash": sim.lm.profile.arch_hash(), "eval_max_seqs": opts.eval_max_seqs,
                              "device": str(sim.device), "torch": str(torch.__version__),
                              "compute_dtype": str(sim.autocast_dtype or torch.float32).removeprefix("torch."),
                              "distributed": {"processes": self.world, "backend": "gloo",
                                              "min_clients": self.min_clients, "timeout_s": self.dopts.timeout_s}},
                      "data": sim.data.summary}
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", dump_yaml(config, "# Resolved run configuration (hsplit run)."))
            checkpoint.save(run_dir, 0, sim.tensors(None), {"metrics": rows, "strategy": plan.strategy})
        write_metrics(run_dir, rows)
        fleet_total = next((r["fleet_total_s"] for r in reversed(rows) if r.get("fleet_total_s") is not None), 0.0)
        for r in range(start, rounds):
            self.round = r
            t0 = time.perf_counter()
            client_rows = self.train_round(r)
            t1 = time.perf_counter()
            update_rows = self.aggregate(r, client_rows)
            agg_s = time.perf_counter() - t1
            ev = self.evaluate()
            new_rows, fleet_total = round_rows(sim, r, update_rows, ev, time.perf_counter() - t0, agg_s, fleet_total)
            g = new_rows[-1]
            checkpoint.save(run_dir, r + 1, sim.tensors(self.last_update),
                            {"metrics": new_rows, "strategy": plan.strategy,
                             "live_clients": [self._party(k).id for k in self.live]}, keep=opts.keep_checkpoints)
            rows += new_rows
            write_metrics(run_dir, rows)
            self.say(f"round {r + 1}: train loss {g['train_loss']:.4f}, eval loss {g['eval_loss']:.4f}, "
                     f"wall {g['wall_s']:.1f} s, clients {len(self.live)}/{len(sim.parties)}")
        for k in self.live:
            self._try_send(k, FINISH)
        self.link.flush(self.live, self.dopts.timeout_s)
        steps = (rounds - start) * sim.steps_per_round * len(sim.parties)
        atomic_write_text(run_dir / "traffic.json", json.dumps(
            {"training_steps": steps, "bytes_by_message": self.link.by_kind,
             "step_bytes": sum(self.link.by_kind.get(k, 0) for k in ("ACT", "GRAD", "NORM", "TOTAL"))}, indent=1))
        return RunResult.from_rows(run_dir, rounds, rows)

    def _party(self, k: int):
        return self.sim.parties[k - 1]

    def _each(self, fn) -> None:
        for k in list(self.live):
            try:
                fn(k)
            except PeerLost as e:
                self.lose(e.rank, e.reason)

    def lose(self, k: int, reason: str) -> None:
        """A client is gone: continue without it when --min-clients allows, else stop with --resume."""
        if k not in self.live:
            return
        self.live.remove(k)
        r = getattr(self, "round", 0) + 1
        name = self._name(k)
        self.faults.append({"round": r, "client": self._party(k).id if self.sim else str(k), "rank": k,
                            "reason": reason, "remaining": [self._party(j).id for j in self.live] if self.sim else []})
        if self.sim is not None and hasattr(self, "run_dir"):
            atomic_write_text(self.run_dir / "faults.json", json.dumps(self.faults, indent=1) + "\n")
        self.say(f"error: {name} was lost in round {r}: {reason}")
        if len(self.live) >= self.min_clients and self.live:
            self.say(f"continuing round {r} with {len(self.live)} client(s) (--min-clients {self.min_clients}); "
                     "aggregation is re-weighted over them")
            return
        raise _Stop(k, f"{name} was lost: {reason}")

    def train_round(self, r: int) -> list[dict]:
        sim, link = self.sim, self.link
        sim.lm.model.train()
        state = {k: _Serving(self._party(k), k) for k in self.live}
        now = time.perf_counter()
        for k in list(self.live):
            state[k].start = now
            try:
                link.send(k, ROUND, [r, sim.total_rounds])
            except PeerLost as e:
                self.lose(e.rank, e.reason)
        active = {k for k in self.live}
        last = {k: time.monotonic() for k in active}
        while active:
            deadline = min(last[k] for k in active) + self.dopts.timeout_s
            try:
                m = link.next(deadline, active)
            except TimeoutError:
                k = min(active, key=lambda j: last[j])
                active.discard(k)
                self.lose(k, f"no answer within {self.dopts.timeout_s:g} s (round {r + 1}, step "
                              f"{state[k].step + 1} of {sim.steps_per_round})")
                continue
            except PeerLost as e:
                active.discard(e.rank)
                self.lose(e.rank, e.reason)
                continue
            k = m.src
            last[k] = time.monotonic()
            try:
                if self._serve(state[k], m, r):
                    active.discard(k)
                    state[k].wall = time.perf_counter() - state[k].start
                last[k] = time.monotonic()
            except PeerLost as e:
                active.discard(e.rank)
                self.lose(e.rank, e.reason)
        sim.lm.model.eval()
        sim.bank.activate(None)
        rows = []
        for k in self.live:
            st, p = state[k], self._party(k)
            rows.append({"round": r + 1, "client": p.id, "device": p.device, "split_layer": p.split,
                         "train_loss": float(np.mean(st.losses)), "tokens": st.tokens, "wall_s": st.wall,
                         "fleet_s": p.predicted_round_s, "bytes_up": st.up, "bytes_down": st.down, "lr": st.lr})
        return rows

    def _serve(self, st: _Serving, m: Msg, r: int) -> bool:
        """Handle one message of a client's local steps; True when its round is complete."""
        sim, t, p = self.sim, self.sim.t, st.party
        clip = t.max_grad_norm > 0 and (p.opt_client is not None or p.opt_server is not None)
        if m.kind == ACT and st.waiting == "ACT" and m.ints[:2] == [r, st.step]:
            _, s, needs_grad, has_rng = m.ints
            h, mask, labels = m.tensors[:3]
            h, mask, labels = h.to(sim.device), mask.to(sim.device), labels.to(sim.device)
            st.lr = _set_lr(sim, [o for o in (p.opt_server,) if o is not None], r, s)
            sim.bank.activate(p.adapter)
            if has_rng:
                torch.set_rng_state(m.tensors[3])
            h_server = h.detach().requires_grad_(bool(needs_grad))
            with sim._autocast():
                logits = sim.split.server_forward(h_server, mask, p.split)
            loss, n_tok = lm_loss(logits, labels)
            loss.backward()
            if needs_grad:
                self.link.send(st.rank, GRAD, [r, s], [h_server.grad])
            st.losses.append(float(loss.detach()))
            st.tokens += n_tok
            act = h.numel() * h.element_size()
            st.up += act + mask.numel() + 4 * labels.numel()
            st.down += act
            if clip:
                st.waiting = "NORM"
                return False
            return self._finish_step(st, None, r)
        if m.kind == NORM and st.waiting == "NORM" and m.ints[:2] == [r, st.step]:
            return self._finish_step(st, m.tensors[0], r)
        raise PeerLost(st.rank, f"protocol error: unexpected {KIND_NAMES.get(m.kind)} {m.ints} while waiting "
                                f"for {st.waiting} of round {r + 1} step {st.step}")

    def _finish_step(self, st: _Serving, client_norms, r: int) -> bool:
        sim, t, p = self.sim, self.sim.t, st.party
        snap = sim.het.before_step(p, st.step) if sim.het else None
        if client_norms is not None:
            server_norms = _norms(p.opt_server).to(client_norms.device)       # messages arrive on the CPU
            total = torch.linalg.vector_norm(torch.cat([client_norms, server_norms]), 2.0)
            self.link.send(st.rank, TOTAL, [r, st.step], [total])
            _clip(p.opt_server, t.max_grad_norm, total)
        sim.finish_step(p, [p.opt_server], snap)
        st.step += 1
        st.waiting = "ACT"
        if st.step == sim.steps_per_round:
            if sim.strategy.resets_adapters and p.opt_server is not None:
                p.opt_server.state.clear()
            return True
        return False

    def aggregate(self, r: int, rows: list[dict]) -> list[dict]:
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
                self.group, self.members = _subgroup(self.store, live, 0, f"{self.seq}.{self.gen}",
                                                     self.dopts.timeout_s), live
            try:
                blobs = _gather_bytes(self.group, torch.empty(0, dtype=torch.uint8), len(live),
                                      self.dopts.timeout_s)
            except Exception as e:
                raise _Stop(None, f"aggregation (gather) failed: {str(e).splitlines()[0][:200]}") from None
            break
        parties = [self._party(k) for k in self.live]
        for p, blob in zip(parties, blobs[1:]):
            _absorb(sim, p, blob)
        rows = [row for row in rows if row["client"] in {p.id for p in parties}]
        with _parties(sim, parties):        # aggregate over the live clients (re-weighted) ...
            update = sim.combine()
        sim.apply(update, r)                # ... applied to every party: a lost client that comes back
        with _parties(sim, parties):        # (--resume) starts from the aggregate, not its stale adapters
            sim.count_traffic(update, rows)
        self.last_update = update
        blobs = [torch.empty(0, dtype=torch.uint8)] + [
            encode_tree(for_client(update, p.adapter, p.split)) for p in parties]
        try:
            _scatter_bytes(self.group, blobs, self.dopts.timeout_s)
        except Exception as e:
            raise _Stop(None, f"aggregation (scatter) failed: {str(e).splitlines()[0][:200]}") from None
        return rows

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out loss of the aggregated model: a live client runs its part, the server the rest."""
        sim = self.sim
        while self.live:
            k = self.live[0]
            p = self._party(k)
            data = _eval_subset(sim, self.opts.eval_max_seqs)
            if len(data) == 0:
                return float("nan")
            try:
                self.link.send(k, EVAL, [self.opts.eval_max_seqs or 0])
                sim.lm.model.eval()
                sim.bank.activate(sim.eval_adapter())
                bs = max(1, sim.t.batch_size)
                total, n = 0.0, 0
                for i in range(0, len(data), bs):
                    h = self.link.expect(k, EVAL_H).tensors[0].to(sim.device)
                    mask = data.attention_mask[i:i + bs].to(sim.device)
                    labels = data.labels[i:i + bs].to(sim.device)
                    with sim._autocast():
                        logits = sim.split.server_forward(h, mask, p.split)
                    loss, c = lm_loss(logits, labels)
                    total += float(loss) * c
                    n += c
                sim.bank.activate(None)
                return total / n if n else float("nan")
            except PeerLost as e:
                sim.bank.activate(None)
                self.lose(e.rank, e.reason)
        return float("nan")


class _Stop(Exception):
    def __init__(self, rank, reason):
        super().__init__(reason)
        self.rank, self.reason = rank, reason


def _checkpoint_files(run_dir: Path, last: int) -> dict[str, torch.Tensor]:
    """What a client needs to replay the run: merged factors of rounds 1..last, everything of round last."""
    out = {}
    for r in range(0, last + 1):
        d = checkpoint.round_dir(run_dir, r)
        names = ["state.json"] + (["merged.safetensors"] if r < last else list(checkpoint.FILES))
        for n in names:
            out[str((d / n).relative_to(run_dir))] = _bytes_tensor((d / n).read_bytes())
    return out


# ------------------------------------------------------------------ the worker (one process)

def resume_command(worker_argv: list[str], env=None) -> tuple[str, str]:
    """(the torchrun command that resumes this run, where to run it), from torchrun's environment:
    one machine: the same `torchrun --nnodes 1 ...`; several: the machine's node rank and --bind
    address are left as placeholders, the rest is the server's command."""
    import shlex
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE") or 1)
    local = int(env.get("LOCAL_WORLD_SIZE") or world)
    nnodes = max(1, world // max(1, local))
    args = [a for a in worker_argv if a != "--resume"] + ["--resume"]
    if nnodes == 1:
        head = ["torchrun", "--nnodes", "1", "--nproc-per-node", str(world)]
        where = "resume with"
    else:
        head = ["torchrun", "--nnodes", str(nnodes), "--nproc-per-node", str(local), "--node-rank", "<i>",
                "--master-addr", env.get("MASTER_ADDR", "?"), "--master-port", env.get("MASTER_PORT", "?")]
        args = ["<this machine's address>" if i and args[i - 1] == "--bind" else
                "--bind=<this machine's address>" if a.startswith("--bind=") else a for i, a in enumerate(args)]
        where = "resume on every machine i (node rank i; --bind its own address) with"
    quoted = [a if a.startswith("<") else shlex.quote(a) for a in head + ["-m", "hsplit.runtime.worker"] + args]
    return " ".join(quoted), where


def _exit_with_parent(pid: int) -> None:
    """The launcher is gone (killed, even with SIGKILL): this process is orphaned, so it stops too."""
    while os.getppid() == pid:
        time.sleep(0.5)
    os._exit(EXIT_FAULT)


def worker(plan_paths, opts: RunOptions, dopts: DistOptions, argv: list[str] | None = None) -> int:
    """One process of a distributed run (rank from torchrun's environment). Returns the exit code.

    Several plans run one after the other on the same processes (each in runs/<plan stem>/ unless
    --name is given for a single plan): start-up (imports, rendezvous) is paid once, e.g. to compare
    strategies on one fleet."""
    rank = int(os.environ.get("RANK", "0"))
    say = lambda s: print(f"[hsplit rank {rank}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if os.environ.get("HSPLIT_PARENT_PID"):         # started by `hsplit run --distributed`: end with it
        threading.Thread(target=_exit_with_parent, args=(int(os.environ["HSPLIT_PARENT_PID"]),), daemon=True,
                         name="hsplit-parent-watch").start()
    if isinstance(plan_paths, (str, Path)):
        plan_paths = [plan_paths]
    if opts.threads:
        torch.set_num_threads(opts.threads)
    _BIND[0] = dopts.bind
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if rank == 0 or not dopts.quiet:
        say(f"joining the run at {where} as {'the server' if rank == 0 else 'rank ' + str(rank)} "
            f"({os.environ.get('WORLD_SIZE', '?')} processes; waiting up to {dopts.connect_timeout_s:g} s for all)")
    try:
        store, pg, rank, world = connect(dopts.bind, dopts.connect_timeout_s)
    except Exception as e:
        say(f"error: cannot join the run (rendezvous at {where}): {str(e).splitlines()[0][:300]}")
        return EXIT_FAULT
    link = Link(pg, rank, [0] if rank else list(range(1, world)), dopts.timeout_s)
    for seq, plan_path in enumerate(plan_paths):
        o = opts if len(plan_paths) == 1 else dataclasses.replace(opts, name=None)
        code = _one_plan(Path(plan_path), o, dopts, link, store, rank, world, say, argv, seq)
        if code != 0:
            return code
    return 0


def _one_plan(plan_path: Path, opts: RunOptions, dopts: DistOptions, link: Link, store, rank: int, world: int,
              say, argv, seq: int) -> int:
    if rank != 0:
        try:
            return client_main(plan_path, link, store, rank, dopts, opts.device, opts.compute_dtype, say, seq)
        except ConfigError as e:
            say(f"error: {e}")
            return EXIT_REFUSED
    server = Server(plan_path, opts, dopts, link, store, world, say, seq)
    try:
        res = server.run()
        say(f"done: {res.rounds_done} rounds, held-out loss {res.eval_before:.4f} -> {res.eval_after:.4f}; "
            f"outputs in {res.run_dir}/")
        return 0
    except Refused as e:
        say(f"error: refused: {e}")
        return EXIT_REFUSED
    except ConfigError as e:
        say(f"error: {e}")
        for k in server.live:
            server._try_send(k, ABORT, [], [_text_tensor(str(e))])
        server.link.flush(server.live, 10.0)
        return EXIT_REFUSED
    except _Stop as e:
        done = checkpoint.complete_rounds(_run_dir(plan_path, opts))
        if os.environ.get("HSPLIT_RESUME_CMD"):            # started by `hsplit run --distributed`
            cmd, where = os.environ["HSPLIT_RESUME_CMD"], "resume with"
        else:
            cmd, where = resume_command(argv or [])
            cmd = f"{TOKEN_ENV}=... {cmd}"
        say(f"error: stopping: {e.reason}. The last complete checkpoint is round {done[-1] if done else 0} "
            f"in {_run_dir(plan_path, opts)}; {where}:\n    {cmd}")
        for k in server.live:
            server._try_send(k, ABORT, [], [_text_tensor(e.reason)])
        server.link.flush(server.live, 10.0)
        time.sleep(0.5)           # let the clients read why before this process's sockets close
        return EXIT_FAULT


# ------------------------------------------------------------------ launching the local processes

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_args(plan_paths, opts: RunOptions, dopts: DistOptions) -> list[str]:
    args = [str(p) for p in ([plan_paths] if isinstance(plan_paths, (str, Path)) else plan_paths)]
    if opts.name:
        args += ["--name", opts.name]
    args += ["--runs-dir", str(opts.runs_dir), "--eval-seqs", str(opts.eval_max_seqs),
             "--timeout", f"{dopts.timeout_s:g}", "--bind", dopts.bind, "--device", opts.device,
             "--compute-dtype", opts.compute_dtype]
    if opts.rounds:
        args += ["--rounds", str(opts.rounds)]
    if dopts.min_clients:
        args += ["--min-clients", str(dopts.min_clients)]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    if opts.keep_checkpoints is not None:
        args += ["--keep-checkpoints", str(opts.keep_checkpoints)]
    if opts.resume:
        args += ["--resume"]
    return args


def launch_local(plan_paths, opts: RunOptions, dopts: DistOptions, nprocs: int | None = None,
                 env: dict | None = None, logs: Path | None = None, deadline_s: float | None = None,
                 on_start=None, resume_cmd: str | None = None, rank_env: dict | None = None,
                 rank_plans: dict | None = None) -> int:
    """Start the server and every client as local processes on `dopts.bind` (what `hsplit run
    --distributed` does); returns the server's exit code. Every process is killed on the way out.
    rank_env / rank_plans: per-rank environment changes (value None: unset) and plan files (tests)."""
    first = plan_paths if isinstance(plan_paths, (str, Path)) else plan_paths[0]
    n = nprocs or len(Plan.load(first).clients) + 1
    port = free_port(dopts.bind)
    base = dict(os.environ if env is None else env)
    base.setdefault(TOKEN_ENV, os.urandom(16).hex())
    base.update(MASTER_ADDR=dopts.bind, MASTER_PORT=str(port), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                HSPLIT_PARENT_PID=str(os.getpid()))
    if resume_cmd:
        base["HSPLIT_RESUME_CMD"] = resume_cmd
    procs = []
    args = worker_args(plan_paths, opts, dopts)
    handlers = {}
    if threading.current_thread() is threading.main_thread():     # SIGTERM / SIGHUP stop them all, as Ctrl-C
        handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for rank in range(n):
            e = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            for key, value in (rank_env or {}).get(rank, {}).items():
                if value is None:
                    e.pop(key, None)
                else:
                    e[key] = value
            a = args if rank not in (rank_plans or {}) else worker_args(rank_plans[rank], opts, dopts)
            a = a + (["--quiet"] if rank else [])         # the server reports for everyone
            out = open(logs / f"rank{rank}.log", "w") if logs else None
            # own session: a terminal's Ctrl-C reaches this process only, which stops them all (finally)
            procs.append(subprocess.Popen([sys.executable, "-m", "hsplit.runtime.worker", *a], env=e,
                                          stdout=out, stderr=subprocess.STDOUT if out else None,
                                          start_new_session=True))
        if on_start:
            on_start(procs)
        limit = None if deadline_s is None else time.monotonic() + deadline_s
        while procs[0].poll() is None:
            if limit is not None and time.monotonic() > limit:
                raise TimeoutError(f"the distributed run did not finish within {deadline_s:g} s")
            time.sleep(0.1)
        grace = time.monotonic() + 10            # FINISH was sent: the clients exit at once
        while any(p.poll() is None for p in procs) and time.monotonic() < grace:
            time.sleep(0.1)
        return procs[0].returncode
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_local_cli(plan_path, opts: RunOptions, min_clients: int | None, timeout_s: float) -> tuple[int, RunResult | None]:
    """`hsplit run plan.yaml --distributed`: launch the server and every client locally. Returns the exit
    code and, when it is 0, the run's result; Ctrl-C or SIGTERM stops every process and raises
    train.RunInterrupted (where it stopped, the exact --resume command)."""
    dopts = DistOptions(timeout_s=timeout_s, min_clients=min_clients)
    plan = Plan.load(plan_path)                 # refuse bad input here, before starting any process
    pick_device(opts.device)
    check_min_clients(plan, plan_path, dopts)
    run_dir, _, _ = prepare_run_dir(plan, Path(plan_path), opts)
    # the in-process run's --resume command (every option it was started with) plus the distributed ones
    extra = ["--distributed", "--timeout", f"{timeout_s:g}"] + (["--min-clients", str(min_clients)] if min_clients else [])
    try:
        code = launch_local(plan_path, opts, dopts, resume_cmd=run_resume_command(Path(plan_path), run_dir, opts,
                                                                                 True, extra))
    except KeyboardInterrupt:
        done = checkpoint.complete_rounds(run_dir)
        if not done:
            shutil.rmtree(run_dir, ignore_errors=True)      # nothing half-written
        raise interrupted(Path(plan_path), run_dir, opts, done[-1] + 1 if done else None, extra) from None
    return code, (RunResult.of_run(run_dir) if code == 0 else None)
