"""Who may join a distributed run: every process presents the sha256 of the plan it runs and an HMAC of it
with the run's shared secret ($HSPLIT_TOKEN); the server lets the run start only when all agree.

    client -> server  HELLO   plan sha256 + HMAC-SHA256(HSPLIT_TOKEN, plan sha256 | rank)
    server -> client  VERDICT ok, or refused with the reason (the client prints it and exits 2)
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import time

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import Plan, _plain
from hsplit.runtime.distributed.wire import HELLO, VERDICT, PeerLost, Refused, bytes_tensor, text, text_tensor

TOKEN_ENV = "HSPLIT_TOKEN"


def plan_hash(plan: Plan) -> str:
    """Of the plan as its file says (relative data.path, model folder and fleet as written: machines may hold
    plan, data and model elsewhere)."""
    d = _plain(plan.to_dict())
    if plan.written_data_path is not None:
        d["data"]["path"] = plan.written_data_path
    if plan.written_model is not None:
        d["model"] = plan.written_model
    if plan.written_fleet is not None:
        d["inputs"]["fleet"] = plan.written_fleet
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def token_mac(token: str, phash: str, rank: int) -> bytes:
    return hmac.new(token.encode(), f"{phash}|rank={rank}".encode(), hashlib.sha256).digest()


def hello(link, rank: int, phash: str) -> str | None:
    """A client's side: present the plan's hash and the token's MAC; None when admitted, else why not."""
    token = os.environ.get(TOKEN_ENV, "")
    mac = token_mac(token, phash, rank) if token else b""
    link.send(0, HELLO, [1 if token else 0], [bytes_tensor(phash.encode()), bytes_tensor(mac or b"\0")])
    try:
        verdict = link.expect(0, VERDICT)
    except Refused as e:
        return str(e)
    return None if verdict.ints[0] == 1 else text(verdict)


def admit(link, live: list[int], phash: str, name, connect_timeout_s: float) -> None:
    """The server's side: wait for every live rank's HELLO and answer each; Refused (every process told why)
    when any runs another plan or lacks the token. name(k): how to call rank k in a message."""
    token = os.environ.get(TOKEN_ENV, "")
    deadline = time.monotonic() + connect_timeout_s
    hellos, problems = {}, []
    while len(hellos) < len(live):
        try:
            m = link.next(deadline, set(live) - set(hellos))
        except TimeoutError:
            missing = sorted(set(live) - set(hellos))
            raise ConfigError("distributed", [f"rank(s) {missing} did not say hello within "
                                              f"{connect_timeout_s:g} s"]) from None
        except PeerLost as e:
            raise ConfigError("distributed", [f"rank {e.rank} left during the handshake: {e.reason}"]) from None
        hellos[m.src] = m
    for k in live:
        m = hellos[k]
        their_hash = bytes(m.tensors[0].tolist()).decode(errors="replace")
        if m.kind != HELLO:
            problems.append((k, f"{name(k)}: protocol error (expected HELLO)"))
        elif their_hash != phash:
            problems.append((k, f"{name(k)} runs a different plan (sha256 {their_hash[:12]}.. vs the server's "
                                f"{phash[:12]}..): start every process with the same plan.yaml"))
        elif not token:
            problems.append((k, f"the server has no token: set {TOKEN_ENV} (the same secret in every process)"))
        elif m.ints[0] == 0:
            problems.append((k, f"{name(k)} presented no token: set {TOKEN_ENV} to the run's shared token"))
        elif not hmac.compare_digest(bytes(m.tensors[1].tolist()), token_mac(token, phash, k)):
            problems.append((k, f"{name(k)} presented a wrong token ({TOKEN_ENV} differs from the server's)"))
    bad = dict(problems)
    for k in live:
        why = (bad.get(k) or "another process was refused: " + "; ".join(bad.values())) if bad else "ok"
        try:
            link.send(k, VERDICT, [0 if bad else 1], [text_tensor(why)])
        except PeerLost:
            pass
    if bad:
        link.flush(live, 10.0)        # the refused learn why before this process exits
        raise Refused("; ".join(dict.fromkeys(bad.values())))
