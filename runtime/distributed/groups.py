"""Process groups of a distributed run: the rendezvous (torchrun's env:// variables), the point-to-point
group every Link uses, and the collectives of the aggregation (gather of the clients' adapters to
the server, scatter of each client's part of the update) on a group of the live ranks.
"""
from __future__ import annotations

import datetime

import torch

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


def subgroup(store, ranks: list[int], rank: int, gen: str, timeout_s: float, bind: str):
    """A gloo group of `ranks` for collectives (only its members take part in creating it)."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
    prefix = f"hsplit/agg/{gen}/{'-'.join(map(str, ranks))}"
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), ranks.index(rank), len(ranks), opts)


def gather_bytes(pg, blob: torch.Tensor, n: int, timeout_s: float) -> list[torch.Tensor] | None:
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


def scatter_bytes(pg, blobs: list[torch.Tensor] | None, timeout_s: float) -> torch.Tensor:
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
