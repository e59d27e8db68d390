"""Intel SGX and TDX DCAP quotes, verified by `dcap-qvl` (Phala's Rust verifier) with Intel's collateral.

A quote is signed by the Quoting Enclave's attestation key, which the QE report binds; the QE
report is signed by the platform's PCK, whose certificate chains to the Intel SGX Root CA. Whether
the platform's TCB is current comes from Intel's signed TCB info and QE identity, and the PCK's
revocation from Intel's CRLs: together the *collateral*, which `dcap-qvl` checks (signatures,
validity at the verification time, revocation, TCB level, debug refused).

veil adds, before handing the quote over:
1. strict framing of the quote: header, body (SGX 384 bytes, TDX 1.0 584, TDX 1.5 648), the
   signature data and its certification data, each length exactly accounted for; only zero bytes may
   follow (quote buffers are fixed-size), and the PEM chain must be the canonical encoding of its
   certificates, so no byte of the quote can change without the verification noticing;
2. the chain's root must be byte-for-byte the trusted root the policy names;
then it turns `dcap-qvl`'s report into `Claims`, and its failures into typed errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import dcap_qvl
from cryptography.hazmat.primitives.serialization import Encoding

from veil.tee._x509 import fingerprint, load_certificates, verification_time
from veil.tee.claims import Claims, Evidence
from veil.tee.errors import (
    AttestationError,
    ChainError,
    CollateralError,
    DebugError,
    EvidenceFormatError,
    ExpiredError,
    PolicyError,
    PolicyFileError,
    RevokedError,
    SignatureError,
    UnsupportedEvidenceError,
)

HEADER_BYTES = 48
ECDSA_P256 = 2
TEE_SGX, TEE_TDX = 0x00000000, 0x00000081
BODY_BYTES = {1: 384, 2: 584, 3: 648}
QE_REPORT_BYTES = 384
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
SGX_ATTRIBUTE_DEBUG = 0x02
TD_ATTRIBUTE_DEBUG = 0x01


@dataclass(frozen=True)
class QuoteFrame:
    """The framing of one ECDSA-P256 quote (the fields veil checks before `dcap-qvl` verifies it)."""

    version: int
    tee: str
    body_type: int
    quote: bytes
    pck_chain_pem: bytes


class _Reader:
    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise EvidenceFormatError(f"quote ends inside {what} (needs {n} bytes at offset {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]


def parse_quote_frame(data: bytes) -> QuoteFrame:
    """Check a quote's framing; raises `EvidenceFormatError` (or `UnsupportedEvidenceError`) otherwise."""
    if not isinstance(data, bytes | bytearray):
        raise EvidenceFormatError("a DCAP quote must be bytes")
    data = bytes(data)
    r = _Reader(data, 0, len(data))
    version, key_type, tee_type = struct.unpack("<HHI", r.take(8, "the quote header"))
    r.take(HEADER_BYTES - 8, "the quote header")
    if version not in (3, 4, 5):
        raise UnsupportedEvidenceError(f"DCAP quote version {version} is not 3, 4 or 5")
    if key_type != ECDSA_P256:
        raise UnsupportedEvidenceError(f"DCAP attestation key type {key_type} is not ECDSA P-256 (2)")
    if tee_type not in (TEE_SGX, TEE_TDX) or (version == 3 and tee_type != TEE_SGX):
        raise EvidenceFormatError(f"DCAP quote v{version} with TEE type {tee_type:#x}")
    if version == 5:
        body_type, body_size = r.u16("the body type"), r.u32("the body size")
        if BODY_BYTES.get(body_type) != body_size or (body_type == 1) != (tee_type == TEE_SGX):
            raise EvidenceFormatError(f"DCAP v5 body type {body_type} with size {body_size} for TEE {tee_type:#x}")
    else:
        body_type = 1 if tee_type == TEE_SGX else 2
    r.take(BODY_BYTES[body_type], "the report body")
    sig_len = r.u32("the signature data length")
    sig_end = r.pos + sig_len
    if sig_end > len(data):
        raise EvidenceFormatError(f"DCAP signature data of {sig_len} bytes runs past the quote's end")
    if any(data[sig_end:]):
        raise EvidenceFormatError(f"DCAP quote is followed by {len(data) - sig_end} bytes that are not zero padding")
    s = _Reader(data, r.pos, sig_end)
    s.take(64, "the quote signature")
    s.take(64, "the attestation key")
    if version == 3:
        chain = _qe_report_and_chain(s)
    else:
        cert_type, size = s.u16("the certification data type"), s.u32("the certification data size")
        if cert_type != CERT_QE_REPORT:
            raise UnsupportedEvidenceError(f"DCAP v{version} certification data type {cert_type} is not 6")
        if s.pos + size != sig_end:
            raise EvidenceFormatError("DCAP QE report certification data does not fill the signature data")
        chain = _qe_report_and_chain(s)
    if s.pos != sig_end:
        raise EvidenceFormatError(f"DCAP signature data has {sig_end - s.pos} unaccounted bytes")
    return QuoteFrame(version=version, tee="sgx" if tee_type == TEE_SGX else "tdx", body_type=body_type,
                      quote=data[:sig_end], pck_chain_pem=chain)


def _qe_report_and_chain(s: _Reader) -> bytes:
    s.take(QE_REPORT_BYTES, "the QE report")
    s.take(64, "the QE report signature")
    s.take(s.u16("the QE authentication data length"), "the QE authentication data")
    cert_type, size = s.u16("the certification data type"), s.u32("the certification data size")
    if cert_type != CERT_PCK_CHAIN:
        raise UnsupportedEvidenceError(f"DCAP certification data type {cert_type} is not a PCK chain (5): "
                                       "the PCK certificate would have to be fetched by the encrypted PPID")
    if s.pos + size != s.end:
        raise EvidenceFormatError("DCAP PCK chain size does not match the signature data")
    pem = s.take(size, "the PCK certificate chain")
    _strict_pem_chain(pem)
    return pem


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\n((?:[A-Za-z0-9+/=]+\n)+)-----END CERTIFICATE-----\n?")


def _strict_pem_chain(pem: bytes) -> None:
    """PEM blocks and nothing else (then NUL padding): base64 lines that are the exact encoding of the
    certificate, so no unsigned byte of the chain (a separator, a spare base64 bit) can change."""
    text, pos = pem.rstrip(b"\0"), 0
    while pos < len(text):
        block = _PEM_BLOCK.match(text, pos)
        if block is None:
            raise EvidenceFormatError(f"DCAP PCK chain holds non-PEM bytes at offset {pos}")
        body = block.group(1).replace(b"\n", b"")
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise EvidenceFormatError("DCAP PCK chain holds invalid base64") from None
        if base64.b64encode(der) != body:
            raise EvidenceFormatError("DCAP PCK chain base64 is not the canonical encoding of its certificate")
        load_certificates(der, "DCAP PCK certificate", EvidenceFormatError)
        pos = block.end()
    if pos == 0:
        raise EvidenceFormatError("DCAP PCK chain is empty")


@dataclass(frozen=True)
class Collateral:
    """Intel's verification collateral for one quote, as `dcap-qvl` takes it (JSON in `Evidence`)."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes

    def to_json(self) -> bytes:
        return self._qvl().to_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> Collateral:
        try:
            qvl = dcap_qvl.QuoteCollateralV3.from_json(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, TypeError) as exc:
            raise CollateralError(f"DCAP collateral is not valid collateral JSON: {exc}") from None
        return cls(**{name: getattr(qvl, name) for name in cls.__dataclass_fields__})

    @classmethod
    def from_pcs(cls, *, tcb_info: bytes, qe_identity: bytes, tcb_signing_chain: bytes, pck_crl: bytes,
                 pck_crl_chain: bytes, root_ca_crl: bytes) -> Collateral:
        """From Intel PCS (or PCCS) answers: the TCB info and QE identity response bodies as served
        (their signatures cover the exact bytes of ``tcbInfo`` / ``enclaveIdentity``), the
        TCB-Info-Issuer-Chain header (PEM), the PCK CRL and Root CA CRL (DER) and the PCK CRL's
        issuer chain (PEM)."""
        tcb_body, tcb_sig = _signed_member(tcb_info, "tcbInfo")
        qe_body, qe_sig = _signed_member(qe_identity, "enclaveIdentity")
        return cls(pck_crl_issuer_chain=pck_crl_chain.decode("ascii"), root_ca_crl=root_ca_crl, pck_crl=pck_crl,
                   tcb_info_issuer_chain=tcb_signing_chain.decode("ascii"), tcb_info=tcb_body,
                   tcb_info_signature=tcb_sig, qe_identity_issuer_chain=tcb_signing_chain.decode("ascii"),
                   qe_identity=qe_body, qe_identity_signature=qe_sig)

    def _qvl(self) -> dcap_qvl.QuoteCollateralV3:
        try:
            return dcap_qvl.QuoteCollateralV3(**{name: getattr(self, name) for name in self.__dataclass_fields__})
        except (TypeError, ValueError) as exc:
            raise CollateralError(f"DCAP collateral is unusable: {exc}") from None


def _signed_member(body: bytes, key: str) -> tuple[str, bytes]:
    """The exact text of member `key` of a PCS response ``{"<key>": {...}, "signature": "<hex>"}``."""
    try:
        text = body.decode("utf-8")
        members = _raw_members(text)
        signature = bytes.fromhex(json.loads(members["signature"]))
        return members[key], signature
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CollateralError(f"PCS response is not a signed {key!r} object: {exc}") from None


def _raw_members(text: str) -> dict[str, str]:
    """Top-level members of a JSON object, each value as its exact source text."""
    decoder = json.JSONDecoder()
    pos = _skip(text, 0)
    if text[pos:pos + 1] != "{":
        raise ValueError("not a JSON object")
    pos, out = _skip(text, pos + 1), {}
    while text[pos:pos + 1] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
        if not isinstance(key, str) or text[pos:pos + 1] != ":" or key in out:
            raise ValueError("malformed or repeated object member")
        start = _skip(text, pos + 1)
        _, end = decoder.raw_decode(text, start)
        out[key] = text[start:end]
        pos = _skip(text, end)
        if text[pos:pos + 1] == ",":
            pos = _skip(text, pos + 1)
            if text[pos:pos + 1] == "}":
                raise ValueError("trailing comma")
        elif text[pos:pos + 1] != "}":
            raise ValueError("expected ',' or '}'")
    if _skip(text, pos + 1) != len(text):
        raise ValueError("trailing text after the object")
    return out


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


_ERROR_KINDS: Sequence[tuple[tuple[str, ...], type[AttestationError]]] = (
    (("Debug mode",), DebugError),
    (("Revoked", "revoked"), RevokedError),
    (("Expired", "expired", "NotValidYet", "not yet valid", "in the future"), ExpiredError),
    (("decode quote", "Failed to extract PCK", "Failed to parse quote", "Failed to parse PCK"), EvidenceFormatError),
    (("certificate chain", "UnknownIssuer", "root CA", "Root CA", "issuer"), ChainError),
    (("Unknown QE vendor", "Unsupported", "unsupported", "not supported"), UnsupportedEvidenceError),
    (("signature is invalid", "Signature is invalid", "hash mismatch", "InvalidSignature", "signature"),
     SignatureError),
    (("TCB level", "TCBInfo", "TCB info", "QE Identity", "QE identity", "FMSPC", "CRL", "collateral"),
     CollateralError),
    (("SEPT_VE_DISABLE", "MR service TD", "not allowed"), PolicyError),
)


def _typed(exc: Exception) -> AttestationError:
    message = " ".join(str(exc).split())
    for needles, kind in _ERROR_KINDS:
        if any(n in message for n in needles):
            return kind(f"DCAP: {message}")
    return AttestationError(f"DCAP verification failed: {message}")


class DcapVerifier:
    """Verifies SGX (``platform="sgx"``) or TDX (``platform="tdx"``) quotes under the given Intel roots.

    Parameters
    ----------
    roots : PEM or DER of the Intel SGX Root CA (the certificate whose key signs every PCK chain).
    platform : which quotes this verifier accepts; a TDX quote given to the SGX verifier is refused.
    """

    def __init__(self, roots: Sequence[bytes], platform: str = "sgx") -> None:
        if platform not in ("sgx", "tdx"):
            raise ValueError("platform must be 'sgx' or 'tdx'")
        self.platform = platform
        self._roots = [c for data in roots for c in load_certificates(data, "Intel root", PolicyFileError)]
        if not self._roots or any(c.issuer != c.subject for c in self._roots):
            raise PolicyFileError("DCAP roots must be self-signed Intel SGX Root CA certificates")

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        when = verification_time(at)
        if evidence.platform != self.platform:
            raise UnsupportedEvidenceError(f"{evidence.platform} evidence given to the {self.platform} verifier")
        frame = parse_quote_frame(evidence.blob)
        if frame.tee != self.platform:
            raise UnsupportedEvidenceError(f"a {frame.tee.upper()} quote was sent as {self.platform} evidence")
        if "collateral" not in evidence.endorsements:
            raise CollateralError("DCAP quote came without its collateral")
        collateral = Collateral.from_json(evidence.endorsements["collateral"])._qvl()
        chain = load_certificates(frame.pck_chain_pem, "DCAP PCK chain", EvidenceFormatError)
        embedded = [c for c in chain if c.issuer == c.subject]
        if len(embedded) != 1:
            raise ChainError(f"the quote's PCK chain holds {len(embedded)} self-signed certificates, not one root")
        root_der = embedded[0].public_bytes(Encoding.DER)
        root = next((c for c in self._roots if c.public_bytes(Encoding.DER) == root_der), None)
        if root is None:
            raise ChainError(f"the quote's PCK chain ends at {fingerprint(embedded[0])[:16]}..., "
                             "not at a trusted Intel root")
        try:
            report = dcap_qvl.verify_with_root_ca(frame.quote, collateral, root_der, int(when.timestamp()))
            verified = json.loads(report.to_json())
        except (ValueError, RuntimeError, TypeError) as exc:
            raise _typed(exc) from None
        return self._claims(verified, frame, fingerprint(root))

    def _claims(self, verified: Mapping, frame: QuoteFrame, root_sha256: str) -> Claims:
        parsed = dcap_qvl.parse_quote(frame.quote)
        header = parsed.header
        kind, body = next(iter(verified["report"].items()))
        fields = {k: bytes.fromhex(v) if isinstance(v, str) else v for k, v in body.items()}
        tcb = {"qe_svn": header.qe_svn, "pce_svn": header.pce_svn}
        details = {"version": frame.version, "body": kind, "advisory_ids": tuple(verified.get("advisory_ids", ())),
                   "fmspc": parsed.fmspc()}
        if self.platform == "sgx":
            tcb["isv_svn"] = fields["isv_svn"]
            return Claims(platform="sgx", measurement=fields["mr_enclave"], report_data=fields["report_data"],
                          debug=bool(fields["attributes"][0] & SGX_ATTRIBUTE_DEBUG), root_sha256=root_sha256,
                          signer=fields["mr_signer"], product_id=fields["isv_prod_id"], svn=fields["isv_svn"],
                          tcb=tcb, tcb_status=verified["status"],
                          registers={"mr_enclave": fields["mr_enclave"], "mr_signer": fields["mr_signer"]},
                          details={**details, "attributes": fields["attributes"].hex(),
                                   "cpu_svn": fields["cpu_svn"].hex()})
        tcb.update(tdx_module_minor=fields["tee_tcb_svn"][0], tdx_module_major=fields["tee_tcb_svn"][1])
        names = ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3", "mr_seam", "mr_signer_seam", "mr_config_id",
                 "mr_owner", "mr_owner_config")
        return Claims(platform="tdx", measurement=fields["mr_td"], report_data=fields["report_data"],
                      debug=bool(fields["td_attributes"][0] & TD_ATTRIBUTE_DEBUG), root_sha256=root_sha256,
                      tcb=tcb, tcb_status=verified["status"],
                      registers={n.replace("rt_mr", "rtmr"): fields[n] for n in names if n in fields},
                      details={**details, "td_attributes": fields["td_attributes"].hex(),
                               "tee_tcb_svn": fields["tee_tcb_svn"].hex()})
