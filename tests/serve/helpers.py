"""Test helpers: self-signed TLS material; the server runs through `veil.serve.server.serve_in_background`;
throwaway redis-servers, child processes that are always stopped, and bounded polling."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
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

def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll until `predicate` is truthy; fail the test (never hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def redis_server(directory: Path, *extra: str, url: str | None = None) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, without persistence unless `extra` options
    say otherwise; yields its URL (`url`, with {port} filled in, for TLS or AUTH)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    listen = ["--port", "0", "--tls-port", str(port)] if "--tls-cert-file" in extra else ["--port", str(port)]
    proc = subprocess.Popen(["redis-server", *listen, "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(directory), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = (url or "redis://127.0.0.1:{port}/0").format(port=port)
    try:
        wait_for(lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 10, "redis-server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A child process that is always stopped (SIGTERM, then SIGKILL) when the block ends."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


running_server = serve_in_background
__all__ = ["Certs", "free_port", "make_certs", "process", "redis_server", "running_server", "wait_for"]


def open_sockets(client: redis.Redis) -> int:
    """Sockets a sync redis-py client's pool holds open (idle or in use)."""
    pool = client.connection_pool
    return sum(conn._sock is not None for conn in [*pool._get_free_connections(), *pool._get_in_use_connections()])


def record_collateral_sources(monkeypatch) -> list:
    """Every collateral source `veil.serve.tee_setup.collateral_source` makes from here on, in order
    (the real ones, recorded so a test can look at their HTTP clients)."""
    from veil.serve import tee_setup

    made: list = []
    make = tee_setup.collateral_source

    def recording(config):
        made.append(make(config))
        return made[-1]

    monkeypatch.setattr(tee_setup, "collateral_source", recording)
    return made
