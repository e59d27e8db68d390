"""The `veil` command against a real server on loopback."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from tests.serve.helpers import running_server
from veil import cli, ml
from veil.serve.app import openapi_schema
from veil.serve.auth import add_token_to_file
from veil.serve.server import ServerConfig

pytestmark = pytest.mark.timeout(300)


def test_demo_local_and_http(capsys):
    assert cli.main(["demo", "--local"]) == 0
    assert "equal plaintext on 100.00%" in capsys.readouterr().out
    assert cli.main(["demo", "--dataset", "wine", "--layout", "batch"]) == 0
    out = capsys.readouterr().out
    assert "server at http://127.0.0.1:" in out and "batch layout" in out


def test_openapi_schema_in_repo_is_current():
    with open("docs/openapi.json") as fh:
        committed = json.load(fh)
    assert committed == json.loads(json.dumps(openapi_schema())), "run `veil openapi --out docs/openapi.json`"


def test_token_deploy_keygen_predict(tmp_path, capsys, monkeypatch):
    X, y = load_breast_cancer(return_X_y=True)
    model = ml.LogisticRegression(max_iter=5000).fit(X, y).compile(X)
    model.save(tmp_path / "bc")
    tokens = tmp_path / "tokens.json"
    assert cli.main(["token", "ops", "--role", "admin", "--tokens", str(tokens)]) == 0
    admin = capsys.readouterr().out.strip()
    user = add_token_to_file(tokens, "analyst", "client")
    monkeypatch.setenv("VEIL_MODEL_KEY", "11" * 32)
    config = ServerConfig(data_dir=str(tmp_path / "data"), tokens_file=str(tokens))
    header = ",".join(f"f{i}" for i in range(X.shape[1]))
    np.savetxt(tmp_path / "data.csv", X, delimiter=",", header=header, comments="")
    with running_server(config) as url:
        assert cli.main(["deploy", str(tmp_path / "bc"), "--name", "bc", "--server", url, "--token", admin]) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 1
        assert cli.main(["deploy", str(tmp_path / "bc"), "--server", url, "--token", user]) == 2
        assert "403" in capsys.readouterr().err
        keys = tmp_path / "keys"
        assert cli.main(["keygen", "--model", "bc", "--out", str(keys), "--server", url, "--token", user]) == 0
        assert (keys / "batch.key").stat().st_mode & 0o777 == 0o600
        out = tmp_path / "pred.csv"
        monkeypatch.setenv("VEIL_TOKEN", user)
        assert cli.main(["predict", str(tmp_path / "data.csv"), "--model", "bc", "--server", url,
                         "--keys", str(keys), "--out", str(out), "--proba", "--chunk-size", "200"]) == 0
        assert cli.main(["predict", str(tmp_path / "missing.csv"), "--model", "bc", "--server", url]) == 2
        capsys.readouterr()
        assert cli.main(["predict", str(tmp_path / "data.csv"), "--model", "bc", "--server", url,
                         "--keys", str(tmp_path / "no-such-keys"), "--out", str(tmp_path / "other.csv")]) == 2
        assert "no key file" in capsys.readouterr().err and not (tmp_path / "other.csv").exists()
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert out.read_text().splitlines()[0] == "prediction,proba_0,proba_1"
    labels = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert set(labels) == {"0", "1"}, "integer class labels are written as integers, not 0.0/1.0"
    assert np.array_equal(table[:, 0], model.predict(X))
    np.testing.assert_allclose(table[:, 1:], model.predict_proba(X), atol=1e-3)
