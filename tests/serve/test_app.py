"""End-to-end over real HTTP(S) on loopback: deploy, register keys, predict on ciphertexts, faults."""

from __future__ import annotations

import base64
import json
import logging

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_wine
from sklearn.preprocessing import StandardScaler

import veil
from veil import ml
from veil.he import SecretKeys, preset
from veil.serve import Client, RequestError
from veil.serve.auth import add_token_to_file
from veil.serve.client import tls_context
from veil.serve.crypto import ArtefactCipher
from veil.serve.server import ServerConfig

from .helpers import make_certs, running_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    Xw, yw = load_wine(return_X_y=True)
    Xw = StandardScaler().fit_transform(Xw)
    Xd, yd = load_diabetes(return_X_y=True)
    wine = ml.LogisticRegression(max_iter=1000).fit(Xw, yw).compile(Xw)
    diabetes = ml.PoissonRegressor(alpha=0.01, max_iter=1000).fit(Xd, yd).compile(Xd)
    return {"wine": (wine, wine.save(root / "wine"), Xw), "diabetes": (diabetes, diabetes.save(root / "diabetes"), Xd)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    tokens = root / "tokens.json"
    names = {"admin": add_token_to_file(tokens, "admin", "admin"),
             "alice": add_token_to_file(tokens, "alice", "client"),
             "bob": add_token_to_file(tokens, "bob", "client")}
    key_file = root / "model.key"
    key_file.write_text(ArtefactCipher.generate_key().hex())
    certs = make_certs(root)

    def config(**kw) -> ServerConfig:
        base = {"data_dir": str(root / "data"), "tokens_file": str(tokens), "model_key_file": str(key_file)}
        return ServerConfig(**dict(base, **kw))

    return {"root": root, "tokens": names, "certs": certs, "config": config}


@pytest.fixture(scope="module")
def tls_server(setup, models):
    certs = setup["certs"]
    cfg = setup["config"](tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                          max_body=64 * 1024 * 1024)
    with running_server(cfg) as url:
        with Client(url, setup["tokens"]["admin"], verify=tls_context(str(certs.ca))) as admin:
            for name, (_, path, _) in models.items():
                admin.deploy(path, name)
        yield url


def _client(setup, url, who="alice", **kw) -> Client:
    return Client(url, setup["tokens"][who], verify=str(setup["certs"].ca), **kw)


@pytest.mark.parametrize("layout", ["batch", "row", "auto"])
def test_classification_over_https_equals_in_process(setup, models, tls_server, layout):
    model, _, X = models["wine"]
    with _client(setup, tls_server) as client:
        raw = client.predict_raw(X, "wine", layout=layout)
        local = model.decision_function(X, fhe="execute", layout="batch")
        np.testing.assert_allclose(raw, local, atol=1e-3)
        assert np.array_equal(client.predict(X, "wine", layout=layout), model.predict(X, fhe="execute"))
        np.testing.assert_allclose(client.predict_proba(X[:10], "wine"), model.predict_proba(X[:10]), atol=1e-3)


def test_regression_over_https_equals_in_process(setup, models, tls_server):
    model, _, X = models["diabetes"]
    with _client(setup, tls_server, chunk_size=100) as client:
        seen = []
        pred = client.predict(X, "diabetes", progress=seen.append)
        assert sum(seen) == len(X) and len(seen) == 5
    np.testing.assert_allclose(pred, model.predict(X, fhe="execute"), rtol=1e-3)
    np.testing.assert_allclose(pred, model.predict(X), rtol=1e-3)


def test_json_endpoints(setup, models, tls_server):
    model, _, X = models["wine"]
    with _client(setup, tls_server) as client:
        raw = client.predict_json(X[:20], "wine")
    np.testing.assert_allclose(raw, model.decision_function(X[:20]), atol=1e-3)


def test_versions_and_listing(setup, models, tls_server):
    model, path, X = models["wine"]
    with _client(setup, tls_server, who="admin") as admin:
        info = admin.deploy(path, "wine-versions")
        again = admin.deploy(path, "wine-versions")
        assert (info["version"], again["version"]) == (1, 2)
        with pytest.raises(RequestError) as exc:
            admin.deploy(path, "wine-versions", version=2)
        assert exc.value.status == 409
        names = {(m["name"], m["version"]) for m in admin.models()}
        assert {("wine-versions", 1), ("wine-versions", 2), ("wine", 1)} <= names
    with _client(setup, tls_server) as client:
        assert np.array_equal(client.predict(X[:5], "wine-versions", version=1), model.predict(X[:5]))


def test_auth_roles_and_key_ownership(setup, models, tls_server):
    _, path, X = models["wine"]
    ca = str(setup["certs"].ca)
    with httpx.Client(base_url=tls_server, verify=tls_context(ca)) as raw:
        assert raw.get("/v1/models").status_code == 401
        r = raw.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    with _client(setup, tls_server) as alice:
        with pytest.raises(RequestError) as exc:
            alice.deploy(path, "stolen")
        assert exc.value.status == 403
        _, mc = alice.model("wine")
        name, request = mc.encrypt(X[:3], "batch")
        key_id = alice.register(mc.public_bundle_bytes(name))
    with httpx.Client(base_url=tls_server, verify=tls_context(ca),
                      headers={"authorization": f"Bearer {setup['tokens']['bob']}"}) as bob:
        for unknown, what in ((key_id, "alice's key"), ("e" * 32, "no such key")):
            r = bob.post("/v1/models/wine/predict", content=request, headers={"x-veil-key-id": unknown})
            assert r.status_code == 404 and r.json()["error"] == "not_found", what
            assert bob.get(f"/v1/keys/{unknown}").status_code == 404, what


def test_server_refuses_a_secret_key(setup, tls_server):
    keys = SecretKeys.generate(preset("depth0"))
    with httpx.Client(base_url=tls_server, verify=tls_context(str(setup["certs"].ca)),
                      headers={"authorization": f"Bearer {setup['tokens']['alice']}"}) as http:
        r = http.post("/v1/keys", content=keys.to_bytes())
        assert r.status_code == 400 and "secret key" in r.json()["detail"]
        r = http.post("/v1/keys/json", json={"bundle": base64.b64encode(keys.to_bytes()).decode()})
        assert r.status_code == 400


def test_bad_requests_get_4xx_and_the_server_stays_up(setup, models, tls_server):
    _, _, X = models["wine"]
    _, _, Xd = models["diabetes"]
    with _client(setup, tls_server) as client:
        _, mc = client.model("wine")
        name, request = mc.encrypt(X[:4], "batch")
        key_id = client.register(mc.public_bundle_bytes(name))
        _, mcd = client.model("diabetes")
        _, request_d = mcd.encrypt(Xd[:4], "batch")
    headers = {"authorization": f"Bearer {setup['tokens']['alice']}", "x-veil-key-id": key_id}
    with httpx.Client(base_url=tls_server, verify=tls_context(str(setup["certs"].ca)), headers=headers) as http:
        cases = {
            "garbage ciphertexts": (http.post("/v1/models/wine/predict", content=b"garbage" * 100), 400),
            "truncated": (http.post("/v1/models/wine/predict", content=request[: len(request) // 3]), 400),
            "wrong shape": (http.post("/v1/models/wine/predict", content=request_d), 422),
            "unknown key": (http.post("/v1/models/wine/predict", content=request,
                                      headers={"x-veil-key-id": "0" * 32}), 404),
            "missing key header": (http.post("/v1/models/wine/predict", content=request,
                                             headers={"x-veil-key-id": ""}), 404),
            "unknown model": (http.post("/v1/models/nope/predict", content=request), 404),
            "path traversal": (http.get("/v1/models/..%2Fetc"), 404),
            "bad model name": (http.get("/v1/models/.hidden"), 400),
            "no such route": (http.get("/v2/anything"), 404),
            "bad version": (http.post("/v1/models/wine/predict?version=0", content=request), 422),
            "garbage bundle": (http.post("/v1/keys", content=b"\x00" * 50), 400),
            "bad base64": (http.post("/v1/keys/json", json={"bundle": "!!!"}), 400),
            "oversized": (http.post("/v1/models/wine/predict", content=b"x" * (65 * 1024 * 1024)), 413),
        }
        chunks = (b"y" * (1024 * 1024) for _ in range(70))
        cases["oversized, chunked"] = (http.post("/v1/models/wine/predict", content=chunks), 413)
        for what, (response, status) in cases.items():
            assert response.status_code == status, (what, response.status_code, response.text[:200])
            assert set(response.json()) == {"error", "detail"}, what
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.post("/v1/models/wine/predict", content=request).status_code == 200


def test_operations_endpoints(setup, tls_server):
    with httpx.Client(base_url=tls_server, verify=tls_context(str(setup["certs"].ca))) as http:
        assert http.get("/readyz").json()["status"] == "ready"
        metrics = http.get("/metrics").text
        assert "veil_requests_total" in metrics and "veil_request_seconds_bucket" in metrics
        assert 'route="/v1/models/{name}/predict"' in metrics
        spec = http.get("/openapi.json").json()
        assert "/v1/models/{name}/predict" in spec["paths"]


def test_logs_never_contain_ciphertexts_or_keys(setup, models, tls_server, caplog):
    _, _, X = models["wine"]
    with caplog.at_level(logging.INFO, logger="veil.serve"), _client(setup, tls_server) as client:
        _, mc = client.model("wine")
        name, request = mc.encrypt(X[:2], "row")
        bundle = mc.public_bundle_bytes(name)
        client.predict(X[:2], "wine", layout="row")
    text = "\n".join(json.dumps(vars(r), default=str) for r in caplog.records)
    assert any(getattr(r, "route", "") == "/v1/models/{name}/predict" for r in caplog.records)
    for secret in (request[100:140], bundle[100:140]):
        for encoding in (secret.hex(), base64.b64encode(secret).decode()[:40], repr(secret)[2:40]):
            assert encoding not in text
    assert setup["tokens"]["alice"] not in text


def test_mutual_tls(setup, models):
    certs = setup["certs"]
    cfg = setup["config"](tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                          tls_client_ca=str(certs.ca))
    _, _, X = models["wine"]
    with running_server(cfg) as url:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", verify=tls_context(str(certs.ca)))
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", verify=tls_context(
                str(certs.ca), (str(certs.other_client_cert), str(certs.other_client_key))))
        with _client(setup, url, cert=(str(certs.client_cert), str(certs.client_key))) as client:
            assert client.health() == {"status": "ok"}
            assert np.array_equal(client.predict(X[:5], "wine"), models["wine"][0].predict(X[:5]))


def test_restart_keeps_keys_and_models(setup, models):
    _, _, X = models["wine"]
    with running_server(setup["config"]()) as url, _client(setup, url) as client:
        _, mc = client.model("wine")
        name, request = mc.encrypt(X[:6], "batch")
        key_id = client.register(mc.public_bundle_bytes(name))
    headers = {"authorization": f"Bearer {setup['tokens']['alice']}", "x-veil-key-id": key_id}
    with running_server(setup["config"]()) as url, httpx.Client(base_url=url, headers=headers) as http:
        assert http.get(f"/v1/keys/{key_id}").json()["owner"] == "alice"
        response = http.post("/v1/models/wine/predict", content=request)
        assert response.status_code == 200
        assert np.array_equal(mc.predict(mc.decrypt(response.content)), models["wine"][0].predict(X[:6]))


def test_tampered_model_file_is_refused(setup, models):
    _, path, X = models["wine"]
    with running_server(setup["config"]()) as url, _client(setup, url, who="admin") as admin:
        admin.deploy(path, "tamper-me")
        stored = setup["root"] / "data" / "models" / "tamper-me" / "1.server.enc"
        blob = bytearray(stored.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        stored.write_bytes(bytes(blob))
        with pytest.raises(RequestError) as exc:
            admin.predict(X[:2], "tamper-me")
        assert exc.value.status == 409 and exc.value.code == "integrity_check_failed"
        assert admin.health() == {"status": "ok"}
        assert np.array_equal(admin.predict(X[:2], "wine"), models["wine"][0].predict(X[:2]))


def test_artefacts_on_disk_are_encrypted(setup, models, tls_server):
    stored = (setup["root"] / "data" / "models" / "wine" / "1.server.enc").read_bytes()
    assert stored.startswith(b"VEILENC1") and b"weights" not in stored


def test_wrong_model_key_is_refused(setup, models, tmp_path):
    other = tmp_path / "other.key"
    other.write_text(ArtefactCipher.generate_key().hex())
    with running_server(setup["config"](model_key_file=str(other))) as url, _client(setup, url) as client:
        with pytest.raises(RequestError) as exc:
            client.predict(models["wine"][2][:2], "wine")
        assert exc.value.status == 409


def test_top_level_client_alias():
    assert veil.Client is Client
