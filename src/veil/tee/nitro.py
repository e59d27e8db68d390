"""AWS Nitro Enclaves attestation documents: COSE_Sign1 (ES384) over CBOR, chained to the AWS Nitro root.

Steps, after AWS's "Verifying the root of trust" (aws-nitro-enclaves-nsm-api, attestation_process.md):
1. decode strictly: a COSE_Sign1 array (optionally CBOR tag 18) of protected header ``{1: -35}``
   (ES384), an empty unprotected header, the payload and a 96-byte signature, nothing after it; the
   payload holds exactly the document's fields with their types and sizes (module_id, digest
   "SHA384", timestamp, 48-byte PCRs, certificate, cabundle, optional public_key/user_data/nonce);
2. chain: ``cabundle[0]`` is byte-for-byte a trusted root (AWS Nitro Enclaves Root-G1) and the
   leaf certificate chains to it through the rest of the bundle, every certificate valid at the
   verification time (leaves live about three hours); `cryptography`'s X.509 verifier walks it;
3. the signature over the COSE ``Sig_structure`` ["Signature1", protected, b"", payload] under the
   leaf's P-384 key (`cryptography`'s ECDSA with SHA-384).

COSE framing is built with `cbor2`; pycose 1.1.0 would verify ECDSA with the pure-Python `ecdsa`
package instead of `cryptography`, so the signature check here stays `cryptography`'s.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from veil.tee._x509 import check_validity, ec_p384_key, fingerprint, load_certificates, verification_time
from veil.tee.claims import Claims, Evidence
from veil.tee.errors import ChainError, EvidenceFormatError, PolicyFileError, SignatureError, UnsupportedEvidenceError

MAX_DOCUMENT_BYTES = 32 * 1024
COSE_SIGN1_TAG = 18
ES384 = -35
SIGNATURE_BYTES = 96
PCR_BYTES = 48
MAX_PCRS = 32
MAX_CHAIN = 8
OPTIONAL_LIMITS = {"public_key": 1024, "user_data": 512, "nonce": 512}
REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")


@dataclass(frozen=True)
class NitroDocument:
    """A decoded attestation document; nothing in it is trusted until `NitroVerifier.verify` returns."""

    protected: bytes
    payload: bytes
    signature: bytes
    module_id: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    @property
    def debug(self) -> bool:
        """Enclaves started with ``--debug-mode`` report all-zero PCR0, PCR1 and PCR2."""
        return all(not any(self.pcrs.get(i, b"")) for i in (0, 1, 2))


def _cbor(data: bytes, what: str) -> object:
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises several kinds on hostile input; all mean "not CBOR"
        raise EvidenceFormatError(f"Nitro {what} is not valid CBOR: {type(exc).__name__}") from None
    if stream.tell() != len(data):
        raise EvidenceFormatError(f"Nitro {what} is followed by {len(data) - stream.tell()} extra bytes")
    return value


def parse_document(data: bytes) -> NitroDocument:
    """Decode and check the framing of a document; raises `EvidenceFormatError` otherwise."""
    if not isinstance(data, bytes | bytearray) or not 0 < len(data) <= MAX_DOCUMENT_BYTES:
        raise EvidenceFormatError(f"a Nitro attestation document is 1..{MAX_DOCUMENT_BYTES} bytes")
    outer = _cbor(bytes(data), "document")
    if isinstance(outer, cbor2.CBORTag):
        if outer.tag != COSE_SIGN1_TAG:
            raise EvidenceFormatError(f"Nitro document has CBOR tag {outer.tag}, not COSE_Sign1 (18)")
        outer = outer.value
    if not isinstance(outer, list | tuple) or len(outer) != 4:  # cbor2 gives a tuple inside a tag
        raise EvidenceFormatError("Nitro document is not a 4-element COSE_Sign1 array")
    protected, unprotected, payload, signature = outer
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)) or \
            not isinstance(unprotected, Mapping) or len(unprotected) != 0:
        raise EvidenceFormatError("COSE_Sign1 needs byte-string protected header, payload and signature and an "
                                  "empty unprotected header")
    if _cbor(protected, "protected header") != {1: ES384}:
        raise UnsupportedEvidenceError("Nitro COSE protected header is not {alg: ES384}")
    if len(signature) != SIGNATURE_BYTES:
        raise EvidenceFormatError(f"ES384 signature is {SIGNATURE_BYTES} bytes, got {len(signature)}")
    fields = _cbor(payload, "payload")
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise EvidenceFormatError("Nitro payload is not a map with text keys")
    unknown = set(fields) - set(REQUIRED) - set(OPTIONAL_LIMITS)
    missing = [k for k in REQUIRED if k not in fields]
    if unknown or missing:
        raise EvidenceFormatError(f"Nitro payload has unknown fields {sorted(unknown)} / lacks {missing}")
    module_id, digest, timestamp = fields["module_id"], fields["digest"], fields["timestamp"]
    if not isinstance(module_id, str) or not module_id or digest != "SHA384":
        raise EvidenceFormatError("Nitro module_id must be non-empty text and digest 'SHA384'")
    if type(timestamp) is not int or timestamp <= 0 or timestamp >= 1 << 64:
        raise EvidenceFormatError("Nitro timestamp must be a positive 64-bit integer of milliseconds")
    pcrs = fields["pcrs"]
    if not isinstance(pcrs, dict) or not 0 < len(pcrs) <= MAX_PCRS or not all(
            type(k) is int and 0 <= k < MAX_PCRS and isinstance(v, bytes) and len(v) == PCR_BYTES
            for k, v in pcrs.items()) or 0 not in pcrs:
        raise EvidenceFormatError(f"Nitro PCRs must map indices 0..{MAX_PCRS - 1} (with 0) to {PCR_BYTES} bytes")
    certificate, cabundle = fields["certificate"], fields["cabundle"]
    if not isinstance(certificate, bytes) or not isinstance(cabundle, list) or \
            not 0 < len(cabundle) <= MAX_CHAIN or not all(isinstance(c, bytes) for c in cabundle):
        raise EvidenceFormatError("Nitro certificate must be bytes and cabundle a list of 1..8 byte strings")
    optional: dict[str, bytes | None] = {}
    for name, limit in OPTIONAL_LIMITS.items():
        value = fields.get(name)
        if value is not None and (not isinstance(value, bytes) or len(value) > limit):
            raise EvidenceFormatError(f"Nitro {name} must be null or at most {limit} bytes")
        optional[name] = value
    return NitroDocument(protected=protected, payload=payload, signature=signature, module_id=module_id,
                         timestamp_ms=timestamp, pcrs=dict(sorted(pcrs.items())), certificate=certificate,
                         cabundle=tuple(cabundle), **optional)


class NitroVerifier:
    """Verifies Nitro attestation documents against the given roots (AWS Nitro Enclaves Root-G1)."""

    platform = "nitro"

    def __init__(self, roots: Sequence[bytes]) -> None:
        self._roots = [c for data in roots for c in load_certificates(data, "Nitro root", PolicyFileError)]
        if not self._roots:
            raise PolicyFileError("Nitro needs at least one root certificate")

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        when = verification_time(at)
        if evidence.platform != self.platform:
            raise UnsupportedEvidenceError(f"{evidence.platform} evidence given to the Nitro verifier")
        doc = parse_document(evidence.blob)
        leaf, root = self._chain(doc, when)
        r, s = int.from_bytes(doc.signature[:48], "big"), int.from_bytes(doc.signature[48:], "big")
        to_sign = cbor2.dumps(["Signature1", doc.protected, b"", doc.payload])
        try:
            ec_p384_key(leaf, "Nitro enclave certificate").verify(encode_dss_signature(r, s), to_sign,
                                                                  ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise SignatureError("Nitro COSE_Sign1 signature does not verify under the enclave certificate") from None
        pcr8 = doc.pcrs.get(8)
        return Claims(platform=self.platform, measurement=doc.pcrs[0], report_data=doc.user_data or b"",
                      debug=doc.debug, root_sha256=fingerprint(root),
                      signer=pcr8 if pcr8 is not None and any(pcr8) else None,
                      registers={f"pcr{i}": v for i, v in doc.pcrs.items()},
                      details={"module_id": doc.module_id, "timestamp": doc.timestamp.isoformat(),
                               "nonce": (doc.nonce or b"").hex(), "public_key": (doc.public_key or b"").hex()})

    def _chain(self, doc: NitroDocument, when: datetime) -> tuple[x509.Certificate, x509.Certificate]:
        bundle = [load_certificates(c, "Nitro CA bundle certificate", ChainError)[0] for c in doc.cabundle]
        leaf = load_certificates(doc.certificate, "Nitro enclave certificate", ChainError)[0]
        root = next((r for r in self._roots if r.public_bytes(Encoding.DER) == doc.cabundle[0]), None)
        if root is None:
            raise ChainError(f"Nitro cabundle starts at {fingerprint(bundle[0])[:16]}..., not at a trusted root")
        for i, cert in enumerate([*bundle, leaf]):
            check_validity(cert, when, "Nitro root" if i == 0 else "Nitro enclave certificate"
                           if i == len(bundle) else f"Nitro intermediate {i}")
        ec_p384_key(leaf, "Nitro enclave certificate")
        ca_policy = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
        verifier = (PolicyBuilder().store(Store([root])).time(when).max_chain_depth(MAX_CHAIN)
                    .extension_policies(ca_policy=ca_policy, ee_policy=ExtensionPolicy.permit_all())
                    .build_client_verifier())
        try:
            verifier.verify(leaf, bundle[1:])
        except VerificationError as exc:
            raise ChainError(f"Nitro certificate chain does not verify: {exc}") from None
        return leaf, root
