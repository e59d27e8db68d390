"""Leveled programs under SEAL: decrypted results equal the plaintext program in both layouts,
simulation matches, keys are exactly what the plan needs, and bad requests are refused."""

import json
import zlib

import numpy as np
import pytest

from veil.errors import KeyMaterialError, PrecisionError, ShapeError, WireFormatError
from veil.he import SecretKeys, wire
from veil.program import LeveledCircuit, LeveledClient, Linear, Poly, Program, load_client, load_server, plan


def _program(rng, sizes=(6, 5, 3), acts=((0.1, 0.5, 0.3),)):
    ops, width = [], sizes[0]
    for i, out in enumerate(sizes[1:]):
        ops.append(Linear(rng.normal(size=(out, width)) / np.sqrt(width), rng.normal(size=out) * 0.1))
        if i < len(acts):
            ops.append(Poly(acts[i]))
        width = out
    return Program(sizes[0], ops)


def _compiled(prog, X, **kw):
    stages, plans = plan(prog, X, **kw)
    server = LeveledCircuit(stages, prog.n_inputs, plans)
    server = load_server(json.loads(json.dumps(server.to_dict())))
    client = load_client(json.loads(json.dumps(server.client_spec())))
    return server, client


CASES = {
    "mlp-square": ((6, 5, 3), ((0.0, 0.0, 1.0),)),
    "mlp-quadratic": ((6, 5, 3), ((0.1, 0.5, 0.3),)),
    "negative-leading": ((6, 4, 2), ((0.2, 1.0, -0.4),)),
    "two-hidden": ((6, 5, 4, 2), ((0.0, 0.0, 1.0), (0.1, 0.5, 0.2))),
    "ends-in-square": ((4, 3), ((0.0, 1.0, 1.0),)),
    "affine-activation": ((5, 4, 2), ((0.5, 2.0),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["batch", "row"])
def test_execute_equals_plaintext(case, layout):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    sizes, acts = CASES[case]
    prog = _program(rng, sizes, acts)
    X = rng.normal(size=(40, sizes[0]))
    server, client = _compiled(prog, X)
    n = 40 if layout == "batch" else 5
    out = client.decrypt(server.run(client.encrypt(X[:n], layout), client.public_bundle(layout)))
    ref = prog.evaluate(X[:n])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    sim = server.simulate(X[:n], layout, rng=np.random.default_rng(0))
    np.testing.assert_allclose(sim, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_row_layout_packs_several_samples_per_ciphertext():
    rng = np.random.default_rng(3)
    prog = _program(rng)
    X = rng.normal(size=(300, 6))
    server, client = _compiled(prog, X)
    packing = client.layout("row")
    assert packing.samples_per_ct > 1 and packing.n_input_cts(300) > 1
    out = client.decrypt(server.run(client.encrypt(X, "row"), client.public_bundle("row")))
    np.testing.assert_allclose(out, prog.evaluate(X), atol=1e-5)


def test_keys_are_exactly_what_the_plan_needs():
    rng = np.random.default_rng(4)
    one_square = _program(rng)
    _, client = _compiled(one_square, rng.normal(size=(10, 6)))
    batch = client.public_bundle("batch")
    assert batch.relin_keys is None and batch.galois_keys is None, "one square, batch layout: no keys"
    row = client.public_bundle("row")
    assert row.relin_keys is not None and set(row.rotation_steps) == set(client.plans["row"].rotation_steps)
    two = _program(rng, (6, 5, 4, 2), ((0.0, 0.0, 1.0), (0.0, 0.0, 1.0)))
    _, client2 = _compiled(two, rng.normal(size=(10, 6)))
    assert client2.public_bundle("batch").relin_keys is not None, "a square feeding a square is relinearized"


def test_planner_picks_rings_and_refuses_what_does_not_fit():
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, size=(10, 6))
    _, plans = plan(_program(rng), X)
    assert plans["batch"].params.poly_modulus_degree == 8192
    def contracting(n_squares):
        ops = []
        for _ in range(n_squares):
            ops += [Linear(np.eye(6), np.zeros(6)), Poly((0.0, 0.0, 1.0))]
        return Program(6, [*ops, Linear(np.ones((1, 6)), np.zeros(1))])

    deep = contracting(4)
    stages, deep_plans = plan(deep, X)
    assert len(stages) == 9 and deep_plans["batch"].params.poly_modulus_degree > 8192
    assert deep_plans["batch"].scale_bits >= 36
    server, client = _compiled(deep, X)
    out = client.decrypt(server.run(client.encrypt(X[:5], "batch"), client.public_bundle("batch")))
    np.testing.assert_allclose(out, deep.evaluate(X[:5]), atol=1e-5)
    with pytest.raises(PrecisionError, match="largest"):
        plan(contracting(28), X)
    with pytest.raises(PrecisionError, match="largest"):
        plan(contracting(28), X * 0.4, input_bounds=0.5)  # 28 squares: depth 57, no ring holds it


def test_inputs_outside_the_planned_box_are_refused():
    rng = np.random.default_rng(6)
    prog = _program(rng)
    X = rng.uniform(-1, 1, size=(50, 6))
    _, client = _compiled(prog, X)
    bad = X[:3].copy()
    bad[2, 1] = 10.0
    with pytest.raises(PrecisionError, match="sample 2, feature 1"):
        client.encrypt(bad, "batch")
    _, bounded = _compiled(prog, X, input_bounds=20.0)
    bounded.encrypt(bad, "batch")


@pytest.fixture(scope="module")
def compiled():
    rng = np.random.default_rng(7)
    prog = _program(rng)
    X = rng.normal(size=(20, 6))
    server, client = _compiled(prog, X)
    return server, client, X


def test_wrong_keys_and_requests_are_refused(compiled):
    server, client, X = compiled
    request = client.encrypt(X[:4], "row")
    bare = SecretKeys.generate(client.plans["row"].params).public_bundle()
    with pytest.raises(KeyMaterialError):
        server.run(request, bare)
    with pytest.raises(ShapeError):
        server.run(request, client.public_bundle("batch"))
    msg = wire.decode(request)
    for header in ({"n_samples": 10**6}, {"n_features": 5}, {"n_samples": True}, {"layout": "diag"},
                   {"layout": ["row"]}):
        forged = wire.Message(msg.kind, dict(msg.header, **header), msg.blobs).to_bytes()
        with pytest.raises((ShapeError, WireFormatError)):
            server.run(forged, client.public_bundle("row"))
    rescaled = client.keys("row").encrypt(np.zeros(client.params["row"].slot_count), 2.0**30)
    forged = client.keys("row").context.pack([rescaled], dict(msg.header, n_samples=1))
    with pytest.raises(ShapeError, match="scale"):
        server.run(forged, client.public_bundle("row"))


def test_malformed_artefacts_are_refused(compiled):
    server, _client, _ = compiled
    d = server.to_dict()
    spec = server.client_spec()
    bad_plans = [
        {"batch": dict(d["plans"]["batch"], scale_bits=10)},
        {"batch": dict(d["plans"]["batch"], input_bounds=[1.0])},
        {"batch": dict(d["plans"]["batch"], input_bounds="x")},
        {"batch": dict(d["plans"]["batch"], relin="yes")},
        {"batch": dict(d["plans"]["batch"], params={"poly_modulus_degree": 1024, "coeff_modulus_bits": [60] * 9})},
        {"batch": dict(d["plans"]["batch"], layout="row")},
        {"row": dict(d["plans"]["row"], rotation_steps=[0])},
        {},
    ]
    for plans in bad_plans:
        with pytest.raises((WireFormatError, ShapeError, ValueError)):
            load_server(dict(d, plans=plans))
        with pytest.raises((WireFormatError, ShapeError, ValueError)):
            LeveledClient(dict(spec, plans=plans))
    with pytest.raises(WireFormatError):
        load_server(dict(d, kind="tree"))
    with pytest.raises(WireFormatError):
        load_client([spec])


def test_batch_layout_relinearizes_after_the_linear_and_needs_a_smaller_special_prime():
    """Two squares (the second deferred, like the first, to the Linear after it): the batch
    layout relinearizes the Linear's outputs once, at product scale, so its special prime is the
    scale's size; the row layout rotates at scale 2^s and keeps one as large as the first prime.
    The answer matches the plaintext program and is relinearized (2 components) exactly when the
    plan relinearizes the last square."""
    rng = np.random.default_rng(11)
    prog = _program(rng, (6, 8, 5, 3), ((0.0, 0.0, 1.0), (0.1, 0.3, -0.5)))
    X = rng.normal(size=(60, 6))
    server, client = _compiled(prog, X)
    batch, row = server.plans["batch"], server.plans["row"]
    assert batch.params.coeff_modulus_bits[-1] == batch.scale_bits < batch.params.coeff_modulus_bits[0]
    assert row.params.coeff_modulus_bits[-1] == max(row.params.coeff_modulus_bits[0], row.scale_bits)
    assert [i for i in range(len(server.stages)) if server.deferred(i)] == [1, 3]
    response = server.run(client.encrypt(X, "batch"), client.public_bundle("batch"))
    _, cts = client.keys("batch").context.unpack(response, max_size=3)
    assert {ct.size() for ct in cts} == {2 if batch.relin_last else 3}
    ref = prog.evaluate(X)
    np.testing.assert_allclose(client.decrypt(response), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
