"""Circuit kinds: one registered object per kind, used by the loaders and the model description."""

import numpy as np
import pytest
from sklearn.datasets import load_iris

from veil.errors import WireFormatError
from veil.program import (
    CircuitKind,
    Linear,
    LinearCircuit,
    Poly,
    ProductSum,
    Program,
    compile_product_sum,
    compile_program,
    compile_staged,
    describe,
    kinds,
    load_client,
    load_server,
    register,
)
from veil.program.glue import StagedGraph, StageIO, Step


@pytest.fixture(scope="module")
def circuits():
    X, _ = load_iris(return_X_y=True)
    rng = np.random.default_rng(0)
    affine = compile_program(Program(4, [Linear(rng.normal(size=(3, 4)), np.zeros(3))]), X)
    leveled = compile_program(Program(4, [Linear(rng.normal(size=(5, 4)), np.zeros(5)), Poly((0.0, 0.0, 1.0)),
                                          Linear(rng.normal(size=(3, 5)), np.zeros(3))]), X)
    ps = ProductSum(2, [(0.0, ((0, 1.0),)), (0.0, ((1, 1.0),))], np.array([[0, 1]]), np.array([3e-6]),
                    np.array([0]), np.array([0.0]))
    products = compile_product_sum(ps, np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]))
    graph = StagedGraph([(4,), (5,), (5,), (3,)], [Step("relu", {}, (1,), 2, 1)],
                        [StageIO((0,), (1,)), StageIO((2,), (3,))], 3)
    first, second = Linear(rng.normal(size=(5, 4)), np.zeros(5)), Linear(rng.normal(size=(3, 5)), np.zeros(3))
    staged = compile_staged(graph, [first, second], {0: X, 2: np.maximum(first(X), 0.0)})
    return {"affine": affine, "leveled": leveled, "product-sum": products, "staged": staged}


def test_every_kind_is_registered_once_and_round_trips(circuits):
    assert set(kinds()) == set(circuits)
    for name, circuit in circuits.items():
        assert circuit.kind == name
        server, client = load_server(circuit.to_dict()), load_client(circuit.client_spec())
        assert (server.kind, client.kind) == (name, name)
        description = describe(server, client)
        assert description["kind"] == name and description["depth"] == circuit.depth
    with pytest.raises(ValueError, match="already registered"):
        register(CircuitKind("affine", LinearCircuit.from_dict, load_client, "a second affine kind"))


def test_unknown_or_malformed_kinds_are_refused(circuits):
    spec = circuits["affine"].to_dict()
    for bad in ({**spec, "kind": "bootstrapped"}, {**spec, "kind": 3}, [spec], "affine"):
        with pytest.raises(WireFormatError):
            load_server(bad)
        with pytest.raises(WireFormatError):
            load_client(bad)


def test_halves_of_different_models_do_not_describe_one(circuits):
    affine, leveled, products = circuits["affine"], circuits["leveled"], circuits["product-sum"]
    with pytest.raises(WireFormatError, match="kinds differ"):
        describe(affine, load_client(leveled.client_spec()))
    spec = products.client_spec()
    spec["output_shift"] += 1  # the client would divide by the wrong power of two, silently
    with pytest.raises(WireFormatError, match="differ"):
        describe(products, load_client(spec))
