"""Bounds of deep programs: sound plans hold outputs beyond one prime in several output primes and
decrypt right for every accepted input; calibrated plans are sized by the calibration data and
refuse (PrecisionError) any output that leaves its range, wrapped or not; plans record their
bounds and a server refuses one whose output bound is below the sound one."""

import json
import math

import numpy as np
import pytest

from veil.errors import PrecisionError, ShapeError, WireFormatError
from veil.he import wire
from veil.program import Linear, Poly, Program, compile_program, load_client, load_server, plan
from veil.program.planner import DETECTION_BITS, MAX_PRIME_BITS, MIN_SCALE_BITS, output_primes, output_value_bits


def _deep(seed=7):
    """Four squares (depth 9, as LeNet-5 after normalisation) on 6 features, each linear layer
    scaled so that its values on the calibration data X reach 2 (as a trained network's do)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-0.5, 0.5, size=(200, 6))
    ops, h = [], X
    for width in (6, 6, 6, 6, 2):
        W, b = rng.normal(size=(width, h.shape[1])), rng.normal(size=width) * 0.1
        k = 2.0 / np.abs(h @ W.T + b).max()
        ops.append(Linear(W * k, b * k))
        h = ops[-1](h)
        if width == 6:
            ops.append(Poly((0.0, 0.0, 1.0)))
            h = h * h
    return Program(6, ops), X


def _pair(prog, X, **kw):
    circuit = compile_program(prog, X, input_bounds=1.0, **kw)
    server = load_server(json.loads(json.dumps(circuit.to_dict())))
    return server, load_client(json.loads(json.dumps(server.client_spec())))


def _run(server, client, X):
    return client.decrypt(server.run(client.encrypt(X, "batch"), client.public_bundle("batch")), len(X))


def _output_room(p):
    """Largest |output| the output level holds at the plan's scale (its primes are below 2^bits)."""
    bottom = output_primes(p.scale_bits, output_value_bits(p.output_bound, p.bounds))
    return 2.0 ** (sum(bottom) - 1 - p.scale_bits)


@pytest.fixture(scope="module")
def deep():
    prog, X = _deep()
    rng = np.random.default_rng(1)
    like = rng.uniform(-0.5, 0.5, size=(4, 6))  # like the calibration data
    edges = rng.choice([-1.0, 1.0], size=(4000, 6))  # accepted (|x| <= 1), unlike the calibration data
    edge = edges[np.argmax(np.abs(prog.evaluate(edges)).max(axis=1))][None]
    return prog, X, like, edge


def test_sound_plans_hold_outputs_beyond_one_prime_and_decrypt_every_accepted_input(deep):
    prog, X, like, edge = deep
    server, client = _pair(prog, X)
    p = client.plans["batch"]
    # (no ring meets the planner's error target under the sound bounds' worst case, so it takes the
    # most precise candidate: the issue asks for such programs to compile up to N=32768)
    assert p.bounds == "sound" and p.params.poly_modulus_degree <= 32768
    # no single prime holds the sound bound next to even the smallest scale: main refused this program
    assert math.log2(p.output_bound) + MIN_SCALE_BITS + 2 > MAX_PRIME_BITS
    assert len(p.params.coeff_modulus_bits) > len(server.stages) + 2, "the output level keeps several primes"
    assert p.output_bound >= np.abs(prog.evaluate(edge)).max()
    Xs = np.vstack([like, edge])
    ref = prog.evaluate(Xs)
    out = _run(server, client, Xs)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref[:len(like)]).max())


def test_calibrated_plans_refuse_outputs_that_leave_their_range(deep):
    prog, X, like, edge = deep
    server, client = _pair(prog, X, bounds="calibrated", headroom=4.0)
    p = client.plans["batch"]
    sound = load_client(json.loads(json.dumps(_pair(prog, X)[0].client_spec()))).plans["batch"]
    assert p.bounds == "calibrated" and p.output_bound < 4.01 * np.abs(prog.evaluate(X)).max()
    assert len(p.params.coeff_modulus_bits) < len(sound.params.coeff_modulus_bits), "fewer primes than sound"
    ref = prog.evaluate(like)
    np.testing.assert_allclose(_run(server, client, like), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # an accepted input whose output wraps around the output modulus (in every slot, so that the
    # polynomial's coefficients exceed it too): decrypted alone it is wrong, the client refuses it
    true = prog.evaluate(edge)
    assert np.abs(true).max() > _output_room(p), "the edge input must wrap around"
    full = np.repeat(edge, p.params.slot_count, axis=0)
    response = server.run(client.encrypt(full, "batch"), client.public_bundle("batch"))
    keys = client.keys("batch")
    _, cts = keys.context.unpack(wire.decode(response, wire.Kind.CIPHERTEXTS), max_size=3)
    wrapped = np.array([keys.decrypt(ct)[0] for ct in cts])
    assert np.any(np.abs(wrapped - true[0]) > _output_room(p)), "without the check: a silent wrong answer"
    with pytest.raises(PrecisionError, match="outside the range the model was compiled for") as err:
        client.decrypt(response, len(full))
    assert "calibrated" in str(err.value)
    # an output beyond the range that did not wrap is refused too; with it, the whole request
    mid = edge * 0.6
    assert 1.01 * p.output_bound < np.abs(prog.evaluate(mid)).max() < _output_room(p)
    with pytest.raises(PrecisionError, match="sample 1"):
        _run(server, client, np.vstack([like[:1], mid]))


def test_plans_record_their_bounds_and_forged_ones_are_refused(deep):
    prog, X, _, _ = deep
    server, client = _pair(prog, X)
    d = server.to_dict()
    batch = d["plans"]["batch"]
    assert batch["bounds"] == "sound" and batch["output_bound"] == client.plans["batch"].output_bound
    for forged in (dict(batch, output_bound=batch["output_bound"] / 1e3), dict(batch, bounds="guess"),
                   dict(batch, output_bound=-1.0), dict(batch, output_bound=True)):
        with pytest.raises(WireFormatError):
            load_server(dict(d, plans={"batch": forged}))
    # a calibrated plan's output level must hold its range and the detection margin
    cal = compile_program(prog, X, input_bounds=1.0, bounds="calibrated").to_dict()
    cal_batch = cal["plans"]["batch"]
    with pytest.raises(WireFormatError):
        load_server(dict(cal, plans={"batch": dict(cal_batch, output_bound=cal_batch["output_bound"] * 2.0**30)}))
    # a plan written before output bounds were recorded gets the sound one from the server
    legacy = {k: v for k, v in batch.items() if k not in ("bounds", "output_bound")}
    loaded = load_server(dict(d, plans={"batch": legacy}))
    assert loaded.plans["batch"].output_bound == pytest.approx(server.plans["batch"].output_bound)
    spec = loaded.client_spec()
    assert spec["plans"]["batch"]["output_bound"] == loaded.plans["batch"].output_bound


def test_what_no_ring_holds_names_the_calibrated_option():
    rng = np.random.default_rng(3)
    ops = []
    for _ in range(7):
        ops += [Linear(rng.normal(size=(6, 6)), rng.normal(size=6)), Poly((0.0, 0.0, 1.0))]
    prog = Program(6, [*ops, Linear(rng.normal(size=(1, 6)), np.zeros(1))])
    X = rng.uniform(-0.1, 0.1, size=(50, 6))
    with pytest.raises(PrecisionError, match='bounds="calibrated"'):
        plan(prog, X, input_bounds=1.0)
    _, plans = plan(prog, X, input_bounds=1.0, bounds="calibrated", layouts=("batch",))
    assert plans["batch"].params.poly_modulus_degree <= 32768
    with pytest.raises(ShapeError, match="bounds"):
        compile_program(prog, X, bounds="tight")
    with pytest.raises(ShapeError, match="headroom"):
        plan(prog, X, bounds="calibrated", headroom=0.5)


def test_output_primes_hold_the_value_with_the_fewest_primes():
    for s in (26, 32, 40):
        for bits in (1, 10, 30, 60, 120):
            primes = output_primes(s, bits)
            assert sum(primes) >= s + bits + 2 and all(p <= MAX_PRIME_BITS for p in primes)
            assert primes[0] >= s + 3 and all(p == s for p in primes[1:])
            assert len(primes) == 1 or MAX_PRIME_BITS + (len(primes) - 2) * s < s + bits + 2, "no spare prime"
    assert output_value_bits(1000.0, "calibrated") == 10 + DETECTION_BITS
