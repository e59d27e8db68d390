"""The ciphertext value type: results equal plaintext arithmetic, and mismatched operands are refused."""

import numpy as np
import pytest

from veil.errors import KeyMaterialError, ScaleMismatchError
from veil.he import HEContext, SecretKeys
from veil.he.ciphertext import Ciphertext, add_many
from veil.he.params import CKKSParameters

PARAMS = CKKSParameters(8192, (50, 40, 40, 50))


@pytest.fixture(scope="module")
def keys():
    return SecretKeys.generate(HEContext(PARAMS), rotation_steps=(1,), relin=True)


def _enc(keys, values, bits=40):
    return Ciphertext(keys.context, keys.encrypt(values, 2.0**bits))


def _dec(keys, ct, n):
    return keys.decrypt(ct.data)[:n]


def test_level_scale_and_arithmetic(keys):
    x, y = np.linspace(-2, 2, 100), np.linspace(3, -1, 100)
    a, b = _enc(keys, x), _enc(keys, y)
    assert a.level == keys.context.top_level == 2 and a.scale == 2.0**40 and a.size == 2
    np.testing.assert_allclose(_dec(keys, a + b, 100), x + y, atol=1e-6)
    np.testing.assert_allclose(_dec(keys, a - b, 100), x - y, atol=1e-6)
    np.testing.assert_allclose(_dec(keys, -a + 1.5, 100), 1.5 - x, atol=1e-6)
    prod = (a * 0.25).rescale_()
    assert prod.level == 1 and prod.scale == pytest.approx(2.0**40, rel=1e-9)
    np.testing.assert_allclose(_dec(keys, prod, 100), 0.25 * x, atol=1e-6)
    sq = a.square()
    assert sq.size == 3
    sq.relinearize_(keys.public_bundle().relin_keys).rescale_()
    assert sq.size == 2 and sq.level == 1
    np.testing.assert_allclose(_dec(keys, sq, 100), x * x, atol=1e-5)
    ab = (a * b).relinearize_(keys.public_bundle().relin_keys).rescale_()
    np.testing.assert_allclose(_dec(keys, ab, 100), x * y, atol=1e-5)
    rot = a.rotate(1, keys.public_bundle().galois_keys)
    np.testing.assert_allclose(_dec(keys, rot, 99), x[1:], atol=1e-5)
    np.testing.assert_allclose(_dec(keys, add_many([a, b, a]), 100), 2 * x + y, atol=1e-6)


def test_pure_operations_leave_operands_alone(keys):
    x = np.arange(10.0)
    a = _enc(keys, x)
    _ = a + a
    _ = a * 2.0
    _ = a.square()
    assert a.level == 2 and a.size == 2
    np.testing.assert_allclose(_dec(keys, a, 10), x, atol=1e-6)
    a.add_(1.0)
    np.testing.assert_allclose(_dec(keys, a, 10), x + 1, atol=1e-6)


def test_mismatched_operands_are_refused(keys):
    a = _enc(keys, np.ones(4))
    low = (a * 2.0).rescale_()
    with pytest.raises(ScaleMismatchError, match="levels"):
        a + low
    with pytest.raises(ScaleMismatchError, match="levels"):
        a * low
    other_scale = _enc(keys, np.ones(4), bits=30)
    with pytest.raises(ScaleMismatchError, match="scales"):
        a + other_scale
    other = SecretKeys.generate(HEContext(CKKSParameters(8192, (60, 40, 60))))
    with pytest.raises(ScaleMismatchError, match="parameters"):
        a + Ciphertext(other.context, other.encrypt(np.ones(4), 2.0**40))
    bottom = low.copy().mul_(2.0).rescale_()
    assert bottom.level == 0
    with pytest.raises(ScaleMismatchError, match="level 0"):
        bottom.rescale_()
    with pytest.raises(ScaleMismatchError, match="does not fit"):
        bottom.square_()
    with pytest.raises(ScaleMismatchError):
        a.square().rotate(1, keys.public_bundle().galois_keys)
    with pytest.raises(KeyMaterialError):
        a.rotate(1, None)
    with pytest.raises(KeyMaterialError):
        a.square().relinearize_(None)
