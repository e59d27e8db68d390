import os

import numpy as np
import pytest

from veil.errors import ParameterMismatchError, WireFormatError
from veil.he import HEContext, SecretKeys, preset, wire


@pytest.fixture(scope="module")
def keys():
    return SecretKeys.generate(preset("depth0"))


@pytest.fixture(scope="module")
def message(keys):
    ct = keys.encrypt(np.arange(5.0), 2.0**30)
    return keys.context.pack([ct, ct], {"layout": "batch"})


def test_roundtrip(keys, message):
    header, cts = keys.context.unpack(message)
    assert header["layout"] == "batch" and len(cts) == 2
    assert np.allclose(keys.decrypt(cts[1])[:5], np.arange(5.0), atol=1e-5)


def test_every_truncation_is_a_typed_error(message):
    ctx = HEContext(preset("depth0"))
    cuts = [0, 3, 4, 9, 10, 50, len(message) // 2, len(message) - 1]
    for cut in cuts:
        with pytest.raises(WireFormatError):
            ctx.unpack(message[:cut])


def test_garbage_and_wrong_types(message):
    ctx = HEContext(preset("depth0"))
    for data in [b"", os.urandom(100), b"VEIL" + os.urandom(200), message + b"x", "text", None]:
        with pytest.raises(WireFormatError):
            ctx.unpack(data)


def test_bad_version_and_kind(message):
    ctx = HEContext(preset("depth0"))
    with pytest.raises(WireFormatError, match="version"):
        ctx.unpack(message[:4] + bytes([99]) + message[5:])
    with pytest.raises(WireFormatError, match="kind"):
        ctx.unpack(message[:5] + bytes([77]) + message[6:])
    with pytest.raises(WireFormatError, match="expected a CIPHERTEXTS"):
        ctx.unpack(message[:5] + bytes([int(wire.Kind.PUBLIC_BUNDLE)]) + message[6:])


def test_corrupted_ciphertext_payload(keys, message):
    msg = wire.decode(message)
    blob = bytearray(msg.blobs[0])
    blob[len(blob) // 2] ^= 0xFF
    blob[len(blob) // 2 + 1] ^= 0xFF
    bad = wire.Message(msg.kind, msg.header, [bytes(blob)]).to_bytes()
    with pytest.raises(WireFormatError, match="invalid ciphertext"):
        keys.context.unpack(bad)


def test_mismatched_parameters(message):
    other = HEContext(preset("depth0-rotations"))
    with pytest.raises(ParameterMismatchError):
        other.unpack(message)
    msg = wire.decode(message)
    forged = wire.Message(msg.kind, dict(msg.header, params=other.params.fingerprint), msg.blobs)
    with pytest.raises(WireFormatError):
        other.unpack(forged.to_bytes())


def test_header_must_be_json_object():
    bad = wire.Message(wire.Kind.CIPHERTEXTS, {}, []).to_bytes()
    broken = bad.replace(b"{}", b"[]")
    with pytest.raises(WireFormatError, match="JSON object"):
        wire.decode(broken)
