"""One input box for every planning path: the affine kind and the planner both accept inputs within
`planner.input_box` (INPUT_HEADROOM times each feature's largest calibration magnitude, and the
median bound for a feature that was always zero at calibration), and decrypt them right."""

from dataclasses import replace

import numpy as np
import pytest

from veil.errors import PrecisionError, WireFormatError
from veil.program import (
    LeveledCircuit,
    Linear,
    LinearCircuit,
    Poly,
    Program,
    compile_program,
    load_client,
    load_server,
    plan,
)
from veil.program.planner import INPUT_HEADROOM, LayoutPlan, input_box

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


NET = Program(2, [Linear(np.array([[1.0, -2.0], [0.5, 1.5], [-1.0, 1.0]]), np.array([0.1, -0.2, 0.0])),
                  Poly((0.0, 0.0, 1.0)), Linear(np.array([[1.0, -0.5, 2.0]]), np.zeros(1))])
POSITIVE = np.random.default_rng(0).uniform(0.0, 1.0, (32, 2))


@pytest.mark.parametrize("layout", ["batch", "row"])
def test_non_negative_box_is_planned_checked_and_enforced(layout):
    """A [0, 1] box (non_negative) gives a smaller sound output bound than [-1, 1]; the plan keeps
    the lower bound through JSON; the server recomputes its bounds over that box and refuses the same
    bound claimed for the symmetric box; the client refuses negative inputs and decrypts the box's
    corners right."""
    sym = compile_program(NET, POSITIVE, input_bounds=1.0)
    pos = compile_program(NET, POSITIVE, input_bounds=1.0, non_negative=True)
    p = pos.plans[layout]
    assert p.non_negative and not sym.plans[layout].non_negative
    assert p.output_bound < sym.plans[layout].output_bound
    assert LayoutPlan.from_dict(p.to_dict()) == p
    server = load_server(pos.to_dict())
    with pytest.raises(WireFormatError):
        LeveledCircuit(pos.stages, 2, {layout: replace(p, non_negative=False)})
    client = load_client(server.client_spec())
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = client.decrypt(server.run(client.encrypt(corners, layout), client.public_bundle(layout)), 4)
    np.testing.assert_allclose(out, NET.evaluate(corners), atol=1e-3)
    with pytest.raises(PrecisionError, match="0 <= x"):
        client.encrypt(np.array([[-0.01, 0.5]]), layout)
    with pytest.raises(PrecisionError):
        compile_program(NET, -POSITIVE, input_bounds=1.0, non_negative=True)
