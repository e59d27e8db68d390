"""Adversarial inputs to the program layer: forged requests, responses and artefacts must raise
typed veil errors (never a bare exception, a crash per request or a silently wrong answer)."""

import contextlib
import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.errors import KeyMaterialError, ShapeError, VeilError, WireFormatError
from veil.he import PublicBundle, SecretKeys, wire
from veil.program import LeveledCircuit, Linear, LinearCircuit, Poly, Program, load_client, load_server, plan
from veil.program.artefact import ModelClient, ModelServer


@pytest.fixture(scope="module")
def leveled():
    rng = np.random.default_rng(7)
    prog = Program(6, [Linear(rng.normal(size=(5, 6)) / 2.4, rng.normal(size=5) * 0.1), Poly((0.0, 0.0, 1.0)),
                       Linear(rng.normal(size=(3, 5)) / 2.2, rng.normal(size=3) * 0.1)])
    X = rng.normal(size=(20, 6))
    stages, plans = plan(prog, X)
    server = LeveledCircuit(stages, 6, plans)
    client = load_client(server.client_spec())
    request = client.encrypt(X[:3], "batch")
    response = server.run(request, client.public_bundle("batch"))
    return server, client, request, response


@pytest.fixture(scope="module")
def affine():
    rng = np.random.default_rng(1)
    W, b, X = rng.normal(size=(3, 5)), rng.normal(size=3), rng.normal(size=(50, 5))
    server = LinearCircuit.calibrate(W, b, X)
    client = load_client(server.client_spec())
    request = client.encrypt(X[:3], "batch")
    response = server.run(request, client.public_bundle("batch"))
    return server, client, request, response


def _with_header(blob: bytes, **header: object) -> bytes:
    msg = wire.decode(blob)
    return wire.Message(msg.kind, dict(msg.header, **header), msg.blobs).to_bytes()


@pytest.mark.parametrize("kind", ["leveled", "affine"])
def test_huge_sample_counts_are_shape_errors_not_overflows(kind, request):
    server, client, req, resp = request.getfixturevalue(kind)
    with pytest.raises(ShapeError):
        server.run(_with_header(req, n_samples=10**400), client.public_bundle("batch"))
    with pytest.raises(ShapeError):
        client.decrypt(_with_header(resp, n_samples=10**400))


@pytest.mark.parametrize("kind", ["leveled", "affine"])
def test_response_for_another_number_of_rows_is_refused(kind, request):
    _server, client, _req, resp = request.getfixturevalue(kind)
    assert client.decrypt(resp, 3).shape == (3, client.n_outputs)
    with pytest.raises(ShapeError, match="request held 3"):
        client.decrypt(_with_header(resp, n_samples=100), 3)


def test_leveled_scale_that_does_not_match_the_primes_is_refused_at_load(leveled):
    server, _client, _req, _resp = leveled
    d, spec = server.to_dict(), server.client_spec()
    for bits in (26, 60):
        plans = {"batch": dict(d["plans"]["batch"], scale_bits=bits)}
        with pytest.raises(WireFormatError):
            load_server(dict(d, plans=plans))
        with pytest.raises(WireFormatError):
            load_client(dict(spec, plans=plans, cost_ms={"batch": 1.0}))


def test_leveled_input_bounds_beyond_the_first_prime_are_refused_at_load(leveled):
    """Bounds of 1e6 were accepted: the client encrypted x = 1e5 and the server answered a
    wrapped-around value (5.5e4 for -2e10)."""
    server, _client, _req, _resp = leveled
    d = server.to_dict()
    for bound in (1e6, 1e300):
        plans = {"batch": dict(d["plans"]["batch"], input_bounds=[bound] * 6)}
        with pytest.raises(WireFormatError):
            load_server(dict(d, plans=plans))


def test_leveled_row_blocks_must_be_powers_of_two_on_the_client(leveled):
    server, _client, _req, _resp = leveled
    spec = server.client_spec()
    for half in (6, 7):
        plans = {"row": dict(spec["plans"]["row"], half=half)}
        with pytest.raises(WireFormatError):
            load_client(dict(spec, plans=plans, cost_ms={"row": 1.0}))
    plans = {"batch": dict(spec["plans"]["batch"], half=4)}
    with pytest.raises(WireFormatError):
        load_client(dict(spec, plans=plans, cost_ms={"batch": 1.0}))


def _mutated(d: dict, path: tuple, value: object) -> dict:
    d = copy.deepcopy(d)
    node = d
    for key in path[:-1]:
        node = node[key]
    if value is _DROP:
        node.pop(path[-1])
    else:
        node[path[-1]] = value
    return d


_DROP = object()
AFFINE_SERVER_BREAKS = {
    "no scales": (("scales",), _DROP),
    "string weights": (("weights",), "abc"),
    "ragged weights": (("weights",), [[1.0, 2.0], [3.0]]),
    "scales list": (("scales", "batch"), []),
    "NaN limit": (("scales", "batch", "input_limit", "limit"), float("nan")),
    "short magnitudes": (("scales", "batch", "input_limit", "magnitudes"), [1.0]),
    "two per slot in rows": (("scales", "row", "per_slot"), 2),
    "product scale beyond modulus": (("scales", "batch", "input_bits"), 120),
    "limit that wraps": (("scales", "batch", "input_limit", "limit"), 1e30),
    "value limit that wraps": (("scales", "batch", "input_limit", "value_limit"), 1e30),
    "magnitudes below the weights": (("scales", "batch", "input_limit", "magnitudes"), [1e-3] * 5),
}


@pytest.mark.parametrize("case", sorted(AFFINE_SERVER_BREAKS))
def test_forged_affine_server_artefacts_are_refused_at_load(affine, case):
    """Each of these loaded (or raised KeyError/TypeError/ValueError); a NaN or huge limit let
    the client encrypt inputs whose outputs wrapped around, two samples per slot in the row layout
    decrypted as zeros, and a 2^120 input scale failed on every request."""
    server, _client, _req, _resp = affine
    path, value = AFFINE_SERVER_BREAKS[case]
    with pytest.raises(VeilError):
        load_server(_mutated(server.to_dict(), path, value))


AFFINE_CLIENT_BREAKS = {
    "no n_features": (("n_features",), _DROP),
    "string n_features": (("n_features",), "x"),
    "fractional n_features": (("n_features",), 2.5),
    "scales list": (("scales",), []),
    "short magnitudes": (("scales", "batch", "input_limit", "magnitudes"), [1.0]),
    "NaN limit": (("scales", "batch", "input_limit", "limit"), float("nan")),
    "negative input bits": (("scales", "batch", "input_bits"), -5),
    "input scale beyond modulus": (("scales", "batch", "input_bits"), 1000),
    "no input limit": (("scales", "batch", "input_limit"), _DROP),
    "two per slot in rows": (("scales", "row", "per_slot"), 2),
}


@pytest.mark.parametrize("case", sorted(AFFINE_CLIENT_BREAKS))
def test_forged_affine_client_specs_are_refused_at_load(affine, case):
    server, _client, _req, _resp = affine
    path, value = AFFINE_CLIENT_BREAKS[case]
    with pytest.raises(VeilError):
        load_client(_mutated(server.client_spec(), path, value))


def _leaves(d: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(d, dict):
        return [p for k, v in d.items() for p in _leaves(v, (*prefix, k))] + [prefix]
    if isinstance(d, list) and len(d) <= 8 and not any(isinstance(v, list) for v in d):
        return [p for i, v in enumerate(d) for p in _leaves(v, (*prefix, i))] + [prefix]
    return [prefix]


_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@pytest.mark.parametrize("kind", ["leveled", "affine"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_artefact_loads_or_raises_a_veil_error(kind, request, data):
    server = request.getfixturevalue(kind)[0]
    for artefact, load in ((server.to_dict(), load_server), (server.client_spec(), load_client)):
        paths = [p for p in _leaves(artefact) if p]
        path = data.draw(st.sampled_from(paths))
        value = data.draw(_JSON | st.just(_DROP))
        with contextlib.suppress(VeilError):
            load(_mutated(artefact, path, value))


def test_model_artefacts_with_missing_parts_or_wrong_classes_are_refused(affine):
    server, _client, _req, _resp = affine
    spec = server.client_spec()
    output = {"task": "classifier", "classes": [0, 1, 2], "proba": "softmax"}
    assert ModelClient.from_dict({"circuit": spec, "output": output}).n_features == 5
    for bad in ({}, {"circuit": spec}, {"circuit": spec, "output": dict(output, colour=1)},
                {"circuit": spec, "output": dict(output, classes=[0, 1])},
                {"circuit": spec, "output": dict(output, classes="abc")}, []):
        with pytest.raises(VeilError):
            ModelClient.from_dict(bad)
    for bad in ({}, {"circuit": None}, []):
        with pytest.raises(VeilError):
            ModelServer.from_dict(bad)


@pytest.mark.parametrize("layout", ["batch", "row"])
def test_affine_request_below_the_top_level_is_refused(layout):
    """With a multi-level preset, mod-switched request ciphertexts reached SEAL and raised a bare
    ValueError (HTTP 500) instead of a typed error."""
    rng = np.random.default_rng(1)
    W, b, X = rng.normal(size=(3, 5)), rng.normal(size=3), rng.normal(size=(50, 5))
    server = LinearCircuit.calibrate(W, b, X, presets={layout: "depth1"})
    client = load_client(server.client_spec())
    ctx = client.keys(layout).context
    header, cts = ctx.unpack(client.encrypt(X[:3], layout))
    for ct in cts:
        ctx.evaluator.mod_switch_to_next_inplace(ct)
    forged = ctx.pack(cts, {k: v for k, v in header.items() if k != "params"})
    with pytest.raises(ShapeError, match="fresh"):
        server.run(forged, client.public_bundle(layout))


def test_program_with_scalar_polynomial_coefficients_is_refused(leveled):
    """Found by the mutation fuzz: `"coeffs": 1` raised a bare TypeError."""
    d = leveled[0].to_dict()
    with pytest.raises(WireFormatError):
        load_server(_mutated(d, ("program", "ops", 1, "coeffs"), 1))


def test_bundle_declaring_steps_its_galois_keys_do_not_cover_is_refused(leveled):
    """Keys for other steps (as many as the plan's) relabelled as the plan's steps were accepted;
    the row request then raised a bare ValueError ("Galois key not present") inside SEAL."""
    _server, client, _req, _resp = leveled
    plan_ = client.plans["row"]
    steps = [s for s in range(5, plan_.params.slot_count) if s not in plan_.rotation_steps][:len(plan_.rotation_steps)]
    other = SecretKeys.generate(plan_.params, rotation_steps=steps, relin=True)
    msg = wire.decode(other.public_bundle().to_bytes())
    forged = wire.Message(msg.kind, dict(msg.header, rotation_steps=list(plan_.rotation_steps)), msg.blobs)
    with pytest.raises(KeyMaterialError, match="holds no Galois keys"):
        PublicBundle.from_bytes(forged.to_bytes())
    assert PublicBundle.from_bytes(client.public_bundle("row").to_bytes()).rotation_steps == plan_.rotation_steps


@pytest.mark.parametrize("kind", ["leveled", "affine"])
def test_non_finite_inputs_are_typed_errors(kind, request):
    client = request.getfixturevalue(kind)[1]
    X = np.zeros((2, client.n_features))
    X[1, 0] = np.nan
    with pytest.raises(ShapeError):
        client.encrypt(X, "batch")


def test_programs_too_wide_for_server_memory_are_refused_at_load():
    """A 1 MB artefact must not make each batch request hold tens of GB of ciphertexts."""
    rng = np.random.default_rng(0)
    narrow = Program(4, [Linear(rng.normal(size=(8, 4)), np.zeros(8)), Poly((0.0, 0.0, 1.0)),
                         Linear(rng.normal(size=(1, 8)), np.zeros(1))])
    stages, plans = plan(narrow, rng.normal(size=(10, 4)), layouts=("batch",))
    wide = [Linear(np.ones((65536, 4)), np.zeros(65536)), stages[1], Linear(np.ones((1, 65536)), np.zeros(1))]
    with pytest.raises(ShapeError, match="GiB"):
        LeveledCircuit(wide, 4, plans)
    LeveledCircuit(stages, 4, plans)
