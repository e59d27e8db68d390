"""X.509 steps shared by the verifiers; every signature check is `cryptography`'s."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from veil.tee.errors import AttestationError, ChainError, ExpiredError


def verification_time(at: datetime | None) -> datetime:
    """`at` as an aware UTC time (default: now); a naive time is refused rather than guessed."""
    if at is None:
        return datetime.now(UTC)
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise TypeError("the verification time must be a timezone-aware datetime")
    return at.astimezone(UTC)


def load_certificates(data: bytes, what: str, error: type[AttestationError]) -> list[x509.Certificate]:
    """One DER certificate, or every certificate of a PEM bundle (text around the blocks is ignored).

    AMD's key distribution service issues VCEKs with serial number 0, which RFC 5280 forbids and
    `cryptography` loads with a deprecation warning; the warning is silenced here because those
    certificates are exactly what SEV-SNP verification must accept. Every field is parsed here, so a
    malformed certificate fails now, as `error`, not later as some other exception.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # malformed name attributes; the signature check decides
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
            for cert in certs:  # cryptography parses these lazily: fail here, typed, not at first use
                _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_before_utc,
                     cert.not_valid_after_utc, cert.signature_hash_algorithm, cert.public_key())
        except (ValueError, x509.InvalidVersion, x509.DuplicateExtension, UnsupportedAlgorithm) as exc:
            raise error(f"{what} is not a valid X.509 certificate: {exc}") from None
    for cert in certs:
        if not cert.public_bytes(Encoding.DER).endswith(_signature_bit_string(cert.signature)):
            raise error(f"{what} encodes its signature with unused bits (a non-canonical, unsigned change)")
    return certs


def _signature_bit_string(signature: bytes) -> bytes:
    """DER of BIT STRING {0 unused bits, signature}: how every certificate here must end."""
    size = len(signature) + 1
    length = bytes([size]) if size < 0x80 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + \
        size.to_bytes((size.bit_length() + 7) // 8, "big")
    return b"\x03" + length + b"\x00" + signature


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def check_validity(cert: x509.Certificate, at: datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise ExpiredError(f"{what} ({common_name(cert)}) is valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                           f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not at {at:%Y-%m-%d %H:%M} UTC")


def check_issued_by(child: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """`issuer` signed `child` (RSA-PSS, PKCS#1 v1.5 or ECDSA, as `cryptography` supports) and is a CA."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ChainError(f"{what}: issuer {common_name(issuer)} has no basicConstraints") from None
    if not constraints.ca:
        raise ChainError(f"{what}: issuer {common_name(issuer)} is not a CA")
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ChainError(f"{what}: {common_name(child)} is not signed by {common_name(issuer)} "
                         f"({type(exc).__name__}: {exc})") from None


def ec_p384_key(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    """The certificate's public key, which must be ECDSA P-384 (the SNP and Nitro signing keys)."""
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise ChainError(f"{what} public key cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ChainError(f"{what} does not hold a P-384 key")
    return key
