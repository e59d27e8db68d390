"""AMD SEV-SNP attestation reports: parse the 1184-byte report, walk VCEK/VLEK -> ASK/ASVK -> ARK.

Layout from AMD's SEV Secure Nested Paging Firmware ABI Specification (56860), ATTESTATION_REPORT:
versions 2, 3 (adds CPUID family/model/stepping), 4 (same as 3) and 5 (adds mitigation vectors);
Turin (CPUID family 0x1A) lays TCB_VERSION out as fmc, boot_loader, tee, snp, 3 reserved, microcode
where Milan and Genoa use boot_loader, tee, 4 reserved, snp, microcode.

Verification, in order (the first failure is raised, as a typed error naming the leg):
1. parse strictly: exact length, known version, ECDSA P-384 signature algorithm, VCEK or VLEK
   signer, zeros where the unsigned signature area must be zero;
2. chain: the endorsement key certificate (VCEK, or VLEK for cloud-provider-loaded keys) is signed
   by a trusted ASK (ASVK), which is signed by a trusted, self-signed ARK; each valid at `at`. The
   RSA-PSS and ECDSA checks are `cryptography`'s;
3. binding: a VCEK's hwID extension equals the report's CHIP_ID and its TCB extensions equal the
   report's REPORTED_TCB (a VCEK is derived for exactly one chip and TCB);
4. the report signature (bytes 0x000-0x29F) under the endorsement key, ECDSA P-384 with SHA-384.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from veil.tee._x509 import (
    check_issued_by,
    check_validity,
    common_name,
    ec_p384_key,
    fingerprint,
    load_certificates,
    verification_time,
)
from veil.tee.claims import Claims, Evidence
from veil.tee.errors import (
    BindingError,
    ChainError,
    CollateralError,
    EvidenceFormatError,
    PolicyFileError,
    SignatureError,
    UnsupportedEvidenceError,
)

REPORT_BYTES = 0x4A0
SIGNED_BYTES = 0x2A0
SIGNATURE_COMPONENT_BYTES = 72
P384_BYTES = 48
SUPPORTED_VERSIONS = frozenset({2, 3, 4, 5})
ECDSA_P384_SHA384 = 1
POLICY_DEBUG = 1 << 19
TURIN_FAMILY = 0x1A
SIGNING_KEYS = {0: "vcek", 1: "vlek"}

_AMD = "1.3.6.1.4.1.3704.1."
OID_PRODUCT_NAME = x509.ObjectIdentifier(_AMD + "2")
OID_HWID = x509.ObjectIdentifier(_AMD + "4")
TCB_OIDS = {"boot_loader": _AMD + "3.1", "tee": _AMD + "3.2", "snp": _AMD + "3.3",
            "microcode": _AMD + "3.8", "fmc": _AMD + "3.9"}


@dataclass(frozen=True)
class TcbVersion:
    """SVNs of the firmware components, from an 8-byte TCB_VERSION."""

    boot_loader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def parse(cls, raw: bytes, turin: bool) -> TcbVersion:
        if turin:
            return cls(boot_loader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(boot_loader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def as_dict(self) -> dict[str, int]:
        out = {"boot_loader": self.boot_loader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out


@dataclass(frozen=True)
class SnpReport:
    """The fields of one ATTESTATION_REPORT (all integers little-endian in the wire format)."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    author_key_en: bool
    mask_chip_id: bool
    signing_key: str
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid: tuple[int, int, int] | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: str
    committed_version: str
    launch_tcb: TcbVersion
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def turin(self) -> bool:
        return self.cpuid is not None and self.cpuid[0] == TURIN_FAMILY


def parse_report(data: bytes) -> SnpReport:
    """Parse and check the framing of one report; raises `EvidenceFormatError` for anything else."""
    if not isinstance(data, bytes | bytearray) or len(data) != REPORT_BYTES:
        raise EvidenceFormatError(f"an SEV-SNP report is {REPORT_BYTES} bytes, got "
                                  f"{len(data) if isinstance(data, bytes | bytearray) else type(data).__name__}")
    data = bytes(data)
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedEvidenceError(f"SEV-SNP report version {version} is not one of {sorted(SUPPORTED_VERSIONS)}")
    vmpl, algo = struct.unpack_from("<II", data, 0x30)
    if algo != ECDSA_P384_SHA384:
        raise UnsupportedEvidenceError(f"SEV-SNP signature algorithm {algo} is not ECDSA P-384/SHA-384 (1)")
    if vmpl > 3:
        raise EvidenceFormatError(f"SEV-SNP VMPL {vmpl} is not 0..3")
    (flags,) = struct.unpack_from("<I", data, 0x48)
    signing_key = SIGNING_KEYS.get((flags >> 2) & 0x7)
    if signing_key is None:
        raise UnsupportedEvidenceError(f"SEV-SNP report signed by key type {(flags >> 2) & 0x7}, not a VCEK or VLEK")
    cpuid = (data[0x188], data[0x189], data[0x18A]) if version >= 3 else None
    turin = cpuid is not None and cpuid[0] == TURIN_FAMILY
    sig = data[SIGNED_BYTES:]
    r_raw, s_raw = sig[:SIGNATURE_COMPONENT_BYTES], sig[SIGNATURE_COMPONENT_BYTES:2 * SIGNATURE_COMPONENT_BYTES]
    if any(r_raw[P384_BYTES:]) or any(s_raw[P384_BYTES:]) or any(sig[2 * SIGNATURE_COMPONENT_BYTES:]):
        raise EvidenceFormatError("SEV-SNP signature has non-zero bytes outside the P-384 r and s values")

    def fw(offset: int) -> str:
        build, minor, major = data[offset], data[offset + 1], data[offset + 2]
        return f"{major}.{minor}.{build}"

    def tcb(offset: int) -> TcbVersion:
        return TcbVersion.parse(data[offset:offset + 8], turin)

    return SnpReport(
        raw=data, version=version, guest_svn=guest_svn, policy=policy,
        family_id=data[0x10:0x20], image_id=data[0x20:0x30], vmpl=vmpl, signature_algo=algo,
        current_tcb=tcb(0x38), platform_info=struct.unpack_from("<Q", data, 0x40)[0],
        author_key_en=bool(flags & 1), mask_chip_id=bool(flags & 2), signing_key=signing_key,
        report_data=data[0x50:0x90], measurement=data[0x90:0xC0], host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110], author_key_digest=data[0x110:0x140], report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180], reported_tcb=tcb(0x180), cpuid=cpuid, chip_id=data[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0), current_version=fw(0x1E8), committed_version=fw(0x1EC), launch_tcb=tcb(0x1F0),
        signature_r=int.from_bytes(r_raw, "little"), signature_s=int.from_bytes(s_raw, "little"))


def _der_small_int(raw: bytes, what: str) -> int:
    """A DER INTEGER of 1 or 2 content bytes holding 0..255, as AMD encodes the SPL extensions."""
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2 or raw[1] > 2:
        raise ChainError(f"VCEK extension {what} is not a small DER INTEGER")
    value = int.from_bytes(raw[2:], "big", signed=True)
    if not 0 <= value <= 255 or (len(raw) == 4 and raw[2] == 0 and raw[3] < 0x80):
        raise ChainError(f"VCEK extension {what} holds {value}, not a canonical 0..255")
    return value


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise ChainError(f"endorsement certificate extensions cannot be parsed: {exc}") from None
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


class SevSnpVerifier:
    """Verifies SEV-SNP reports against the AMD roots it was given.

    Parameters
    ----------
    roots : PEM bundles as AMD publishes them (``cert_chain``: ASK or ASVK, then the ARK), one per
        product. Self-signed certificates are the trust anchors (ARKs); every other certificate must
        be signed by one of them and is an acceptable issuer of VCEKs/VLEKs.
    """

    platform = "sev-snp"

    def __init__(self, roots: Sequence[bytes]) -> None:
        certs = [c for bundle in roots for c in load_certificates(bundle, "AMD root bundle", PolicyFileError)]
        self._anchors = [c for c in certs if c.issuer == c.subject]
        if not self._anchors:
            raise PolicyFileError("SEV-SNP roots hold no self-signed ARK")
        for ark in self._anchors:
            check_issued_by(ark, ark, "ARK")
        self._intermediates: list[tuple[x509.Certificate, x509.Certificate]] = []
        for cert in certs:
            if cert.issuer == cert.subject:
                continue
            ark = next((a for a in self._anchors if a.subject == cert.issuer), None)
            if ark is None:
                raise PolicyFileError(f"{common_name(cert)} in the SEV-SNP roots is not issued by a given ARK")
            check_issued_by(cert, ark, "ASK")
            self._intermediates.append((cert, ark))
        self._known = {c.public_bytes(Encoding.DER) for c in certs}

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        when = verification_time(at)
        if evidence.platform != self.platform:
            raise UnsupportedEvidenceError(f"{evidence.platform} evidence given to the SEV-SNP verifier")
        report = parse_report(evidence.blob)
        leaf, ark = self._chain(report, evidence, when)
        self._check_binding(report, leaf)
        try:
            ec_p384_key(leaf, report.signing_key.upper()).verify(
                encode_dss_signature(report.signature_r, report.signature_s),
                report.raw[:SIGNED_BYTES], ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise SignatureError(f"SEV-SNP report signature does not verify under the {report.signing_key.upper()}") \
                from None
        return self._claims(report, leaf, ark)

    def _chain(self, report: SnpReport, evidence: Evidence,
               when: datetime) -> tuple[x509.Certificate, x509.Certificate]:
        name = report.signing_key
        if name not in evidence.endorsements:
            raise CollateralError(f"SEV-SNP report is signed by a {name.upper()} but no {name!r} endorsement came "
                                  f"with it (got {sorted(evidence.endorsements)})")
        certs = load_certificates(evidence.endorsements[name], name.upper(), EvidenceFormatError)
        leaf = certs[0]
        for extra in certs[1:]:
            if extra.public_bytes(Encoding.DER) not in self._known:
                raise ChainError(f"{common_name(extra)} sent beside the {name.upper()} is not one of the trusted "
                                 "AMD certificates")
        expected = "SEV-VLEK" if name == "vlek" else "SEV-VCEK"
        if common_name(leaf) != expected:
            raise ChainError(f"report says {expected} but the endorsement certificate is {common_name(leaf)}")
        ec_p384_key(leaf, expected)
        issuers = [(ask, ark) for ask, ark in self._intermediates if ask.subject == leaf.issuer]
        if not issuers:
            raise ChainError(f"{expected} issuer {leaf.issuer.rfc4514_string()} is not a trusted ASK/ASVK "
                             "(wrong product or wrong root)")
        failure: ChainError | None = None
        for ask, ark in issuers:
            try:
                check_issued_by(leaf, ask, expected)
            except ChainError as exc:
                failure = exc
                continue
            check_validity(leaf, when, expected)
            check_validity(ask, when, "ASK")
            check_validity(ark, when, "ARK")
            return leaf, ark
        assert failure is not None
        raise failure

    @staticmethod
    def _check_binding(report: SnpReport, leaf: x509.Certificate) -> None:
        product = _extension(leaf, OID_PRODUCT_NAME)
        product_name = product[2:].decode("ascii", "replace") if product and len(product) > 2 else ""
        if product_name and product_name.startswith("Turin") != report.turin:
            raise BindingError(f"report CPUID {report.cpuid} does not match the endorsement's product {product_name}")
        if report.signing_key == "vcek":
            hwid = _extension(leaf, OID_HWID)
            if hwid is None:
                raise BindingError("VCEK has no hwID extension")
            if report.mask_chip_id or hwid != report.chip_id[:len(hwid)] or any(report.chip_id[len(hwid):]):
                raise BindingError(f"VCEK hwID {hwid.hex()[:16]}... does not match the report CHIP_ID "
                                   f"{report.chip_id.hex()[:16]}...")
        for component, value in report.reported_tcb.as_dict().items():
            raw = _extension(leaf, x509.ObjectIdentifier(TCB_OIDS[component]))
            if raw is None:
                if report.signing_key == "vcek":
                    raise BindingError(f"VCEK lacks its {component} SPL extension")
                continue
            if _der_small_int(raw, component) != value:
                raise BindingError(f"report REPORTED_TCB {component}={value} differs from the "
                                   f"{report.signing_key.upper()}'s {_der_small_int(raw, component)}")

    def _claims(self, report: SnpReport, leaf: x509.Certificate, ark: x509.Certificate) -> Claims:
        product = _extension(leaf, OID_PRODUCT_NAME)
        return Claims(
            platform=self.platform, measurement=report.measurement, report_data=report.report_data,
            debug=report.debug, root_sha256=fingerprint(ark), signer=report.id_key_digest, svn=report.guest_svn,
            tcb=report.reported_tcb.as_dict(),
            registers={"measurement": report.measurement, "host_data": report.host_data,
                       "id_key_digest": report.id_key_digest, "author_key_digest": report.author_key_digest,
                       "family_id": report.family_id, "image_id": report.image_id},
            details={"version": report.version, "vmpl": report.vmpl, "policy": report.policy,
                     "signing_key": report.signing_key, "chip_id": report.chip_id.hex(),
                     "product": product[2:].decode("ascii", "replace") if product and len(product) > 2 else "",
                     "current_firmware": report.current_version, "committed_firmware": report.committed_version,
                     "current_tcb": report.current_tcb.as_dict(), "committed_tcb": report.committed_tcb.as_dict(),
                     "platform_info": report.platform_info, "report_id": report.report_id.hex()})
