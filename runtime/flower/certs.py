"""Certificates and keys for a Flower fleet on its own: a CA, the server's TLS certificate (SuperLink and the
activation stream share it) and one SuperNode authentication key pair per device.

    write_certs(Path("certs"), hosts=["127.0.0.1", "localhost"])   # certs/{ca.crt, server.pem, server.key}
    write_node_key(Path("keys"), "dev1")                          # keys/{dev1, dev1.pub} (OpenSSH, EC P-384)

`hsplit flower certs` / `hsplit flower node-key` call these. The CA signs the server certificate only;
SuperNodes authenticate with their registered keys (`flwr supernode register keys/dev1.pub`).
For a fleet behind a public name, give that name (and address) in `hosts`.
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_certs(out: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A CA (ca.crt, ca.key) and a server certificate for `hosts` (server.pem, server.key) under `out`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("hsplit fleet CA")).issuer_name(_name("hsplit fleet CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    alt = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = {"ca.crt": ca.public_bytes(pem), "server.pem": cert.public_bytes(pem),
             "ca.key": ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
             "server.key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    for name, data in files.items():
        (out / name).write_bytes(data)
        if name.endswith(".key"):
            (out / name).chmod(0o600)
    return {name: out / name for name in files}


def write_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (OpenSSH format, EC P-384): out/NAME (private), out/NAME.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / name, out / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub
