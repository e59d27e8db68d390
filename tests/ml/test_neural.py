"""Encrypted MLPs: execute agrees with the plaintext polynomial network on every dataset, accuracy
is within 2 points of scikit-learn's ReLU MLP of the same size, and the API behaves as sklearn's."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.neural_network import MLPRegressor as SkMLPRegressor

from tests.ml.datasets import CLASSIFICATION, REGRESSION, load
from veil import ml
from veil.errors import NotCompiledError, PrecisionError

HIDDEN = (32,)
BOUNDS = {"digits": 16.0}  # pixel counts are 0..16 by construction


def _split(name):
    X, y = load(name)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y if name != "diabetes" else None)


@pytest.fixture(scope="module", params=CLASSIFICATION)
def classifier(request):
    name = request.param
    Xtr, Xte, ytr, yte = _split(name)
    model = ml.MLPClassifier(hidden_layer_sizes=HIDDEN, activation="square", learning_rate_init=0.01,
                             max_iter=150, random_state=0).fit(Xtr, ytr)
    model.compile(Xtr, input_bounds=BOUNDS.get(name))
    return name, model, Xtr, Xte, ytr, yte


def test_classifier_execute_agrees_and_accuracy_matches_scikit_learn(classifier):
    name, model, Xtr, Xte, ytr, yte = classifier
    plain = model.predict(Xte)
    enc = model.predict(Xte, fhe="execute")
    assert np.mean(enc == plain) >= 0.995
    raw_plain = model._raw(Xte, "disable")
    raw_enc = model._raw(Xte, "execute")
    np.testing.assert_allclose(raw_enc, raw_plain, atol=1e-4 * np.abs(raw_plain).max())
    sk = SkMLPClassifier(hidden_layer_sizes=HIDDEN, random_state=0, max_iter=2000).fit(Xtr, ytr)
    ours, theirs = np.mean(enc == yte), sk.score(Xte, yte)
    assert ours >= theirs - 0.02, f"{name}: encrypted {ours:.3f} vs scikit-learn ReLU {theirs:.3f}"
    proba = model.predict_proba(Xte[:20], fhe="execute")
    np.testing.assert_allclose(proba, model.predict_proba(Xte[:20]), atol=1e-4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_classifier_row_layout_and_simulation(classifier):
    _, model, _, Xte, _, _ = classifier
    one = Xte[:2]
    np.testing.assert_array_equal(model.predict(one, fhe="execute", layout="row"), model.predict(one))
    assert model.fhe_client.choose_layout(1) == "row"
    assert model.fhe_client.choose_layout(len(Xte) * 20) == "batch"
    sim = model._raw(Xte, "simulate")
    ref = model._raw(Xte, "disable")
    np.testing.assert_allclose(sim, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", REGRESSION)
@pytest.mark.parametrize("activation", ["square", "relu_poly"])
def test_regressor_execute_within_1e_3_relative(name, activation):
    Xtr, Xte, ytr, yte = _split(name)
    model = ml.MLPRegressor(hidden_layer_sizes=(16,), activation=activation, learning_rate_init=0.01,
                            max_iter=200, random_state=0).fit(Xtr, ytr)
    model.compile(Xtr)
    plain = model.predict(Xte)
    enc = model.predict(Xte, fhe="execute")
    assert enc.shape == plain.shape == yte.shape
    assert np.max(np.abs(enc - plain)) <= 1e-3 * np.max(np.abs(plain))
    sk = SkMLPRegressor(hidden_layer_sizes=(16,), random_state=0, max_iter=3000,
                        learning_rate_init=0.01).fit(Xtr, ytr)
    assert model.score(Xte, yte, fhe="execute") >= sk.score(Xte, yte) - 0.05


def test_two_hidden_layers_and_multi_output_regression():
    X, y = load("diabetes")
    Y = np.column_stack([y, -2 * y + 5])
    model = ml.MLPRegressor(hidden_layer_sizes=(12, 8), activation="relu_poly", learning_rate_init=0.01,
                            max_iter=100, random_state=0).fit(X, Y)
    model.compile(X)
    plain, enc = model.predict(X[:50]), model.predict(X[:50], fhe="execute")
    assert enc.shape == (50, 2)
    assert np.max(np.abs(enc - plain)) <= 1e-3 * np.max(np.abs(plain))


def test_sklearn_conventions_and_errors():
    X, y = load("iris")
    model = ml.MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, random_state=1)
    assert clone(model).get_params() == model.get_params()
    assert model.fit(X, y) is model and model.n_features_in_ == 4 and model.n_iter_ == 5
    with pytest.raises(NotCompiledError):
        model.predict(X, fhe="execute")
    with pytest.raises(ValueError, match="fhe"):
        model.predict(X, fhe="on")
    with pytest.raises(ValueError, match="activation"):
        ml.MLPClassifier(activation="relu").fit(X, y)
    model.compile(X)
    with pytest.raises(PrecisionError, match="outside the range"):
        model.predict(X * 10, fhe="execute")
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.predict(X[:5], fhe="execute"), model.predict(X[:5]))
    a = ml.MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, random_state=3).fit(X, y)
    b = ml.MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, random_state=3).fit(X, y)
    np.testing.assert_array_equal(a.program_.ops[0].weight, b.program_.ops[0].weight)


def test_saved_mlp_runs_through_model_server_and_client(tmp_path):
    X, y = load("wine")
    model = ml.MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0).fit(X, y).compile(X)
    model.save(tmp_path)
    server, client = ml.ModelServer.load(tmp_path), ml.ModelClient.load(tmp_path)
    for layout in ("batch", "row"):
        _, request = client.encrypt(X[:7], layout)
        bundle = server.load_bundle(client.public_bundle_bytes(layout))
        raw = client.decrypt(server.run(request, bundle))
        np.testing.assert_allclose(raw, model._raw(X[:7], "disable"), atol=1e-5)
        np.testing.assert_array_equal(client.predict(raw), model.predict(X[:7]))
    assert b"weight" not in (tmp_path / "client.json").read_bytes()


def test_large_inputs_run_chunked_over_worker_processes():
    X, y = load("iris")
    model = ml.MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0).fit(X, y).compile(X)
    rng = np.random.default_rng(0)
    big = X[rng.integers(0, len(X), size=20_000)] * rng.uniform(0.9, 1.1, size=(20_000, 4))
    raw = model._raw(big, "execute", "batch", workers=2)
    ref = model._raw(big, "disable")
    np.testing.assert_allclose(raw, ref, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(model.predict(big[:5000], fhe="execute", workers=1), model.predict(big[:5000]))
