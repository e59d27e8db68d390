"""Concrete ML call compatibility: the code of Zama's Flower + FHE blog post runs with
only its import changed to veil.ml; MNIST is replaced by scikit-learn's digits (no internet)."""

from __future__ import annotations

import pickle

import numpy
import numpy as np
import pytest
from sklearn import neural_network
from sklearn.datasets import load_digits, load_wine
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import veil.ml
from veil.ml import LogisticRegression

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()  # stands in for fetch_openml("mnist_784") (no pandas, no network here)
    x_train, x_test, y_train, y_test = train_test_split(data.data, data.target.astype("int"), test_size=300,
                                                        random_state=0)
    return x_train, x_test, y_train, y_test


def test_seed_local_training_snippet(digits):
    x_train, x_test, y_train, y_test = digits
    model = LogisticRegression(penalty="l2", max_iter=2000)
    model.fit(X=x_train, y=y_train)
    model.compile(x_train)
    y_preds_clear = model.predict(x_test, fhe="execute")
    accuracy = accuracy_score(y_test, y_preds_clear)
    assert accuracy > 0.9
    assert np.array_equal(y_preds_clear, model.predict(x_test))


def test_seed_federated_model_conversion_snippet(digits, tmp_path):
    """A scikit-learn LogisticRegression trained by warm-started rounds over partitions (what the
    seed's Flower clients do), pickled, loaded and converted with Concrete ML's call."""
    x_train, x_test, y_train, y_test = digits
    model = SkLogisticRegression(penalty="l2", warm_start=True, max_iter=50)
    for part in np.array_split(np.arange(len(x_train)), 3):
        model.fit(x_train[part], y_train[part])
    path_to_model = tmp_path / "model.pkl"
    with open(path_to_model, "wb") as file:
        pickle.dump(model, file)

    with path_to_model.open("rb") as file:
        sklearn_model = pickle.load(file)
    compile_set = numpy.random.randint(0, 16, (100, 64)).astype(float)
    sklearn_model.classes_ = sklearn_model.classes_.astype(int)
    model = LogisticRegression.from_sklearn_model(sklearn_model, compile_set)
    model.compile(compile_set)
    y_preds_enc = model.predict(x_test, fhe="execute")
    assert accuracy_score(y_test, y_preds_enc) > 0.85
    assert np.array_equal(y_preds_enc, sklearn_model.predict(x_test))


def test_from_sklearn_model_with_x_compiles_and_ignores_quantization_bits():
    X, y = load_wine(return_X_y=True)
    sk = SkLogisticRegression(max_iter=5000).fit(X, y)
    model = LogisticRegression.from_sklearn_model(sk, X, n_bits=8, rounding_threshold_bits=6)
    assert hasattr(model, "circuit_")
    assert np.array_equal(model.predict(X[:20], fhe="execute"), sk.predict(X[:20]))
    assert not hasattr(LogisticRegression.from_sklearn_model(sk), "circuit_")
    assert hasattr(veil.ml.from_sklearn_model(sk, X=X, n_bits=8), "circuit_")


def test_pipeline_ending_in_a_veil_estimator_converts():
    X, y = load_wine(return_X_y=True)
    pipe = Pipeline([("scaler", StandardScaler()), ("lr", veil.ml.LogisticRegression(max_iter=1000))]).fit(X, y)
    model = veil.ml.from_sklearn_model(pipe).compile(X)
    assert isinstance(model, veil.ml.LogisticRegression)
    assert np.array_equal(model.predict(X, fhe="execute"), pipe.predict(X))
    np.testing.assert_allclose(model.predict_proba(X), pipe.predict_proba(X), atol=1e-9)
    same = veil.ml.LogisticRegression.from_sklearn_model(pipe)
    np.testing.assert_allclose(same.weights_, model.weights_)


def test_sklearn_mlp_is_refused_with_a_pointer_to_veil_mlp():
    X, y = load_wine(return_X_y=True)
    mlp = neural_network.MLPClassifier(hidden_layer_sizes=(4,), max_iter=20).fit(X, y)
    with pytest.raises(TypeError, match=r"veil\.ml\.MLPClassifier"):
        veil.ml.from_sklearn_model(mlp)
    reg = neural_network.MLPRegressor(hidden_layer_sizes=(4,), max_iter=20).fit(X, y.astype(float))
    with pytest.raises(TypeError, match=r"veil\.ml\.MLPRegressor"):
        veil.ml.from_sklearn_model(reg)
