"""Test helpers: self-signed TLS material; the server runs through `veil.serve.server.serve_in_background`."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.net import free_port
from veil.serve.server import serve_in_background


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path
    other_client_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool, san: x509.GeneralName | None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1, a client certificate from that CA and one from another."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil test CA")])
    ca = _cert("veil test CA", ca_key, ca_name, ca_key, True, None)
    out = {}
    for role, san in (("server", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"veil test {role}", key, ca_name, ca_key, False, san)
        out[f"{role}_cert"], out[f"{role}_key"] = directory / f"{role}.pem", directory / f"{role}.key"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out[f"{role}_key"])
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _cert("rogue", rogue_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue")]),
                  rogue_key, False, None)
    (directory / "rogue.pem").write_bytes(rogue.public_bytes(serialization.Encoding.PEM))
    _write_key(rogue_key, directory / "rogue.key")
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Certs(directory / "ca.pem", out["server_cert"], out["server_key"], out["client_cert"],
                 out["client_key"], directory / "rogue.pem", directory / "rogue.key")

running_server = serve_in_background
__all__ = ["Certs", "free_port", "make_certs", "running_server"]
