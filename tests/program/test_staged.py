"""The staged kind's pieces without torch models: the public graph is parsed strictly (unknown
ops and parameters, values read before they exist, steps along the batch), artefacts whose parts
disagree are refused, the protocol runs through the chunked worker pool as in process, the gather
layout computes the affine map under SEAL and refuses a table that misses weights, and
per-element polynomials normalise, round-trip and are refused in the row layout."""

import copy
import json

import numpy as np
import pytest

from veil.errors import PrecisionError, ShapeError, WireFormatError
from veil.program import (
    Linear,
    LinearCircuit,
    Poly,
    Program,
    compile_program,
    compile_staged,
    load_client,
    load_server,
    parallel,
    request_bytes,
)
from veil.program.common import local_transport
from veil.program.glue import StagedGraph, StageIO, Step
from veil.program.ir import normalise
from veil.program.leveled import LeveledCircuit
from veil.program.parallel import execute_chunked
from veil.program.planner import plan


def _graph():
    return StagedGraph([(4,), (5,), (5,), (3,)], [Step("relu", {}, (1,), 2, 1)],
                       [StageIO((0,), (1,)), StageIO((2,), (3,))], 3)


@pytest.fixture(scope="module")
def staged():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4200, 4))
    first, second = Linear(rng.normal(size=(5, 4)), rng.normal(size=5)), Linear(rng.normal(size=(3, 5)), np.zeros(3))
    circuit = compile_staged(_graph(), [first, second], {0: X, 2: np.maximum(first(X), 0.0)})
    return circuit, X, lambda Z: second(np.maximum(first(Z), 0.0))


@pytest.mark.parametrize(("edit", "error"), [
    (lambda d: d["steps"][0].update(op="exp"), WireFormatError),
    (lambda d: d["steps"][0]["params"].update(inplace=True), WireFormatError),
    (lambda d: d["steps"][0].update(op="softmax", params={"dim": 0}), ShapeError),
    (lambda d: d["steps"][0].update(op="softmax", params={"dim": "1"}), WireFormatError),
    (lambda d: d["steps"][0].update(op="max_pool1d", params={"kernel_size": 9}), ShapeError),
    (lambda d: d["steps"][0].update(op="cat", params={"dim": -2}), ShapeError),
    (lambda d: d["steps"][0].update(round=0), ShapeError),  # reads stage 0's answer before it exists
    (lambda d: d["steps"][0].update(output=1), ShapeError),  # defines a value twice
    (lambda d: d["steps"][0].update(inputs=[7]), WireFormatError),
    (lambda d: d["stages"][1].update(inputs=[3]), ShapeError),
    (lambda d: d["shapes"].__setitem__(2, [6]), ShapeError),  # relu cannot give another shape
    (lambda d: d["shapes"].__setitem__(2, [5.0]), ShapeError),
    (lambda d: d.update(output=True), WireFormatError),
    (lambda d: d.update(stages=[]), ShapeError),
])
def test_malformed_graphs_are_refused(edit, error):
    d = _graph().to_dict()
    edit(d)
    with pytest.raises(error):
        StagedGraph.from_dict(json.loads(json.dumps(d)))


def test_parts_that_disagree_are_refused(staged):
    circuit, _, _ = staged
    good = circuit.to_dict()
    edits = [
        lambda d: d["layouts"].update(row=["gather", "batch"]),
        lambda d: d["layouts"].update(tree=["batch", "batch"]),
        lambda d: d.update(bounds=[1.0, 0.0]),
        lambda d: d.update(bounds=[1.0]),
        lambda d: d["boxes"][0].pop(),
        lambda d: d["stages"].reverse(),
        lambda d: d["stages"][1]["scales"].pop("batch"),
    ]
    for edit in edits:
        for make, data in ((load_server, copy.deepcopy(good)), (load_client, circuit.client_spec())):
            edit(data)
            with pytest.raises((WireFormatError, ShapeError)):
                make(data)


def test_protocol_runs_in_process_simulated_and_in_worker_processes(staged):
    circuit, X, reference = staged
    server, client = load_server(circuit.to_dict()), load_client(circuit.client_spec())
    ref = reference(X[:50])
    for layout in ("batch", "row"):
        np.testing.assert_allclose(client.infer(X[:50], layout, local_transport(server, client)), ref, atol=1e-4)
        np.testing.assert_allclose(circuit.simulate(X[:50], layout), ref, atol=1e-4)
    np.testing.assert_allclose(circuit.evaluate(X[:50]), ref, atol=1e-9)
    out = execute_chunked(X, server_dict=circuit.to_dict(), client_spec=circuit.client_spec(),
                          load_server=load_server, load_client=load_client,
                          keys={"row": client.keys("row").to_bytes()}, layout="row", chunk_rows=2048, workers=2)
    np.testing.assert_allclose(out, reference(X), atol=1e-4)  # three chunks, each one whole protocol
    with pytest.raises(PrecisionError, match="stage 0 input"):
        client.infer(X[:2] * 10, "batch", local_transport(server, client))


def test_requests_and_chunks_are_sized_by_the_largest_stage(staged):
    circuit, _, _ = staged
    client = load_client(circuit.client_spec())
    for layout in ("batch", "row"):
        packing = client.layout(layout)
        per_stage = [side.layout(name) for side, name in zip(client.stages, client.layouts[layout], strict=True)]
        assert packing.n_input_cts(5000) == max(p.n_input_cts(5000) for p in per_stage)
        rows = parallel.default_chunk_rows(client, layout)
        assert request_bytes(client, layout, rows) <= parallel.MAX_CHUNK_BYTES
    with pytest.raises(ShapeError, match="unknown layout"):
        parallel.default_chunk_rows(client, "gather")  # a stage's layout, not the program's


def test_gather_layout_computes_the_map_and_refuses_tables_that_miss_weights():
    rng = np.random.default_rng(1)
    for n_out in (7, 5000):  # one ciphertext for several samples; a sample over three ciphertexts
        W = rng.normal(size=(n_out, 12)) * (rng.random((n_out, 12)) < 0.3)
        b, X = rng.normal(size=n_out), rng.normal(size=(30, 12))
        circuit = LinearCircuit.calibrate(W, b, X, presets={"row": None, "gather": "depth0-rotations"})
        server, client = load_server(json.loads(json.dumps(circuit.to_dict()))), load_client(circuit.client_spec())
        out = client.infer(X[:5], "gather", local_transport(server, client))
        np.testing.assert_allclose(out, X[:5] @ W.T + b, atol=1e-3)
        assert client.choose_layout(1) == "gather"
    d = circuit.to_dict()
    missing = copy.deepcopy(d)
    row = next(r for r in missing["gather"] if r[0] >= 0)
    row[row.index(-1) - 1 if -1 in row else -1] = -1
    with pytest.raises(WireFormatError, match="misses non-zero weights"):
        LinearCircuit.from_dict(missing)
    for bad in ([[1, 0] + [-1] * (len(d["gather"][0]) - 2)] * n_out, [[-1, 0]] * n_out, d["gather"][:-1], "x"):
        with pytest.raises((ShapeError, WireFormatError)):
            LinearCircuit.from_dict({**d, "gather": bad})
    with pytest.raises((ShapeError, WireFormatError), match="gather table"):
        LinearCircuit.from_dict({k: v for k, v in d.items() if k != "gather"})


def test_per_element_polynomials_normalise_round_trip_and_stay_out_of_the_row_layout():
    rng = np.random.default_rng(2)
    c2 = np.array([0.5, 0.0, -2.0, 0.0])
    poly = Poly((rng.normal(size=4), rng.normal(size=4), c2))
    program = Program(3, [Linear(rng.normal(size=(4, 3)), rng.normal(size=4)), poly,
                          Linear(rng.normal(size=(2, 4)), rng.normal(size=2))])
    X = rng.normal(size=(20, 3))
    stages = normalise(program)
    np.testing.assert_allclose(Program(3, stages).evaluate(X), program.evaluate(X), rtol=1e-9, atol=1e-9)
    squared = stages[1]
    assert list(squared.coeffs[2]) == [1.0, 0.0, -1.0, 0.0] and list(squared.coeffs[1][[1, 3]]) == [1.0, 1.0]
    again = Program.from_dict(json.loads(json.dumps(program.to_dict())))
    np.testing.assert_array_equal(again.evaluate(X), program.evaluate(X))
    with pytest.raises(ShapeError):
        Program(3, [Linear(np.eye(3), np.zeros(3)), poly])  # four coefficients for three values
    circuit = compile_program(program, X)
    assert set(circuit.plans) == {"batch"}
    server = load_server(circuit.to_dict())
    client = load_client(circuit.client_spec())
    np.testing.assert_allclose(client.infer(X[:4], "batch", local_transport(server, client)),
                               program.evaluate(X[:4]), atol=1e-4)
    _, row_plans = plan(Program(3, [Linear(np.eye(4, 3), np.zeros(4)), Poly((0.0, 0.0, 1.0)),
                                    Linear(np.ones((2, 4)), np.zeros(2))]), X)
    with pytest.raises(WireFormatError, match="row layout"):
        LeveledCircuit(stages, 3, {"row": row_plans["row"]})
    odd = Poly((np.zeros(4), np.zeros(4), np.array([1.0, 0.0, 0.5, 1.0])))  # not normalised
    with pytest.raises(WireFormatError, match="normalised"):
        LeveledCircuit([stages[0], odd, stages[2]], 3, circuit.plans)


def test_planned_bound_holds_for_the_worst_inputs_of_the_box():
    rng = np.random.default_rng(3)
    op = Linear(rng.normal(size=(6, 10)) * np.array([1e-9, 1.0, 3.0, 1e-3, 1.0, 2.0, 5.0, 1e-7, 1.0, 1.0]),
                rng.normal(size=6))
    X = rng.uniform(-1.0, 1.0, size=(100, 10))
    graph = StagedGraph([(10,), (6,)], [], [StageIO((0,), (1,))], 1)
    circuit = compile_staged(graph, [op], {0: X})
    server, client = load_server(circuit.to_dict()), load_client(circuit.client_spec())
    box = circuit.boxes[0]
    worst = np.sign(op.weight) * box  # each row's largest output, a corner of the accepted box
    for layout in ("batch", "row"):
        out = client.infer(worst, layout, local_transport(server, client))
        np.testing.assert_allclose(np.diag(out), np.abs(op.weight) @ box + op.bias, rtol=1e-5)
        assert np.max(np.abs(out)) <= circuit.bounds[0]
    with pytest.raises(PrecisionError, match="stage 0 input"):
        client.infer(worst * 1.01, "batch", local_transport(server, client))
