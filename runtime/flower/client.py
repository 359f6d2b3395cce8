"""The ClientApp's work on a device: one Flower train message (a round's local steps) with the device's own
part of the model, its state kept in a local folder between messages.

    reply = handle(config, node_config, kind="train")     # config: the message's ConfigRecord as a dict

A ClientApp process lives for one message, so every message:
    1. loads the device's part of the model (embeddings + blocks [0, split); partial_load) and the plan
       (the copy the server sent, or the node's own `plan=` copy, whose sha256 must match);
    2. restores its state from the store folder (runtime/train/partystore.py's format:
       STORE/<run>/<client>/round-NNNN.safetensors, NNNN = messages handled): its adapter factors, AdamW
       moments (never uploaded), the strategy's per-client and global state, the base weights of its
       adapted modules (merges move them) and how far it has applied the server's updates;
    3. applies the round updates it has not applied yet (each what the server ships it, strategy.download:
       a device that sat rounds out or came back after a fault catches up here, then strategy.enter);
    4. opens the activation stream (stream.py) with the round's token and runs the round's split steps
       (step.client_round with distributed.client.RemoteServer: the same split step as every transport);
    5. saves its state, replies with its upload (client-side factors and the strategy's upload, no
       optimizer moments) and the seconds spent loading and saving.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan
from hsplit.runtime.common import GLOBAL
from hsplit.runtime.distributed.auth import plan_hash
from hsplit.runtime.distributed.client import RemoteServer
from hsplit.runtime.distributed.wire import decode_tree, encode_tree
from hsplit.runtime.flower.stream import Stream
from hsplit.runtime.models.partial_load import is_placeholder
from hsplit.runtime.train.partystore import PartyStore
from hsplit.runtime.train.simulation import build_part
from hsplit.runtime.train.step import client_round
from hsplit.runtime.strategies import RoundUpdate

KEEP_VERSIONS = 2


def default_store() -> Path:
    return Path.home() / ".hsplit" / "flower"


def load_plan(config: dict, node_config: dict, store: Path) -> tuple[Plan, Path]:
    """The plan this node runs: its own copy (node config `plan=`) or the text the server sent; its hash must be
    the server's."""
    own = node_config.get("plan")
    if own:
        path = Path(str(own)).expanduser()
    else:
        path = store / "plan.yaml"
        store.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != config["plan"]:
            path.write_text(config["plan"])
    plan = Plan.load(path)
    if plan_hash(plan) != config["plan_sha256"]:
        raise ConfigError(str(path), [f"this node's plan (sha256 {plan_hash(plan)[:12]}..) is not the server's "
                                      f"({config['plan_sha256'][:12]}..): give the node the run's plan.yaml "
                                      "(node config plan=PATH) or leave plan= out to use the server's"])
    return plan, path


def base_params(sim) -> dict[str, torch.nn.Parameter]:
    """The frozen base weights of every adapted module this process holds (what a merge moves)."""
    return {n: q for n, q in sim.lm.model.named_parameters() if ".base_layer." in n and not is_placeholder(q)}


def state_tensors(sim, p, applied: int, trained: int, seq: int) -> dict[str, torch.Tensor]:
    out = dict(sim.party_tensors(p))
    if sim.global_ranks:
        out.update({f"global/{k}": v for k, v in sim.bank.state(GLOBAL, copy=False).items()})
    out.update({f"state/{k}": v for k, v in sim.strategy.state_tensors().items()})
    out.update({f"base/{n}": q.detach() for n, q in base_params(sim).items()})
    out.update({"meta/applied": torch.tensor(applied), "meta/trained": torch.tensor(trained),
                "meta/seq": torch.tensor(seq)})
    seen = set()                 # a strategy may keep one tensor under two names (hafl): safetensors wants copies
    for k, v in out.items():
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            out[k] = v.clone()
        seen.add(out[k].untyped_storage().data_ptr())
    return out


def load_state(sim, p, t: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    def part(prefix):
        return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    sim.load_party(p, {k: v for k, v in t.items() if k.split("/", 1)[0] in ("adapter", "client", "server",
                                                                            "strategy")})
    if sim.global_ranks:
        sim.bank.load_state(GLOBAL, part("global/"))
    sim.strategy.load_state_tensors(part("state/"))
    params = base_params(sim)
    with torch.no_grad():
        for n, v in part("base/").items():
            params[n].copy_(v)
    return int(t["meta/applied"]), int(t["meta/trained"]), int(t["meta/seq"])


def _say(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def handle(config: dict, node_config: dict, kind: str, say=_say) -> dict:
    """One train message on this node; returns the reply's fields."""
    t0 = time.perf_counter()
    root = Path(str(node_config.get("store") or default_store())).expanduser()
    client_id = config["client"]
    folder = root / config["run"]
    plan, _ = load_plan(config, node_config, folder)
    rank = 1 + [c.id for c in plan.clients].index(client_id)
    sim = build_part(plan, rank, str(node_config.get("device-type", "cpu")))
    p = sim.parties[rank - 1]
    sim.materialise([p], 0)
    store = PartyStore(folder / "clients")
    saved = store.load(client_id)
    applied, trained, seq = load_state(sim, p, saved) if saved else (-1, -1, 0)
    load_s = time.perf_counter() - t0
    pending = decode_tree(torch.frombuffer(bytearray(config["updates"]), dtype=torch.uint8), RoundUpdate) \
        if config.get("updates") else []
    for r, applies, update in pending:
        if r > applied:              # the round updates it missed, in order (the client's part of each)
            sim.apply(update, r, [p] if applies else [])
            applied = r
    sim.total_rounds = int(config["rounds"])
    ca = config.get("ca") or None
    link = Stream.open(config["address"], ca, config["token"], client_id, float(config.get("timeout", 300)))
    reply: dict = {"load_s": load_s}
    try:
        if kind == "train":
            r = int(config["round"])
            if sim.sampling:          # it may have sat rounds out: catch up with the global state
                sim.strategy.enter(p, r)
            say(f"[hsplit client {client_id}] round {r + 1}: stream open to {config['address']}, "
                f"{sim.steps_per_round} step(s); model part and state loaded in {load_s:.2f} s")
            t1 = time.perf_counter()
            client_round(sim, p, r, RemoteServer(sim, link))
            reply["steps_s"] = time.perf_counter() - t1
            trained = r
            own = {m: (a.detach(), b.detach()) for m, (a, b) in sim.bank.factors(p.adapter).items()
                   if m in p.client_modules}
            up = encode_tree({"factors": own, "strategy": sim.strategy.upload(p, p.client_modules)})
            reply["upload"] = bytes(up.numpy().tobytes())
        else:
            raise ValueError(f"unknown message kind {kind!r}")
    finally:
        link.close()
    t2 = time.perf_counter()
    seq += 1
    store.save(client_id, seq, state_tensors(sim, p, applied, trained, seq))
    store.prune([seq - KEEP_VERSIONS + 1]) if seq > KEEP_VERSIONS else None
    reply.update(save_s=time.perf_counter() - t2, stream_up=link.bytes_sent, stream_down=link.bytes_received)
    return reply
