"""The key-switching error model (`planner.keyswitch_variance`) against SEAL's own rotations."""

from __future__ import annotations

import numpy as np
import pytest

from veil.he import CKKSParameters, SecretKeys
from veil.he.ciphertext import Ciphertext
from veil.program.planner import NOISE_SLOTS, keyswitch_variance

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(("bits", "low"), [((39, 34, 34, 34, 34, 39), 0.8), ((39, 34, 34, 34, 43), 0.3)])
def test_rotation_error_follows_the_model_slot_by_slot(bits, low):
    """One rotation of a fresh ciphertext on 4 sets of keys: the squared error over its predicted
    per-slot variance averages at most about 1 per key (about 1 when the key's errors dominate; about
    0.45 when a larger special prime leaves the rounding of the division by it, which the model
    takes as a rescale's NOISE_SLOTS N, 1.5 times the measured N / 6), and slot 0, where SEAL's uncentered digits put
    most of it (fixed by the key), stays within 5 of its predicted deviations. With a special
    prime as large as the first prime, that slot's deviation is 100 times a rescale's error, what
    the estimate used to stand for a key switch."""
    params = CKKSParameters(8192, bits)
    scale = 2.0**34
    spread, profile = keyswitch_variance(params, len(bits) - 1)
    variance = (spread + profile) / scale**2
    if bits[-1] == bits[0]:
        assert np.sqrt(variance[0]) > 100 * NOISE_SLOTS * 8192 / scale, "slot 0 gets 100 rescales' error"
    assert np.sqrt(variance[0]) > 10 * np.sqrt(np.median(variance))
    x = np.random.default_rng(0).integers(0, 2, 4096).astype(float)
    for _ in range(4):
        keys = SecretKeys.generate(params, rotation_steps=(1,))
        ct = Ciphertext(keys.context, keys.encrypt(x, scale))
        before = keys.decrypt(ct.data)
        error = keys.decrypt(ct.rotate(1, keys.public_bundle().galois_keys).data) - np.roll(before, -1)
        assert low < np.mean(error**2 / variance) < 1.25
        assert abs(error[0]) < 5 * np.sqrt(variance[0])
