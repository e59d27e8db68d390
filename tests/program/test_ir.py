"""The program IR: normalisation preserves the function, parsing untrusted programs is strict."""

import contextlib
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import ShapeError, WireFormatError
from veil.program.ir import Linear, Poly, Program, normalise


def _random_program(rng, ops_kinds, n_in=5):
    ops, width = [], n_in
    for kind in ops_kinds:
        if kind == "linear":
            out = int(rng.integers(1, 6))
            ops.append(Linear(rng.normal(size=(out, width)), rng.normal(size=out)))
            width = out
        else:
            ops.append(Poly(tuple(rng.normal(size=int(rng.integers(1, 4))))))
    return Program(n_in, ops)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["linear", "poly"]), min_size=1, max_size=6), st.integers(0, 2**31))
def test_normalise_preserves_the_function(kinds, seed):
    rng = np.random.default_rng(seed)
    prog = _random_program(rng, kinds)
    stages = normalise(prog)
    X = rng.normal(size=(7, prog.n_inputs))
    ref = prog.evaluate(X)
    got = Program(prog.n_inputs, stages).evaluate(X)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * (1 + np.abs(ref).max()))
    assert isinstance(stages[0], Linear)
    for a, b in itertools.pairwise(stages):
        assert type(a) is not type(b), "stages alternate Linear and Poly"
    for op in stages:
        if isinstance(op, Poly):
            assert op.coeffs[2] in (1.0, -1.0), "leading coefficients are folded into the Linear before"
    # one level per stage, and never more stages than squares + linears
    assert len(stages) <= 2 * prog.n_squares + 1


def test_program_round_trips_through_json():
    rng = np.random.default_rng(0)
    prog = _random_program(rng, ["linear", "poly", "linear"])
    again = Program.from_dict(json.loads(json.dumps(prog.to_dict())))
    X = rng.normal(size=(3, 5))
    np.testing.assert_array_equal(again.evaluate(X), prog.evaluate(X))


@pytest.mark.parametrize("bad", [
    None, [], {"ops": "x"}, {"n_inputs": 2, "ops": []}, {"n_inputs": 2, "ops": [1]},
    {"n_inputs": 2, "ops": [{"op": "relu"}]},
    {"n_inputs": 2, "ops": [{"op": "linear", "weight": [[1, 2]], "bias": [0, 1]}]},
    {"n_inputs": 3, "ops": [{"op": "linear", "weight": [[1, 2]], "bias": [0]}]},
    {"n_inputs": 2, "ops": [{"op": "linear", "weight": [[1, "a"]], "bias": [0]}]},
    {"n_inputs": 2, "ops": [{"op": "linear", "weight": [[1, 1e400]], "bias": [0]}]},
    {"n_inputs": 2.0, "ops": [{"op": "poly", "coeffs": [0, 1]}]},
    {"n_inputs": True, "ops": [{"op": "poly", "coeffs": [0, 1]}]},
    {"n_inputs": 2, "ops": [{"op": "poly", "coeffs": [0, 1, 2, 3]}]},
    {"n_inputs": 2, "ops": [{"op": "poly", "coeffs": []}]},
    {"n_inputs": 2, "ops": [{"op": "poly", "coeffs": [[1]]}] * 100},
])
def test_malformed_programs_are_refused(bad):
    with pytest.raises((WireFormatError, ShapeError)):
        Program.from_dict(bad)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["op", "ops", "n_inputs", "weight", "bias", "coeffs"]), inner,
                        max_size=4), max_leaves=20))
def test_fuzzed_programs_never_crash(data):
    with contextlib.suppress(WireFormatError, ShapeError):
        Program.from_dict(data)
