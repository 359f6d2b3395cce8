"""The data plane of a Flower run: a direct gRPC stream (grpcio) between a ClientApp and the ServerApp that
carries one round's split steps, in runtime/distributed/wire.py's messages.

    hub = Hub(check)                       # in the ServerApp: check(hello) -> (rank, None) | (None, why)
    port = serve(hub, "0.0.0.0:9443", cert_pem, key_pem)       # TLS (None, None: plaintext, loopback only)
    m = hub.next(deadline, {1, 2}); hub.send(1, GRAD, [r, s], [grad])    # as runtime/distributed/link.Link

    link = Stream.open("server:9443", ca_pem, token, client_id)  # in a ClientApp; Refused(why) if not admitted
    link.send(0, ACT, [r, s, 1, 0], [h, mask, labels]); grad = link.expect(0, GRAD).tensors[0]
    link.close()                                                  # BYE: the round is over for this client

One bidirectional stream per client per train message (its local steps of the round): the client
opens it, says HELLO with the per-round token the train message gave it, and the server
answers VERDICT (ok, or why not: a wrong token, one of an earlier round, another client's). Frames are
a wire.pack header (96 int64) followed by its payload bytes: raw tensor bytes, never pickle. A stream
that ends without BYE (the ClientApp process died, the device went away) is reported to the server's
loop as wire.PeerLost naming the client; every wait has a deadline kept here, in Python.
"""
from __future__ import annotations

import queue
import threading
import time
import warnings
from concurrent import futures

import grpc
import numpy as np
import torch

from hsplit.runtime.distributed.wire import (ABORT, DTYPES, FINISH, HDR, HELLO, KIND_NAMES, MAGIC, VERDICT, Msg,
                                             PeerLost, Refused, text, text_tensor, unpack)

METHOD = "/hsplit.Activations/Steps"
BYE = FINISH                    # a client's last frame on its stream
_MAX = 1 << 30                  # bytes per frame (a long sequence's activations)
OPTIONS = [("grpc.max_send_message_length", _MAX), ("grpc.max_receive_message_length", _MAX)]


def frame(kind: int, ints=(), tensors=()) -> bytes:
    """wire.pack's layout (header, then each tensor's bytes 8-byte aligned) as one bytes object; the tensors'
    bytes are copied once, into the join."""
    parts, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if n:
            parts.append(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        if n % 8:
            parts.append(bytes(8 - n % 8))
        off += n + (-n) % 8
    return b"".join([frame_header(kind, ints, tensors, off)] + parts)


def frame_header(kind: int, ints, tensors, payload_bytes: int) -> bytes:
    ints = [int(i) for i in ints]
    head = [MAGIC, kind, len(ints), len(tensors), payload_bytes] + ints
    for t in tensors:
        head += [DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(head) > HDR:
        raise ValueError("message header too long")
    return np.asarray(head + [0] * (HDR - len(head)), dtype=np.int64).tobytes()


def unframe(src: int, data: bytes) -> Msg:
    """The message in a frame; its tensors are copies (unpack clones them out of the read-only bytes)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        header = torch.frombuffer(data, dtype=torch.int64, count=HDR)
        if int(header[0]) != MAGIC:
            raise ValueError("bad frame header (not an hsplit peer?)")
        payload = torch.frombuffer(data, dtype=torch.uint8, offset=HDR * 8) if len(data) > HDR * 8 else \
            torch.empty(0, dtype=torch.uint8)
        return unpack(src, header, payload)


class Hub:
    """The ServerApp's side: every client's stream, one inbox, Link's interface (send / next / expect)."""

    def __init__(self, check, timeout_s: float = 300.0):
        self.check, self.timeout_s = check, timeout_s
        self.inbox: queue.Queue = queue.Queue()
        self.held: list[Msg] = []
        self.out: dict[int, queue.Queue] = {}
        self.serial: dict[int, int] = {}
        self.dead: dict[int, str] = {}
        self.lock = threading.Lock()
        self.bytes_sent = self.bytes_received = 0
        self.by_kind: dict[str, int] = {}
        self.refusals: list[str] = []           # why streams were refused (tests, the server's log)
        self.poll = None                        # called about once a second while next() waits

    # ---- the gRPC handler: one call per client stream ----
    def steps(self, requests, context):
        try:
            first = unframe(0, next(requests))
        except (StopIteration, ValueError, grpc.RpcError):
            return
        k, why = (None, "the first message must be HELLO") if first.kind != HELLO else self.check(first)
        if k is None:
            self.refusals.append(why)
            yield frame(VERDICT, [0], [text_tensor(why)])
            return
        q: queue.Queue = queue.Queue()
        with self.lock:
            serial = self.serial[k] = self.serial.get(k, 0) + 1
            self.out[k] = q
            self.dead.pop(k, None)
            self.held = [m for m in self.held if m.src != k]
        context.add_callback(lambda: q.put(None))
        threading.Thread(target=self._reader, args=(k, serial, requests), daemon=True,
                         name=f"hsplit-stream-{k}").start()
        yield frame(VERDICT, [1], [text_tensor("ok")])
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    def _reader(self, k: int, serial: int, requests) -> None:
        why = "its stream ended before the round did (the ClientApp process died or its device went away)"
        try:
            for data in requests:
                m = unframe(k, data)
                if m.kind == BYE:
                    self.close(k, serial)
                    return
                self.inbox.put(m)
        except grpc.RpcError as e:
            why = f"its stream broke ({e.code().name if hasattr(e, 'code') else e}): the ClientApp process died " \
                  "or its device went away"
        except ValueError as e:
            why = str(e)
        self._fail(k, serial, why)

    def close(self, k: int, serial: int | None = None) -> None:
        """End k's stream (the server's side); nothing more is expected from it."""
        with self.lock:
            if serial is not None and self.serial.get(k) != serial:
                return
            q = self.out.pop(k, None)
        if q is not None:
            q.put(None)

    def _fail(self, k: int, serial: int, why: str) -> None:
        with self.lock:
            if self.serial.get(k) != serial or k in self.dead:
                return
            self.dead[k] = why
            q = self.out.pop(k, None)
        if q is not None:
            q.put(None)
        self.inbox.put(PeerLost(k, why))

    # ---- Link's interface for the server's loop ----
    def send(self, dst: int, kind: int, ints=(), tensors=()) -> int:
        with self.lock:
            q = self.out.get(dst)
            if q is None:
                raise PeerLost(dst, self.dead.get(dst, "it has no open stream"))
        data = frame(kind, ints, tensors)
        q.put(data)
        with self.lock:
            self.bytes_sent += len(data)
            self.by_kind[KIND_NAMES[kind]] = self.by_kind.get(KIND_NAMES[kind], 0) + len(data)
        return len(data)

    def next(self, deadline: float, want=None) -> Msg:
        """The next message (from `want` ranks if given) before `deadline`, else TimeoutError; PeerLost when a
        wanted client's stream broke."""
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
                if self.poll is not None:
                    self.poll()
                continue
            if isinstance(m, PeerLost):
                if want is None or m.rank in want:
                    raise m
                continue
            with self.lock:
                self.bytes_received += m.nbytes
                self.by_kind[KIND_NAMES[m.kind]] = self.by_kind.get(KIND_NAMES[m.kind], 0) + m.nbytes
            if want is None or m.src in want:
                return m
            self.held.append(m)

    def expect(self, src: int, kind: int) -> Msg:
        try:
            m = self.next(time.monotonic() + self.timeout_s, {src})
        except TimeoutError:
            raise PeerLost(src, f"no answer within {self.timeout_s:g} s") from None
        if m.kind != kind:
            raise PeerLost(src, f"protocol error: expected {KIND_NAMES[kind]}, got {KIND_NAMES.get(m.kind)}")
        return m


def serve(hub: Hub, address: str, cert_pem: bytes | None, key_pem: bytes | None, workers: int = 64):
    """Start the activation service on `address` (host:port; port 0 picks one). Returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hsplit-grpc"),
                         options=OPTIONS)
    handler = grpc.method_handlers_generic_handler("hsplit.Activations", {
        "Steps": grpc.stream_stream_rpc_method_handler(hub.steps)})     # raw bytes in and out
    server.add_generic_rpc_handlers((handler,))
    if cert_pem is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


class Stream:
    """A ClientApp's side of one stream: Link's interface towards rank 0 (what distributed.client.RemoteServer
    uses), with deadlines."""

    def __init__(self, channel, timeout_s: float):
        self.channel, self.timeout_s = channel, timeout_s
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.bytes_sent = self.bytes_received = 0
        call = channel.stream_stream(METHOD)(iter(self.requests.get, None))
        self.call = call
        self.reader = threading.Thread(target=self._reader, args=(call,), daemon=True, name="hsplit-stream")
        self.reader.start()

    @classmethod
    def open(cls, address: str, ca_pem: bytes | None, token: str, client_id: str, timeout_s: float = 300.0):
        """Connect and present the token; Refused(why) when the server does not admit it."""
        if ca_pem:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem),
                                          options=OPTIONS)
        else:
            channel = grpc.insecure_channel(address, options=OPTIONS)
        s = cls(channel, timeout_s)
        s.send(0, HELLO, [], [text_tensor(token), text_tensor(client_id)])
        verdict = s.expect(0, VERDICT)
        if verdict.ints[0] != 1:
            s.channel.close()
            raise Refused(text(verdict))
        return s

    def _reader(self, call) -> None:
        try:
            for data in call:
                self.replies.put(unframe(0, data))
            self.replies.put(PeerLost(0, "the server closed the stream"))
        except grpc.RpcError as e:
            self.replies.put(PeerLost(0, f"the stream broke: {e.code().name}: {e.details()}"))

    def send(self, dst: int, kind: int, ints=(), tensors=()) -> int:
        data = frame(kind, ints, tensors)
        self.requests.put(data)
        self.bytes_sent += len(data)
        return len(data)

    def expect(self, src: int, kind: int) -> Msg:
        try:
            m = self.replies.get(timeout=self.timeout_s)
        except queue.Empty:
            raise PeerLost(0, f"the server sent nothing for {self.timeout_s:g} s") from None
        if isinstance(m, PeerLost):
            raise m
        self.bytes_received += m.nbytes
        if m.kind == ABORT:
            raise Refused(text(m))
        if m.kind != kind:
            raise PeerLost(0, f"protocol error: expected {KIND_NAMES[kind]}, got {KIND_NAMES.get(m.kind)}")
        return m

    def close(self) -> None:
        """BYE, then the stream ends."""
        self.send(0, BYE)
        self.requests.put(None)
        self.reader.join(self.timeout_s)          # the server ends the call once it has read BYE
        self.channel.close()
