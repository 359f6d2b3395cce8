"""The run configuration of the hsplit Flower app (`[tool.flwr.app.config]` of the app's pyproject.toml,
overridden with `flwr run APP FEDERATION --run-config 'rounds=3 name="demo"'`), validated when the
ServerApp starts: every problem in one error naming the key and the fix.

    fopts = FlowerOptions.from_run_config(dict(context.run_config))

Keys (docs/file-formats.md "Flower app"): plan (path on the server), name, runs-dir, rounds (0: the
plan's), min-clients (0: all), timeout, connect-timeout, rejoin-timeout, stream-bind (host:port the
activation stream listens on), stream-address (what devices dial; default: stream-bind), ssl-certfile /
ssl-keyfile / ssl-ca-certfile (the stream's TLS; the CA reaches the devices in the train message),
insecure (a plaintext stream off loopback), eval-seqs, threads.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from hsplit.planner.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class FlowerOptions:
    plan: str = ""
    name: str = ""
    runs_dir: str = "runs"
    rounds: int = 0
    min_clients: int = 0
    timeout: float = 300.0
    connect_timeout: float = 300.0
    rejoin_timeout: float = 0.0
    stream_bind: str = "127.0.0.1:0"
    stream_address: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_ca_certfile: str = ""
    insecure: bool = False
    eval_seqs: int = 64
    threads: int = 0

    @classmethod
    def from_run_config(cls, rc: dict, source: str = "run config ([tool.flwr.app.config])") -> "FlowerOptions":
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        problems, values = [], {}
        for key, v in rc.items():
            f = known.get(key)
            if f is None:
                problems.append(f"{key}: unknown key; known: {', '.join(sorted(known))}")
                continue
            want = {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                problems.append(f"{key}: expected {want.__name__}, got {v!r}")
                continue
            values[f.name] = v
        o = cls(**values)
        if not o.plan:
            problems.append("plan: missing; give the plan file's path on the server "
                            "(flwr run ... --run-config 'plan=\"/abs/plan.yaml\"')")
        elif not Path(o.plan).is_file():
            problems.append(f"plan: {o.plan} is not a file (the ServerApp reads it on the server's machine; "
                            "give an absolute path)")
        for key in ("rounds", "min-clients", "threads"):
            if getattr(o, key.replace("-", "_")) < 0:
                problems.append(f"{key}: must be >= 0 (0: the default)")
        for key in ("timeout", "connect-timeout"):
            if getattr(o, key.replace("-", "_")) <= 0:
                problems.append(f"{key}: must be > 0 seconds")
        if o.eval_seqs < 1:
            problems.append("eval-seqs: must be >= 1")
        if bool(o.ssl_certfile) != bool(o.ssl_keyfile):
            problems.append("ssl-certfile / ssl-keyfile: give both (the stream's TLS certificate and key) or neither")
        for key in ("ssl-certfile", "ssl-keyfile", "ssl-ca-certfile"):
            p = getattr(o, key.replace("-", "_"))
            if p and not Path(p).is_file():
                problems.append(f"{key}: {p} is not a file")
        if o.ssl_certfile and not o.ssl_ca_certfile:
            problems.append("ssl-ca-certfile: missing; the devices verify the stream's certificate with this CA "
                            "(the one `hsplit flower certs` wrote)")
        host = o.stream_bind.rsplit(":", 1)[0]
        if ":" not in o.stream_bind:
            problems.append(f"stream-bind: {o.stream_bind!r} is not host:port")
        elif not o.ssl_certfile and not o.insecure and host not in LOOPBACK:
            problems.append(f"stream-bind: {o.stream_bind} is not loopback and no TLS certificate is given: set "
                            "ssl-certfile/ssl-keyfile/ssl-ca-certfile (hsplit flower certs), or insecure=true to "
                            "send activations in plaintext")
        if problems:
            raise ConfigError(source, problems)
        return o

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile)
