"""A test-only attester: a fake "TEE" whose attestation key is certified by its own root CA.

Its evidence is ``MAGIC | measurement (48) | debug (1) | report data (64) | DER ECDSA signature``,
with the attestation key's certificate as the ``cert`` endorsement. `FakeVerifier` is the plug-in
that verifies it; it exists only here and is registered only in the tests' own policies
(``load_policy(..., plugins={"veil-test": FakeVerifier})``), never in veil itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from veil.tee import ChainError, Claims, Evidence, EvidenceFormatError, ExpiredError, SignatureError

PLATFORM = "veil-test"
MAGIC = b"VEILFAKE"
HEADER = len(MAGIC) + 48 + 1 + 64


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, days: int = 30) -> x509.Certificate:
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


class FakePlatform:
    """One fake machine: a root CA, an attestation key it certified, and the measurement it reports."""

    def __init__(self, measurement: bytes = b"\x11" * 48, *, debug: bool = False, root_name: str = "Fake TEE Root"):
        self.measurement, self.debug = measurement, debug
        self._root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _cert(root_name, self._root_key, root_name, self._root_key, ca=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert("Fake attestation key", self._key, root_name, self._root_key, ca=False)
        self.platform = PLATFORM

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(Encoding.PEM)

    def attest(self, report_data: bytes) -> Evidence:
        assert len(report_data) == 64
        body = MAGIC + self.measurement + bytes([self.debug]) + report_data
        signature = self._key.sign(body, ec.ECDSA(hashes.SHA256()))
        return Evidence(PLATFORM, body + signature, {"cert": self.cert.public_bytes(Encoding.DER)})


class FakeVerifier:
    """Plug-in verifier of `FakePlatform` evidence (cryptography does every signature check)."""

    platform = PLATFORM

    def __init__(self, roots: Sequence[bytes]) -> None:
        self._roots = [x509.load_pem_x509_certificate(r) for r in roots]

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        when = at or datetime.now(UTC)
        blob = evidence.blob
        if len(blob) <= HEADER or not blob.startswith(MAGIC) or blob[len(MAGIC) + 48] not in (0, 1):
            raise EvidenceFormatError("not fake-platform evidence")
        try:
            cert = x509.load_der_x509_certificate(evidence.endorsements["cert"])
        except (KeyError, ValueError):
            raise EvidenceFormatError("fake evidence needs its attestation certificate") from None
        root = next((r for r in self._roots if r.subject == cert.issuer), None)
        if root is None:
            raise ChainError("fake attestation key is not certified by a trusted root")
        try:
            cert.verify_directly_issued_by(root)
        except (InvalidSignature, ValueError, TypeError):
            raise ChainError("fake attestation certificate is not signed by the trusted root") from None
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise ExpiredError("fake attestation certificate expired")
        try:
            cert.public_key().verify(blob[HEADER:], blob[:HEADER], ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SignatureError("fake evidence signature does not verify") from None
        offset = len(MAGIC)
        return Claims(platform=PLATFORM, measurement=blob[offset:offset + 48], debug=bool(blob[offset + 48]),
                      report_data=blob[offset + 49:HEADER],
                      root_sha256=hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest())
