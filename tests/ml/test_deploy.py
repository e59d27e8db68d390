"""Client/server split: artefacts, key bundles, and typed errors on bad requests."""

import json
import pickle

import numpy as np
import pytest

from tests.ml.datasets import load
from veil import ml
from veil.errors import (
    KeyMaterialError,
    NotCompiledError,
    ParameterMismatchError,
    PrecisionError,
    ShapeError,
    WireFormatError,
)
from veil.he import PublicBundle, SecretKeys, wire
from veil.program import artefact


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    X, y = load("wine")
    model = ml.LogisticRegression(max_iter=1000).fit(X, y).compile(X)
    path = model.save(tmp_path_factory.mktemp("wine"))
    return model, path, X


def test_artefacts_hold_no_secrets_and_client_holds_no_weights(deployed):
    _, path, _ = deployed
    server = json.loads((path / artefact.SERVER_FILE).read_text())
    client = json.loads((path / artefact.CLIENT_FILE).read_text())
    assert "weights" in server["circuit"] and "weights" not in client["circuit"]
    client_text = json.dumps(client)
    assert not any(repr(float(w)) in client_text for w in server["circuit"]["weights"][0])
    for text in (json.dumps(server), json.dumps(client)):
        assert "secret" not in text.lower()


@pytest.mark.parametrize("layout", ["batch", "row", "auto"])
def test_client_server_roundtrip_equals_in_process(deployed, layout):
    model, path, X = deployed
    server = ml.ModelServer.load(path)
    client = ml.ModelClient.load(path)
    name, request = client.encrypt(X, layout)
    bundle = server.load_bundle(client.public_bundle_bytes(name))
    raw = client.decrypt(server.run(request, bundle))
    assert np.array_equal(client.predict(raw), model.predict(X))
    np.testing.assert_allclose(client.predict_proba(raw), model.predict_proba(X), atol=1e-3)


def test_auto_layout_picks_row_for_one_sample_and_batch_for_many(deployed):
    _, path, _ = deployed
    client = ml.ModelClient.load(path)
    assert client.choose_layout(1) == "row"
    assert client.choose_layout(5000) == "batch"


def test_batch_bundle_carries_no_galois_keys(deployed):
    _, path, _ = deployed
    client = ml.ModelClient.load(path)
    batch = PublicBundle.from_bytes(client.public_bundle_bytes("batch"))
    row = PublicBundle.from_bytes(client.public_bundle_bytes("row"))
    assert batch.galois_keys is None and batch.relin_keys is None
    assert row.rotation_steps == (1, 2, 4, 8) and row.relin_keys is None


def test_server_rejects_bad_requests(deployed):
    _, path, X = deployed
    server = ml.ModelServer.load(path)
    client = ml.ModelClient.load(path)
    _, request = client.encrypt(X[:5], "batch")
    bundle = server.load_bundle(client.public_bundle_bytes("batch"))
    row_bundle = server.load_bundle(client.public_bundle_bytes("row"))
    with pytest.raises(WireFormatError):
        server.run(b"garbage", bundle)
    with pytest.raises(WireFormatError):
        server.run(request[: len(request) // 2], bundle)
    msg = wire.decode(request)
    too_few = wire.Message(msg.kind, msg.header, msg.blobs[:-1]).to_bytes()
    with pytest.raises(ShapeError, match="ciphertexts"):
        server.run(too_few, bundle)
    wrong_features = wire.Message(msg.kind, dict(msg.header, n_features=3), msg.blobs).to_bytes()
    with pytest.raises(ShapeError, match="features"):
        server.run(wrong_features, bundle)
    bad_layout = wire.Message(msg.kind, dict(msg.header, layout="diagonal"), msg.blobs).to_bytes()
    with pytest.raises(ShapeError, match="layout"):
        server.run(bad_layout, bundle)
    with pytest.raises(ShapeError, match="key bundle"):
        server.run(request, row_bundle)
    with pytest.raises(KeyMaterialError):
        server.load_bundle(client.keys("batch").to_bytes())


def test_row_request_with_a_bundle_lacking_rotations(deployed):
    _, path, X = deployed
    server = ml.ModelServer.load(path)
    client = ml.ModelClient.load(path)
    _, request = client.encrypt(X[:1], "row")
    partial = SecretKeys.generate(client.keys("row").params, rotation_steps=[1, 2]).public_bundle()
    with pytest.raises(ShapeError, match="rotation steps"):
        server.run(request, partial)


def test_response_from_other_parameters_is_refused(deployed):
    _, path, X = deployed
    server = ml.ModelServer.load(path)
    client = ml.ModelClient.load(path)
    _, request = client.encrypt(X[:2], "batch")
    response = server.run(request, server.load_bundle(client.public_bundle_bytes("batch")))
    msg = wire.decode(response)
    forged = wire.Message(msg.kind, dict(msg.header, layout="row"), msg.blobs).to_bytes()
    client.keys("row")
    with pytest.raises(ParameterMismatchError):
        client.decrypt(forged)


def test_client_input_validation(deployed):
    _, path, X = deployed
    client = ml.ModelClient.load(path)
    with pytest.raises(ShapeError):
        client.encrypt(X[:, :3])
    with pytest.raises(ShapeError):
        client.encrypt(np.empty((0, X.shape[1])))
    with pytest.raises(ValueError, match="NaN"):
        client.encrypt(np.full((1, X.shape[1]), np.nan))
    with pytest.raises(PrecisionError, match="outside the range"):
        client.encrypt(X[:2] * 100)
    fresh = ml.ModelClient.load(path)
    _, request = client.encrypt(X[:2], "batch")
    server = ml.ModelServer.load(path)
    response = server.run(request, server.load_bundle(client.public_bundle_bytes("batch")))
    with pytest.raises(KeyMaterialError, match="no 'batch' keys"):
        fresh.decrypt(response)


def test_bad_artefacts(tmp_path):
    (tmp_path / "server.json").write_text("{not json")
    with pytest.raises(WireFormatError):
        ml.ModelServer.load(tmp_path)
    (tmp_path / "client.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(WireFormatError):
        ml.ModelClient.load(tmp_path)
    with pytest.raises(WireFormatError):
        ml.ModelServer.load(tmp_path / "missing")


def test_modes_and_compile_errors():
    X, y = load("iris")
    model = ml.LogisticRegression().fit(X, y)
    with pytest.raises(NotCompiledError):
        model.predict(X, fhe="execute")
    with pytest.raises(NotCompiledError):
        model.save("unused")
    with pytest.raises(ValueError, match="fhe must be"):
        model.predict(X, fhe="encrypt")
    with pytest.raises(ValueError):
        model.compile(X[:, :2])
    with pytest.raises(PrecisionError):
        model.compile(X, input_bounds=0.5)
    with pytest.raises(PrecisionError, match="outputs up to"):
        model.compile(X * 1e12)


def test_input_limits_accept_the_declared_range_and_unseen_pixels():
    X, y = load("digits", scaled=False)
    model = ml.LogisticRegression(max_iter=2000).fit(X, y).compile(X[:100], input_bounds=16.0)
    probe = np.full((1, 64), 16.0)
    assert np.array_equal(model.predict(probe, fhe="execute"), model.predict(probe))
    default = ml.LogisticRegression(max_iter=2000).fit(X, y).compile(X[:300])
    unseen = np.abs(X[300:]).max(axis=0) > 2 * np.abs(X[:300]).max(axis=0)
    assert unseen.any(), "some pixels exceed twice their calibration maximum"
    assert np.array_equal(default.predict(X[300:], fhe="execute"), default.predict(X[300:]))


def test_input_limit_guarantees_no_wrap_around():
    """Anything the client accepts decrypts correctly, even at the edge of the limit."""
    X, y = load("iris")
    model = ml.LogisticRegression().fit(X, y).compile(X)
    limit = model.circuit_.scales["batch"].input_limit
    a = np.asarray(limit.magnitudes)
    edge = np.sign(model.weights_[0]) * (limit.limit / a.sum()) * 0.999
    out = model.decision_function(edge[None, :], fhe="execute", layout="batch")
    np.testing.assert_allclose(out, model.decision_function(edge[None, :]), rtol=1e-3)
    with pytest.raises(PrecisionError):
        model.predict(edge[None, :] * 1.01, fhe="execute", layout="batch")


def test_simulate_reflects_precision_of_execute():
    X, y = load("diabetes")
    model = ml.Ridge().fit(X, y).compile(X)
    plain = model.predict(X)
    err_sim = np.max(np.abs(model.predict(X, fhe="simulate") - plain))
    err_exe = np.max(np.abs(model.predict(X, fhe="execute") - plain))
    assert 0 < err_sim < 1e-2 and 0 < err_exe < 1e-2
    assert 0.05 < err_sim / err_exe < 20


def test_pickle_and_clone_keep_the_compiled_model():
    import sklearn

    X, y = load("iris")
    model = ml.LogisticRegression().fit(X, y).compile(X)
    model.predict(X, fhe="execute")
    again = pickle.loads(pickle.dumps(model))
    assert np.array_equal(again.predict(X, fhe="execute"), model.predict(X))
    fresh = sklearn.clone(model)
    assert fresh.get_params() == model.get_params() and not hasattr(fresh, "circuit_")
