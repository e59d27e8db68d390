"""Flower's deployment engine: a SuperLink and one SuperNode per owner as processes on loopback, over TLS."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from veil.fl import cli
from veil.fl.config import FLConfig
from veil.fl.deployment import LocalFederation, _alive, _children, kill_tree, run_deployment, write_app
from veil.fl.simulation import run_simulation
from veil.net import free_port

pytestmark = pytest.mark.timeout(420)


def test_deployment_over_tls_matches_simulation(tmp_path, monkeypatch):
    cfg = FLConfig(clients=3, rounds=2, max_iter=10)  # federated standardization: one statistics round
    rows = []
    spawned = []
    original_spawn = LocalFederation._spawn

    def spawn(self, args, log_name):
        proc = original_spawn(self, args, log_name)
        spawned.append(proc.pid)
        return proc

    monkeypatch.setattr(LocalFederation, "_spawn", spawn)
    deployed = run_deployment(cfg, tmp_path, tls=True, timeout=300, on_round=rows.append)
    assert len(spawned) == 4  # one SuperLink, three SuperNodes
    assert not any(_alive(pid) for pid in spawned) and not any(_children(pid) for pid in spawned)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows == deployed.history
    assert deployed.scaler is not None and deployed.statistics["rounds"] == 1
    assert (tmp_path / "tls" / "ca.pem").exists()
    assert deployed.accuracy()[-1] > 0.9
    simulated = run_simulation(cfg)
    for a, b in zip(deployed.weights, simulated.weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-9)


def test_app_directory_carries_the_run_config(tmp_path):
    cfg = FLConfig(clients=4, secagg=True, dp="client", noise_multiplier=0.5, dataset="wine")
    text = (write_app(tmp_path, cfg) / "pyproject.toml").read_text()
    assert 'serverapp = "veil.fl.app:server_app"' in text
    assert "secagg = true" in text and 'dp = "client"' in text and "noise-multiplier = 0.5" in text
    fed = LocalFederation(tmp_path, 2, tls=False)
    assert "--insecure" in fed.superlink_args() and fed.supernode_args(1)[-1] == "--insecure"
    assert "partition-id=1 num-partitions=2" in fed.supernode_args(1)


def test_cli_superlink_supernodes_and_secagg_run(tmp_path, capsys):
    """`python -m veil.fl superlink|supernode` as separate processes, then `run --engine deployment --secagg`."""
    port = free_port()
    home = ["--home", str(tmp_path / "home")]
    base = [sys.executable, "-m", "veil.fl"]
    procs = []
    try:
        with open(tmp_path / "processes.log", "wb") as log:
            procs.append(subprocess.Popen([*base, "superlink", "--port", str(port), *home], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            for i in range(3):
                procs.append(subprocess.Popen([*base, "supernode", "--superlink", f"127.0.0.1:{port}",
                                               "--partition-id", str(i), "--clients", "3", *home],
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        code = cli.main(["run", "--engine", "deployment", "--superlink", f"127.0.0.1:{port}", "--clients", "3",
                         "--rounds", "1", "--secagg", "--out", str(tmp_path / "out"), "--json", "--quiet",
                         "--timeout", "240", "--max-iter", "10", "--no-standardize"])
        assert code == 0, (tmp_path / "processes.log").read_text()[-3000:]
        assert all(p.poll() is None for p in procs)  # still serving
    finally:
        for p in procs:
            kill_tree(p.pid)
            p.wait(timeout=10)
    summary = json.loads(capsys.readouterr().out)
    assert [h["round"] for h in summary["history"]] == [0, 1]
    assert summary["history"][1]["accuracy"] > 0.9  # SecAgg+ really aggregated trained updates
    assert summary["rejected"] == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["config"]["secagg"] is True
    assert (tmp_path / "out" / "model" / "client.json").exists()


def test_torch_mlp_run_exports_serves_and_predicts_encrypted_like_the_federated_model(tmp_path, capsys):
    """torch-mlp trains with a polynomial activation, so the exported network is the federated one:
    encrypted predictions (in process and through `veil serve`) equal its plaintext predictions."""
    from veil import ml
    from veil.fl.data import load_dataset
    from veil.fl.export import encrypted_check, to_veil_model
    from veil.ml.torch_compile import Polynomial
    from veil.serve import Client
    from veil.serve.auth import add_token_to_file
    from veil.serve.server import ServerConfig, serve_in_background

    cfg = FLConfig(clients=3, rounds=2, model="torch-mlp", dataset="wine", epochs=3, lr=0.1)
    result = run_simulation(cfg, engine="inprocess")
    network = result.learner().model
    assert any(isinstance(m, Polynomial) for m in network.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in network.modules())
    data = load_dataset("wine", seed=cfg.seed)
    model = to_veil_model(result, data.X_test)
    assert isinstance(model, ml.MLPClassifier) and model.circuit_.kind == "leveled"
    plain = result.predict(data.X_test)
    assert np.array_equal(model.predict(data.X_test, fhe="execute"), plain)
    check = encrypted_check(result, model, data.X_test, data.y_test)
    assert check["encrypted_agreement"] == 1.0 and check["encrypted_accuracy"] > 0.8

    saved = model.save(tmp_path / "model")
    tokens = tmp_path / "tokens.json"
    admin, user = add_token_to_file(tokens, "admin", "admin"), add_token_to_file(tokens, "u", "client")
    config = ServerConfig(data_dir=str(tmp_path / "data"), tokens_file=str(tokens),
                          model_key_file=str(tmp_path / "model.key"))
    (tmp_path / "model.key").write_text("22" * 32)
    with serve_in_background(config) as url:
        with Client(url, admin) as client:
            assert client.deploy(saved, "fl-mlp")["kind"] == "leveled"
        with Client(url, user) as client:
            for layout in ("batch", "row"):
                assert np.array_equal(client.predict(data.X_test, "fl-mlp", layout=layout), plain)

    code = cli.main(["run", "--model", "torch-mlp", "--dataset", "wine", "--clients", "3", "--rounds", "1",
                     "--epochs", "3", "--lr", "0.1", "--simulator", "inprocess", "--out", str(tmp_path / "out"),
                     "--json", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["encrypted_agreement"] == 1.0 and summary["veil_model"] == str(tmp_path / "out" / "model")
    client_json = json.loads((tmp_path / "out" / "model" / "client.json").read_text())
    assert client_json["model"] == "MLPClassifier" and client_json["circuit"]["kind"] == "leveled"
