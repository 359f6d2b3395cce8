"""Distributed execution of a plan: the server and every client as separate processes (torch.distributed).

    wire.py      messages and tensor trees as bytes          link.py      point-to-point transport, deadlines
    auth.py      who may join (plan hash + token HMAC)       groups.py    rendezvous, gather/scatter collectives
    server.py    rank 0: the round loop's executor           client.py    rank k: the plan's k-th client
    launcher.py  the torchrun worker and the local launcher (`hsplit run --distributed`)

    torchrun --nnodes 1 --nproc-per-node 3 -m hsplit.runtime.distributed.worker plan.yaml --name demo   # 2 clients
    hsplit run plan.yaml --distributed --name demo          # the same, launched locally by hsplit

Rank 0 is the server, rank k (1..K) runs the plan's k-th client. Each process loads only its own
part of the model (partial_load.py) but builds the same `Simulation` around it and runs the same
code as the in-process simulation: the round loop (loop.rounds_loop, with server.Server as its
executor), the split step (step.client_step / step.ServerSide), the strategy's aggregation,
evaluation, checkpoints and metrics; so the result equals the in-process simulation's
(tests/test_distributed.py, every strategy, within 1e-5).

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
(`strategy.combine`, over the live clients) and applies the result to every party it keeps (a lost
client included, so it rejoins from the aggregate on --resume), then `scatter` of the RoundUpdate:
each client gets the part for its own blocks and its own adapter (`RoundUpdate.for_client`; safetensors bytes,
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
