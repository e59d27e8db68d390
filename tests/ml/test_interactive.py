"""Interactive inference (`compile_torch_model(..., nonlinear="client")`) on MNIST-sized inputs:
LeNet-5 with ReLU and MaxPool, a residual CNN with BatchNorm, ReLU and a concatenation, and an MLP
with GELU, Dropout and Softmax agree with the plaintext network; the client refuses inputs and
intermediates outside their planned range before encrypting them, and forged or wrapped answers
after decrypting them; the server refuses requests for a stage that does not exist or with
another stage's shapes; the client specification holds no weight."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.ml import nets
from tests.ml.nets import agreement as _agreement
from tests.ml.nets import reference as _reference
from veil import ml
from veil.errors import PrecisionError, ShapeError, WireFormatError
from veil.he import wire

AGREEMENT = 0.995


@pytest.fixture(scope="module")
def data():
    return nets.data()


@pytest.fixture(scope="module")
def lenet(data):
    _, _, Xte, yte = data
    return (*nets.lenet5(), Xte, yte)


def test_lenet5_with_relu_and_maxpool_runs_unchanged(lenet):
    net, model, Xte, yte = lenet
    plain = model.forward(Xte[:300])
    np.testing.assert_allclose(plain, _reference(net, Xte[:300]), atol=1e-4)
    assert np.mean(plain.argmax(1) == yte[:300]) >= 0.8  # a trained network: its accuracy is the plaintext one
    enc = model.forward(Xte[:16], fhe="execute", layout="row")
    np.testing.assert_allclose(enc, plain[:16], atol=1e-4 * np.abs(plain).max())
    assert _agreement(enc, plain[:16]) >= AGREEMENT
    assert _agreement(model.forward(Xte[:300], fhe="simulate", layout="batch"), plain) >= AGREEMENT
    circuit = model.circuit_
    assert circuit.kind == "staged" and circuit.depth == 0 and len(circuit.stages) == 5  # conv, conv, 3 dense
    assert [s.op for s in circuit.graph.steps] == ["relu", "max_pool2d", "relu", "max_pool2d", "reshape", "relu",
                                                   "relu"]
    assert circuit.layouts["row"][:2] == ("gather", "gather")  # the convolutions gather their 5x5 windows
    spec = circuit.client_spec()
    assert '"weights"' not in json.dumps(spec)
    first = np.asarray(spec["stages"][0]["gather"])  # the public table is the kernel geometry: 25 taps everywhere
    assert first.shape == (6 * 24 * 24, 25) and np.all(first >= 0)


def test_residual_cnn_with_batchnorm_and_concatenation(data):
    _, _, Xte, _ = data
    net, model = nets.residual_cnn()
    steps = [s.op for s in model.circuit_.graph.steps]
    assert steps.count("cat") == 1 and steps.count("relu") == 3 and len(model.circuit_.stages) == 4
    assert model.circuit_.stages[2].n_features == 2 * 4 * 14 * 14  # the skip connection's input is sent again
    plain = model.forward(Xte[:200])
    np.testing.assert_allclose(plain, _reference(net, Xte[:200]), atol=1e-4)
    enc = model.forward(Xte[:12], fhe="execute", layout="row")
    np.testing.assert_allclose(enc, plain[:12], atol=1e-4 * np.abs(plain).max())
    assert _agreement(enc, plain[:12]) >= AGREEMENT
    assert _agreement(model.forward(Xte[:200], fhe="simulate", layout="row"), plain) >= AGREEMENT


def test_mlp_with_gelu_and_softmax_in_both_layouts(data):
    _, _, Xte, _ = data
    net, model = nets.gelu_mlp()
    assert [s.op for s in model.circuit_.graph.steps] == ["reshape", "gelu", "reshape", "gelu", "softmax"]
    plain = model.forward(Xte[:40])
    np.testing.assert_allclose(plain, _reference(net, Xte[:40]), atol=1e-5)
    for layout in ("batch", "row"):
        enc = model.forward(Xte[:40], fhe="execute", layout=layout)
        np.testing.assert_allclose(enc, plain, atol=1e-4)
        assert _agreement(enc, plain) >= AGREEMENT
    assert model.fhe_client.choose_layout(1) == "row" and model.fhe_client.choose_layout(4096) == "batch"


def test_inputs_and_intermediates_outside_their_range_are_refused_before_encrypting():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.zero_()
    X = np.random.default_rng(0).uniform(0.0, 0.1, size=(50, 4))
    model = ml.compile_torch_model(net, X, input_bounds=1.0, nonlinear="client")
    client, server = model.fhe_client, model.circuit_
    sent = []

    def send(request, layout):
        sent.append(wire.decode(request).header["stage"])
        return server.run(request, client.public_bundle(layout))

    np.testing.assert_allclose(client.infer(X[:3], "batch", send), _reference(net, X[:3]), atol=1e-4)
    sent.clear()
    with pytest.raises(PrecisionError, match="stage 0 input"):
        client.infer(np.full((1, 4), 1.5), "batch", send)  # beyond input_bounds
    assert sent == []
    with pytest.raises(PrecisionError, match="stage 1 input"):
        client.infer(np.full((1, 4), 1.0), "batch", send)  # accepted, but its ReLU output is 5x the calibration's
    assert sent == [0]


def _forging(server, client, stage, tamper):
    """A server that answers honestly, then alters the ciphertexts of its answer to `stage`."""
    def send(request, layout):
        return nets.tampered(server, server.run(request, client.public_bundle(layout)), stage, tamper)
    return send


def test_forged_or_wrapped_answers_are_detected(lenet):
    _, model, Xte, _ = lenet
    client, server = model.fhe_client, model.circuit_
    x = Xte[:2].reshape(2, -1)
    for tamper in (nets.shift, nets.wrap):
        with pytest.raises(PrecisionError, match="stage 1 answered"):
            client.infer(x, "row", _forging(server, client, 1, tamper))

    def renamed(request, layout):
        msg = wire.decode(server.run(request, client.public_bundle(layout)))
        msg.header["stage"] = 1 - msg.header["stage"] if msg.header["stage"] < 2 else msg.header["stage"]
        return msg.to_bytes()

    with pytest.raises(ShapeError, match="names stage 1"):
        client.infer(x, "row", renamed)


def test_server_refuses_missing_stages_and_other_stages_shapes(lenet):
    _, model, Xte, _ = lenet
    client, server = model.fhe_client, model.circuit_
    bundle = client.public_bundle("row")
    session = client.session(Xte[:1].reshape(1, -1), "row")
    first = session.request()

    def edited(request, **fields):
        msg = wire.decode(request)
        for key, value in fields.items():
            if value is None:
                msg.header.pop(key)
            else:
                msg.header[key] = value
        return msg.to_bytes()

    with pytest.raises(ShapeError, match="stages 0 to 4"):
        server.run(edited(first, stage=5), bundle)
    with pytest.raises(ShapeError, match="784 features"):
        server.run(edited(first, stage=1), bundle)  # stage 0's inputs sent to stage 1, out of order
    with pytest.raises(ShapeError):
        server.run(edited(first, layout="batch"), bundle)  # the row request's ciphertexts named as batch
    for bad in (None, "1", True, 1.0, [0]):
        with pytest.raises(WireFormatError, match="names its stage"):
            server.run(edited(first, stage=bad), bundle)
    with pytest.raises(ShapeError, match="not been received"):
        session.request()
    session.receive(server.run(first, bundle))
    with pytest.raises(ShapeError, match="no stage request"):
        session.receive(server.run(first, bundle))
    second = session.request()
    with pytest.raises(ShapeError):
        server.run(edited(second, stage=2), bundle)  # stage 1's inputs for stage 2
    session.receive(server.run(second, bundle))
    while (request := session.request()) is not None:
        session.receive(server.run(request, bundle))
    np.testing.assert_allclose(session.result(), model.forward(Xte[:1]), atol=1e-3)


class Functional(nn.Module):
    """Functional forms, shape arithmetic, PReLU and LayerNorm (their weights stay on the server)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.prelu = nn.PReLU(3)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(self.prelu(self.conv(x)), 3)
        x = x.view(x.size(0), -1)
        return torch.softmax(self.fc(torch.tanh(self.norm(x))) * 2.0, dim=1)


def test_functional_forms_prelu_and_layer_norm():
    torch.manual_seed(0)
    net = Functional()
    with torch.no_grad():
        net.prelu.weight.copy_(torch.tensor([0.1, -0.3, 0.7]))
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    net.eval()
    X = np.random.default_rng(0).uniform(size=(40, 1, 8, 8))
    model = ml.compile_torch_model(net, X, nonlinear="client")
    steps = [(s.op, s.params) for s in model.circuit_.graph.steps]
    assert ("clamp", {"max": 0.0}) in steps and ("layer_norm", {"normalized_shape": [12], "eps": 1e-5}) in steps
    assert '"weights"' not in json.dumps(model.circuit_.client_spec())
    public = json.dumps(model.circuit_.graph.to_dict())
    assert "0.7" not in public and "-0.3" not in public  # the PReLU slopes are in no client step
    ref = _reference(net, X[:10])
    np.testing.assert_allclose(model.forward(X[:10]), ref, atol=1e-6)
    np.testing.assert_allclose(model.forward(X[:10], fhe="execute", layout="row"), ref, atol=1e-4)
