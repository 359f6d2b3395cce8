"""The wire format of a distributed run: messages, and tensor trees as safetensors bytes (never pickle).

Every message is an int64 header [MAGIC, kind, n_ints, n_tensors, payload bytes, ints...,
(dtype, ndim, shape...) per tensor] and one uint8 payload with the tensors' bytes, 8-byte aligned.
Kinds (runtime/distributed/__init__.py says who sends which): HELLO, VERDICT, ACT, GRAD, NORM, TOTAL,
ROUND, AGG, EVAL, EVAL_H, RESTORE, FINISH, ABORT, PING.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = 0x5053504C   # "PSPL"
HDR = 96
(HELLO, VERDICT, ACT, GRAD, NORM, TOTAL, ROUND, AGG, EVAL, EVAL_H, RESTORE, FINISH, ABORT, PING) = range(1, 15)
KIND_NAMES = {v: k for k, v in dict(HELLO=HELLO, VERDICT=VERDICT, ACT=ACT, GRAD=GRAD, NORM=NORM, TOTAL=TOTAL,
                                    ROUND=ROUND, AGG=AGG, EVAL=EVAL, EVAL_H=EVAL_H, RESTORE=RESTORE,
                                    FINISH=FINISH, ABORT=ABORT, PING=PING).items()}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.float64]
EXIT_REFUSED, EXIT_FAULT = 2, 3


class PeerLost(Exception):
    def __init__(self, rank: int, reason: str):
        super().__init__(reason)
        self.rank, self.reason = rank, reason


class Refused(Exception):
    pass


@dataclass
class Msg:
    src: int
    kind: int
    ints: list[int]
    tensors: list[torch.Tensor]
    nbytes: int


def pack(kind: int, ints, tensors) -> tuple[torch.Tensor, torch.Tensor]:
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


def unpack(src: int, header: torch.Tensor, payload: torch.Tensor) -> Msg:
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


def size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()


def text_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(s.encode() or b" "), dtype=torch.uint8).clone()


def text(m: Msg) -> str:
    return bytes(m.tensors[0].tolist()).decode(errors="replace").strip() if m.tensors else ""


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
