"""hsplit as a Flower app: the ServerApp and the ClientApp that `flwr run` starts (the app's pyproject.toml
names them: serverapp = "hsplit.runtime.flower.app:server_app", clientapp = "...:client_app").

    hsplit flower app fleet-app/ --plan plan.yaml      # writes fleet-app/pyproject.toml naming these
    flwr run fleet-app/ myfleet --stream --run-config 'rounds=3'

The ServerApp runs the round loop (server.py, the executor of loop.rounds_loop; it evaluates the aggregate
itself); the ClientApp answers two message types: `query` (which plan client this node is: its node config
`client=` or `device=`) and `train` (one round's split steps over the activation stream; client.py). Node config keys: client, device, store (the folder that keeps the device's state
between rounds; default ~/.hsplit/flower), plan (the node's own copy of the plan), device-type (cpu|cuda).
"""
from __future__ import annotations

import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


def _say(s: str) -> None:
    print(f"[hsplit server] {s}", file=sys.stderr, flush=True)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from hsplit.runtime.train import checkpoint
    from hsplit.runtime.distributed.server import Stop
    from hsplit.runtime.flower.config import FlowerOptions
    from hsplit.runtime.flower.server import FlowerServer

    fopts = FlowerOptions.from_run_config(dict(context.run_config))
    if fopts.threads:
        import torch
        torch.set_num_threads(fopts.threads)
    server = FlowerServer(grid, fopts, context.run_id, _say)
    try:
        res = server.run()
    except Stop as e:
        done = checkpoint.complete_rounds(server.run_dir) if server.run_dir else []
        _say(f"error: stopping: {e.reason}. The last complete checkpoint is round {done[-1] if done else 0} in "
             f"{server.run_dir}; resuming a Flower run is not supported yet: start a new run (name=...)")
        raise SystemExit(3) from None
    _say(f"done: {res.rounds_done} rounds, held-out loss {res.eval_before:.4f} -> {res.eval_after:.4f}; "
         f"outputs in {res.run_dir}/")


def _reply(msg: Message, fields: dict) -> Message:
    return Message(RecordDict({"hsplit": ConfigRecord(fields)}), reply_to=msg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    nc = dict(context.node_config)
    return _reply(msg, {"client": str(nc.get("client", "")), "device": str(nc.get("device", ""))})


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from hsplit.runtime.flower.client import handle
    return _reply(msg, handle(dict(msg.content["hsplit"]), dict(context.node_config), "train"))
