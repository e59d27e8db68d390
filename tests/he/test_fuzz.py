"""Property-based fuzzing of the decoders a server runs on untrusted bytes: the wire envelope, CKKS
parameters and public key bundles raise only their documented veil errors, whatever the input
(random bytes, bit flips of valid messages, or headers holding any JSON value)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.errors import InsecureParametersError, VeilError, WireFormatError
from veil.he import CKKSParameters, PublicBundle, SecretKeys, preset, wire

FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[1, 2]).public_bundle().to_bytes()


def loads_or_refuses(data: bytes) -> PublicBundle | None:
    """The bundle, or None if refused with a veil error; any other exception fails the test."""
    try:
        return PublicBundle.from_bytes(data)
    except VeilError:
        return None


def well_formed(bundle: PublicBundle | None) -> bool:
    return bundle is None or (all(type(s) is int for s in bundle.rotation_steps)
                              and isinstance(bundle.params.poly_modulus_degree, int))


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p % (len(out) * 8) // 8] ^= 1 << (p % 8)
    return bytes(out)


@FUZZ
@given(st.binary(max_size=300))
def test_decode_random_bytes_raises_only_wire_format_error(data):
    try:
        msg = wire.decode(data)
    except WireFormatError:
        return
    assert isinstance(msg.header, dict) and msg.to_bytes() == data


@FUZZ
@given(st.lists(st.integers(0, 2**20), min_size=1, max_size=4))
def test_bit_flipped_bundle_header_raises_only_veil_errors(bundle, positions):
    head_bits = (10 + 200) * 8  # prefix and JSON header: where a flip changes meaning, not key bytes
    assert well_formed(loads_or_refuses(_flip(bundle, [p % head_bits for p in positions])))


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 2**24), min_size=1, max_size=3))
def test_bit_flipped_bundle_anywhere_raises_only_veil_errors(bundle, positions):
    assert well_formed(loads_or_refuses(_flip(bundle, positions)))


@FUZZ
@given(JSON)
def test_parameters_from_any_json_raise_only_insecure_parameters_error(value):
    try:
        params = CKKSParameters.from_dict(value)
    except InsecureParametersError:
        return
    assert isinstance(params.poly_modulus_degree, int) and not isinstance(params.poly_modulus_degree, bool)


@FUZZ
@given(st.fixed_dictionaries({}, optional={"params": JSON, "fingerprint": JSON, "rotation_steps": JSON,
                                           "relin": JSON}),
       st.sampled_from(["params", "fingerprint", "rotation_steps", "relin", None]))
def test_bundle_headers_with_any_json_raise_only_veil_errors(bundle, changes, keep_real):
    msg = wire.decode(bundle)
    header = dict(changes)
    if keep_real is not None:
        header[keep_real] = msg.header[keep_real]
    header.setdefault("params", msg.header["params"])
    try:
        forged = wire.Message(wire.Kind.PUBLIC_BUNDLE, header, msg.blobs).to_bytes()
    except ValueError:  # json cannot write NaN-free JSON for this value: not a message a client can send
        return
    assert well_formed(loads_or_refuses(forged))


@FUZZ
@given(st.sampled_from(["Infinity", "-Infinity", "NaN", "1e400", "-1e400", "1.5", "true", '"8"', "[]", "{}", "null"]),
       st.sampled_from(["poly_modulus_degree", "coeff_modulus_bits", "security_bits", "step", "relin"]))
def test_non_integer_json_numbers_in_a_bundle_are_refused(bundle, literal, field):
    msg = wire.decode(bundle)
    fields = {"poly_modulus_degree": "4096", "coeff_modulus_bits": "[60,49]", "security_bits": "128",
              "step": "1", "relin": "false"}
    fields[field] = literal
    head = (f'{{"fingerprint":"{msg.header["fingerprint"]}","params":{{"coeff_modulus_bits":'
            f'{fields["coeff_modulus_bits"]},"poly_modulus_degree":{fields["poly_modulus_degree"]},'
            f'"security_bits":{fields["security_bits"]}}},"relin":{fields["relin"]},'
            f'"rotation_steps":[{fields["step"]},2]}}')
    json.loads(head)  # the forged header is JSON Python accepts
    forged = wire.Message(wire.Kind.PUBLIC_BUNDLE, {}, msg.blobs).to_bytes()
    prefix = wire.MAGIC + bytes([wire.VERSION, int(wire.Kind.PUBLIC_BUNDLE)])
    body = forged[len(prefix) + 4 + 2:]  # blob count and blobs after the empty header "{}"
    data = prefix + len(head).to_bytes(4, "little") + head.encode() + body
    with pytest.raises(VeilError):
        PublicBundle.from_bytes(data)
