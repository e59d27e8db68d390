"""Key release end to end, in process, with a test-only attester whose root only the test's policy holds."""

from __future__ import annotations

import json
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.tee.fakeplatform import PLATFORM, FakePlatform, FakeVerifier
from tests.tee.vectors import write_policy
from veil.serve.crypto import ArtefactCipher
from veil.tee import (
    BindingError,
    ChainError,
    Challenge,
    DebugError,
    Evidence,
    KeyBroker,
    KeyGrant,
    KeyReleaseError,
    KeyRequest,
    KeyRequester,
    MeasurementError,
    NoEvidenceError,
    NonceError,
    PlatformError,
    check_binding,
    tls_report_data,
)
from veil.tee.binding import key_release_report_data

GOOD = b"\x11" * 48


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def machine() -> FakePlatform:
    return FakePlatform(GOOD)


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def other_machine() -> FakePlatform:
    """Trusted hardware (its root is in the policy) running software with another measurement."""
    return FakePlatform(b"\x22" * 48, root_name="Fake TEE Root B")


@pytest.fixture()
def debug_machine() -> FakePlatform:
    return FakePlatform(GOOD, debug=True, root_name="Fake TEE Root C")


@pytest.fixture()
def broker(tmp_path, machine, other_machine, debug_machine, clock) -> KeyBroker:
    roots = [machine.root_pem, other_machine.root_pem, debug_machine.root_pem]
    policy = write_policy(tmp_path, {PLATFORM: {"roots": roots, "measurements": [GOOD.hex()]}},
                          plugins={PLATFORM: FakeVerifier})
    return KeyBroker(policy, ArtefactCipher.generate_key(), context=b"veil-test-deployment", nonce_ttl=30,
                     clock=clock)


def attest(broker: KeyBroker, machine: FakePlatform) -> tuple[KeyRequester, KeyRequest]:
    requester = KeyRequester(broker.challenge())
    return requester, requester.request(machine.attest(requester.report_data))


def test_worker_that_attests_gets_the_key_and_serves(broker, machine):
    sealed = ArtefactCipher(broker._key).encrypt(b"model weights", "model:digits:1")
    requester, request = attest(broker, machine)
    key = requester.unwrap(broker.release(request))
    assert key == broker._key
    assert ArtefactCipher(key).decrypt(sealed, "model:digits:1") == b"model weights"
    assert broker.counter.grants() == {PLATFORM: 1} and broker.counter.total_refused == 0


def test_messages_survive_a_json_round_trip(broker, machine):
    challenge = Challenge.from_dict(json.loads(json.dumps(broker.challenge().to_dict())))
    requester = KeyRequester(challenge)
    request = KeyRequest.from_dict(json.loads(json.dumps(requester.request(
        machine.attest(requester.report_data)).to_dict())))
    grant = KeyGrant.from_dict(json.loads(json.dumps(broker.release(request).to_dict())))
    assert requester.unwrap(grant) == broker._key


def _refused(broker, request, error, reason, caplog):
    granted = broker.counter.grants()
    with caplog.at_level(logging.WARNING, logger="veil.tee.keyrelease"), pytest.raises(error):
        broker.release(request)
    assert any(reason in record.getMessage() for record in caplog.records)
    assert broker.counter.grants() == granted
    return broker.counter.refusals()


def test_worker_with_another_measurement_gets_no_key(broker, other_machine, caplog):
    _, request = attest(broker, other_machine)
    assert _refused(broker, request, MeasurementError, "MeasurementError", caplog) == \
        {(PLATFORM, "MeasurementError"): 1}


def test_machine_under_a_root_the_policy_lacks_gets_no_key(broker, caplog):
    _, request = attest(broker, FakePlatform(GOOD, root_name="Attacker Root"))
    assert _refused(broker, request, ChainError, "ChainError", caplog) == {(PLATFORM, "ChainError"): 1}


def test_replayed_nonce_gets_no_key(broker, machine, caplog):
    requester, request = attest(broker, machine)
    requester.unwrap(broker.release(request))
    refusals = _refused(broker, request, NonceError, "NonceError", caplog)
    assert refusals == {(PLATFORM, "NonceError"): 1}
    assert broker.counter.grants() == {PLATFORM: 1}


def test_stale_nonce_gets_no_key(broker, machine, clock, caplog):
    _, request = attest(broker, machine)
    clock.now += 31
    assert _refused(broker, request, NonceError, "expired", caplog) == {(PLATFORM, "NonceError"): 1}


def test_unknown_nonce_and_a_nonce_consumed_by_a_failed_attempt_get_no_key(broker, machine, caplog):
    requester = KeyRequester(Challenge(nonce=b"\x00" * 32, context=broker.context, expires_in=30))
    _refused(broker, requester.request(machine.attest(requester.report_data)), NonceError, "unknown", caplog)
    requester, request = attest(broker, machine)
    _refused(broker, requester.request(None), NoEvidenceError, "NoEvidenceError", caplog)
    _refused(broker, request, NonceError, "NonceError", caplog)


def test_worker_without_evidence_gets_no_key(broker, caplog):
    requester = KeyRequester(broker.challenge())
    refusals = _refused(broker, requester.request(None), NoEvidenceError, "NoEvidenceError", caplog)
    assert refusals == {("none", "NoEvidenceError"): 1}


def test_evidence_bound_to_another_key_gets_no_key(broker, machine, caplog):
    """A relay that forwards an honest worker's evidence with its own public key cannot get the key."""
    honest, request = attest(broker, machine)
    thief = KeyRequester(honest.challenge)
    stolen = KeyRequest(nonce=request.nonce, public_key=thief.public_key, evidence=request.evidence)
    _refused(broker, stolen, BindingError, "BindingError", caplog)


def test_evidence_for_another_nonce_or_context_gets_no_key(broker, machine, caplog):
    challenge = broker.challenge()
    requester = KeyRequester(challenge)
    old = machine.attest(key_release_report_data(b"\x01" * 32, requester.public_key, challenge.context))
    _refused(broker, requester.request(old), BindingError, "BindingError", caplog)
    challenge = broker.challenge()
    requester = KeyRequester(Challenge(challenge.nonce, b"another deployment", challenge.expires_in))
    _refused(broker, requester.request(machine.attest(requester.report_data)), BindingError, "BindingError", caplog)


def test_debug_machine_and_unlisted_platform_get_no_key(broker, debug_machine, caplog):
    _, request = attest(broker, debug_machine)
    _refused(broker, request, DebugError, "DebugError", caplog)
    requester = KeyRequester(broker.challenge())
    snp = Evidence("sev-snp", bytes(1184))
    _refused(broker, requester.request(snp), PlatformError, "PlatformError", caplog)


def test_grant_opens_only_for_its_requester_and_unchanged(broker, machine):
    requester, request = attest(broker, machine)
    grant = broker.release(request)
    other = KeyRequester(requester.challenge)
    other.request(request.evidence)
    with pytest.raises(KeyReleaseError):
        other.unwrap(grant)
    tampered = KeyGrant(grant.nonce, grant.wrapped_key[:-1] + bytes([grant.wrapped_key[-1] ^ 1]))
    with pytest.raises(KeyReleaseError):
        requester.unwrap(tampered)
    assert requester.unwrap(grant) == broker._key


def test_pending_nonces_are_bounded(tmp_path, machine, clock):
    policy = write_policy(tmp_path, {PLATFORM: {"roots": [machine.root_pem], "measurements": [GOOD.hex()]}},
                          plugins={PLATFORM: FakeVerifier})
    broker = KeyBroker(policy, bytes(32), max_pending=2, clock=clock)
    first = KeyRequester(broker.challenge())
    broker.challenge(), broker.challenge()
    with pytest.raises(NonceError):
        broker.release(first.request(machine.attest(first.report_data)))


@pytest.mark.parametrize("data", [None, [], {}, {"nonce": "AA==", "public_key": "AA==", "evidence": None},
                                  {"nonce": "!", "public_key": "", "evidence": None}])
def test_malformed_messages_are_typed_errors(data):
    with pytest.raises(KeyReleaseError):
        KeyRequest.from_dict(data)
    with pytest.raises(KeyReleaseError):
        KeyGrant.from_dict(data)
    with pytest.raises(KeyReleaseError):
        Challenge.from_dict(data)


def test_server_evidence_must_bind_its_tls_key(machine, tmp_path):
    """What `veil.Client(attest=...)` will check: evidence over the server's TLS key, else nothing is sent."""
    policy = write_policy(tmp_path, {PLATFORM: {"roots": [machine.root_pem], "measurements": [GOOD.hex()]}},
                          plugins={PLATFORM: FakeVerifier})

    def spki() -> bytes:
        return generate_private_key(SECP256R1()).public_key().public_bytes(Encoding.DER,
                                                                          PublicFormat.SubjectPublicKeyInfo)

    nonce, server_key, relay_key = b"\x07" * 32, spki(), spki()
    claims = policy.verify(machine.attest(tls_report_data(nonce, server_key)))
    check_binding(claims, tls_report_data(nonce, server_key), "the server's TLS key")
    with pytest.raises(BindingError):
        check_binding(claims, tls_report_data(nonce, relay_key), "the server's TLS key")
    with pytest.raises(BindingError):
        check_binding(claims, tls_report_data(b"\x08" * 32, server_key), "the server's TLS key")


def test_attested_low_order_public_key_is_refused_not_a_crash(broker, machine, caplog):
    """An attested enclave that binds the all-zero X25519 point gets a typed refusal, not a ValueError."""
    challenge = broker.challenge()
    zero = bytes(32)
    evidence = machine.attest(key_release_report_data(challenge.nonce, zero, challenge.context))
    request = KeyRequest(nonce=challenge.nonce, public_key=zero, evidence=evidence)
    _refused(broker, request, KeyReleaseError, "KeyReleaseError", caplog)
