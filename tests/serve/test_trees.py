"""Tree ensembles served end to end: deployed over HTTP, the client encodes over the public grid,
the server evaluates ciphertexts in both layouts, and tampered tree artefacts are refused with
4xx JSON errors."""

from __future__ import annotations

import copy
import json

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes

from veil import ml
from veil.program.products.planner import row_error_bound
from veil.serve.auth import add_token_to_file
from veil.serve.crypto import ArtefactCipher
from veil.serve.server import ServerConfig

from .helpers import running_server
from .test_neural import _user

pytestmark = pytest.mark.timeout(300)
N_QUERY = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    Xc, yc = load_breast_cancer(return_X_y=True)
    clf = ml.XGBClassifier(n_estimators=20, random_state=0).fit(Xc[:400], yc[:400]).compile(Xc[:400])
    Xr, yr = load_diabetes(return_X_y=True)
    reg = ml.RandomForestRegressor(n_estimators=5, random_state=0).fit(Xr[:300], yr[:300]).compile(Xr[:300])
    tokens = root / "tokens.json"
    names = {"admin": add_token_to_file(tokens, "admin", "admin"),
             "alice": add_token_to_file(tokens, "alice", "client")}
    key_file = root / "model.key"
    key_file.write_text(ArtefactCipher.generate_key().hex())
    config = ServerConfig(data_dir=str(root / "data"), tokens_file=str(tokens), model_key_file=str(key_file))
    return {"tokens": names, "config": config,
            "cancer": (clf, clf.save(root / "cancer"), Xc[400:400 + N_QUERY]),
            "diabetes": (reg, reg.save(root / "diabetes"), Xr[300:300 + N_QUERY])}


@pytest.fixture(scope="module")
def server(setup):
    from veil.serve import Client

    with running_server(setup["config"]) as url:
        with Client(url, setup["tokens"]["admin"]) as admin:
            for name in ("cancer", "diabetes"):
                admin.deploy(setup[name][1], name)
        yield url


def _row_bound(model) -> float:
    """The row plan's error bound on the model's raw outputs."""
    circuit = model.circuit_
    return row_error_bound(circuit.evaluated, circuit.plans["row"]) / 2.0**circuit.shift


@pytest.mark.parametrize("layout", ["batch", "row"])
def test_served_trees_equal_plaintext(setup, server, layout):
    """Encrypted raw outputs, classes and probabilities through the SDK equal the plaintext model
    (a batch-layout request of one group is ~450 ciphertexts: the classes and probabilities are
    checked through the row layout, the raw outputs through both)."""
    clf, _, Xc = setup["cancer"]
    reg, _, Xr = setup["diabetes"]
    with _user(server, setup["tokens"]["alice"]) as client:
        raw = client.predict_raw(Xc, "cancer", layout=layout)
        np.testing.assert_allclose(raw, clf._raw(Xc, "disable"), atol=1e-3)
        if layout == "row":
            assert np.max(np.abs(raw - clf._raw(Xc, "disable"))) <= _row_bound(clf)
        np.testing.assert_allclose(client.predict(Xr, "diabetes", layout=layout), reg.predict(Xr), rtol=1e-3)
        if layout == "row":
            assert np.array_equal(client.predict(Xc[:4], "cancer", layout=layout), clf.predict(Xc[:4]))
            np.testing.assert_allclose(client.predict_proba(Xc[:4], "cancer", layout=layout),
                                       clf.predict_proba(Xc[:4]), atol=1e-3)


def test_model_detail_names_the_kind_and_the_row_keys(setup, server):
    clf, _, _ = setup["cancer"]
    with _user(server, setup["tokens"]["alice"]) as client:
        detail = client._request("GET", "/v1/models/cancer").json()
    assert detail["kind"] == "product-sum" and detail["layouts"] == ["batch", "row"]
    assert detail["keys"]["batch"]["rotation_steps"] == []
    assert detail["keys"]["row"]["rotation_steps"] == list(clf.circuit_.plans["row"].rotation_steps)
    assert detail["client"]["circuit"]["encoding"]["kind"] == "thermometer"
    assert "products" not in json.dumps(detail)


def _malformed(setup) -> dict[str, dict]:
    path = setup["cancer"][1]
    good = {kind: json.loads((path / f"{kind}.json").read_text()) for kind in ("server", "client")}
    other = {kind: json.loads((setup["diabetes"][1] / f"{kind}.json").read_text()) for kind in ("server", "client")}
    cases = {"client-of-another-model": dict(good, client=other["client"])}
    edges = copy.deepcopy(good)
    edges["client"]["circuit"]["encoding"]["edges"][0][0] -= 1.0
    cases["client-grid-differs"] = edges
    kind = copy.deepcopy(good)
    kind["client"]["circuit"]["kind"] = "leveled"
    cases["kind-mismatch"] = kind
    factors = copy.deepcopy(good)
    factors["server"]["circuit"]["products"]["factors"][0][0] = 10**6
    cases["factor-out-of-range"] = factors
    steps = copy.deepcopy(good)
    for side in ("server", "client"):
        steps[side]["circuit"]["plans"]["row"]["rotation_steps"] = [1]
    cases["row-steps-forged-on-both"] = steps
    width = copy.deepcopy(good)
    width["server"]["circuit"]["encoding"]["edges"] = width["server"]["circuit"]["encoding"]["edges"][:-1]
    cases["grid-narrower-than-program"] = width
    return cases


def test_malformed_tree_artefacts_answer_4xx_json(setup, server):
    with httpx.Client(base_url=server, headers={"authorization": f"Bearer {setup['tokens']['admin']}"},
                      timeout=60) as http:
        for name, body in _malformed(setup).items():
            response = http.post("/v1/models", json=dict(body, name=f"bad-{name}"))
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            assert response.json()["error"] and response.json()["detail"], name
        assert not [m for m in http.get("/v1/models").json() if m["name"].startswith("bad-")]


def test_auto_layout_skips_a_batch_group_over_the_request_budget(setup, server):
    """One batch group of this model is ~450 ciphertexts (over 64 MiB): "auto" sends rows instead,
    and a budget that holds the group lets "auto" choose by cost again."""
    clf, _, Xc = setup["cancer"]
    with _user(server, setup["tokens"]["alice"]) as client:
        _, mc = client.model("cancer")
        assert client.auto_layouts(mc) == ["row"]
        error = np.abs(client.predict_raw(Xc[:3], "cancer") - clf._raw(Xc[:3], "disable"))
        assert np.max(error) <= _row_bound(clf) <= 1e-3, "within the row plan's bound"
        assert len(client._key_ids) == 1
    with _user(server, setup["tokens"]["alice"], max_request_bytes=1 << 30) as client:
        _, mc = client.model("cancer")
        assert client.auto_layouts(mc) == ["batch", "row"]
