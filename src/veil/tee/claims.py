"""What a verifier hands on: `Evidence` in, `Claims` out, whatever the platform.

A verifier (`veil.tee.sevsnp`, `veil.tee.dcap`, `veil.tee.nitro`, or a plug-in) turns the bytes a
platform produced into `Claims` only after every signature and certificate has checked out; the
policy (`veil.tee.policy`) then decides on the claims alone.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Protocol

from veil.tee.errors import EvidenceFormatError

REPORT_DATA_BYTES = 64
MAX_EVIDENCE_BYTES = 1 << 20
PLATFORM_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Claims:
    """Facts a verifier established about one piece of evidence.

    Parameters
    ----------
    platform : "sev-snp", "sgx", "tdx", "nitro" or a plug-in's name.
    measurement : the launch measurement: SNP MEASUREMENT, SGX MRENCLAVE, TDX MRTD, Nitro PCR0.
    report_data : the bytes the attested software chose (64 for SNP/SGX/TDX; Nitro's user_data).
    debug : True when the enclave or guest is debuggable (its memory is open to the host).
    signer : SGX MRSIGNER, SNP ID-key digest; None where the platform has none.
    product_id, svn : SGX ISVPRODID/ISVSVN, SNP GUEST_SVN; None where absent.
    tcb : named TCB components (SNP boot_loader/tee/snp/microcode[/fmc], TDX tee_tcb_svn bytes).
    tcb_status : DCAP's TCB status ("UpToDate", "SWHardeningNeeded", "OutOfDate", ...); None elsewhere.
    registers : every named measurement register (TDX rtmr0-3, Nitro pcr0-pcrN, SNP host_data ...).
    root_sha256 : SHA-256 of the DER of the trust anchor the evidence chained to.
    details : other verified facts, for logs (vmpl, chip id, advisories, module id, timestamp ...).
    """

    platform: str
    measurement: bytes
    report_data: bytes
    debug: bool
    root_sha256: str
    signer: bytes | None = None
    product_id: int | None = None
    svn: int | None = None
    tcb: Mapping[str, int] = field(default_factory=dict)
    tcb_status: str | None = None
    registers: Mapping[str, bytes] = field(default_factory=dict)
    details: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tcb", _frozen(self.tcb))
        object.__setattr__(self, "registers", _frozen(self.registers))
        object.__setattr__(self, "details", _frozen(self.details))


@dataclass(frozen=True)
class Evidence:
    """Platform evidence and the endorsements needed to verify it.

    `blob` is the report, quote or document exactly as the platform produced it. `endorsements`
    holds what the verifier needs beside it: ``vcek``/``vlek`` (SEV-SNP, DER or PEM) or
    ``collateral`` (SGX/TDX, the JSON of `veil.tee.dcap.Collateral`). Trust anchors never travel
    here: they come from the verifier's policy.
    """

    platform: str
    blob: bytes
    endorsements: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.platform or not set(self.platform) <= PLATFORM_NAME_CHARS or len(self.platform) > 32:
            raise EvidenceFormatError(f"platform name {self.platform!r} is not [a-z0-9-]{{1,32}}")
        if not isinstance(self.blob, bytes) or not 0 < len(self.blob) <= MAX_EVIDENCE_BYTES:
            raise EvidenceFormatError(f"evidence must be 1..{MAX_EVIDENCE_BYTES} bytes")
        for name, value in self.endorsements.items():
            if not isinstance(name, str) or not isinstance(value, bytes) or len(value) > MAX_EVIDENCE_BYTES:
                raise EvidenceFormatError(f"endorsement {name!r} must be bytes of at most {MAX_EVIDENCE_BYTES}")
        object.__setattr__(self, "endorsements", _frozen(self.endorsements))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: bytes as standard base64."""
        return {"platform": self.platform, "blob": _b64(self.blob),
                "endorsements": {k: _b64(v) for k, v in sorted(self.endorsements.items())}}

    @classmethod
    def from_dict(cls, data: object) -> Evidence:
        """Inverse of `to_dict`; anything else raises `EvidenceFormatError`."""
        if not isinstance(data, dict) or set(data) - {"platform", "blob", "endorsements"} or \
                not {"platform", "blob"} <= set(data):
            raise EvidenceFormatError("evidence must be an object with platform, blob and optional endorsements")
        endorsements = data.get("endorsements", {})
        if not isinstance(data["platform"], str) or not isinstance(endorsements, dict):
            raise EvidenceFormatError("evidence platform must be a string and endorsements an object")
        return cls(data["platform"], _unb64(data["blob"], "blob"),
                   {str(k): _unb64(v, f"endorsement {k!r}") for k, v in endorsements.items()})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > 2 * MAX_EVIDENCE_BYTES:
        raise EvidenceFormatError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceFormatError(f"{what} is not valid base64") from None


class Verifier(Protocol):
    """Turns one platform's evidence into claims, or raises an `AttestationError` naming what failed."""

    platform: str

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify at `at` (default: now), so recorded evidence stays testable after its certificates expire."""
        ...
