"""Real device fleets: hsplit as a Flower app (Flower's deployment engine as the control plane) with the
per-step activations on a direct gRPC stream (the data plane). A third transport under the one round loop
and the one split step, beside the in-process simulation and torchrun (runtime/distributed/).

    config.py   the app's run configuration (FlowerOptions)     certs.py   a CA, the server certificate, node keys
    app.py      ServerApp + ClientApp (what `flwr run` starts)   stream.py  the gRPC activation stream
    server.py   the ServerApp's executor of loop.rounds_loop     client.py  a device's message: load, steps, save
    fleet.py    local SuperLink/SuperNode processes and the app folder (`hsplit flower ...`, tests, bench)

README "Real fleets" has the commands; docs/runtime.md says when to choose torchrun and when Flower.
"""
