import numpy as np
import pytest

from veil.errors import InsecureParametersError, KeyMaterialError, ParameterMismatchError
from veil.he import HEContext, PublicBundle, SecretKeys, preset, wire


def test_bundle_without_rotations_has_no_galois_keys():
    keys = SecretKeys.generate(preset("depth0"))
    bundle = keys.public_bundle()
    assert bundle.galois_keys is None and bundle.relin_keys is None
    data = bundle.to_bytes()
    assert len(wire.decode(data).blobs) == 0
    assert len(data) < 1000


def test_bundle_has_only_requested_rotation_steps():
    keys = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[1, 2, 4])
    loaded = PublicBundle.from_bytes(keys.public_bundle().to_bytes())
    assert loaded.rotation_steps == (1, 2, 4)
    assert loaded.galois_keys.size() == 3
    ctx = loaded.context
    ct = keys.encrypt(np.arange(8.0), 2.0**50)
    rotated = ctx.evaluator.rotate_vector(ct, 2, loaded.galois_keys)
    assert np.allclose(keys.decrypt(rotated)[:6], np.arange(2.0, 8.0), atol=1e-3)
    with pytest.raises(ValueError, match="Galois key not present"):
        ctx.evaluator.rotate_vector(ct, 3, loaded.galois_keys)


def test_rotations_need_a_special_prime():
    with pytest.raises(KeyMaterialError):
        SecretKeys.generate(preset("depth0"), rotation_steps=[1])


def test_bundle_cannot_decrypt():
    """Everything a server holds (bundle, ciphertexts) reveals nothing without the client key."""
    keys = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[1])
    secret = np.linspace(-3, 3, 64)
    ct = keys.encrypt(secret, 2.0**30)
    data = keys.public_bundle().to_bytes()
    bundle = PublicBundle.from_bytes(data)
    assert not hasattr(bundle, "decrypt") and not hasattr(bundle, "secret_key")
    # The serialized secret key appears nowhere in the bundle.
    sk_payload = wire.decode(keys.to_bytes()).blobs[0]
    assert sk_payload[64:128] not in data
    # No blob of the bundle loads as a secret key.
    for blob in wire.decode(data).blobs:
        with pytest.raises((RuntimeError, ValueError)):
            bundle.context.seal.from_secret_str(blob)
    # Another key pair over the same parameters decrypts to noise, not the data.
    attacker = SecretKeys.generate(bundle.context)
    guess = attacker.decrypt(ct)[:64]
    assert np.max(np.abs(guess - secret)) > 1e3
    assert np.allclose(keys.decrypt(ct)[:64], secret, atol=1e-4)


def test_server_refuses_secret_keys():
    keys = SecretKeys.generate(preset("depth0"))
    with pytest.raises(KeyMaterialError, match="secret key"):
        PublicBundle.from_bytes(keys.to_bytes())


def test_forged_bundles_are_refused():
    keys = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[1, 2])
    msg = wire.decode(keys.public_bundle().to_bytes())
    wrong_count = wire.Message(msg.kind, dict(msg.header, rotation_steps=[1, 2, 4]), msg.blobs)
    with pytest.raises(KeyMaterialError):
        PublicBundle.from_bytes(wrong_count.to_bytes())
    extra = wire.Message(msg.kind, dict(msg.header, secret="x"), msg.blobs)
    with pytest.raises(KeyMaterialError, match="unexpected"):
        PublicBundle.from_bytes(extra.to_bytes())
    garbage = wire.Message(msg.kind, msg.header, [b"\x00" * 100])
    with pytest.raises(KeyMaterialError):
        PublicBundle.from_bytes(garbage.to_bytes())
    insecure = wire.Message(msg.kind, dict(msg.header, params={"poly_modulus_degree": 2048,
                                                               "coeff_modulus_bits": [60, 60]}),
                            msg.blobs)
    with pytest.raises(InsecureParametersError):
        PublicBundle.from_bytes(insecure.to_bytes())
    with pytest.raises(ParameterMismatchError):
        PublicBundle.from_bytes(keys.public_bundle().to_bytes(), HEContext(preset("depth1")))


def test_secret_keys_roundtrip_for_the_owner():
    keys = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[4])
    ct = keys.encrypt(np.ones(4), 2.0**30)
    again = SecretKeys.from_bytes(keys.to_bytes())
    assert again.rotation_steps == (4,)
    assert np.allclose(again.decrypt(ct)[:4], 1.0, atol=1e-5)


def test_key_id_is_stable_and_distinct():
    a = SecretKeys.generate(preset("depth0"))
    b = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[1])
    assert a.public_bundle().key_id == a.public_bundle().key_id
    assert a.public_bundle().key_id != b.public_bundle().key_id
