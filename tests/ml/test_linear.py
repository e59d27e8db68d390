"""Encrypted execution agrees with plaintext scikit-learn for every estimator and dataset."""

import numpy as np
import pytest
import sklearn
from sklearn import linear_model, svm

from tests.ml.datasets import CLASSIFICATION, load
from veil import ml

CLASSIFIERS = {
    "LogisticRegression": lambda: ml.LogisticRegression(max_iter=1000),
    "LinearSVC": lambda: ml.LinearSVC(max_iter=5000),
    "SGDClassifier": lambda: ml.SGDClassifier(loss="log_loss", random_state=0),
}
REGRESSORS = {
    "LinearRegression": lambda: ml.LinearRegression(),
    "Ridge": lambda: ml.Ridge(alpha=1.0),
    "Lasso": lambda: ml.Lasso(alpha=0.1),
    "ElasticNet": lambda: ml.ElasticNet(alpha=0.01),
    "LinearSVR": lambda: ml.LinearSVR(C=10.0, max_iter=20000, random_state=0),
    "SGDRegressor": lambda: ml.SGDRegressor(random_state=0),
    "PoissonRegressor": lambda: ml.PoissonRegressor(alpha=0.01, max_iter=1000),
    "GammaRegressor": lambda: ml.GammaRegressor(alpha=0.01, max_iter=1000),
    "TweedieRegressor": lambda: ml.TweedieRegressor(power=1.5, alpha=0.01, max_iter=1000),
    "TweedieIdentity": lambda: ml.TweedieRegressor(power=0.0, alpha=0.01),
}
ROW_SAMPLES = 40


def _agreement(a, b):
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def _max_rel_error(pred, ref):
    return float(np.max(np.abs(pred - ref) / np.abs(ref)))


@pytest.mark.parametrize("dataset", CLASSIFICATION)
@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_execute_matches_plaintext(name, dataset):
    X, y = load(dataset)
    model = CLASSIFIERS[name]().fit(X, y).compile(X)
    sk = model.sklearn_model_
    plain = sk.predict(X)
    assert np.array_equal(model.predict(X, fhe="disable"), plain)
    enc = model.predict(X, fhe="execute", layout="batch")
    assert _agreement(enc, plain) >= 0.995
    row = model.predict(X[:ROW_SAMPLES], fhe="execute", layout="row")
    assert _agreement(row, plain[:ROW_SAMPLES]) >= 0.995
    sim = model.predict(X, fhe="simulate")
    assert _agreement(sim, plain) >= 0.995
    dec = model.decision_function(X[:ROW_SAMPLES], fhe="execute")
    ref = sk.decision_function(X[:ROW_SAMPLES])
    np.testing.assert_allclose(dec, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert model.score(X, y, fhe="execute") == pytest.approx(sk.score(X, y), abs=0.005)


@pytest.mark.parametrize("name", sorted(REGRESSORS))
def test_regressor_execute_matches_plaintext(name):
    X, y = load("diabetes")
    model = REGRESSORS[name]().fit(X, y).compile(X)
    sk = model.sklearn_model_
    plain = sk.predict(X)
    np.testing.assert_allclose(model.predict(X, fhe="disable"), plain, rtol=1e-12)
    assert _max_rel_error(model.predict(X, fhe="execute", layout="batch"), plain) < 1e-3
    row = model.predict(X[:ROW_SAMPLES], fhe="execute", layout="row")
    assert _max_rel_error(row, plain[:ROW_SAMPLES]) < 1e-3
    assert _max_rel_error(model.predict(X, fhe="simulate"), plain) < 1e-3
    assert model.score(X, y, fhe="execute") == pytest.approx(sk.score(X, y), rel=1e-3)


@pytest.mark.parametrize("dataset", ["iris", "breast_cancer"])
@pytest.mark.parametrize("kw", [{"loss": "log_loss"}, {"loss": "modified_huber"}])
def test_predict_proba_matches(dataset, kw):
    X, y = load(dataset)
    for model in (ml.LogisticRegression(max_iter=1000), ml.SGDClassifier(random_state=0, **kw)):
        model.fit(X, y).compile(X)
        ref = model.sklearn_model_.predict_proba(X)
        np.testing.assert_allclose(model.predict_proba(X, fhe="execute"), ref, atol=2e-3)
        np.testing.assert_allclose(model.predict_proba(X, fhe="disable"), ref, atol=1e-12)


def test_predict_proba_only_where_scikit_learn_has_it():
    X, y = load("iris")
    assert not hasattr(ml.LinearSVC().fit(X, y), "predict_proba")
    assert not hasattr(ml.SGDClassifier(loss="hinge").fit(X, y), "predict_proba")
    assert hasattr(ml.SGDClassifier(loss="log_loss").fit(X, y), "predict_proba")


def test_digits_raw_pixels_logistic_regression():
    """The benchmark's model: unscaled digits, 64 features, 10 classes."""
    X, y = load("digits", scaled=False)
    model = ml.LogisticRegression(max_iter=2000).fit(X, y).compile(X)
    plain = model.predict(X)
    assert _agreement(model.predict(X, fhe="execute"), plain) >= 0.995
    assert _agreement(model.predict(X[:30], fhe="execute", layout="row"), plain[:30]) >= 0.995


def test_multi_output_regression():
    X, y = load("diabetes")
    Y = np.column_stack([y, 0.5 * y + 100.0])
    model = ml.Ridge().fit(X, Y).compile(X)
    enc = model.predict(X, fhe="execute")
    assert enc.shape == (len(X), 2)
    assert _max_rel_error(enc, model.sklearn_model_.predict(X)) < 1e-3


@pytest.mark.parametrize(
    ("sk_model", "dataset"),
    [
        (linear_model.LogisticRegression(max_iter=1000), "breast_cancer"),
        (linear_model.LogisticRegression(max_iter=1000), "wine"),
        (svm.LinearSVC(max_iter=5000), "iris"),
        (linear_model.Ridge(), "diabetes"),
        (linear_model.PoissonRegressor(), "diabetes"),
    ],
)
@pytest.mark.parametrize("scaler", [None, "standard", "minmax", "maxabs"])
def test_from_sklearn_model_with_scaler_pipelines(sk_model, dataset, scaler):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, StandardScaler

    X, y = load(dataset, scaled=False)
    scalers = {"standard": StandardScaler(), "minmax": MinMaxScaler(), "maxabs": MaxAbsScaler()}
    fitted = sklearn.clone(sk_model)
    if scaler is not None:
        fitted = make_pipeline(scalers[scaler], fitted)
    fitted.fit(X, y)
    model = ml.from_sklearn_model(fitted).compile(X)
    assert type(model).__name__ == type(sk_model).__name__
    plain = fitted.predict(X)
    enc = model.predict(X, fhe="execute")
    if model._task == "classifier":
        assert _agreement(enc, plain) >= 0.995
        assert _agreement(model.predict(X), plain) == 1.0
    else:
        assert _max_rel_error(enc, plain) < 1e-3


def test_from_sklearn_model_refuses_unsupported():
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    X, y = load("iris")
    with pytest.raises(TypeError, match="no encrypted equivalent"):
        ml.from_sklearn_model(KNeighborsClassifier().fit(X, y))
    with pytest.raises(TypeError, match="cannot fold"):
        ml.from_sklearn_model(make_pipeline(PolynomialFeatures(), linear_model.Ridge()).fit(X, y))
    with pytest.raises(TypeError, match="wraps"):
        ml.LogisticRegression.from_sklearn_model(linear_model.Ridge().fit(X, y))
    with pytest.raises(sklearn.exceptions.NotFittedError):
        ml.from_sklearn_model(make_pipeline(StandardScaler(), linear_model.Ridge()))
