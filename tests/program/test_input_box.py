"""One input box for every planning path: the affine kind and the planner both accept inputs within
`planner.input_box` (INPUT_HEADROOM times each feature's largest calibration magnitude, and the
median bound for a feature that was always zero at calibration), and decrypt them right."""

import numpy as np
import pytest

from veil.errors import PrecisionError
from veil.program import Linear, LinearCircuit, Poly, Program, load_client, plan
from veil.program.planner import INPUT_HEADROOM, input_box

W = np.array([[1.0, 1.0]])
B = np.zeros(1)
X = np.column_stack([np.linspace(-1.0, 1.0, 11), np.zeros(11)])
"""Feature 1 is zero on every calibration sample."""


def test_input_box_scales_calibration_and_floors_zero_features():
    np.testing.assert_array_equal(input_box(X, None), [INPUT_HEADROOM * 1.0, INPUT_HEADROOM * 1.0 / 2])
    np.testing.assert_array_equal(input_box(X, 3.0), [3.0, 3.0])
    with pytest.raises(PrecisionError):
        input_box(X, 0.5)


@pytest.mark.parametrize("layout", ["batch", "row"])
def test_affine_accepts_the_corner_of_the_input_box(layout):
    server = LinearCircuit.calibrate(W, B, X, headroom=1.0)
    client = load_client(server.client_spec())
    corner = input_box(X, None)[None, :]
    out = client.decrypt(server.run(client.encrypt(corner, layout), client.public_bundle(layout)), 1)
    np.testing.assert_allclose(out, corner @ W.T + B, atol=1e-4)
    with pytest.raises(PrecisionError):
        client.encrypt(corner * 4, layout)


def test_planner_plans_for_the_same_box():
    _stages, plans = plan(Program(2, [Linear(W, B), Poly((0.0, 0.0, 1.0))]), X)
    for p in plans.values():
        np.testing.assert_array_equal(p.input_bounds, input_box(X, None))
