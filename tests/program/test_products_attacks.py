"""Forged product-sum artefacts, specifications and requests: only typed veil errors, no bare
exception and no huge allocation (security review of `veil.program.products` / `encoding`)."""

from __future__ import annotations

import contextlib
import copy
import json
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil import ml
from veil.errors import VeilError
from veil.program import load_client, load_server
from veil.program.encoding import ThermometerEncoding
from veil.program.products import ProductSum, ProductSumCircuit, ProductSumClient

pytestmark = pytest.mark.timeout(120)

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
                    | st.text(max_size=3) | st.just(10 ** 400) | st.just(-1) | st.just(65536),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=3),
                    max_leaves=12)


def _typed(fn, *args):
    with contextlib.suppress(VeilError):
        fn(*args)


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(zlib.crc32(b"products-attacks"))
    X = rng.normal(size=(120, 3))
    y = (X[:, 0] - X[:, 2] > 0).astype(int)
    return ml.RandomForestClassifier(n_estimators=2, max_depth=2, n_bits=2, random_state=0).fit(X, y).compile(X), X


def _paths(d, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, d
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d[:6]):
            yield from _paths(v, (*prefix, i))


def _mutated(doc, data):
    doc = copy.deepcopy(doc)
    paths = [p for p, _ in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = data.draw(JSON)
    return doc


def test_fixed_bare_exceptions_of_product_sum_from_dict():
    """Were ValueError (no terms), OverflowError (a JSON integer beyond a float), MemoryError (a
    dense literals x inputs matrix of 32 GiB in `lower`): now typed."""
    ok = {"n_inputs": 1, "literals": [[0.0, [[0, 1.0]]]], "factors": [[0, -1]], "values": [1.0], "outputs": [0],
          "base": [1.0]}
    ProductSum.from_dict(ok)
    n = 65535
    huge = {"n_inputs": n, "literals": [[0.0, [[i, 1.0]]] for i in range(n)], "factors": [[i, -1] for i in range(n)],
            "values": [1.0] * n, "outputs": [0] * n, "base": [1.0]}
    # 4096 distinct products times 60000 outputs: a last Linear of 1.8 GiB
    many_outputs = {"n_inputs": 1, "literals": [[float(k), [[0, 1.0]]] for k in range(4096)],
                    "factors": [[k, -1] for k in range(4096)], "values": [1.0] * 4096,
                    "outputs": list(range(4096)), "base": [0.0] * 60000}
    for bad in ({**ok, "factors": [], "values": [], "outputs": []}, {**ok, "values": [10 ** 400]},
                {**ok, "literals": [[10 ** 400, [[0, 1.0]]]]}, {**ok, "base": [-(10 ** 309)]}):
        with pytest.raises(VeilError):
            ProductSum.from_dict(bad)
    for forged in (huge, many_outputs):
        with pytest.raises(VeilError):
            ProductSum.from_dict(forged).lower()


def test_sparse_lowering_matches_the_reference(model):
    m, X = model
    ps = m.program_
    Xe = m.encoding_.encode(X)
    np.testing.assert_allclose(ps.lower().evaluate(Xe), ps.evaluate(Xe), atol=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_product_sum_and_encoding_from_dict(model, data):
    m, _ = model
    _typed(ProductSum.from_dict, data.draw(JSON))
    _typed(ThermometerEncoding.from_dict, data.draw(JSON))
    _typed(lambda d: ProductSum.from_dict(d).lower(), _mutated(m.program_.to_dict(), data))
    _typed(ThermometerEncoding.from_dict, _mutated(m.encoding_.to_dict(), data))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_circuit_and_client_artefacts(model, data):
    m, _ = model
    server_doc = json.loads(json.dumps(m.circuit_.to_dict()))
    spec = json.loads(json.dumps(m.circuit_.client_spec()))
    _typed(ProductSumCircuit.from_dict, _mutated(server_doc, data))
    _typed(ProductSumClient, _mutated(spec, data))
    _typed(load_server, data.draw(JSON))
    _typed(load_client, data.draw(JSON))


def test_forged_requests_are_refused(model):
    m, X = model
    server = load_server(m.circuit_.to_dict())
    client = load_client(m.circuit_.client_spec())
    other = ml.RandomForestClassifier(n_estimators=2, max_depth=2, n_bits=2, random_state=1).fit(
        X, (X[:, 1] > 0).astype(int)).compile(X)
    stranger = load_client(other.circuit_.client_spec())
    for layout in ("batch", "row"):
        req = client.encrypt(X[:2], layout)
        bundle = client.public_bundle(layout)
        np.testing.assert_allclose(client.decrypt(server.run(req, bundle), 2), m._raw(X[:2], "disable"), atol=1e-3)
        other_layout = "row" if layout == "batch" else "batch"
        keys = client.keys(layout)
        scale = 2.0 ** client.plans[layout].scale_bits
        slots = client.plans[layout].params.slot_count
        cts = [keys.encrypt(np.zeros(slots), scale) for _ in range(3)]
        forged = [
            keys.context.pack(cts, {"layout": layout, "n_samples": 2, "n_features": 3}),  # wrong count
            keys.context.pack(cts[:1], {"layout": other_layout, "n_samples": 1, "n_features": 3}),  # wrong layout
            keys.context.pack([keys.encrypt(np.zeros(slots), scale * 2)] * (1 if layout == "row" else client.n_inputs),
                              {"layout": layout, "n_samples": 1, "n_features": 3}),  # wrong scale
            req[:-7], b"", req + b"\x00",
        ]
        for bad in forged:
            with pytest.raises(VeilError):
                server.run(bad, bundle)
        # another model's bundle for the same parameters is not detectable (evaluation keys carry
        # no owner): it only garbles the answer of the client who sent it, never raises a bare error
        _typed(server.run, req, stranger.public_bundle(layout))
        with pytest.raises(VeilError):  # a request without the rotation/relin keys
            server.run(req, client.public_bundle(other_layout))


def test_fixed_overflow_and_loose_types_in_artefact_numbers():
    """A JSON integer beyond a float made `math.isfinite` / numpy raise OverflowError (bare);
    numpy also parsed strings and booleans as edges."""
    from veil.program.planner import LayoutPlan

    for edges in ([[10 ** 400]], [["1.5"]], [[True]], [[1.0, "2"]]):
        with pytest.raises(VeilError):
            ThermometerEncoding.from_dict({"kind": "thermometer", "edges": edges})
    rng = np.random.default_rng(zlib.crc32(b"plan-overflow"))
    X = rng.normal(size=(60, 2))
    plan = ml.DecisionTreeRegressor(max_depth=2, random_state=0).fit(X, X[:, 0]).compile(X).circuit_.plans["batch"]
    doc = plan.to_dict()
    LayoutPlan.from_dict(doc)
    with pytest.raises(VeilError):
        LayoutPlan.from_dict({**doc, "input_bounds": [10 ** 400] * len(doc["input_bounds"])})


def _r4_products(scale: float, T: int = 8):
    """16 literals per term (R = 4 rounds: the deepest form), values of magnitude `scale`."""
    rng = np.random.default_rng(zlib.crc32(b"r4"))
    n = 16
    lits = [(0.0, ((i, 1.0),)) for i in range(n)] + [(1.0, ((i, -1.0),)) for i in range(n)]
    factors = np.array([[i if rng.random() < 0.5 else n + i for i in range(n)] for _ in range(T)])
    ps = ProductSum(n, lits, factors, rng.uniform(0.5, 1.0, size=T) * scale, np.zeros(T, dtype=np.int64),
                    np.array([0.0]), np.zeros(T, dtype=np.int64))  # one group: a tree's leaves
    X = (rng.random((64, n)) < 0.5).astype(float)
    Xq = np.array([[1.0 if f < n else 0.0 for f in row] for row in factors])  # each term's own input
    return ps, X, Xq


def test_deep_products_with_large_values_are_exact_or_refused():
    from veil.program.products import compile_product_sum

    ps, X, Xq = _r4_products(250.0, 256)
    circuit = compile_product_sum(ps, X, ThermometerEncoding([[0.5]] * ps.n_inputs))
    server, client = load_server(circuit.to_dict()), load_client(circuit.client_spec())
    plain = ps.evaluate(Xq)[:, 0]
    for layout, rows in (("batch", len(Xq)), ("row", 6)):  # the row layout: one ciphertext per sample
        request = client.encrypt(Xq[:rows], layout)
        out = client.decrypt(server.run(request, client.public_bundle(layout)), rows)[:, 0]
        np.testing.assert_allclose(out, plain[:rows], rtol=1e-3, err_msg=layout)


def test_compile_without_encoding_accepts_its_own_plan():
    from veil.program.products import compile_product_sum

    ps, X, _ = _r4_products(1.0)
    compile_product_sum(ps, X)


def test_forged_row_plan_with_a_huge_selection_is_refused_at_load():
    """Fixed: a forged artefact that passes the batch bound (lowering <= MAX_DENSE) with a row
    plan at N=16384 made `SlotCircuit._selection` build 2064 dense diagonals (0.13 GiB, at load,
    through `client_spec()`'s cost) and encode them (about 1 GiB) on the first request; a real one
    (n_inputs 4096 at N=32768) reaches tens of GiB."""
    from veil.he import CKKSParameters
    from veil.program.planner import LayoutPlan
    from veil.program.products import SlotGeometry, plan_product_sum

    n, T = 4096, 512
    lits = [(0.0, tuple(((t * 8 + j * 1031) % n, 1.0) for j in range(8))) for t in range(T)]
    ps = ProductSum(n, lits, np.array([[t, -1] for t in range(T)]), np.ones(T), np.zeros(T, dtype=np.int64),
                    np.zeros(1))
    params = CKKSParameters(16384, (60, 40, 40, 40, 60))
    geometry = SlotGeometry(ps, params.slot_count)
    assert geometry.n_diagonals(ps) > 2000
    forged = LayoutPlan("row", params, 40, (1.0,) * n, True, geometry.rotation_steps, n, False)
    with pytest.raises(VeilError, match="GiB"):
        ProductSumCircuit(ps, {"row": forged})
    X = (np.random.default_rng(zlib.crc32(b"huge-row")).random((4, n)) < 0.5).astype(float)
    planned = plan_product_sum(ps, X, layouts=("row",))  # the planner's own ring (N=8192) stays under the bound
    assert ProductSumCircuit(ps, planned).plans.keys() == {"row"}
