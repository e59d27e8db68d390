"""SGX and TDX DCAP quotes verified by dcap-qvl with Intel's recorded collateral."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tests.tee.vectors import (
    DCAP_CASES,
    REAL_NOW,
    at,
    collateral,
    dcap_evidence,
    flip,
    intel_root,
    read,
    tcb_signing_chain_2018,
    write_policy,
)
from veil.tee import (
    AttestationError,
    ChainError,
    CollateralError,
    DcapVerifier,
    DebugError,
    Evidence,
    EvidenceFormatError,
    ExpiredError,
    MeasurementError,
    PolicyError,
    SignatureError,
    TcbError,
    UnsupportedEvidenceError,
)
from veil.tee.dcap import Collateral, _raw_members, _typed, parse_quote_frame

CASES = sorted(DCAP_CASES)
SGX_BODY, TD_BODY = 48, 48


def _verifier(platform: str) -> DcapVerifier:
    return DcapVerifier([intel_root()], platform)


@pytest.mark.parametrize("case", CASES)
def test_recorded_quote_verifies_at_its_recorded_time(case):
    evidence, when = dcap_evidence(case)
    claims = _verifier(evidence.platform).verify(evidence, at=when)
    quote = evidence.blob
    assert claims.platform == evidence.platform
    assert claims.tcb_status == DCAP_CASES[case][-1]
    assert not claims.debug
    if evidence.platform == "sgx":
        assert claims.measurement == quote[SGX_BODY + 64:SGX_BODY + 96]
        assert claims.signer == quote[SGX_BODY + 128:SGX_BODY + 160]
        assert claims.report_data == quote[SGX_BODY + 320:SGX_BODY + 384]
    else:
        assert claims.measurement == quote[TD_BODY + 136:TD_BODY + 184]
        assert claims.registers["rtmr0"] == quote[TD_BODY + 328:TD_BODY + 376]
        assert claims.report_data == quote[TD_BODY + 520:TD_BODY + 584]


def test_known_report_data_of_recorded_tdx_quotes():
    edgeless, when = dcap_evidence("edgeless-tdx-v4")
    assert _verifier("tdx").verify(edgeless, at=when).report_data.startswith(b"Hello from Edgeless Systems!")
    no_nonce, when = dcap_evidence("gcp-tdx-no-nonce")
    assert _verifier("tdx").verify(no_nonce, at=when).report_data.hex().startswith("cf83e135")


def _policy(tmp_path, case, **table):
    evidence, when = dcap_evidence(case)
    claims = _verifier(evidence.platform).verify(evidence, at=when)
    policy = write_policy(tmp_path, {evidence.platform: {"roots": [intel_root()],
                                                         "measurements": [claims.measurement.hex()], **table}})
    return policy, evidence, when, claims


def test_policy_decides_on_tcb_status(tmp_path):
    strict, evidence, when, _ = _policy(tmp_path, "automata-sgx-v3")
    with pytest.raises(TcbError, match="SWHardeningNeeded"):
        strict.verify(evidence, at=when)
    lenient, *_ = _policy(tmp_path, "automata-sgx-v3", tcb_status=["UpToDate", "SWHardeningNeeded"])
    assert lenient.verify(evidence, at=when).tcb_status == "SWHardeningNeeded"
    up_to_date, evidence, when, _ = _policy(tmp_path, "gcp-tdx-v4")
    assert up_to_date.verify(evidence, at=when).tcb_status == "UpToDate"


def test_policy_refuses_another_mrenclave_mrsigner_or_rtmr(tmp_path):
    policy, evidence, when, _ = _policy(tmp_path, "automata-sgx-v3", tcb_status=["SWHardeningNeeded"],
                                             signers=["00" * 32])
    with pytest.raises(MeasurementError, match="signer"):
        policy.verify(evidence, at=when)
    other = write_policy(tmp_path, {"sgx": {"roots": [intel_root()], "measurements": ["ab" * 32],
                                            "tcb_status": ["SWHardeningNeeded"]}})
    with pytest.raises(MeasurementError):
        other.verify(evidence, at=when)
    tdx, evidence, when, _ = _policy(tmp_path, "gcp-tdx-v4", registers={"rtmr0": ["00" * 48]})
    with pytest.raises(MeasurementError, match="rtmr0"):
        tdx.verify(evidence, at=when)


def test_debug_enclave_and_debug_td_refused():
    occlum = read("sgx-tdx/trustee_occlum_quote.dat")
    coll = collateral(occlum, *DCAP_CASES["automata-sgx-v3"][2:5])
    with pytest.raises(DebugError):
        _verifier("sgx").verify(Evidence("sgx", occlum, {"collateral": coll}), at=at(DCAP_CASES["automata-sgx-v3"][5]))
    debug_td = read("sgx-tdx/trustee_tdx_quote_4.dat")
    coll = collateral(debug_td, "go-tdx-guest_sample_tcbInfo_response", "go-tdx-guest_sample_qeIdentity_response",
                      "go-tdx-guest_pckcrl", "go-tdx-guest_rootcrl.der", signing=tcb_signing_chain_2018())
    with pytest.raises(DebugError):
        _verifier("tdx").verify(Evidence("tdx", debug_td, {"collateral": coll}), at=at("2023-06-19"))


@pytest.mark.parametrize("case", CASES)
def test_recorded_collateral_expired_at_the_real_time(case):
    evidence, _ = dcap_evidence(case)
    with pytest.raises(ExpiredError):
        _verifier(evidence.platform).verify(evidence, at=REAL_NOW)


@pytest.mark.parametrize("case", ["automata-sgx-v3", "gcp-tdx-v4"])
def test_collateral_not_yet_valid_refused(case):
    evidence, when = dcap_evidence(case)
    with pytest.raises(ExpiredError):
        _verifier(evidence.platform).verify(evidence, at=when - timedelta(days=60))


def _fake_intel_root() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    real = x509.load_pem_x509_certificate(intel_root())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=3650)).not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.PEM)


@pytest.mark.parametrize("case", ["automata-sgx-v3", "gcp-tdx-v4"])
def test_wrong_root_refused(case):
    evidence, when = dcap_evidence(case)
    with pytest.raises(ChainError, match="not at a trusted Intel root"):
        DcapVerifier([_fake_intel_root()], evidence.platform).verify(evidence, at=when)
    older_cert_same_key = read("sgx-tdx/intel_sgx_root_ca_2033.der")
    with pytest.raises(ChainError):
        DcapVerifier([older_cert_same_key], evidence.platform).verify(evidence, at=when)


def test_quote_of_the_other_platform_and_missing_collateral_refused():
    sgx, when = dcap_evidence("automata-sgx-v3")
    with pytest.raises(UnsupportedEvidenceError):
        _verifier("tdx").verify(Evidence("tdx", sgx.blob, sgx.endorsements), at=when)
    with pytest.raises(CollateralError):
        _verifier("sgx").verify(Evidence("sgx", sgx.blob), at=when)
    tdx, when = dcap_evidence("gcp-tdx-v4")
    with pytest.raises(AttestationError):
        _verifier("tdx").verify(Evidence("tdx", tdx.blob, sgx.endorsements), at=when)


def _regions(quote: bytes) -> dict[str, int]:
    pem = quote.index(b"-----BEGIN CERTIFICATE-----")
    return {"version": 0, "tee_type": 4, "qe_vendor": 12, "body_start": 48, "measurement_sgx": 48 + 64,
            "measurement_td": 48 + 136, "report_data_end": 48 + 383, "sig_len": 48 + 384, "pem_begin": pem,
            "pem_body": pem + 200, "pem_newline": quote.index(b"\n", pem + 30), "pem_end": len(quote.rstrip(b"\0")) - 2}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("region", ["version", "tee_type", "qe_vendor", "body_start", "measurement_sgx",
                                    "measurement_td", "report_data_end", "sig_len", "pem_begin", "pem_body",
                                    "pem_newline", "pem_end"])
def test_flipped_byte_in_quote_refused(case, region):
    evidence, when = dcap_evidence(case)
    tampered = flip(evidence.blob, _regions(evidence.blob)[region])
    with pytest.raises(AttestationError):
        _verifier(evidence.platform).verify(Evidence(evidence.platform, tampered, evidence.endorsements), at=when)


@pytest.mark.parametrize("case", ["automata-sgx-v3", "gcp-tdx-v4"])
def test_every_single_byte_flip_of_a_quote_is_refused(case):
    evidence, when = dcap_evidence(case)
    verifier = _verifier(evidence.platform)
    accepted = []
    for offset in range(len(evidence.blob)):
        try:
            verifier.verify(Evidence(evidence.platform, flip(evidence.blob, offset), evidence.endorsements), at=when)
            accepted.append(offset)
        except AttestationError:
            pass
    assert accepted == []


def test_flipped_collateral_refused():
    evidence, when = dcap_evidence("gcp-tdx-v4")
    coll = Collateral.from_json(evidence.endorsements["collateral"])
    fields = {name: getattr(coll, name) for name in Collateral.__dataclass_fields__}
    for name in ("tcb_info", "qe_identity"):
        text = fields[name]
        tampered = Collateral(**{**fields, name: text.replace('"tcbEvaluationDataNumber":17',
                                                              '"tcbEvaluationDataNumber":18')})
        assert getattr(tampered, name) != text
        with pytest.raises(AttestationError):
            _verifier("tdx").verify(Evidence("tdx", evidence.blob, {"collateral": tampered.to_json()}), at=when)
    for name in ("tcb_info_signature", "qe_identity_signature", "pck_crl", "root_ca_crl"):
        tampered = Collateral(**{**fields, name: flip(fields[name], len(fields[name]) - 10)})
        with pytest.raises(AttestationError):
            _verifier("tdx").verify(Evidence("tdx", evidence.blob, {"collateral": tampered.to_json()}), at=when)


def test_folder_negative_corrupted_quote_refused():
    corrupted = read("sgx-tdx/fortanix_sgx_quote_v3_pckchain_corrupted.bin")
    original = read("sgx-tdx/fortanix_sgx_quote_v3_pckchain.bin")
    assert corrupted != original
    assert parse_quote_frame(corrupted).pck_chain_pem == parse_quote_frame(original).pck_chain_pem
    coll = collateral(corrupted, *DCAP_CASES["automata-sgx-v3"][2:5])
    with pytest.raises(AttestationError):
        _verifier("sgx").verify(Evidence("sgx", corrupted, {"collateral": coll}),
                                at=at(DCAP_CASES["automata-sgx-v3"][5]))


def test_folder_quote_without_pck_chain_is_unsupported():
    with pytest.raises(UnsupportedEvidenceError, match="type 3"):
        parse_quote_frame(read("sgx-tdx/fortanix_sgx_quote_v3_certtype3.bin"))


def test_trailing_bytes_that_are_not_padding_refused():
    with pytest.raises(EvidenceFormatError, match="39 bytes"):
        parse_quote_frame(read("sgx-tdx/go-tdx-guest_tdx_prod_quote_SPR_E4.dat"))


def test_azure_td_without_sept_ve_disable_refused_by_dcap_qvl():
    quote = read("sgx-tdx/trustee-azure_tdx_td-quote.bin")
    coll = collateral(quote, *DCAP_CASES["gcp-tdx-v4"][2:5])
    with pytest.raises(PolicyError, match="SEPT_VE_DISABLE"):
        _verifier("tdx").verify(Evidence("tdx", quote, {"collateral": coll}), at=at(DCAP_CASES["gcp-tdx-v4"][5]))


@pytest.mark.parametrize("cut", [0, 10, 47, 48, 300, 431, 436, 1000, -1])
def test_truncated_quote_refused(cut):
    evidence, _ = dcap_evidence("automata-sgx-v3")
    with pytest.raises(EvidenceFormatError):
        parse_quote_frame(evidence.blob[:cut])


def test_pcs_response_must_be_one_signed_object():
    assert _raw_members('{"tcbInfo": {"a": [1, 2]}, "signature": "00"}') == {"tcbInfo": '{"a": [1, 2]}',
                                                                             "signature": '"00"'}
    for bad in ('{"a": 1} x', '{"a": 1, "a": 2}', "[1]", '{"a" 1}', '{"a": 1,}'):
        with pytest.raises(ValueError):
            _raw_members(bad)
    with pytest.raises(CollateralError):
        Collateral.from_pcs(tcb_info=b'{"tcbInfo": {}}', qe_identity=b"{}", tcb_signing_chain=b"", pck_crl=b"",
                            pck_crl_chain=b"", root_ca_crl=b"")
    with pytest.raises(CollateralError):
        Collateral.from_json(b"not json")


@pytest.mark.parametrize("message, kind", [
    ("Verification failed: Debug mode is enabled", DebugError),
    ("Verification failed: CrlExpired { time: UnixTime(1), next_update: UnixTime(0) }", ExpiredError),
    ("Verification failed: TCBInfo issue date is in the future", ExpiredError),
    ("Verification failed: Failed to verify certificate chain\n\nCaused by:\n    UnknownIssuer", ChainError),
    ("Verification failed: Failed to parse root CA CRL\n\nCaused by:\n  UnsupportedCrlSignature", ChainError),
    ("Verification failed: Unknown QE vendor ID", UnsupportedEvidenceError),
    ("Verification failed: Failed to parse PCK certificate", EvidenceFormatError),
    ("Verification failed: ISV enclave report signature is invalid", SignatureError),
    ("Verification failed: No matching TCB level found", CollateralError),
    ("Verification failed: SEPT_VE_DISABLE is not enabled", PolicyError),
    ("Verification failed: something new", AttestationError),
])
def test_dcap_qvl_failures_map_to_typed_errors(message, kind):
    error = _typed(ValueError(message))
    assert type(error) is kind and "\n" not in str(error)
