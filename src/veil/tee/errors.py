"""Typed errors of attestation: each names the step that refused the evidence.

Every failure of `veil.tee` is an `AttestationError`; the subclasses say which leg failed, so a
refusal can be logged and counted by reason (`KeyBroker` counts them by class name).
"""

from __future__ import annotations

from veil.errors import VeilError


class AttestationError(VeilError):
    """Evidence, collateral, policy or key release that veil refuses."""


class EvidenceFormatError(AttestationError, ValueError):
    """Bytes that are not well-formed evidence: wrong length, version, field, encoding or trailing data."""


class UnsupportedEvidenceError(EvidenceFormatError):
    """Well-formed evidence of a kind veil cannot verify (unknown platform, certification type, algorithm)."""


class SignatureError(AttestationError):
    """A report, quote or document signature that does not verify under its signing key."""


class ChainError(AttestationError):
    """A certificate chain that does not lead to a trusted root (broken link, wrong root, bad certificate)."""


class ExpiredError(ChainError):
    """A certificate, CRL or collateral item that is not valid at the verification time."""


class RevokedError(ChainError):
    """A certificate or TCB level that its issuer has revoked."""


class CollateralError(AttestationError):
    """Verification collateral (TCB info, QE identity, CRLs, endorsement key) that is missing or unusable."""


class BindingError(AttestationError):
    """Evidence not bound to what it must be: chip id or TCB against the VCEK, report data against a nonce/key."""


class PolicyError(AttestationError):
    """Verified evidence whose claims the operator's policy does not accept."""


class PlatformError(PolicyError):
    """A platform the policy does not allow."""


class MeasurementError(PolicyError):
    """A measurement, signer, product id or named register outside the policy."""


class TcbError(PolicyError):
    """A security version, TCB component or TCB status below what the policy requires."""


class DebugError(PolicyError):
    """A debuggable enclave or guest (its memory is open to the host) under a policy that refuses debug."""


class PolicyFileError(AttestationError, ValueError):
    """A policy file that is not valid: unknown keys, wrong types, bad hex, missing roots."""


class NonceError(AttestationError):
    """A key-release nonce that is unknown, already used or expired."""


class KeyReleaseError(AttestationError):
    """A wrapped key that cannot be unwrapped, or a key-release message that is malformed."""


class DeviceError(AttestationError):
    """An attestation device that is absent or fails (no /dev/attestation, TSM configfs, /dev/sev-guest, /dev/nsm)."""


class NoEvidenceError(EvidenceFormatError):
    """A request that should carry evidence and carries none (a worker that cannot attest)."""
