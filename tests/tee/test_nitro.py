"""AWS Nitro attestation documents verified against the AWS Nitro root at their own timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tests.tee.vectors import NITRO_CASES, REAL_NOW, flip, nitro_root, read, snp_root, write_policy
from veil.tee import (
    AttestationError,
    ChainError,
    DebugError,
    Evidence,
    EvidenceFormatError,
    ExpiredError,
    MeasurementError,
    NitroVerifier,
    SignatureError,
    UnsupportedEvidenceError,
)
from veil.tee.nitro import parse_document

CASES = sorted(NITRO_CASES)


@pytest.fixture(scope="module")
def verifier() -> NitroVerifier:
    return NitroVerifier([nitro_root()])


def doc(case: str) -> bytes:
    return read(f"nitro/{NITRO_CASES[case][0]}")


def recorded(case: str) -> datetime:
    return parse_document(doc(case)).timestamp


@pytest.mark.parametrize("case", CASES)
def test_recorded_document_verifies_at_its_timestamp(verifier, case):
    _, prefix, debug = NITRO_CASES[case]
    claims = verifier.verify(Evidence("nitro", doc(case)), at=recorded(case))
    parsed = parse_document(doc(case))
    assert claims.measurement == parsed.pcrs[0] and claims.measurement.hex().startswith(prefix or "")
    assert claims.debug is debug
    assert claims.registers["pcr0"] == parsed.pcrs[0] and len(claims.registers) == len(parsed.pcrs)
    assert claims.report_data == (parsed.user_data or b"")
    assert claims.details["module_id"] == parsed.module_id


def test_recorded_nonce_and_user_data_are_claims(verifier):
    claims = verifier.verify(Evidence("nitro", doc("fortanix-debug")), at=recorded("fortanix-debug"))
    assert claims.details["nonce"] == "8013cf2d252821a740e526102b9cd3d0"
    assert claims.report_data.hex().startswith("9e2fa4bf") and len(claims.report_data) == 64
    assert verifier.verify(Evidence("nitro", doc("marlin-pcr16")), at=recorded("marlin-pcr16")).registers["pcr16"]


@pytest.mark.parametrize("case", [c for c in CASES if NITRO_CASES[c][2]])
def test_debug_enclave_refused_by_a_strict_policy_accepted_when_allowed(tmp_path, case):
    table = {"roots": [nitro_root()], "measurements": ["00" * 48]}
    with pytest.raises(DebugError):
        write_policy(tmp_path, {"nitro": table}).verify(Evidence("nitro", doc(case)), at=recorded(case))
    assert write_policy(tmp_path, {"nitro": {**table, "allow_debug": True}}).verify(
        Evidence("nitro", doc(case)), at=recorded(case)).debug


def test_policy_pins_pcr0_and_further_pcrs(tmp_path, verifier):
    case = "signal-production"
    claims = verifier.verify(Evidence("nitro", doc(case)), at=recorded(case))
    table = {"roots": [nitro_root()], "measurements": [claims.measurement.hex()],
             "registers": {"pcr1": [claims.registers["pcr1"].hex()], "pcr2": [claims.registers["pcr2"].hex()]}}
    assert write_policy(tmp_path, {"nitro": table}).verify(Evidence("nitro", doc(case)), at=recorded(case))
    wrong = {**table, "registers": {"pcr2": ["11" * 48]}}
    with pytest.raises(MeasurementError, match="pcr2"):
        write_policy(tmp_path, {"nitro": wrong}).verify(Evidence("nitro", doc(case)), at=recorded(case))
    other = write_policy(tmp_path, {"nitro": {**table, "measurements": [doc("marlin-2024-12-13")[:0].hex() or
                                                                        "22" * 48]}})
    with pytest.raises(MeasurementError):
        other.verify(Evidence("nitro", doc(case)), at=recorded(case))


@pytest.mark.parametrize("case", CASES)
def test_expired_chain_refused_at_the_real_time_and_a_day_later(verifier, case):
    with pytest.raises(ExpiredError):
        verifier.verify(Evidence("nitro", doc(case)), at=REAL_NOW)
    with pytest.raises(ExpiredError):
        verifier.verify(Evidence("nitro", doc(case)), at=recorded(case) + timedelta(days=1))


def _fake_root() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    real = x509.load_pem_x509_certificate(nitro_root())
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=3650)).not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA384())).public_bytes(Encoding.PEM)


@pytest.mark.parametrize("root", ["impostor", "amd"])
def test_wrong_root_refused(root):
    roots = [_fake_root()] if root == "impostor" else [snp_root("milan")]
    with pytest.raises(ChainError, match="not at a trusted root"):
        NitroVerifier(roots).verify(Evidence("nitro", doc("marlin-2024-12-13")), at=recorded("marlin-2024-12-13"))


def test_substituted_cabundle_root_is_refused(verifier):
    """A bundle that starts at an impostor root is refused even if the trusted root is byte-equal elsewhere."""
    outer = cbor2.loads(doc("marlin-2024-12-13"))
    payload = cbor2.loads(outer[2])
    payload["cabundle"] = [x509.load_pem_x509_certificate(_fake_root()).public_bytes(Encoding.DER),
                           *payload["cabundle"]]
    outer[2] = cbor2.dumps(payload)
    with pytest.raises(ChainError):
        verifier.verify(Evidence("nitro", cbor2.dumps(outer)), at=recorded("marlin-2024-12-13"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("where", [0, 3, 10, 160, 500, 1500, 2500, 3500, -200, -96, -1])
def test_flipped_byte_refused(verifier, case, where):
    raw = doc(case)
    with pytest.raises(AttestationError):
        verifier.verify(Evidence("nitro", flip(raw, where % len(raw))), at=recorded(case))


def test_every_single_byte_flip_of_a_document_is_refused(verifier):
    raw, when = doc("marlin-2024-12-13"), recorded("marlin-2024-12-13")
    accepted = []
    for offset in range(len(raw)):
        try:
            verifier.verify(Evidence("nitro", flip(raw, offset)), at=when)
            accepted.append(offset)
        except AttestationError:
            pass
    assert accepted == []


def test_folder_negatives_refused(verifier):
    when = recorded("fortanix-debug")
    with pytest.raises(ChainError):
        verifier.verify(Evidence("nitro", read("nitro/fortanix_tampered_certificate.cbor")), at=when)
    with pytest.raises(SignatureError):
        verifier.verify(Evidence("nitro", read("nitro/fortanix_tampered_signature.cbor")), at=when)
    invalid = read("nitro/eternis_invalid_attestation.cbor")
    with pytest.raises(SignatureError):
        verifier.verify(Evidence("nitro", invalid), at=parse_document(invalid).timestamp)


def test_signal_flipped_pcr_bit_breaks_the_signature(verifier):
    """SecureValueRecovery2's own negative: bit 0 of byte 160 (inside a PCR) must break the COSE signature."""
    raw = doc("signal-debug")
    with pytest.raises(SignatureError):
        verifier.verify(Evidence("nitro", flip(raw, 160)), at=recorded("signal-debug"))


def test_framing_is_strict():
    outer = cbor2.loads(doc("marlin-2024-12-13"))
    payload = cbor2.loads(outer[2])
    with pytest.raises(EvidenceFormatError, match="extra bytes"):
        parse_document(doc("marlin-2024-12-13") + b"\x00")
    with pytest.raises(EvidenceFormatError, match="unprotected"):
        parse_document(cbor2.dumps([outer[0], {4: b"kid"}, outer[2], outer[3]]))
    with pytest.raises(UnsupportedEvidenceError):
        parse_document(cbor2.dumps([cbor2.dumps({1: -7}), {}, outer[2], outer[3]]))
    assert parse_document(cbor2.dumps(cbor2.CBORTag(18, outer))).module_id == payload["module_id"]
    for change in ({"digest": "SHA256"}, {"extra": 1}, {"timestamp": -1}, {"pcrs": {0: b"\x00" * 32}},
                   {"user_data": b"x" * 513}, {"cabundle": []}, {"module_id": ""}):
        with pytest.raises(EvidenceFormatError):
            parse_document(cbor2.dumps([outer[0], {}, cbor2.dumps({**payload, **change}), outer[3]]))
