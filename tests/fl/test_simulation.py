"""Federated runs on Flower's simulation engine (Ray), end to end down to encrypted predictions."""

import json

import numpy as np
import pytest

from tests.fl.faults import faulty_owners
from tests.serve.helpers import free_port, running_server
from veil.fl import cli
from veil.fl.config import FLConfig
from veil.fl.data import load_dataset
from veil.fl.export import to_veil_model
from veil.fl.partition import partition
from veil.fl.privacy import gaussian_epsilon
from veil.fl.simulation import run_simulation
from veil.serve.auth import add_token_to_file
from veil.serve.client import Client
from veil.serve.server import ServerConfig

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def plain(digits):
    """10 owners, 5 rounds of FedAvg on digits logistic regression, without SecAgg+."""
    rows = []
    result = run_simulation(FLConfig(clients=10, rounds=5), on_round=rows.append)
    assert rows == result.history
    return result


def test_fedavg_trains_and_encrypted_predictions_match(plain, digits):
    accuracy = plain.accuracy()
    assert [h["round"] for h in plain.history] == [0, 1, 2, 3, 4, 5]
    assert accuracy[0] < 0.2  # the zero model before any round
    assert accuracy[-1] >= 0.92 and accuracy[1] > 0.8
    assert plain.rejected == [] and plain.privacy is None
    model = to_veil_model(plain, digits.X_test)
    assert plain.scaler is not None  # federated standardization, folded into the exported model
    federated = plain.predict(digits.X_test)
    encrypted = model.predict(digits.X_test, fhe="execute")
    assert np.array_equal(encrypted, federated)
    assert np.mean(encrypted == digits.y_test) == pytest.approx(accuracy[-1])


def test_secagg_reaches_the_same_model(plain, digits):
    # the in-process grid runs the same apps as Ray's engine: only SecAgg+ separates the two runs
    secure = run_simulation(FLConfig(clients=10, rounds=5, secagg=True), engine="inprocess")
    assert len(secure.round_weights) == len(plain.round_weights) == 6
    # after one round only SecAgg+'s stochastic quantization separates the two aggregates
    for a, b in zip(secure.round_weights[1], plain.round_weights[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # later rounds restart the local solvers from those slightly different points
    for a, b in zip(secure.weights, plain.weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert np.abs(plain.weights[0]).max() > 0.1  # a trained model, not zeros on both sides
    assert secure.accuracy()[-1] >= 0.92
    assert np.allclose(secure.accuracy(), plain.accuracy(), atol=0.01)
    agree = secure.predict(digits.X_test) == plain.predict(digits.X_test)
    assert agree.mean() >= 0.99


def test_malformed_updates_are_dropped_without_crashing_rounds(digits):
    faults = {0: "shape", 1: "nan", 2: "garbage", 3: "count", 4: "dtype"}
    cfg = FLConfig(clients=8, rounds=3, max_iter=10)
    result = run_simulation(cfg, engine="inprocess", owner_factory=faulty_owners(faults))
    assert len(result.history) == 4
    training = [r for r in result.rejected if isinstance(r["round"], int)]
    assert len(training) == 5 * 3
    assert {r["round"] for r in training} == {1, 2, 3}
    # the garbage owner's statistics are undecodable too: the scaler comes from the others
    assert {r["round"] for r in result.rejected} - {1, 2, 3} == {f"stats-{i + 1}" for i in
                                                                  range(result.statistics["rounds"])}
    reasons = " | ".join(r["reason"] for r in training)
    for word in ("shape", "NaN", "undecodable", "arrays", "dtype"):
        assert word in reasons
    assert result.accuracy()[-1] > 0.9  # the three honest owners still train the model


def test_server_side_dp_adds_noise_and_reports_epsilon(plain):
    cfg = FLConfig(clients=10, rounds=5, dp="server", noise_multiplier=0.3, clipping_norm=0.5)
    result = run_simulation(cfg, engine="inprocess")
    report = result.privacy
    assert report.mode == "server" and report.noise_multiplier == 0.3 and report.clipping_norm == 0.5
    assert report.noise_std == pytest.approx(0.3 * 0.5 / 10)
    assert report.epsilon == pytest.approx(gaussian_epsilon(0.3, 5, 1e-5))
    assert report.min_clients_aggregated == 10
    assert np.abs(result.weights[0] - plain.weights[0]).max() > 1e-2  # clipped and noised, not plain FedAvg
    assert result.accuracy()[-1] > 0.6


def test_client_side_dp_with_secagg(digits):
    cfg = FLConfig(clients=4, rounds=3, dp="client", secagg=True, noise_multiplier=0.1, clipping_norm=1.0)
    result = run_simulation(cfg, engine="inprocess")
    assert result.privacy.mode == "client"
    assert result.accuracy()[-1] > 0.8


def test_robust_strategy_torch_model_and_custom_arrays():
    wine = load_dataset("wine")
    mean, scale = wine.X_train.mean(0), wine.X_train.std(0)
    parts = partition((wine.X_train - mean) / scale, wine.y_train, 4, "dirichlet", alpha=1.0, seed=1)
    cfg = FLConfig(clients=4, rounds=4, model="torch-linear", strategy="fedtrimmedavg", epochs=5, lr=0.05,
                   trim_beta=0.25)
    result = run_simulation(cfg, partitions=parts, test=((wine.X_test - mean) / scale, wine.y_test),
                            engine="inprocess", owner_factory=faulty_owners({3: "nan"}))
    assert len(result.rejected) == 4
    assert result.accuracy()[0] < result.accuracy()[-1]
    assert result.accuracy()[-1] > 0.85


def test_cli_run_checks_the_deploy_server_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    out = tmp_path / "out"
    args = ["run", "--clients", "2", "--rounds", "1", "--dataset", "iris", "--simulator", "inprocess",
            "--out", str(out), "--quiet", "--deploy", f"http://127.0.0.1:{free_port()}", "--token", "t"]
    assert cli.main(args) == 2
    assert "cannot reach" in capsys.readouterr().err and not out.exists()
    assert cli.main([*args[:-2]]) == 2
    assert "--deploy needs an admin token" in capsys.readouterr().err


def test_cli_run_saves_and_deploys_for_encrypted_inference(tmp_path, monkeypatch, capsys, digits):
    tokens = tmp_path / "tokens.json"
    admin = add_token_to_file(tokens, "ops", "admin")
    monkeypatch.setenv("VEIL_MODEL_KEY", "22" * 32)
    config = ServerConfig(data_dir=str(tmp_path / "data"), tokens_file=str(tokens))
    with running_server(config) as url:
        code = cli.main(["run", "--clients", "10", "--rounds", "5", "--model", "logreg", "--dataset", "digits",
                         "--out", str(tmp_path / "out"), "--deploy", url, "--token", admin, "--name", "digits-fl",
                         "--json", "--quiet"])
        assert code == 0
        summary = json.loads(capsys.readouterr().out)
        with Client(url, admin) as client:
            assert [m["name"] for m in client.models()] == ["digits-fl"]
    assert summary["encrypted_agreement"] == 1.0
    assert summary["encrypted_accuracy"] == summary["plaintext_accuracy"] >= 0.92
    assert summary["plaintext_accuracy"] == pytest.approx(summary["history"][-1]["accuracy"])
    assert (tmp_path / "out" / "model" / "server.json").exists()
    assert (tmp_path / "out" / "result.json").exists()
