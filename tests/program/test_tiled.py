"""The tiled row layout of leveled programs (`veil.program.tiled`): a convolution runs as one
plaintext product per ciphertext of client-side windows, later layers by the hybrid diagonal
method; results equal the plaintext program whatever the geometry, and a forged geometry is
refused at load on both sides."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from veil import ml
from veil.errors import ShapeError, WireFormatError
from veil.ml.torch_compile import module_to_program
from veil.program import LeveledCircuit, Linear, Poly, Program, leveled, load_client, load_server, plan
from veil.program.ir import normalise
from veil.program.planner import row_cost_ms
from veil.program.tiled import MAX_WINDOW_ENTRIES, TiledGeometry, build, plaintext_words


def _conv_program(seed=0):
    """conv 1->3 3x3 stride 2 on 9x9 (3 x 4 x 4 = 48 outputs, 9 inputs per window), square, 48 -> 4."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), ml.Square(), nn.Flatten(), nn.Linear(48, 4)).eval()
    return module_to_program(net, (1, 9, 9))


def _mlp(rng, sizes):
    ops, width = [], sizes[0]
    for i, out in enumerate(sizes[1:]):
        ops.append(Linear(rng.normal(size=(out, width)) / np.sqrt(width), rng.normal(size=out) * 0.1))
        if i < len(sizes) - 2:
            ops.append(Poly((0.1, 0.5, 0.3)))
        width = out
    return Program(sizes[0], ops)


def _halves(prog, X, geometry=None, layouts=("row",)):
    stages, plans = plan(prog, X, layouts=layouts)
    if geometry is not None:
        g = geometry(stages, plans["row"].params.slot_count)
        plans["row"] = dataclasses.replace(plans["row"], geometry=g, rotation_steps=g.rotation_steps)
    server = load_server(json.loads(json.dumps(LeveledCircuit(stages, prog.n_inputs, plans).to_dict())))
    client = load_client(json.loads(json.dumps(server.client_spec())))
    return server, client


def _run(server, client, X):
    return client.decrypt(server.run(client.encrypt(X, "row"), client.public_bundle("row")), len(X))


def test_convolution_runs_on_client_side_windows_without_rotations_before_the_fold():
    prog = _conv_program()
    X = np.random.default_rng(0).uniform(0, 1, size=(30, 81))
    server, client = _halves(prog, X)
    g = client.plans["row"].geometry
    w = g.windows
    assert w is not None and w.n_views == 9 and len(w.windows) == 16, "one window per position, shared by channels"
    assert w.period == 64 and w.n_cts * w.stack >= 9
    counts = g.op_counts()
    assert counts[0] == {"input_cts": w.n_cts, "mul_plain": w.n_cts, "rotations": len(w.fold)}
    assert counts[1]["mul_plain"] == 4 and counts[1]["rotations"] == 1 + 1 + 4  # d=4: B=2, G=2, fold 64 -> 4
    out = _run(server, client, X[:5])
    ref = prog.evaluate(X[:5])
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("sizes", [(6, 5, 3), (6, 5, 20, 3), (40, 3, 7, 2)])
@pytest.mark.parametrize("first", ["windows", "diagonal"])
def test_every_geometry_computes_the_program(sizes, first):
    """Both first stages, narrowing and widening layers (rows above the input period: no fold),
    several samples interleaved per ciphertext: decrypted outputs equal the plaintext program."""
    rng = np.random.default_rng(len(sizes) * 10 + sum(sizes))
    prog = _mlp(rng, sizes)
    X = rng.normal(size=(40, sizes[0]))
    server, client = _halves(prog, X, lambda stages, slots: build(stages, prog.n_inputs, slots, first))
    g = client.plans["row"].geometry
    assert (g.windows is not None) == (first == "windows") and g.samples_per_ct > 1
    n = 2 * g.samples_per_ct + 1  # three groups, the last one partly filled
    out = _run(server, client, X[np.arange(n) % len(X)])
    ref = prog.evaluate(X[np.arange(n) % len(X)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_planner_picks_the_cheaper_first_stage():
    prog = _conv_program()
    X = np.random.default_rng(1).uniform(0, 1, size=(10, 81))
    stages, plans = plan(prog, X, layouts=("row",))
    p = plans["row"]
    costs = {first: row_cost_ms(stages, build(stages, 81, p.params.slot_count, first), p.params)
             for first in ("windows", "diagonal")}
    assert costs["windows"] < costs["diagonal"] and p.geometry.windows is not None


def test_cryptonets_geometry_operation_counts():
    """CryptoNets (pad, conv 5x5 stride 2 x5, square, 845 -> 100, square, 100 -> 10) on N=8192:
    7 ciphertexts of 4 windows each and 36 rotations in all (the diagonal method over all 784
    pixels needed 160), 10 Galois keys."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(1, 5, 5, stride=2), ml.Square(), nn.Flatten(),
                        nn.Linear(845, 100), ml.Square(), nn.Linear(100, 10)).eval()
    stages = normalise(module_to_program(net, (1, 28, 28)))
    g = build(stages, 784, 4096, "windows")
    assert (g.windows.period, g.windows.stack, g.windows.n_cts, len(g.windows.windows)) == (1024, 4, 7, 169)
    assert g.op_counts() == [{"input_cts": 7, "mul_plain": 7, "rotations": 2},
                             {"input_cts": 0, "mul_plain": 128, "rotations": 25},
                             {"input_cts": 0, "mul_plain": 16, "rotations": 9}]
    assert g.rotation_steps == (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048)


@pytest.fixture(scope="module")
def conv_halves():
    prog = _conv_program(1)
    X = np.random.default_rng(2).uniform(0, 1, size=(20, 81))
    server, client = _halves(prog, X, layouts=("batch", "row"))
    return server, client, X


def _geometry(d):
    return d["plans"]["row"]["geometry"]


FORGED = {
    "window reads beyond the inputs": lambda g: g["windows"]["windows"][0].__setitem__(0, 81),
    "window lists an input twice": lambda g: g["windows"]["windows"][0].__setitem__(1, g["windows"]["windows"][0][0]),
    "window index is a float": lambda g: g["windows"]["windows"][0].__setitem__(0, 1.0),
    "window index is a boolean": lambda g: g["windows"]["windows"][0].__setitem__(0, True),
    "output names no window": lambda g: g["windows"]["window_of"].__setitem__(0, 10**6),
    "empty window": lambda g: g["windows"]["windows"].__setitem__(0, []),
    "period not a power of two": lambda g: g["windows"].__setitem__("period", 48),
    "period below the outputs": lambda g: g["windows"].__setitem__("period", 32),
    "blocks beyond the virtual vector": lambda g: g["windows"].__setitem__("stack", 2 * g["virtual"]),
    "virtual beyond the slots": lambda g: g.__setitem__("virtual", 1 << 20),
    "virtual not a power of two": lambda g: g.__setitem__("virtual", 3000),
    "stage reads another period": lambda g: g["diagonals"][0].__setitem__("period_in", 32),
    "last rows below the outputs": lambda g: g["diagonals"][0].__setitem__("rows", 2),
    "more baby steps than diagonals": lambda g: g["diagonals"][0].__setitem__("baby", 64),
    "unknown field": lambda g: g.__setitem__("extra", 1),
    "diagonal stage missing a field": lambda g: g["diagonals"][0].pop("baby"),
    "windows not an object": lambda g: g.__setitem__("windows", [1, 2]),
    "too many window entries": lambda g: g["windows"].__setitem__(
        "windows", [list(range(81))] * (MAX_WINDOW_ENTRIES // 81 + 1)),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_geometry_is_refused_on_both_sides(conv_halves, case):
    server, _client, _X = conv_halves
    d, spec = server.to_dict(), server.client_spec()
    for artefact, load in ((d, load_server), (spec, load_client)):
        forged = copy.deepcopy(artefact)
        FORGED[case](_geometry(forged))
        with pytest.raises((WireFormatError, ShapeError)):
            load(json.loads(json.dumps(forged)))


def test_forged_windows_that_miss_weights_are_refused_by_the_server(conv_halves):
    """A client cannot tell (it holds no weights); the server, which does, refuses a plan whose
    windows would leave a weight out (a silently wrong answer)."""
    server, _client, _X = conv_halves
    d = copy.deepcopy(server.to_dict())
    _geometry(d)["windows"]["windows"][0] = _geometry(d)["windows"]["windows"][0][1:]
    with pytest.raises(WireFormatError, match="miss weights"):
        load_server(d)


def test_row_plan_without_geometry_or_with_other_steps_is_refused(conv_halves):
    server, _client, _X = conv_halves
    d, spec = server.to_dict(), server.client_spec()
    row = d["plans"]["row"]
    cases = [{k: v for k, v in row.items() if k != "geometry"}, dict(row, half=64),
             dict(row, rotation_steps=row["rotation_steps"][:-1]),
             dict(row, rotation_steps=[*row["rotation_steps"], 3])]
    for bad in cases:
        with pytest.raises(WireFormatError):
            load_server(dict(d, plans={**d["plans"], "row": bad}))
        with pytest.raises(WireFormatError):
            load_client(dict(spec, plans={**spec["plans"], "row": bad}))
    batch = dict(d["plans"]["batch"], geometry=row["geometry"])
    with pytest.raises(WireFormatError):
        load_server(dict(d, plans={**d["plans"], "batch": batch}))


def test_geometry_encoding_more_plaintexts_than_allowed_is_refused_at_load(conv_halves, monkeypatch):
    """A consistent geometry with a full-size block per stage spreads the weights over more
    diagonals than the planned one (the server counts the non-zero diagonals it would encode on the
    first request, and never builds the padded slots x slots matrix): beyond MAX_ROW_WORDS it is
    refused at load instead. (The limit is lowered between the two counts: at its real size only a
    program with millions of weights reaches it once all-zero diagonals are not counted.)"""
    server, _client, _X = conv_halves
    d = copy.deepcopy(server.to_dict())
    row = d["plans"]["row"]
    slots = row["params"]["poly_modulus_degree"] // 2
    g = {"virtual": slots, "windows": None, "diagonals": [{"period_in": slots, "rows": slots, "baby": 64}] * 2}
    steps = TiledGeometry.from_dict(g, slots).rotation_steps
    d["plans"]["row"] = dict(row, geometry=g, rotation_steps=list(steps))
    top, degree = len(row["params"]["coeff_modulus_bits"]) - 1, row["params"]["poly_modulus_degree"]
    honest = plaintext_words(server.plans["row"].geometry, top, degree, server.stages)
    forged = plaintext_words(TiledGeometry.from_dict(g, slots), top, degree, server.stages)
    assert forged > 2 * honest
    monkeypatch.setattr(leveled, "MAX_ROW_WORDS", (honest + forged) // 2)
    load_server(server.to_dict())
    with pytest.raises(WireFormatError, match="plaintexts"):
        load_server(d)
