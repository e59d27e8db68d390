"""Inputs that are not arrays of real numbers get a typed error from every client, never a builtin
ValueError/TypeError or a silent answer.

Found as a user: `veil.Client.predict` and `ModelClient.encrypt` on complex inputs dropped the
imaginary part (a ComplexWarning, then an answer for other inputs than the caller's), and strings
or ragged rows raised numpy's own ValueError/TypeError instead of a `veil.errors` type."""

import warnings

import numpy as np
import pytest

from veil.errors import ShapeError
from veil.program import LinearCircuit, load_client
from veil.program.common import checked_rows

BAD = {
    "complex": np.ones((2, 3)) + 1j,
    "complex with zero imaginary part": np.ones((2, 3), dtype=complex),
    "complex in an object array": np.array([[1j, 1.0, 1.0]], dtype=object),
    "strings": np.array([["a", "b", "c"]]),
    "ragged rows": [[1.0, 2.0, 3.0], [1.0, 2.0]],
    "a dict": {"a": 1},
}


@pytest.mark.parametrize("name", BAD)
def test_non_real_inputs_are_shape_errors(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning either: refused before any cast
        with pytest.raises(ShapeError, match="real numbers"):
            checked_rows(BAD[name], 3)


def test_a_client_refuses_complex_rows_before_encrypting():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 3))
    client = load_client(LinearCircuit.calibrate(rng.normal(size=(2, 3)), np.zeros(2), X).client_spec())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ShapeError):
            client.encrypt(X[:2] + 0.5j, "batch")
    assert client.check_input(X[:2].astype(np.float32)).dtype == np.float64  # real numbers still pass
    assert client.check_input([[1, 2, 3]]).tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("entry", [2**70, -2**70, 2**63])
def test_gather_tables_with_integers_beyond_int64_are_shape_errors(entry):
    """A client.json (or server.json) whose gather table holds an integer numpy cannot convert
    raised OverflowError from `ModelClient.load`; it is a malformed artefact like any other."""
    from veil.program.packing import check_gather_index

    with pytest.raises(ShapeError, match="integers from -1 to 3"):
        check_gather_index([[0, 1], [2, entry]], 2, 4)
    assert check_gather_index([[0, 1], [2, -1]], 2, 4).tolist() == [[0, 1], [2, -1]]


@pytest.mark.parametrize("op", [{"relu": 1}, ["relu"], None, 3])
def test_a_staged_graph_whose_step_op_is_not_a_string_is_a_wire_format_error(op):
    """An op that is a JSON object or array raised TypeError (unhashable) from `ModelClient.load`."""
    from veil.errors import WireFormatError
    from veil.program.glue import StagedGraph, StageIO, Step

    graph = StagedGraph([(4,), (5,), (5,), (3,)], [Step("relu", {}, (1,), 2, 1)],
                        [StageIO((0,), (1,)), StageIO((2,), (3,))], 3).to_dict()
    graph["steps"][0]["op"] = op
    with pytest.raises(WireFormatError, match="unknown client step"):
        StagedGraph.from_dict(graph)


def test_a_value_just_past_its_bound_is_named_exactly():
    """`input_bounds=1.0` and a pixel of 1.000001 said "feature 3 = 1 is outside ... (|x| <= 1)"."""
    from veil.errors import PrecisionError
    from veil.program.planner import check_box

    X = np.zeros((1, 4))
    X[0, 3] = 1.000001
    with pytest.raises(PrecisionError, match=r"feature 3 = 1\.000001 is outside .*\(\|x\| <= 1\.0\)"):
        check_box(X, np.ones(4))
    check_box(np.ones((1, 4)), np.ones(4))  # the bound itself is accepted


def test_a_staged_client_takes_samples_in_the_models_input_shape():
    """`forward` takes images (n, 1, 2, 2); `veil.Client.predict` on the same X raised ShapeError
    "expected an array of shape (n, 4)". Both shapes give the same answer; others are refused."""
    from veil.program import Linear, compile_staged
    from veil.program.common import local_transport
    from veil.program.glue import StagedGraph, StageIO, Step

    rng = np.random.default_rng(5)
    graph = StagedGraph([(1, 2, 2), (5,), (5,), (3,)], [Step("relu", {}, (1,), 2, 1)],
                        [StageIO((0,), (1,)), StageIO((2,), (3,))], 3)
    first, second = Linear(rng.normal(size=(5, 4)), rng.normal(size=5)), Linear(rng.normal(size=(3, 5)), np.zeros(3))
    X = rng.normal(size=(300, 4))
    server = compile_staged(graph, [first, second], {0: X, 2: np.maximum(first(X), 0.0)})
    client = load_client(server.client_spec())
    images = X[:3].reshape(3, 1, 2, 2)
    assert client.check_input(images).tolist() == X[:3].tolist()
    out = client.infer(images, "batch", local_transport(server, client))
    assert np.abs(out - second(np.maximum(first(X[:3]), 0.0))).max() < 1e-3
    for wrong in (X[:3].reshape(3, 2, 2), X[:3].reshape(3, 1, 4), images + 1j):
        with pytest.raises(ShapeError):
            client.check_input(wrong)
