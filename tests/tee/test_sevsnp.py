"""SEV-SNP verification against real recorded reports, their VCEK/VLEKs and AMD's roots."""

from __future__ import annotations

import importlib.resources
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tests.tee.vectors import REAL_NOW, SNP_CASES, SNP_ROOTS, at, flip, read, snp_evidence, snp_root, write_policy
from veil.tee import (
    AttestationError,
    BindingError,
    ChainError,
    CollateralError,
    DebugError,
    Evidence,
    EvidenceFormatError,
    ExpiredError,
    MeasurementError,
    SevSnpVerifier,
    SignatureError,
    TcbError,
    UnsupportedEvidenceError,
)
from veil.tee._x509 import load_certificates
from veil.tee.sevsnp import REPORT_BYTES, parse_report

CASES = sorted(SNP_CASES)


@pytest.fixture(scope="module")
def verifier() -> SevSnpVerifier:
    return SevSnpVerifier([snp_root(name) for name in SNP_ROOTS])


def recorded(case: str):
    return at(SNP_CASES[case][4])


@pytest.mark.parametrize("case", CASES)
def test_recorded_report_verifies_at_its_recorded_time(verifier, case):
    report_file, _, key, _, _, prefix, debug = SNP_CASES[case]
    raw = read(f"sev-snp/{report_file}")
    claims = verifier.verify(snp_evidence(case), at=recorded(case))
    assert claims.platform == "sev-snp"
    assert claims.measurement == raw[0x90:0xC0]
    assert claims.report_data == raw[0x50:0x90]
    assert claims.debug is debug
    assert claims.details["signing_key"] == key
    if prefix:
        assert claims.measurement.hex().startswith(prefix)


def test_claims_carry_the_reported_tcb_of_each_layout(verifier):
    milan = verifier.verify(snp_evidence("virtee-milan"), at=recorded("virtee-milan"))
    assert dict(milan.tcb) == {"boot_loader": 3, "tee": 0, "snp": 8, "microcode": 115}
    turin = verifier.verify(snp_evidence("oak-turin-v5"), at=recorded("oak-turin-v5"))
    assert dict(turin.tcb) == {"fmc": 0, "boot_loader": 1, "tee": 0, "snp": 2, "microcode": 71}
    assert turin.details["product"] == "Turin" and turin.details["committed_firmware"] == "1.55.61"
    vlek = verifier.verify(snp_evidence("trustee-vlek"), at=recorded("trustee-vlek"))
    assert dict(vlek.tcb) == {"boot_loader": 4, "tee": 0, "snp": 24, "microcode": 217} and vlek.details["vmpl"] == 1


def _policy(tmp_path, case, **table):
    report_file = SNP_CASES[case][0]
    measurement = read(f"sev-snp/{report_file}")[0x90:0xC0].hex()
    return write_policy(tmp_path, {"sev-snp": {"roots": [snp_root(n) for n in SNP_ROOTS],
                                               "measurements": [measurement], **table}})


def test_debug_guest_refused_by_a_strict_policy_and_accepted_when_debug_is_allowed(tmp_path):
    strict = _policy(tmp_path, "go-sev-guest-debug")
    with pytest.raises(DebugError):
        strict.verify(snp_evidence("go-sev-guest-debug"), at=recorded("go-sev-guest-debug"))
    lenient = _policy(tmp_path, "go-sev-guest-debug", allow_debug=True)
    assert lenient.verify(snp_evidence("go-sev-guest-debug"), at=recorded("go-sev-guest-debug")).debug


def test_policy_refuses_another_measurement_low_tcb_svn_and_vmpl(tmp_path):
    evidence, when = snp_evidence("trustee"), recorded("trustee")
    assert _policy(tmp_path, "trustee", min_svn=4, min_tcb={"snp": 8}, max_vmpl=0).verify(evidence, at=when)
    other = write_policy(tmp_path, {"sev-snp": {"roots": [snp_root("milan")], "measurements": ["00" * 48]}})
    with pytest.raises(MeasurementError):
        other.verify(evidence, at=when)
    with pytest.raises(TcbError):
        _policy(tmp_path, "trustee", min_svn=5).verify(evidence, at=when)
    with pytest.raises(TcbError):
        _policy(tmp_path, "trustee", min_tcb={"microcode": 116}).verify(evidence, at=when)
    vlek = snp_evidence("trustee-vlek")
    with pytest.raises(AttestationError, match="VMPL 1"):
        _policy(tmp_path, "trustee-vlek", max_vmpl=0).verify(vlek, at=recorded("trustee-vlek"))


def test_routex_committed_firmware_case_is_visible_to_policy(verifier):
    """routex-client-lua refuses its Genoa v3 vector for committed firmware 1.55.39 < 1.55.49: the claims show it."""
    claims = verifier.verify(snp_evidence("routex-genoa-v3"), at=recorded("routex-genoa-v3"))
    assert claims.details["committed_firmware"] == "1.55.39"


OFFSETS = {"version": 0x00, "guest_svn": 0x04, "policy": 0x08, "vmpl": 0x30, "sig_algo": 0x34, "flags": 0x48,
           "report_data": 0x50, "measurement": 0x90, "host_data": 0xC0, "reported_tcb": 0x180, "chip_id": 0x1A0,
           "committed": 0x1EC, "sig_r": 0x2A0, "sig_r_padding": 0x2A0 + 60, "sig_s": 0x2E8,
           "sig_reserved": 0x400, "last": REPORT_BYTES - 1}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("field", sorted(OFFSETS))
def test_flipped_byte_in_report_refused(verifier, case, field):
    raw = read(f"sev-snp/{SNP_CASES[case][0]}")
    with pytest.raises(AttestationError):
        verifier.verify(snp_evidence(case, flip(raw, OFFSETS[field])), at=recorded(case))


def test_every_single_byte_flip_of_one_report_is_refused(verifier):
    raw = read("sev-snp/virtee-sev_report_milan.bin")
    when = recorded("virtee-milan")
    accepted = []
    for offset in range(REPORT_BYTES):
        try:
            verifier.verify(snp_evidence("virtee-milan", flip(raw, offset)), at=when)
            accepted.append(offset)
        except AttestationError:
            pass
    assert accepted == []


@pytest.mark.parametrize("where", [200, 600, 1000, -60, -5])
def test_flipped_byte_in_vcek_refused(verifier, where):
    report_file, cert, _, _, day, _, _ = SNP_CASES["virtee-milan"]
    tampered = Evidence("sev-snp", read(f"sev-snp/{report_file}"),
                        {"vcek": flip(read(f"sev-snp/{cert}"), where % len(read(f"sev-snp/{cert}")))})
    with pytest.raises(AttestationError):
        verifier.verify(tampered, at=at(day))


def test_wrong_product_root_refused():
    milan_only_genoa = SevSnpVerifier([snp_root("genoa"), snp_root("turin_vcek")])
    with pytest.raises(ChainError, match="not a trusted ASK"):
        milan_only_genoa.verify(snp_evidence("virtee-milan"), at=recorded("virtee-milan"))


def _impostor_roots() -> bytes:
    """An attacker's ARK and ASK with AMD's exact names, RSA-PSS like AMD's, signing nothing real."""
    ark_key, ask_key = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    real_ask, real_ark = x509.load_pem_x509_certificates(snp_root("milan"))
    now = REAL_NOW

    def make(subject, key, issuer, issuer_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=3650))
                .not_valid_after(now + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(issuer_key, hashes.SHA384(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA384()), 48)))

    ark = make(real_ark.subject, ark_key, real_ark.subject, ark_key)
    ask = make(real_ask.subject, ask_key, real_ark.subject, ark_key)
    assert ask.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "SEV-Milan"
    return ask.public_bytes(Encoding.PEM) + ark.public_bytes(Encoding.PEM)


def test_impostor_root_with_amd_names_refused():
    with pytest.raises(ChainError, match="not signed by"):
        SevSnpVerifier([_impostor_roots()]).verify(snp_evidence("virtee-milan"), at=recorded("virtee-milan"))


@pytest.mark.parametrize("case", ["trustee-vlek", "constellation-aws-vlek"])
def test_expired_vlek_refused_at_the_real_time(verifier, case):
    with pytest.raises(ExpiredError, match="SEV-VLEK"):
        verifier.verify(snp_evidence(case), at=REAL_NOW)


@pytest.mark.parametrize("case", CASES)
def test_chain_refused_outside_its_validity(verifier, case):
    cert = load_certificates(read(f"sev-snp/{SNP_CASES[case][1]}"), "VCEK", ChainError)
    with pytest.raises(ExpiredError):
        verifier.verify(snp_evidence(case), at=cert[0].not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(ExpiredError):
        verifier.verify(snp_evidence(case), at=cert[0].not_valid_before_utc - timedelta(seconds=1))


@pytest.mark.parametrize("bad_vcek", ["trustee_test-vcek-invalid-legacy.der", "trustee_test-vcek-invalid-new.der"])
def test_folder_negative_vceks_not_signed_by_amd_refused(verifier, bad_vcek):
    evidence = Evidence("sev-snp", read("sev-snp/trustee_test-report.bin"), {"vcek": read(f"sev-snp/{bad_vcek}")})
    with pytest.raises(ChainError):
        verifier.verify(evidence, at=at("2024-07-03"))


def test_folder_negative_mismatched_vcek_refused(verifier):
    evidence = Evidence("sev-snp", read("sev-snp/kinvolk-azure_snp-report.bin"),
                        {"vcek": read("sev-snp/kinvolk-azure_certs_MISMATCHED.pem")})
    with pytest.raises(BindingError, match="hwID"):
        verifier.verify(evidence, at=at("2023-11-28"))


def test_folder_report_without_its_vcek_cannot_verify(verifier):
    report = read("sev-snp/routex_genoa_v2_report_novcek.bin")
    with pytest.raises(CollateralError):
        verifier.verify(Evidence("sev-snp", report), at=at("2026-03-06"))
    with pytest.raises(BindingError):
        verifier.verify(Evidence("sev-snp", report, {"vcek": read("sev-snp/trustee-azure_genoa_vcek.pem")}),
                        at=at("2026-03-06"))


def test_folder_vlek_report_signed_by_another_vlek_refused(verifier):
    evidence = Evidence("sev-snp", read("sev-snp/constellation_vlek_report.bin"),
                        {"vlek": read("sev-snp/constellation_vlek.pem")})
    with pytest.raises(SignatureError):
        verifier.verify(evidence, at=at("2024-01-01"))
    with pytest.raises(ExpiredError):
        verifier.verify(evidence, at=REAL_NOW)


def test_turin_vcek_does_not_verify_a_milan_report(verifier):
    evidence = Evidence("sev-snp", read("sev-snp/virtee-sev_report_milan.bin"),
                        {"vcek": read("sev-snp/virtee-sev_vcek_turin.der")})
    with pytest.raises(BindingError, match="Turin"):
        verifier.verify(evidence, at=at("2025-01-01"))


def test_routex_negative_with_overwritten_signature_refused(verifier):
    raw = read("sev-snp/routex_genoa_v5_report.bin")
    overwritten = raw[:0x2A0] + b"W" * (REPORT_BYTES - 0x2A0)
    with pytest.raises(EvidenceFormatError):
        verifier.verify(snp_evidence("routex-genoa-v5", overwritten), at=recorded("routex-genoa-v5"))


def test_vcek_sent_as_vlek_and_unknown_certs_beside_it_refused(verifier):
    report_file, cert, _, _, day, _, _ = SNP_CASES["virtee-milan"]
    raw = read(f"sev-snp/{report_file}")
    with pytest.raises(CollateralError):
        verifier.verify(Evidence("sev-snp", raw, {"vlek": read(f"sev-snp/{cert}")}), at=at(day))
    bundle = load_certificates(read(f"sev-snp/{cert}"), "VCEK", ChainError)[0].public_bytes(Encoding.PEM) + \
        _impostor_roots()
    with pytest.raises(ChainError, match="not one of the trusted"):
        verifier.verify(Evidence("sev-snp", raw, {"vcek": bundle}), at=at(day))


@pytest.mark.parametrize("length", [0, 1, REPORT_BYTES - 1, REPORT_BYTES + 1])
def test_wrong_length_refused(length):
    with pytest.raises(EvidenceFormatError, match="1184"):
        parse_report(bytes(length))


def test_unknown_version_and_algorithm_refused():
    raw = read("sev-snp/virtee-sev_report_milan.bin")
    with pytest.raises(UnsupportedEvidenceError, match="version 6"):
        parse_report(b"\x06" + raw[1:])
    with pytest.raises(UnsupportedEvidenceError, match="algorithm"):
        parse_report(raw[:0x34] + b"\x02" + raw[0x35:])


# The omne-attest wheel ships a real Milan report with its VCEK, ASK and ARK (Apache-2.0); read in place.
OMNE_ARK_SHA256 = "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"


def _omne():
    try:
        files = importlib.resources.files("omne_attest").joinpath("vectors")
    except ModuleNotFoundError:
        pytest.skip("omne-attest is not installed (pip install 'veil[dev]'); its wheel ships the vectors")
    return {name: files.joinpath(name).read_bytes()
            for name in ("attestation.bin", "kds_vcek.der", "milan_ask.der", "milan_ark.der")}


def _omne_roots(files) -> bytes:
    return b"".join(x509.load_der_x509_certificate(files[n]).public_bytes(Encoding.PEM)
                    for n in ("milan_ask.der", "milan_ark.der"))


def test_omne_attest_vector_verifies_with_its_debug_bit_set():
    files = _omne()
    vcek = load_certificates(files["kds_vcek.der"], "VCEK", ChainError)[0]
    claims = SevSnpVerifier([_omne_roots(files)]).verify(
        Evidence("sev-snp", files["attestation.bin"], {"vcek": files["kds_vcek.der"]}),
        at=vcek.not_valid_before_utc + timedelta(days=1))
    assert claims.debug and claims.details["policy"] == 0x0B0000
    assert claims.root_sha256 == OMNE_ARK_SHA256


def test_omne_attest_vector_strict_policy_refuses_debug_allowing_policy_accepts(tmp_path):
    files = _omne()
    evidence = Evidence("sev-snp", files["attestation.bin"], {"vcek": files["kds_vcek.der"]})
    when = load_certificates(files["kds_vcek.der"], "VCEK", ChainError)[0].not_valid_before_utc + timedelta(days=1)
    table = {"roots": [_omne_roots(files)], "measurements": [files["attestation.bin"][0x90:0xC0].hex()]}
    with pytest.raises(DebugError):
        write_policy(tmp_path, {"sev-snp": table}).verify(evidence, at=when)
    assert write_policy(tmp_path, {"sev-snp": {**table, "allow_debug": True}}).verify(evidence, at=when).debug
    with pytest.raises(SignatureError):
        write_policy(tmp_path, {"sev-snp": {**table, "allow_debug": True}}).verify(
            Evidence("sev-snp", flip(files["attestation.bin"], 0x90), {"vcek": files["kds_vcek.der"]}), at=when)


@pytest.mark.parametrize("case", ["virtee-milan", "oak-turin-v5", "trustee-vlek"])
def test_every_single_byte_flip_of_the_endorsement_certificate_is_refused(verifier, case):
    report_file, cert, key, _, day, _, _ = SNP_CASES[case]
    raw, der = read(f"sev-snp/{report_file}"), read(f"sev-snp/{cert}")
    accepted = []
    for offset in range(len(der)):
        try:
            verifier.verify(Evidence("sev-snp", raw, {key: flip(der, offset)}), at=at(day))
            accepted.append(offset)
        except AttestationError:
            pass
    assert accepted == []
