"""The ServerApp's work: the executor of the one round loop (loop.rounds_loop) on Flower's deployment engine.

    result = FlowerServer(grid, FlowerOptions.from_run_config(rc), run_id, say).run()

Control plane (Flower's Message API, through the Grid): a `query` message asks every new SuperNode which
plan client it is (node config `client=c3`) or which device kind it has (`device=jetson`: it takes a free
plan slot of that kind); each round a `train` message goes to the round's clients (the plan's sample, or
all): round, plan and its sha256, a per-round token, the activation stream's address (and its CA), and
what the device has not applied yet of the rounds' updates: for each, `strategy.download(party, update)`,
exactly what torchrun's server scatters (its blocks' entries; hsplitlora bounded: only its truncated
download T, the rest stays owed at the server). The reply carries the device's upload (client-side
factors + the strategy's upload; optimizer moments stay on the device). The server holds the whole
base model and every holder's adapters, as the in-process simulation does, so it evaluates the
aggregated model itself (no message: a ClientApp process per message costs seconds).

Data plane (stream.py): a gRPC stream per message from the ClientApp, admitted with the round's token
(tokens expire when their round ends), carrying runtime/distributed's messages; the
server half of every split step is distributed.server.Server.serve, i.e. step.ServerSide.

Faults: a device whose stream breaks, whose ClientApp fails (an error reply) or that does not answer
within `timeout` is named (faults.json, the metrics rows); the round completes with the others when
at least `min-clients` remain (re-weighted), else the run stops (exit with the reason). A device that
comes back (a SuperNode with the same `client=`) takes its slot again at the start of a round and
catches up from its stored state with the updates it missed.
"""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.planner.yamlio import atomic_write_text
from hsplit.runtime.distributed.server import Server, Serving, check_min_clients
from hsplit.runtime.distributed.wire import PeerLost, decode_tree, encode_tree, text
from hsplit.runtime.outputs.evaluate import evaluate
from hsplit.runtime.flower.config import FlowerOptions
from hsplit.runtime.flower.stream import Hub, serve
from hsplit.runtime.train.loop import rounds_loop
from hsplit.runtime.train.options import DistOptions, RunOptions
from hsplit.runtime.outputs.rundir import RunResult, prepare_run_dir
from hsplit.runtime.train.simulation import build
from hsplit.runtime.train.step import ServerSide

POLL_S = 0.2          # how often the ServerApp asks the SuperLink for replies


class FlowerServer(Server):
    def __init__(self, grid, fopts: FlowerOptions, run_id: int | str, say):
        self.grid, self.fopts = grid, fopts
        plan_path = Path(fopts.plan)
        opts = RunOptions(rounds=fopts.rounds or None, name=fopts.name or None, runs_dir=fopts.runs_dir,
                          eval_max_seqs=fopts.eval_seqs, progress=False, threads=fopts.threads or None,
                          device="cpu")
        dopts = DistOptions(timeout_s=fopts.timeout, min_clients=fopts.min_clients or None,
                            connect_timeout_s=fopts.connect_timeout)
        self.hub = Hub(self.check_hello, fopts.timeout)
        self.hub.poll = self.poll_replies
        plan = Plan.load(plan_path)
        super().__init__(plan_path, opts, dopts, self.hub, None, len(plan.clients) + 1, say)
        self.plan_text = plan_path.read_text()
        self.run_id = str(run_id)
        self.live = []                       # ranks (plan index + 1) whose device is connected
        self.node: dict[int, int] = {}       # rank -> Flower node id
        self.seen: set[int] = set()          # node ids asked who they are
        self.gone: set[int] = set()          # node ids of devices that were lost
        self.tokens: dict[str, tuple[int, str]] = {}     # token -> (rank, what it admits)
        self.expired: dict[str, str] = {}    # token -> what it admitted
        self.updates: list[tuple[int, object, set[int]]] = []   # (round, RoundUpdate, party indices it applied to)
        self.delivered: dict[int, int] = {}  # rank -> last round update its device applied
        self.outstanding: dict[str, tuple[int, int]] = {}     # message id -> (rank, last update round it carries)
        self.replies: dict[int, object] = {}  # rank -> reply Message
        self.failed: dict[int, str] = {}      # rank -> why its ClientApp failed (an error reply)
        self.streaming = False                # the round's loop waits on the activation streams
        self.round_overhead: list[dict] = []  # per train message: its seconds, push to reply, and the device's parts
        self.pushed: dict[int, float] = {}
        self.shipped: dict[int, int] = {}     # rank -> bytes of round updates its last message carried
        self.ca_pem = Path(fopts.ssl_ca_certfile).read_bytes() if fopts.tls else b""
        self.address = ""

    # ---- the data plane's admission ----
    def check_hello(self, m):
        token = text(m)
        client = bytes(m.tensors[1].tolist()).decode(errors="replace").strip() if len(m.tensors) > 1 else "?"
        if token in self.tokens:
            k, what = self.tokens[token]
            if self._party(k).id != client:
                return None, f"refused: the token is client {self._party(k).id}'s, not {client}'s"
            return k, None
        if token in self.expired:
            return None, f"refused: the token expired (it admitted {self.expired[token]}, which is over)"
        return None, "refused: wrong token (not one this server issued for the current round)"

    def issue(self, k: int, what: str) -> str:
        tok = secrets.token_urlsafe(24)
        self.tokens[tok] = (k, what)
        return tok

    def expire(self) -> None:
        for tok, (_, what) in self.tokens.items():
            self.expired[tok] = what
        self.tokens = {}

    # ---- the control plane ----
    def message(self, k: int, kind: str, **fields) -> str:
        from flwr.app import ConfigRecord, Message, RecordDict
        p = self._party(k)
        last = self.delivered.get(k, -1)
        download = self.sim.strategy.download      # what its device applies (as every transport ships it)
        pending = [(r, p.index in applied, download(p, u)) for r, u, applied in self.updates if r > last]
        cfg = {"run": self.run_key, "client": p.id, "plan": self.plan_text, "plan_sha256": self.phash,
               "rounds": int(self.sim.total_rounds), "address": self.address, "ca": self.ca_pem,
               "timeout": float(self.fopts.timeout), "eval_max_seqs": int(self.opts.eval_max_seqs or 0),
               "updates": bytes(encode_tree(pending).numpy().tobytes()) if pending else b"", **fields}
        self.shipped[k] = len(cfg["updates"])
        msg = Message(RecordDict({"hsplit": ConfigRecord(cfg)}), dst_node_id=self.node[k], message_type=kind)
        mid = list(self.grid.push_messages([msg]))[0]
        self.forget(k)                    # an earlier message's late reply (e.g. Flower's "Node Unavailable")
        self.outstanding[mid] = (k, pending[-1][0] if pending else last)
        self.pushed[k] = time.perf_counter()
        self.replies.pop(k, None)
        self.failed.pop(k, None)
        return mid

    def forget(self, k: int) -> None:
        """Replies to k's earlier messages no longer count (k was lost, or has a newer message)."""
        self.outstanding = {mid: v for mid, v in self.outstanding.items() if v[0] != k}

    def poll_replies(self) -> None:
        """Collect the replies that arrived; a failed ClientApp is reported to the round's loop as a lost peer."""
        if not self.outstanding:
            return
        for reply in self.grid.pull_messages(list(self.outstanding)):
            mid = reply.metadata.reply_to_message_id
            if mid not in self.outstanding:
                continue
            k, upto = self.outstanding.pop(mid)
            if reply.has_error():
                self.failed[k] = f"its ClientApp failed: {reply.error.reason}"
                if self.streaming:          # the round's loop is waiting for its stream
                    self.hub.inbox.put(PeerLost(k, self.failed[k]))
                continue
            self.delivered[k] = upto
            self.replies[k] = reply
            content = reply.content["hsplit"]
            self.round_overhead.append({"round": self.round + 1, "client": self._party(k).id,
                                        "message_s": time.perf_counter() - self.pushed[k],
                                        "updates_bytes": self.shipped.get(k, 0),
                                        **{key: float(content.get(key, 0.0)) for key in ("steps_s", "load_s",
                                                                                          "save_s")}})

    def wait_reply(self, k: int):
        """k's reply to its last message (its ClientApp saved its state), or PeerLost."""
        deadline = time.monotonic() + self.fopts.timeout
        while k not in self.replies:
            if k in self.failed:
                raise PeerLost(k, self.failed.pop(k))
            if time.monotonic() > deadline:
                raise PeerLost(k, f"no reply within {self.fopts.timeout:g} s")
            time.sleep(POLL_S)
            self.poll_replies()
        return self.replies.pop(k)

    def discover(self, deadline: float, until_all: bool) -> None:
        """Ask every SuperNode not seen yet which plan client it is (and wait for the answers); give free plan
        slots to the new ones. until_all: keep looking for new nodes until every slot is taken or `deadline`."""
        from flwr.app import ConfigRecord, Message, RecordDict
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in self.seen and n not in self.gone]
            asked = {}
            for n in new:
                msg = Message(RecordDict({"hsplit": ConfigRecord({"plan_sha256": self.phash})}), dst_node_id=n,
                              message_type="query")
                asked[list(self.grid.push_messages([msg]))[0]] = n
            self.seen.update(new)
            end = time.monotonic() + self.fopts.timeout        # a node that never answers stays unassigned
            while asked and time.monotonic() < end:
                for reply in self.grid.pull_messages(list(asked)):
                    n = asked.pop(reply.metadata.reply_to_message_id, None)
                    if n is not None and not reply.has_error():
                        c = reply.content["hsplit"]
                        self.assign(n, str(c.get("client", "")), str(c.get("device", "")))
                if asked:
                    time.sleep(POLL_S)
            if len(self.live) == len(self.plan.clients) or not until_all or time.monotonic() >= deadline:
                return
            time.sleep(POLL_S)

    def assign(self, node: int, client: str, device: str) -> None:
        ids = [c.id for c in self.plan.clients]
        free = [k for k in range(1, self.world) if k not in self.live]
        if client:
            if client not in ids:
                self.say(f"warning: node {node} says client={client}, which the plan does not have "
                         f"({', '.join(ids)}); it stays idle")
                return
            k = ids.index(client) + 1
            if k not in free:
                self.say(f"warning: node {node} says client={client}, which node {self.node[k]} already is; "
                         "it stays idle")
                return
        elif device:
            slots = [k for k in free if self.plan.clients[k - 1].device == device]
            if not slots:
                self.say(f"warning: node {node} (device={device}) finds no free plan slot of that device kind; "
                         "it stays idle")
                return
            k = slots[0]
        else:
            self.say(f"warning: node {node} gives neither client= nor device= in its node config; it stays idle")
            return
        self.node[k] = node
        self.live = sorted(self.live + [k])
        self.say(f"node {node} is {self._name(k)}")

    def lose(self, k: int, reason: str) -> None:
        if k in self.live and k in self.node:
            self.gone.add(self.node[k])
            self.forget(k)
        super().lose(k, reason)

    # ---- the run ----
    def run(self) -> RunResult:
        opts, plan, plan_path = self.opts, self.plan, self.plan_path
        check_min_clients(plan, plan_path, self.dopts)
        if opts.resume:
            raise ConfigError(str(plan_path), ["resume is not supported on Flower yet; start a new run (name=)"])
        run_dir, done, rounds = prepare_run_dir(plan, plan_path, opts)
        plan.training.rounds = rounds
        self.run_key = f"{run_dir.name}-{self.run_id}"
        self.warn_timeout()
        f = self.fopts
        cert = Path(f.ssl_certfile).read_bytes() if f.tls else None
        key = Path(f.ssl_keyfile).read_bytes() if f.tls else None
        grpc_server, port = serve(self.hub, f.stream_bind, cert, key)
        host = f.stream_bind.rsplit(":", 1)[0]
        self.address = f.stream_address or f"{host}:{port}"
        self.say(f"activation stream on {f.stream_bind.rsplit(':', 1)[0]}:{port} "
                 f"({'TLS' if f.tls else 'plaintext'}); devices dial {self.address}")
        try:
            self.discover(time.monotonic() + f.connect_timeout, until_all=True)
            self.min_clients = self.dopts.min_clients or len(plan.clients)
            if len(self.live) < self.min_clients:
                missing = [c.id for i, c in enumerate(plan.clients) if i + 1 not in self.live]
                raise ConfigError(str(plan_path), [f"clients {', '.join(missing)} have no device after "
                                                   f"{f.connect_timeout:g} s (connect-timeout): start a SuperNode "
                                                   "with --node-config 'client=\"ID\"' (or device=KIND) for each"])
            self.run_dir = run_dir
            # the whole model (not only the blocks above the lowest split): evaluation runs here, and every
            # merge reaches every block, exactly as in-process
            self.sim = build(plan, progress=False, device="cpu", compute=opts.compute_dtype)
            self.side = ServerSide(self.sim)
            extra = {"flower": {"min_clients": self.min_clients, "timeout_s": f.timeout,
                                "stream": "tls" if f.tls else "plaintext", "run_id": self.run_id}}
            res = rounds_loop(self, plan, plan_path, opts, run_dir, done, rounds, [None], config_extra=extra)
            by_kind = self.hub.by_kind
            atomic_write_text(run_dir / "traffic.json", json.dumps(
                {"bytes_by_message": by_kind, "step_bytes": sum(by_kind.get(k, 0) for k in
                                                                ("ACT", "GRAD", "NORM", "TOTAL")),
                 "train_messages": self.round_overhead}, indent=1))
            return res
        finally:
            grpc_server.stop(grace=None)

    # ---- the executor of loop.rounds_loop ----
    def rejoin(self) -> None:
        if len(self.live) < len(self.plan.clients):
            self.discover(time.monotonic() + self.fopts.rejoin_timeout, until_all=self.fopts.rejoin_timeout > 0)

    def train_round(self, r: int, reporter=None, on_step=None) -> list[dict]:
        sim = self.sim
        self.round = r
        self.rejoin()
        sampled = {p.index + 1 for p in sim.round_parties(r)}
        ks = [k for k in self.live if k in sampled]
        self.current = [self._party(k) for k in ks]
        sim.materialise(self.current, r)
        sim.lm.model.train()
        self.side.begin_round(self.current)
        self.expire()
        state = {k: Serving() for k in ks}
        last = {}
        for k in ks:
            self.message(k, "train", round=r, token=self.issue(k, f"client {self._party(k).id}'s round {r + 1}"))
            last[k] = time.monotonic()
        active = set(ks)
        self.streaming = True
        self.serve_steps(self.hub, active, state, last, self.fopts.timeout, r)
        self.streaming = False
        sim.lm.model.eval()
        sim.bank.activate(None)
        return self.side.rows(r, [self._party(k) for k in self.live if k in sampled])

    def aggregate(self, r: int, rows: list[dict]):
        sim = self.sim
        trained = {p.index + 1 for p in self.current}
        for k in [k for k in self.live if k in trained]:
            try:
                reply = self.wait_reply(k)
            except PeerLost as e:
                self.lose(k, e.reason)
                continue
            self.absorb(self._party(k), torch.frombuffer(bytearray(reply.content["hsplit"]["upload"]),
                                                         dtype=torch.uint8))
        self.expire()
        parties = [self._party(k) for k in self.live if k in trained]
        rows = [row for row in rows if row["client"] in {p.id for p in parties}]
        update = sim.strategy.combine(parties)      # over the live clients (re-weighted)
        applied = self.current if sim.sampling else list(sim.active)
        sim.apply(update, r, self.current if sim.sampling else None)
        from hsplit.runtime.train.step import count_update_traffic
        count_update_traffic(sim.strategy, parties, rows, update)
        self.updates.append((r, update, {p.index for p in applied}))
        if sim.sampling:
            sim.release(self.current, r + 1)
        return update, rows

    @torch.no_grad()
    def absorb(self, p, blob: torch.Tensor) -> None:
        """A device's upload: its client-side factors and the strategy's upload (its moments stay on the device)."""
        up = decode_tree(blob)
        f = self.sim.bank.factors(p.adapter)
        for m, (a, b) in up["factors"].items():
            f[m][0].copy_(a)
            f[m][1].copy_(b)
        self.sim.strategy.absorb(p, up["strategy"])

    def evaluate(self) -> float:
        """Held-out loss of the aggregated model, on the server: it holds the whole base model and every
        holder's adapters (as in-process), so evaluating needs no device and no message. Its base weights are the
        exact global model (sim.holds_global; hsplitlora bounded: what the devices still owe is in their offsets
        here, never in the base), so no eval_state is shipped."""
        return evaluate(self.sim, self.sim.data.eval, self.opts.eval_max_seqs)
