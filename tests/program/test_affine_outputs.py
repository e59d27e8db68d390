"""The affine client refuses a decrypted output beyond what the model's scales hold
(`LinearClient.check_outputs`, `affine.output_bound`): an answer computed under another client's
keys decrypts to values spread over the whole modulus and is refused, while every output of an
accepted input, up to the corners of the input limit, passes and agrees with plaintext."""

import numpy as np
import pytest

from veil.errors import PrecisionError
from veil.program import LinearCircuit, load_client
from veil.program.affine import output_bound


@pytest.fixture(scope="module")
def circuit() -> LinearCircuit:
    rng = np.random.default_rng(11)
    W, b = rng.normal(size=(10, 30)), rng.normal(size=10)
    return LinearCircuit.calibrate(W, b, rng.normal(size=(300, 30)))


def _layouts(circuit: LinearCircuit) -> list[str]:
    return sorted(circuit.scales)


def test_an_answer_under_another_clients_keys_is_refused(circuit):
    rng = np.random.default_rng(12)
    X = rng.normal(size=(40, 30))
    for layout in _layouts(circuit):
        alice, mallory = load_client(circuit.client_spec()), load_client(circuit.client_spec())
        response = circuit.run(alice.encrypt(X, layout), alice.public_bundle(layout))
        assert np.max(np.abs(alice.decrypt(response) - (X @ circuit.weights.T + circuit.bias))) < 1e-2
        mallory.keys(layout)  # keys of the same parameters, not alice's
        with pytest.raises(PrecisionError, match="not computed by this model under these keys"):
            mallory.decrypt(response)


def test_outputs_at_the_corners_of_the_input_limit_pass(circuit):
    """The largest outputs an accepted input can give: each row's weights' signs, scaled until the
    input limit's weighted magnitude is reached (or a value reaches its limit)."""
    for layout in _layouts(circuit):
        client = load_client(circuit.client_spec())
        lim = client.input_limits[layout]
        a = np.asarray(lim.magnitudes)
        c = min(lim.limit / float(a.sum()), lim.value_limit) * (1 - 1e-9)
        X = np.vstack([np.sign(circuit.weights) * c, -np.sign(circuit.weights) * c])
        Y = client.decrypt(circuit.run(client.encrypt(X, layout), client.public_bundle(layout)))
        ref = X @ circuit.weights.T + circuit.bias
        assert np.max(np.abs(Y - ref)) < 1e-2 * max(1.0, float(np.max(np.abs(ref))))
        s = circuit.scales[layout]
        assert np.max(np.abs(Y)) <= output_bound(s.params, s.input_bits, s.weight_bits, s.per_slot)


def test_a_specification_without_weight_bits_still_loads_unchecked(circuit):
    spec = circuit.client_spec()
    for entry in spec["scales"].values():
        del entry["weight_bits"]
    client = load_client(spec)
    assert all(bound is None for bound in client.output_bounds.values())
    X = np.random.default_rng(13).normal(size=(5, 30))
    layout = _layouts(circuit)[0]
    Y = client.decrypt(circuit.run(client.encrypt(X, layout), client.public_bundle(layout)))
    assert np.max(np.abs(Y - (X @ circuit.weights.T + circuit.bias))) < 1e-2


def test_a_weight_scale_beyond_the_modulus_is_refused(circuit):
    spec = circuit.client_spec()
    layout = _layouts(circuit)[0]
    spec["scales"][layout]["weight_bits"] = 10_000
    with pytest.raises(Exception, match="weight_bits"):
        load_client(spec)
