"""Local learners: scikit-learn and PyTorch, exchange of weights, FedAvg by hand, export to veil.ml."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from veil import ml
from veil.errors import FederatedConfigError
from veil.fl.data import load_dataset
from veil.fl.learners import SklearnLearner, TorchLearner, make_learner
from veil.fl.partition import partition


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _fedavg(global_learner, learners, parts, rounds, test):
    accuracy = [global_learner.evaluate(*test)[1]["accuracy"]]
    for r in range(rounds):
        weights, results = global_learner.get_weights(), []
        for learner, (X, y) in zip(learners, parts, strict=True):
            learner.set_weights(weights)
            n = learner.fit(X, y, {"server_round": r + 1})
            results.append((learner.get_weights(), n))
        total = sum(n for _, n in results)
        global_learner.set_weights([sum(w[i] * n for w, n in results) / total for i in range(len(weights))])
        accuracy.append(global_learner.evaluate(*test)[1]["accuracy"])
    return accuracy


@pytest.mark.parametrize("model", ["logreg", "sgd", "torch-linear"])
def test_fedavg_by_hand_trains_on_skewed_owners(digits, model):
    parts = partition(digits.X_train, digits.y_train, 5, "dirichlet", alpha=0.3, seed=0)
    assert any(len(np.unique(y)) < 10 for _, y in parts)  # some owners miss classes
    learners = [make_learner(model, 64, digits.classes, max_iter=10, epochs=2) for _ in range(len(parts) + 1)]
    accuracy = _fedavg(learners[0], learners[1:], parts, 4, (digits.X_test, digits.y_test))
    assert accuracy[0] < 0.3
    assert accuracy[-1] > 0.85


def test_sklearn_learner_weights_layout_and_veil_export(digits):
    learner = SklearnLearner(ml.LogisticRegression(max_iter=200), 64, digits.classes)
    assert [w.shape for w in learner.get_weights()] == [(10, 64), (10,)]
    learner.fit(digits.X_train, digits.y_train)
    with pytest.raises(ValueError, match="shapes"):
        learner.set_weights([np.zeros((9, 64)), np.zeros(10)])
    model = learner.to_veil()
    assert isinstance(model, ml.LogisticRegression)
    plain = learner.sklearn_model().predict(digits.X_test)
    assert np.array_equal(model.predict(digits.X_test), plain)
    reference = LogisticRegression(max_iter=200).fit(digits.X_train, digits.y_train)
    assert np.mean(plain == reference.predict(digits.X_test)) > 0.95


def test_binary_and_regression_learners():
    bc = load_dataset("breast_cancer")
    learner = make_learner("logreg", bc.X_train.shape[1], bc.classes, max_iter=100)
    assert learner.get_weights()[0].shape == (1, 30)
    learner.fit(bc.X_train, bc.y_train)
    assert learner.evaluate(bc.X_test, bc.y_test)[1]["accuracy"] > 0.85
    diabetes = load_dataset("diabetes")
    reg = make_learner("ridge", 10, None)
    reg.fit(diabetes.X_train, diabetes.y_train)
    assert reg.evaluate(diabetes.X_test, diabetes.y_test)[1]["r2"] > 0.3
    assert reg.to_veil().predict(diabetes.X_test[:5]) == pytest.approx(
        reg.sklearn_model().predict(diabetes.X_test[:5]))


def test_torch_linear_and_mlp_export_to_veil(digits):
    learner = make_learner("torch-linear", 64, digits.classes, epochs=3)
    learner.fit(digits.X_train, digits.y_train, {})
    model = learner.to_veil().compile(digits.X_test)
    _, metrics = learner.evaluate(digits.X_test, digits.y_test)
    encrypted = model.predict(digits.X_test[:50], fhe="execute")
    plain = model.predict(digits.X_test)
    assert np.array_equal(encrypted, plain[:50])
    assert np.mean(plain == digits.y_test) == pytest.approx(metrics["accuracy"])
    mlp = make_learner("torch-mlp", 64, digits.classes)
    assert isinstance(mlp, TorchLearner)
    scaler = StandardScaler().fit(digits.X_train)  # owners train on scaled features, as the federation does
    mlp.fit(scaler.transform(digits.X_train), digits.y_train, {})
    exported = mlp.to_veil(scaler).compile(digits.X_test)  # the trained network, scaler folded in
    assert isinstance(exported, ml.MLPClassifier)
    with torch.no_grad():
        logits = mlp.model(torch.as_tensor(scaler.transform(digits.X_test[:30]), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(exported.program_.evaluate(digits.X_test[:30]), logits, rtol=1e-4, atol=1e-4)
    assert np.array_equal(exported.predict(digits.X_test[:30], fhe="execute"),
                          digits.classes[logits.argmax(1)])
    with pytest.raises(ValueError):
        mlp.set_weights(mlp.get_weights()[:-1])


def test_fedprox_term_keeps_weights_near_the_global_model(digits):
    far = {}
    for mu in (0.0, 10.0):
        learner = make_learner("torch-linear", 64, digits.classes, epochs=2, lr=0.01)
        start = learner.get_weights()
        learner.fit(digits.X_train, digits.y_train, {"proximal_mu": mu})
        far[mu] = sum(float(np.sum((a - b) ** 2)) for a, b in zip(learner.get_weights(), start, strict=True))
    assert far[10.0] < far[0.0]


def test_npz_datasets_load_and_a_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("mine.npz", X=rng.normal(size=(40, 3)), y=np.arange(40) % 2)
    data = load_dataset("mine.npz")
    assert data.task == "classification" and data.X_train.shape[1] == 3
    with pytest.raises(FederatedConfigError, match=r"'other\.npz' does not exist"):
        load_dataset("other.npz")
