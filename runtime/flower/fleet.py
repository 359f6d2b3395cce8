"""The files and processes of a Flower fleet: the app folder, the `flwr` connection, and (tests, benchmarks,
trying it on one machine) local SuperLink and SuperNode processes on loopback.

    write_app(Path("fleet-app"), plan="plan.yaml", name="demo")      # fleet-app/pyproject.toml
    write_connection(Path("~/.flwr"), "fleet", "127.0.0.1:9093", ca=Path("certs/ca.crt"))
    with LocalFleet(tmp, certs=Path("certs")) as fleet:               # a SuperLink (+ node auth with certs)
        fleet.add_node("a", client="a")                                # a SuperNode: --node-config client="a"
        code, log = fleet.run(app, run_config={"rounds": 2})           # flwr run APP fleet --stream

Every process starts in its own session and is stopped (its whole process group) on the way out.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APP_COMPONENTS = {"serverapp": "hsplit.runtime.flower.app:server_app",
                  "clientapp": "hsplit.runtime.flower.app:client_app"}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(folder: Path, plan: str | Path, **config) -> Path:
    """The Flower app folder (pyproject.toml) whose run config names `plan` (made absolute) and `config`
    (FlowerOptions keys, dashes or underscores); every other key with its default, so that `flwr run
    --run-config` can override any of them (Flower refuses a key the app does not declare)."""
    from dataclasses import fields
    from hsplit.runtime.flower.config import FlowerOptions
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    defaults = {f.name.replace("_", "-"): f.default for f in fields(FlowerOptions)}
    values = {**defaults, "plan": str(Path(plan).resolve()), **{k.replace("_", "-"): v for k, v in config.items()}}
    for k in ("runs-dir", "ssl-certfile", "ssl-keyfile", "ssl-ca-certfile"):
        if values.get(k):
            values[k] = str(Path(values[k]).resolve())
    lines = ["# A Flower app that runs an hsplit plan: flwr run THIS_FOLDER FEDERATION --stream",
             "# (written by `hsplit flower app`; the run config keys are in docs/file-formats.md)",
             "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "hsplit-fleet"', 'version = "1.0.0"',
             'description = "hsplit split-federated LoRA fine-tuning"', 'license = "Apache-2.0"',
             "dependencies = []          # hsplit and flwr are installed on the server and every device", "",
             "[tool.flwr.app]", 'publisher = "hsplit"', "", "[tool.flwr.app.components]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in APP_COMPONENTS.items()]
    lines += ["", "[tool.flwr.app.config]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def write_connection(flwr_home: Path, name: str, address: str, ca: Path | None = None) -> Path:
    """$FLWR_HOME/config.toml naming the SuperLink `name` (TLS with `ca`, else insecure) as the default."""
    flwr_home = Path(flwr_home).expanduser()
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{Path(ca).resolve()}"' if ca else "insecure = true"
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}\n')
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class LocalFleet:
    """A SuperLink and SuperNodes as local processes on loopback (TLS and node authentication when `certs`
    holds ca.crt, server.pem, server.key)."""

    def __init__(self, root: Path, certs: Path | None = None, env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.home = self.root / "flwr-home"
        self.env = dict(os.environ if env is None else env, FLWR_HOME=str(self.home))
        self.env.setdefault("OMP_NUM_THREADS", "1")
        # the SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp from PATH
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env.get("PATH", "")
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        write_connection(self.home, "local", self.address, certs / "ca.crt" if certs else None)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        p = subprocess.Popen(args, env=self.env, cwd=self.root, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def tls_args(self, server: bool) -> list[str]:
        c = self.certs
        if c is None:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
                    "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]
        return ["--root-certificates", str(c / "ca.crt")]

    def start_link(self, deadline_s: float = 120) -> None:
        p = self._start("superlink", [_bin("flower-superlink"), *self.tls_args(True), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--disable-runtime-dependency-installation"])
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:           # ready: its port accepts connections
            if p.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.logs['superlink'].read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"flower-superlink did not listen within {deadline_s:g} s")

    def register(self, pub: Path) -> subprocess.CompletedProcess:
        """`flwr supernode register PUB local` (node authentication)."""
        return subprocess.run([_bin("flwr"), "supernode", "register", str(pub), "local"], env=self.env,
                              capture_output=True, text=True, timeout=120)

    def add_node(self, name: str, key: Path | None = None, max_retries: int | None = None, **node_config) -> \
            subprocess.Popen:
        nc = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
        args = [_bin("flower-supernode"), *self.tls_args(False), "--superlink", self.address,
                "--port", str(free_port())]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        if nc:
            args += ["--node-config", nc]
        return self._start(name, args)

    def stop(self, name: str, sig=signal.SIGKILL) -> None:
        p = self.procs.get(name)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)           # the process and what it started (a SuperNode's ClientApp)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def run(self, app: Path, run_config: dict | None = None, timeout_s: float = 600) -> tuple[int, str]:
        """`flwr run APP local --stream` until the run ends; (exit code, its output)."""
        args = [_bin("flwr"), "run", str(app), "local", "--stream"]
        if run_config:
            args += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
        p = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        return p.returncode, p.stdout + p.stderr

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name, signal.SIGTERM)
        for name in list(self.procs):
            self.stop(name, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        shutil.rmtree(self.home / "apps", ignore_errors=True)
