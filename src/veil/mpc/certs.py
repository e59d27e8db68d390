"""Certificates that name who a process is in a computation: role and rank.

Every link between processes of a computation is TLS 1.3 with certificates on both sides
(`veil.mpc.transport`). A certificate is signed by the operator's CA and carries, as a URI
subject alternative name, the identity it may claim: ``urn:veil:mpc:party:R`` for computing
party R or ``urn:veil:mpc:dealer:R`` for the dealer (rank R = number of parties). A process can
only take the rank its certificate names; host names are not what is checked, the identity is.

`make_dev_pki` writes a development CA and one certificate per rank (``veil mpc certs``). In
production the operator's own CA issues the same identities (`identity_uri` says what to put
in the certificate); keys are ECDSA P-256 and are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.mpc.errors import ProtocolError
from veil.names import NAME_RULE, is_name

URI_PREFIX = "urn:veil:mpc:"
ROLES = ("party", "dealer", "owner")
KEY_EXCHANGE_GROUP = "X25519"
"""The one TLS 1.3 key-exchange group parties offer and accept (see `Identity.contexts`)."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate lets its holder be: a role ("party", "dealer" or "owner") and a rank,
    or for a data owner (who is not a rank of the computation) a name."""

    role: str
    rank: int | str

    def uri(self) -> str:
        """The subject alternative name URI that names this identity."""
        return f"{URI_PREFIX}{self.role}:{self.rank}"

    @property
    def label(self) -> str:
        """File-name stem and human-readable name: ``party0``, ``dealer``, ``owner-alice``."""
        if self.role == "owner":
            return f"owner-{self.rank}"
        return "dealer" if self.role == "dealer" else f"party{self.rank}"


def owner(name: str) -> Identity:
    """The identity of data owner (or result holder) ``name``."""
    if not is_name(name):
        raise ProtocolError(f"owner names are {NAME_RULE}, got {name!r}")
    return Identity("owner", name)


def identity_for(rank: int, world: int) -> Identity:
    """The identity rank ``rank`` must prove in a computation of ``world`` ranks (dealer last)."""
    if not 0 <= rank < world:
        raise ProtocolError(f"rank {rank} outside 0..{world - 1}")
    return Identity("dealer" if rank == world - 1 else "party", rank)


def identity_uri(rank: int, world: int) -> str:
    """The URI SAN a certificate for ``rank`` must carry (for an operator's own CA)."""
    return identity_for(rank, world).uri()


def identities_of(peercert: dict) -> list[Identity]:
    """Identities named by a peer certificate as returned by ``SSLObject.getpeercert()``."""
    out = []
    for kind, value in peercert.get("subjectAltName", ()):
        if kind != "URI" or not value.startswith(URI_PREFIX):
            continue
        role, _, rank = value[len(URI_PREFIX) :].partition(":")
        if role in ("party", "dealer") and rank.isdigit():
            out.append(Identity(role, int(rank)))
        elif role == "owner" and is_name(rank):
            out.append(Identity(role, rank))
    return out


def cert_identity(cert_pem: bytes) -> Identity | None:
    """The single identity a PEM certificate names (None if it names none or several)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = identities_of({"subjectAltName": [("URI", u) for u in
                                               san.get_values_for_type(x509.UniformResourceIdentifier)]})
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class TLSFiles:
    """Paths of one process's TLS material: the CA to trust, its certificate and private key."""

    ca: Path
    cert: Path
    key: Path

    def check(self) -> None:
        """Raise a clear error if a file is missing."""
        for name, p in (("CA certificate", self.ca), ("certificate", self.cert), ("private key", self.key)):
            if not Path(p).is_file():
                raise ProtocolError(f"{name} {p} not found (make development ones with `veil mpc certs`)")

    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """(server, client) contexts: TLS 1.3 only, peer certificate required and checked against the CA,
        key exchange on X25519 alone. Before a stranger's certificate is checked the listening party
        does its key exchange: OpenSSL's defaults also accept the finite-field groups (ffdhe8192
        costs ~0.16 s of CPU per ClientHello against 0.5 ms for X25519), so replayed ClientHellos
        would otherwise keep a party's single join thread busy past the real ranks' deadlines."""
        self.check()
        out = []
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            ctx = ssl.SSLContext(purpose)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.maximum_version = ssl.TLSVersion.TLSv1_3
            ctx.set_ecdh_curve(KEY_EXCHANGE_GROUP)
            ctx.load_cert_chain(str(self.cert), str(self.key))
            ctx.load_verify_locations(cafile=str(self.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
            # peers are checked by the identity in their certificate (role and rank), not by host name
            ctx.check_hostname = False
            out.append(ctx)
        return out[0], out[1]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "veil mpc"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_ca(common_name: str = "veil mpc development CA", days: int = 365):
    """A self-signed CA certificate and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca_cert, ca_key, identity: Identity, days: int = 365, valid_from: dt.datetime | None = None):
    """A certificate for ``identity`` signed by the CA, usable as TLS client and server, valid for
    ``days`` from ``valid_from`` (default: now)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = valid_from or dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"veil mpc {identity.label}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri())]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                              x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_identity(out: Path, ca_cert, ca_key, identity: Identity) -> TLSFiles:
    """Issue and write ``<label>.pem`` / ``<label>.key`` for ``identity`` into ``out``."""
    out = Path(out)
    cert, key = issue(ca_cert, ca_key, identity)
    (out / f"{identity.label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / f"{identity.label}.key", key)
    return TLSFiles(out / "ca.pem", out / f"{identity.label}.pem", out / f"{identity.label}.key")


def make_dev_pki(out: Path | str, n_parties: int, owners: tuple[str, ...] = ()) -> dict[int | str, TLSFiles]:
    """Write a development CA (``ca.pem``, ``ca.key``) and a certificate per rank into ``out``.

    Returns each rank's `TLSFiles` (ranks 0..n-1 are parties, rank n the dealer) and, keyed by
    name, those of the data owners / result holders in ``owners`` (``owner-NAME.pem``). Each
    process should receive only the CA certificate and its own certificate and key.
    """
    if n_parties < 2:
        raise ProtocolError("at least 2 computing parties are needed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca()
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key)
    world = n_parties + 1
    files: dict[int | str, TLSFiles] = {r: write_identity(out, ca_cert, ca_key, identity_for(r, world))
                                        for r in range(world)}
    for name in owners:
        files[name] = write_identity(out, ca_cert, ca_key, owner(name))
    return files


def load_ca(out: Path | str):
    """The CA certificate and key written by `make_dev_pki` (to issue more identities later)."""
    out = Path(out)
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    return cert, key
