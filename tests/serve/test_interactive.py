"""Interactive networks (`compile_torch_model(..., nonlinear="client")`, kind `staged`) served end
to end: a small ReLU/MaxPool CNN on 8x8 digits and the issue's MNIST networks (LeNet-5 with ReLU and
MaxPool, a residual CNN with BatchNorm, ReLU and a concatenation, an MLP with GELU and Softmax:
`tests.ml.nets`) deployed to a live server on 127.0.0.1 and predicted through `veil.Client` (one
stateless request per stage, each naming its stage), the digits CNN also by Redis workers, agreeing
with plaintext torch; requests naming a stage that does not exist, no stage, a malformed stage or
another stage's shapes answer 4xx JSON errors, also through the queue; another principal cannot use
a client's stage keys; a served answer altered on its way back (forged or wrapped past the modulus)
is refused by the client."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import typing

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from tests.ml import nets
from tests.ml.datasets import train
from veil import ml
from veil.errors import PrecisionError
from veil.he import wire
from veil.program.kinds import descriptions, kinds
from veil.serve import Client
from veil.serve.auth import add_token_to_file
from veil.serve.client import RequestError
from veil.serve.crypto import ArtefactCipher
from veil.serve.schemas import ModelInfo
from veil.serve.server import ServerConfig

from .helpers import running_server
from .test_cluster import process, redis_server

pytestmark = pytest.mark.timeout(300)
N_QUERY = 40
NAME = "digits-cnn"
N_MNIST = 32  # MNIST test images per network and layout


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interactive")
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, 1, 8, 8)
    net = train(_cnn(), X[:1200], y[:1200], epochs=4)
    model = ml.compile_torch_model(net, X[:800], input_bounds=1.0, nonlinear="client")
    tokens = root / "tokens.json"
    names = {who: add_token_to_file(tokens, who, role)
             for who, role in (("admin", "admin"), ("alice", "client"), ("bob", "client"))}
    key_file = root / "model.key"
    key_file.write_text(ArtefactCipher.generate_key().hex())

    def config(**kw) -> ServerConfig:
        base = {"data_dir": str(root / "data"), "tokens_file": str(tokens), "model_key_file": str(key_file)}
        return ServerConfig(**dict(base, **kw))

    with torch.no_grad():
        logits = net(torch.tensor(X[1500:1500 + N_QUERY], dtype=torch.float32)).numpy()
    return {"root": root, "tokens": names, "config": config, "key": key_file.read_text(), "net": net,
            "model": model, "path": model.save(root / NAME), "X": X[1500:1500 + N_QUERY].reshape(N_QUERY, -1),
            "torch": logits}


@pytest.fixture(scope="module")
def mnist(setup):
    """Per MNIST network: its saved model, N_MNIST flattened test images and the plaintext
    network's outputs on them."""
    X = nets.data()[2][:N_MNIST]
    out = {}
    for name, build in nets.NETWORKS.items():
        net, model = build()
        out[name] = {"path": model.save(setup["root"] / name), "X": X.reshape(N_MNIST, -1),
                     "torch": nets.reference(net, X)}
    return out


@pytest.fixture(scope="module")
def server(setup, mnist):
    with running_server(setup["config"]()) as url:
        with Client(url, setup["tokens"]["admin"]) as admin:
            admin.deploy(setup["path"], NAME)
            for name, entry in mnist.items():
                admin.deploy(entry["path"], name)
        yield url


def _agrees(served: np.ndarray, logits: np.ndarray) -> None:
    """Served outputs are the plaintext torch network's (CKKS noise of ~1e-7 of the outputs per
    stage) and so are its classes."""
    np.testing.assert_allclose(served, logits, atol=1e-3 * float(np.abs(logits).max()))
    assert np.array_equal(served.argmax(1), logits.argmax(1))


def _edited(request: bytes, **fields: typing.Any) -> bytes:
    """The request with header fields replaced (None removes the field)."""
    msg = wire.decode(request)
    for key, value in fields.items():
        if value is None:
            msg.header.pop(key)
        else:
            msg.header[key] = value
    return msg.to_bytes()


def _refusals(url: str, setup: dict, name: str = NAME, X: np.ndarray | None = None,
              logits: np.ndarray | None = None) -> None:
    """Bad stage requests to model `name` (default: the digits CNN and its inputs) answer 4xx JSON
    errors and leave the server serving; bob cannot use alice's stage keys."""
    X, logits = (setup["X"], setup["torch"]) if X is None else (X, logits)
    with Client(url, setup["tokens"]["alice"], retries=0) as alice:
        version, mc = alice.model(name)
        circuit = mc.circuit
        session = circuit.session(X[:3], "row")
        first = session.request()
        key_id = alice.register(mc.public_bundle_bytes("row"))
        n_stages = len(circuit.stages)
        cases = [(_edited(first, stage=n_stages), 422, "stages 0 to"),  # no such stage
                 (_edited(first, stage=-1), 422, "stages 0 to"),
                 (_edited(first, stage=1), 422, ""),  # stage 0's inputs as stage 1 (out of order): its layout or shapes
                 (_edited(first, stage=None), 400, "names its stage"),
                 (_edited(first, stage="0"), 400, "names its stage"),
                 (_edited(first, stage=True), 400, "names its stage"),
                 (_edited(first, layout="batch"), 422, ""),  # the row request named as the batch layout
                 (first[:len(first) // 2], 400, "")]  # truncated
        for request, status, detail in cases:
            with pytest.raises(RequestError) as info:
                alice.send(name, version, key_id, request)
            assert info.value.status == status and detail in info.value.detail, (status, info.value)
        session.receive(alice.send(name, version, key_id, first))
        second = session.request()
        with pytest.raises(RequestError) as info:  # stage 1's inputs for stage 2
            alice.send(name, version, key_id, _edited(second, stage=2))
        assert info.value.status == 422
        with Client(url, setup["tokens"]["bob"], retries=0) as bob:
            with pytest.raises(RequestError) as info:
                bob.send(name, version, key_id, second)
            assert info.value.status == 404 and "unknown key id" in info.value.detail
        session.receive(alice.send(name, version, key_id, second))
        while (request := session.request()) is not None:
            session.receive(alice.send(name, version, key_id, request))
        _agrees(session.result(), logits[:3])
        with contextlib.suppress(RequestError):
            alice.delete_key(key_id)


def test_model_is_described_as_staged(setup, server):
    with Client(server, setup["tokens"]["alice"]) as client:
        detail = client._request("GET", f"/v1/models/{NAME}").json()
    circuit = setup["model"].circuit_
    assert detail["kind"] == "staged" and detail["depth"] == 0 and detail["layouts"] == ["batch", "row"]
    assert not detail["keys"]["batch"]["relin"] and not detail["keys"]["row"]["relin"]
    assert detail["keys"]["row"]["rotation_steps"] == sorted(circuit.evaluation_keys("row")[1])
    assert set(typing.get_args(ModelInfo.model_fields["kind"].annotation)) == set(kinds())


def test_published_kinds_come_from_the_registry(setup, server):
    """The OpenAPI schema's `ModelInfo.kind` lists the registered kinds and describes each with its
    registered description (nothing written twice by hand)."""
    with Client(server, setup["tokens"]["alice"]) as client:
        spec = client._request("GET", "/openapi.json").json()
    kind = spec["components"]["schemas"]["ModelInfo"]["properties"]["kind"]
    assert sorted(kind["enum"]) == sorted(kinds()) and "staged" in kind["enum"]
    for name, text in descriptions().items():
        assert text and f"{name}: {text}" in kind["description"]


@pytest.mark.parametrize("layout", ["batch", "row"])
def test_served_predictions_agree_with_plaintext_torch(setup, server, layout):
    with Client(server, setup["tokens"]["alice"]) as client:
        _agrees(client.predict_raw(setup["X"], NAME, layout=layout), setup["torch"])
        if layout == "row":
            _agrees(client.predict_json(setup["X"][:2], NAME, layout="row"), setup["torch"][:2])
            _agrees(client.predict_raw(setup["X"][:5], NAME), setup["torch"][:5])  # auto
        for key_id in list(client._key_ids.values()):
            client.delete_key(key_id)


def test_bad_stage_requests_get_4xx_and_keys_stay_their_owners(setup, server):
    _refusals(server, setup)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_workers_serve_interactive_models(setup, tmp_path):
    env = dict(os.environ, VEIL_MODEL_KEY=setup["key"])
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server(tmp_path / "redis"))
        front = stack.enter_context(running_server(setup["config"](queue=url, queue_timeout=60.0,
                                                                   data_dir=str(tmp_path / "data"))))
        stack.enter_context(process([sys.executable, "-m", "veil.serve.worker", "--queue", url,
                                     "--name", "w1", "--claim-idle", "1", "--data-dir", str(tmp_path / "w")],
                                    env, tmp_path / "w1.log"))
        with Client(front, setup["tokens"]["admin"]) as admin:
            admin.deploy(setup["path"], NAME)
        with Client(front, setup["tokens"]["alice"], retries=0) as client:
            for layout in ("batch", "row"):
                _agrees(client.predict_raw(setup["X"][:8], NAME, layout=layout), setup["torch"][:8])
            for key_id in list(client._key_ids.values()):
                client.delete_key(key_id)
        _refusals(front, setup)


@pytest.mark.parametrize("layout", ["batch", "row"])
@pytest.mark.parametrize("name", list(nets.NETWORKS))
def test_mnist_networks_served_agree_with_plaintext_torch(setup, mnist, server, name, layout):
    """LeNet-5 (ReLU, MaxPool), the residual BatchNorm CNN and the GELU MLP over HTTP: the outputs
    are the plaintext network's and at least 99.5% of the classes agree (here: all of them)."""
    entry = mnist[name]
    with Client(server, setup["tokens"]["alice"]) as client:
        served = client.predict_raw(entry["X"], name, layout=layout)
        for key_id in list(client._key_ids.values()):
            client.delete_key(key_id)
    assert served.shape == entry["torch"].shape
    assert nets.agreement(served, entry["torch"]) >= 0.995
    _agrees(served, entry["torch"])


@pytest.mark.parametrize("name", list(nets.NETWORKS))
def test_mnist_networks_refuse_bad_stage_requests(setup, mnist, server, name):
    _refusals(server, setup, name, mnist[name]["X"], mnist[name]["torch"])


@pytest.mark.parametrize("name", list(nets.NETWORKS))
def test_served_answers_altered_in_transit_are_refused_by_the_client(setup, mnist, server, name):
    """The server's real answer to stage 1, shifted by 100 or multiplied past the modulus before the
    client reads it, is refused after decryption: by the check of stage 1's answer against its
    planned bound, or (the GELU MLP, whose sound bound on that answer exceeds 100) by the check of
    the next stage's input against its range, before anything is encrypted again. Untouched
    answers decode to the plaintext network's outputs."""
    X = mnist[name]["X"][:2]
    with Client(server, setup["tokens"]["alice"], retries=0) as alice:
        version, mc = alice.model(name)
        send = alice._transport(name, version, mc)
        for tamper in (nets.shift, nets.wrap):
            def forged(request: bytes, layout: str, tamper=tamper) -> bytes:
                return nets.tampered(mc.circuit, send(request, layout), 1, tamper)

            with pytest.raises(PrecisionError, match=r"stage 1 answered|stage 2 input"):
                mc.circuit.infer(X, "row", forged)
        _agrees(mc.circuit.infer(X, "row", send), mnist[name]["torch"][:2])
        for key_id in list(alice._key_ids.values()):
            alice.delete_key(key_id)
