"""The Flower transport's costs on this machine: per-step exchange on the gRPC activation stream vs the gloo
link (torchrun's transport) at the same activation size, and the per-round overhead of a Flower message.

    .venv/bin/python bench/flower.py [--reps 30] [--sizes 8192,8388608] [--rounds 3]
    # -> bench/results/flower.json (summarised in docs/benchmarks.md "Flower transport")

Per step: one split step's exchange, client -> server ACT (one activation tensor of SIZE bytes) and
server -> client GRAD (the same size), through the real transports, both inside this one process
(threads), so that the two are measured under the same load: runtime/distributed/link.Link on a gloo
process group of 2 ranks (a TCPStore on loopback) and runtime/flower/stream.py (Hub + Stream over gRPC
on loopback, plaintext and TLS). Median of --reps after 3 warm-up exchanges; reported as ratios to gloo.
SIZE 8192 is the tiny test model's activation (batch 2 x 32 tokens x hidden 32 x fp32); 8388608 is 8 MB.

Per round (a real SuperLink and SuperNodes on loopback, the tiny model, 2 clients, --rounds rounds,
1 local step): each train message from push to reply as the ServerApp sees it, split into the parts a
device reports (its local steps, its model part + state load, its state save) and the rest (Flower's
delivery and polls, the ClientApp process start and its imports), plus `import
hsplit.runtime.flower.client` in a fresh process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hsplit.runtime.distributed.wire import ACT, GRAD  # noqa: E402


def _exchange(send_client, recv_server, send_server, recv_client, size: int, reps: int) -> list[float]:
    """Client sends ACT, the server answers GRAD; seconds per exchange."""
    h = torch.randn(size // 4)
    out = []
    for i in range(reps + 3):
        t = time.perf_counter()
        send_client(ACT, [0, i], [h])
        m = recv_server()
        send_server(GRAD, [0, i], [m.tensors[0]])
        recv_client()
        if i >= 3:
            out.append(time.perf_counter() - t)
    return out


def gloo_steps(size: int, reps: int) -> list[float]:
    import torch.distributed as dist
    from hsplit.runtime.distributed.link import Link
    from hsplit.runtime.flower.fleet import free_port

    port = free_port()
    pgs = [None, None]

    def make(rank):
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=60))
        pgs[rank] = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=60))
    ts = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    server, client = Link(pgs[0], 0, [1], 60), Link(pgs[1], 1, [0], 60)
    return _exchange(lambda k, i, t: client.send(0, k, i, t), lambda: server.expect(1, ACT),
                     lambda k, i, t: server.send(1, k, i, t), lambda: client.expect(0, GRAD), size, reps)


def grpc_steps(size: int, reps: int, tls: bool) -> list[float]:
    from hsplit.runtime.flower.certs import write_certs
    from hsplit.runtime.flower.stream import Hub, Stream, serve

    hub = Hub(lambda m: (1, None), timeout_s=60)
    cert = key = ca = None
    if tls:
        files = write_certs(Path(tempfile.mkdtemp(prefix="hsplit-bench-")), ["127.0.0.1"])
        cert, key, ca = (files[n].read_bytes() for n in ("server.pem", "server.key", "ca.crt"))
    server, port = serve(hub, "127.0.0.1:0", cert, key)
    try:
        s = Stream.open(f"127.0.0.1:{port}", ca, "t", "a", timeout_s=60)
        out = _exchange(lambda k, i, t: s.send(0, k, i, t), lambda: hub.expect(1, ACT),
                        lambda k, i, t: hub.send(1, k, i, t), lambda: s.expect(0, GRAD), size, reps)
        s.close()
        return out
    finally:
        server.stop(grace=None)


def per_round(rounds: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import CORPUS_LINES
    from hsplit.planner.plan import Plan
    from hsplit.runtime.flower.fleet import LocalFleet, write_app
    from hsplit.runtime.models.tiny import save_tiny_model

    root = Path(tempfile.mkdtemp(prefix="hsplit-bench-flower-"))
    model = save_tiny_model(root / "tiny", "llama", layers=4)
    (root / "corpus").mkdir()
    for i, name in enumerate(("alpha", "beta")):
        (root / "corpus" / f"{name}.txt").write_text(" ".join(CORPUS_LINES[(i + j) % 4] for j in range(120)))
    plan = Plan.from_dict({
        "model": str(model), "strategy": "hsplitlora", "server_rank": 4, "modules": ["q_proj", "v_proj"],
        "training": {"batch_size": 2, "seq_len": 32, "local_steps": 1, "rounds": rounds, "dtype": "fp32",
                     "seed": 0},
        "data": {"path": str(root / "corpus"), "partition": "by-source", "eval_fraction": 0.1},
        "clients": [{"id": "a", "device": "d", "split_layer": 1, "ranks": {"q_proj": 4}, "data_weight": 1.0},
                    {"id": "b", "device": "d", "split_layer": 3, "ranks": {"q_proj": 4}, "data_weight": 1.0}]},
        "bench.yaml")
    plan.save(root / "bench.yaml")
    app = write_app(root / "app", root / "bench.yaml", name="bench", runs_dir=root / "runs", eval_seqs=4,
                    threads=1)
    with LocalFleet(root / "fleet") as fleet:
        fleet.start_link()
        for c in ("a", "b"):
            fleet.add_node(c, client=c, store=str(root / "store" / c))
        t = time.perf_counter()
        code, out = fleet.run(app, timeout_s=1200)
        total = time.perf_counter() - t
        if code != 0:
            raise SystemExit(out[-3000:])
        import csv
        rows = list(csv.DictReader(open(root / "runs" / "bench" / "metrics.csv")))
        traffic = json.loads((root / "runs" / "bench" / "traffic.json").read_text())
    imports = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import hsplit.runtime.flower.client"], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
        imports.append(time.perf_counter() - t)
    rounds_wall = [float(r["wall_s"]) for r in rows if r["client"] == "all" and r["round"] != "0"]
    steps = [float(r["wall_s"]) for r in rows if r["client"] not in ("all",) and r["round"] != "0"]
    msgs = traffic["train_messages"]
    med = lambda key: statistics.median(x[key] for x in msgs)  # noqa: E731
    return {"rounds": rounds, "flwr_run_wall_s": total, "round_wall_s": rounds_wall,
            "median_round_wall_s": statistics.median(rounds_wall),
            "client_round_wall_s_as_server_sees_it": steps,
            "train_message_s_median": med("message_s"), "device_steps_s_median": med("steps_s"),
            "device_load_s_median": med("load_s"), "device_save_s_median": med("save_s"),
            "flower_and_process_start_s_median": statistics.median(
                x["message_s"] - x["steps_s"] - x["load_s"] - x["save_s"] for x in msgs),
            "clientapp_import_s_median": statistics.median(imports)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sizes", default="8192,8388608")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-round", action="store_true", help="per-step exchange only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "flower.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}, "reps": a.reps, "steps": []}
    for size in (int(s) for s in a.sizes.split(",")):
        g = statistics.median(gloo_steps(size, a.reps))
        p = statistics.median(grpc_steps(size, a.reps, tls=False))
        s = statistics.median(grpc_steps(size, a.reps, tls=True))
        res["steps"].append({"bytes": size, "gloo_ms": 1e3 * g, "grpc_ms": 1e3 * p, "grpc_tls_ms": 1e3 * s,
                             "grpc_over_gloo": p / g, "grpc_tls_over_gloo": s / g})
        print(json.dumps(res["steps"][-1]), flush=True)
    if not a.skip_round:
        res["round"] = per_round(a.rounds)
        print(json.dumps(res["round"]), flush=True)
    res["machine"]["load_avg_end"] = os.getloadavg()[0]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
