"""`hsplit flower ...`: the files a Flower fleet needs (certificates, SuperNode keys, the app folder), thin
over runtime/flower/ (certs.py, fleet.py). Registered in cli.py as a sub-command group.

    hsplit flower certs certs/ --host 127.0.0.1 --host localhost
    hsplit flower node-key keys/ dev1
    hsplit flower app fleet-app/ --plan plan.yaml --certs certs/ --name demo
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hsplit.cliutil.console import check_format, console, fail, print_json
from hsplit.cliutil.options import FORMAT


flower_app = typer.Typer(help="Real device fleets on Flower: certificates, SuperNode keys, the app folder "
                              "(README \"Real fleets\").", no_args_is_help=True)


@flower_app.command("certs")
def certs_cmd(
    out: Path = typer.Argument(..., help="Folder for ca.crt, ca.key, server.pem, server.key."),
    host: List[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                   help="A name or address the server is reached at (repeat)."),
    days: int = typer.Option(365, "--days", min=1, help="Validity of the certificates."),
    fmt: str = FORMAT,
):
    """A CA and the server's TLS certificate (SuperLink and the activation stream share it).

    Example: hsplit flower certs certs/ --host fleet.example.org --host 203.0.113.5
    """
    check_format(fmt)
    from hsplit.runtime.flower.certs import write_certs
    files = write_certs(out, host, days)
    if fmt == "json":
        print_json({k: str(v) for k, v in files.items()})
        return
    console.print(f"wrote {', '.join(str(p) for p in files.values())} (server certificate for {', '.join(host)})")


@flower_app.command("node-key")
def node_key_cmd(
    out: Path = typer.Argument(..., help="Folder for the key pair."),
    name: str = typer.Argument(..., help="The device's name: OUT/NAME (private) and OUT/NAME.pub."),
    fmt: str = FORMAT,
):
    """A SuperNode authentication key pair; register the public key with `flwr supernode register`.

    Example: hsplit flower node-key keys/ dev1 && flwr supernode register keys/dev1.pub fleet
    """
    check_format(fmt)
    from hsplit.runtime.flower.certs import write_node_key
    priv, pub = write_node_key(out, name)
    if fmt == "json":
        print_json({"private": str(priv), "public": str(pub)})
        return
    console.print(f"wrote {priv} (give it to flower-supernode --auth-supernode-private-key) and {pub} "
                  "(flwr supernode register)")


@flower_app.command("app")
def app_cmd(
    out: Path = typer.Argument(..., help="The app folder to write (pyproject.toml)."),
    plan: Path = typer.Option(..., "--plan", help="The plan (its path on the server machine)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name (default: the plan's stem)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders are written."),
    certs: Optional[Path] = typer.Option(None, "--certs", help="Folder from `hsplit flower certs`: TLS on the "
                                                               "activation stream."),
    stream_bind: str = typer.Option("127.0.0.1:9443", "--stream-bind", help="host:port the activation "
                                                                            "stream listens on."),
    stream_address: Optional[str] = typer.Option(None, "--stream-address", help="What devices dial (default: "
                                                                               "--stream-bind)."),
    min_clients: int = typer.Option(0, "--min-clients", min=0, help="Finish a round with this many clients "
                                                                   "when one is lost (0: all)."),
    timeout: float = typer.Option(300.0, "--timeout", min=1, help="Seconds a device may stay silent."),
    fmt: str = FORMAT,
):
    """Write the Flower app folder that runs PLAN: `flwr run OUT FEDERATION --stream`.

    Example: hsplit flower app fleet-app/ --plan plan.yaml --certs certs/ --name demo
    """
    check_format(fmt)
    from hsplit.runtime.flower.fleet import write_app
    if not plan.is_file():
        fail(f"--plan: {plan} is not a file")
    config = {"runs_dir": runs_dir, "stream_bind": stream_bind, "min_clients": min_clients, "timeout": timeout}
    if name:
        config["name"] = name
    if stream_address:
        config["stream_address"] = stream_address
    if certs is not None:
        missing = [f for f in ("ca.crt", "server.pem", "server.key") if not (certs / f).is_file()]
        if missing:
            fail(f"--certs: {certs} lacks {', '.join(missing)}; write them with `hsplit flower certs {certs}`")
        config.update(ssl_certfile=certs / "server.pem", ssl_keyfile=certs / "server.key",
                      ssl_ca_certfile=certs / "ca.crt")
    folder = write_app(out, plan, **config)
    if fmt == "json":
        print_json({"app": str(folder), "pyproject": str(folder / "pyproject.toml")})
        return
    console.print(f"wrote {folder / 'pyproject.toml'}; run it with: flwr run {folder} FEDERATION --stream")
