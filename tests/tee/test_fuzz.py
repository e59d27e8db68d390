"""Hypothesis: whatever the bytes or JSON, veil.tee answers with its typed errors, never another exception."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tee import vectors
from veil.tee import (
    AttestationError,
    Challenge,
    DcapVerifier,
    Evidence,
    EvidenceFormatError,
    KeyGrant,
    KeyReleaseError,
    KeyRequest,
    NitroVerifier,
    PolicyFileError,
    SevSnpVerifier,
    parse_policy,
)
from veil.tee.dcap import Collateral, _raw_members, parse_quote_frame
from veil.tee.errors import CollateralError, DeviceError
from veil.tee.nitro import parse_document
from veil.tee.providers import parse_snp_cert_table
from veil.tee.sevsnp import REPORT_BYTES, parse_report

FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", max_size=12)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=20)
CBOR = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.binary(max_size=64) | TEXT,
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT | st.integers(0, 40), inner,
                                                                                  max_size=6),
                    max_leaves=30)


def _outcome(call, *errors):
    """The call's result, or the expected exception it raised (any other propagates and fails the test)."""
    try:
        return call()
    except errors as exc:
        return exc


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


@FUZZ
@given(st.binary(max_size=2 * REPORT_BYTES) | st.binary(min_size=REPORT_BYTES, max_size=REPORT_BYTES))
def test_snp_report_parser(data):
    result = _outcome(lambda: parse_report(data), EvidenceFormatError)
    assert isinstance(result, EvidenceFormatError) or (len(data) == REPORT_BYTES and result.raw == data)


@FUZZ
@given(EDITS)
def test_snp_verifier_on_mutated_real_reports(edits):
    case = "virtee-milan"
    verifier = SevSnpVerifier([vectors.snp_root("milan")])
    evidence = vectors.snp_evidence(case)
    report = _mutate(evidence.blob, edits)
    vcek = _mutate(evidence.endorsements["vcek"], edits[1:]) if len(edits) > 1 else evidence.endorsements["vcek"]
    try:
        verifier.verify(Evidence("sev-snp", report, {"vcek": vcek}), at=vectors.at(vectors.SNP_CASES[case][4]))
    except AttestationError:
        assert report != evidence.blob or vcek != evidence.endorsements["vcek"]


@FUZZ
@given(st.binary(max_size=6000))
def test_dcap_frame_parser(data):
    result = _outcome(lambda: parse_quote_frame(data), EvidenceFormatError)
    assert isinstance(result, EvidenceFormatError) or data.startswith(result.quote)


@FUZZ
@given(EDITS)
def test_dcap_verifier_on_mutated_real_quotes(edits):
    evidence, when = vectors.dcap_evidence("automata-sgx-v3")
    quote = _mutate(evidence.blob, edits)
    try:
        DcapVerifier([vectors.intel_root()], "sgx").verify(Evidence("sgx", quote, evidence.endorsements), at=when)
    except AttestationError:
        assert quote != evidence.blob


@FUZZ
@given(st.binary(max_size=3000))
def test_dcap_collateral_and_pcs_json(data):
    assert isinstance(_outcome(lambda: Collateral.from_json(data), CollateralError), CollateralError | Collateral)
    members = _outcome(lambda: _raw_members(data.decode("latin-1")), ValueError)
    assert isinstance(members, ValueError | dict)


@FUZZ
@given(st.binary(max_size=5000) | CBOR.map(cbor2.dumps))
def test_nitro_document_parser(data):
    result = _outcome(lambda: parse_document(data), EvidenceFormatError)
    assert isinstance(result, EvidenceFormatError) or result.payload in data


@FUZZ
@given(CBOR, st.binary(max_size=100))
def test_nitro_payload_fields(payload, signature):
    document = cbor2.dumps([cbor2.dumps({1: -35}), {}, cbor2.dumps(payload), signature])
    with pytest.raises(EvidenceFormatError):
        parse_document(document)


@FUZZ
@given(EDITS)
def test_nitro_verifier_on_mutated_real_documents(edits):
    raw = vectors.read("nitro/marlin_aws_2024-12-13.cbor")
    document = _mutate(raw, edits)
    try:
        NitroVerifier([vectors.nitro_root()]).verify(Evidence("nitro", document),
                                                     at=parse_document(raw).timestamp)
    except AttestationError:
        assert document != raw


@FUZZ
@given(JSON)
def test_evidence_and_key_release_messages(data):
    for kind in (Evidence, KeyRequest, KeyGrant, Challenge):
        result = _outcome(lambda kind=kind: kind.from_dict(data), EvidenceFormatError, KeyReleaseError)
        assert isinstance(result, EvidenceFormatError | KeyReleaseError | kind)


@FUZZ
@given(JSON | st.fixed_dictionaries({"version": st.just(1), "platforms": st.dictionaries(
    st.sampled_from(["sev-snp", "sgx", "tdx", "nitro", "other"]), JSON, max_size=2)}))
def test_policy_parser(tmp_path_factory, data):
    result = _outcome(lambda: parse_policy(data, base_dir=tmp_path_factory.getbasetemp()), PolicyFileError)
    assert isinstance(result, PolicyFileError)  # no root files exist there, so nothing can be accepted


@FUZZ
@given(st.binary(max_size=400))
def test_snp_certificate_table(data):
    result = _outcome(lambda: parse_snp_cert_table(data), DeviceError)
    assert isinstance(result, DeviceError) or set(result) <= {"vcek", "vlek", "ask", "ark"}
