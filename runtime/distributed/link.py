"""Link: point-to-point messages between the server and its clients on a gloo process group.

Deadlines are kept in Python, never by gloo: a gloo send/recv whose wait times out closes every
connection of the process group (gloo signals the timeout to all its pairs), which would turn one
silent client into the loss of all of them. So each peer has a reader and a sender thread that wait
without limit, sending never blocks the caller (a peer that stopped reading holds up only its own
queue), and the waiting side names a peer that has not answered within --timeout.
"""
from __future__ import annotations

import datetime
import queue
import threading
import time

import torch

from hsplit.runtime.distributed.wire import (ABORT, HDR, KIND_NAMES, MAGIC, PING, Msg, PeerLost, Refused, pack, text,
                                             unpack)

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
                self.inbox.put(unpack(src, header, payload))
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
                return text(m)
        while True:
            try:
                m = self.inbox.get_nowait()
            except queue.Empty:
                return None
            if isinstance(m, Msg) and m.kind == ABORT:
                return text(m)

    def send(self, dst: int, kind: int, ints=(), tensors=()) -> int:
        """Queue a message for `dst` and return at once; PeerLost if `dst`'s connection already failed."""
        if dst in self.dead:
            raise PeerLost(dst, self.dead[dst])
        header, payload = pack(kind, ints, tensors)
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
            raise Refused(text(m))
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
