"""Issue 13: every input answers JSON 4xx (never a 500), numbers are checked at the boundary, tokens
are revocable without restart, key quotas and DELETE, owner-only key use, TLS refusal, version-bound
artefacts, request ids, protected and offline docs. Each test fails on the code before the issue."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import sqlite3
import struct
import time

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler

from veil import cli, ml
from veil.he import SecretKeys, preset, wire
from veil.serve import Client, RequestError
from veil.serve.auth import TokenStore, add_token_to_file, list_tokens, revoke_tokens
from veil.serve.backends.base import MAX_VERSION
from veil.serve.crypto import ArtefactCipher
from veil.serve.errors import UnauthorizedError
from veil.serve.server import ServerConfig, check_transport, is_loopback
from veil.serve.service import Service

from .helpers import make_certs, running_server

pytestmark = pytest.mark.timeout(300)
BIG = 2**63


def envelope(kind: wire.Kind, header: str, blobs: list[bytes] | tuple = ()) -> bytes:
    """A wire message with a header written by hand (JSON that `json.dumps` would never produce)."""
    head = header.encode()
    parts = [struct.pack("<4sBBI", wire.MAGIC, wire.VERSION, int(kind), len(head)), head,
             struct.pack("<I", len(blobs))]
    for blob in blobs:
        parts += [struct.pack("<I", len(blob)), blob]
    return b"".join(parts)


def assert_json_error(response: httpx.Response, status: int, what: str = "") -> dict:
    assert response.status_code == status, (what, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), what
    body = response.json()
    assert set(body) == {"error", "detail"}, what
    return body


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    tokens = root / "tokens.json"
    names = {who: add_token_to_file(tokens, who, "admin" if who == "admin" else "client")
             for who in ("admin", "alice", "bob")}
    key_file = root / "model.key"
    key_file.write_text(ArtefactCipher.generate_key().hex())
    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    wine = ml.LogisticRegression(max_iter=1000).fit(X, y).compile(X)
    wine_dir = wine.save(root / "wine")
    other = ml.LogisticRegression(C=0.01, max_iter=1000).fit(X, y).compile(X)
    other_dir = other.save(root / "other")

    def config(**kw) -> ServerConfig:
        base = {"data_dir": str(root / "data"), "tokens_file": str(tokens), "model_key_file": str(key_file)}
        return ServerConfig(**dict(base, **kw))

    return {"root": root, "tokens_file": tokens, "tokens": names, "config": config, "X": X, "wine": wine,
            "wine_dir": wine_dir, "other_dir": other_dir}


@pytest.fixture(scope="module")
def server(env):
    """One plain-HTTP loopback server with `wine` deployed and alice's batch key registered."""
    with running_server(env["config"]()) as url:
        with Client(url, env["tokens"]["admin"]) as admin:
            admin.deploy(env["wine_dir"], "wine")
        with Client(url, env["tokens"]["alice"]) as alice:
            _, mc = alice.model("wine")
            _, request = mc.encrypt(env["X"][:5], "batch")
            key_id = alice.register(mc.public_bundle_bytes("batch"))
        yield {"url": url, "mc": mc, "request": request, "key_id": key_id}


def http(env, server, who: str = "alice", **headers) -> httpx.Client:
    auth = {"authorization": f"Bearer {env['tokens'][who]}"} if who else {}
    return httpx.Client(base_url=server["url"], headers=dict(auth, **headers), timeout=60)


def artefacts(path) -> dict:
    return {"server": json.loads((path / "server.json").read_text()),
            "client": json.loads((path / "client.json").read_text())}


# --- the nine 500s -------------------------------------------------------------------------------

def test_versions_beyond_range_answer_422(env, server):
    with http(env, server) as h:
        for url in (f"/v1/models/wine?version={BIG}", f"/v1/models/wine?version={MAX_VERSION + 1}"):
            assert_json_error(h.get(url), 422, url)
        r = h.post(f"/v1/models/wine/predict?version={BIG}", content=server["request"],
                   headers={"x-veil-key-id": server["key_id"]})
        assert_json_error(r, 422, "predict version")
    with http(env, server, "admin") as h:
        body = dict(artefacts(env["wine_dir"]), name="too-far")
        for bad in (BIG, 2**63 - 1, MAX_VERSION + 1, True, 1.5, "2", 0, -1):
            assert_json_error(h.post("/v1/models", json=dict(body, version=bad)), 422, repr(bad))
        assert not (env["root"] / "data" / "models" / "too-far").exists()


def test_last_version_then_automatic_deploy_is_409_without_orphan_files(env, server):
    with http(env, server, "admin") as h:
        body = dict(artefacts(env["wine_dir"]), name="last")
        assert h.post("/v1/models", json=dict(body, version=MAX_VERSION)).status_code == 201
        assert_json_error(h.post("/v1/models", json=body), 409, "automatic version past the last")
    files = sorted(p.name for p in (env["root"] / "data" / "models" / "last").iterdir())
    assert files == [f"{MAX_VERSION}.client.enc", f"{MAX_VERSION}.server.enc"]


def test_key_bundles_with_non_integer_numbers_answer_400(env, server):
    keys = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[1])
    msg = wire.decode(keys.public_bundle().to_bytes())
    fingerprint = msg.header["fingerprint"]

    def header(degree: str = "4096", bits: str = "[60,49]", steps: str = "[1]", relin: str = "false") -> str:
        return (f'{{"fingerprint":"{fingerprint}","params":{{"coeff_modulus_bits":{bits},'
                f'"poly_modulus_degree":{degree},"security_bits":128}},"relin":{relin},"rotation_steps":{steps}}}')

    cases = {"poly_modulus_degree Infinity": header(degree="Infinity"),
             "poly_modulus_degree 1e400": header(degree="1e400"),
             "poly_modulus_degree true": header(degree="true"),
             "coeff_modulus_bits [1e400]": header(bits="[1e400]"),
             "coeff_modulus_bits [60.0, 49]": header(bits="[60.0,49]"),
             "rotation step a": header(steps='["a"]'),
             "rotation step 1e400": header(steps="[1e400]"),
             "rotation step 1.0": header(steps="[1.0]"),
             "rotation step 2^70": header(steps=str([2**70])),
             "relin string": header(relin='"yes"')}
    with http(env, server) as h:
        for what, header in cases.items():
            bundle = envelope(wire.Kind.PUBLIC_BUNDLE, header, msg.blobs)
            assert_json_error(h.post("/v1/keys", content=bundle), 400, what)
            b64 = base64.b64encode(bundle).decode()
            assert_json_error(h.post("/v1/keys/json", json={"bundle": b64}), 400, what)
        assert h.get("/healthz").status_code == 200


def test_ciphertext_headers_with_wrong_types_answer_4xx(env, server):
    msg = wire.decode(server["request"])
    with http(env, server, **{"x-veil-key-id": server["key_id"]}) as h:
        for what, change, status in (("layout []", {"layout": []}, 400), ("layout {}", {"layout": {}}, 400),
                                     ("layout 1", {"layout": 1}, 400), ("n_samples true", {"n_samples": True}, 422),
                                     ("n_samples 5.0", {"n_samples": 5.0}, 422),
                                     ("n_features true", {"n_features": True}, 422)):
            forged = wire.Message(msg.kind, dict(msg.header, **change), msg.blobs).to_bytes()
            assert_json_error(h.post("/v1/models/wine/predict", content=forged), status, what)
        assert h.post("/v1/models/wine/predict", content=server["request"]).status_code == 200


def test_deploy_with_malformed_scales_answers_400(env, server):
    body = dict(artefacts(env["wine_dir"]), name="bad-scales")
    with http(env, server, "admin") as h:
        for scales in ([], {}, "x", {"diagonal": {}}, {"batch": []}):
            server_json = json.loads(json.dumps(body["server"]))
            server_json["circuit"]["scales"] = scales
            assert_json_error(h.post("/v1/models", json=dict(body, server=server_json)), 400, repr(scales))
        server_json = json.loads(json.dumps(body["server"]))
        server_json["circuit"]["scales"]["batch"]["input_bits"] = 1e300
        assert_json_error(h.post("/v1/models", json=dict(body, server=server_json)), 400, "input_bits 1e300")


def test_unexpected_errors_answer_json_500_logged_counted_and_keep_the_connection(env, server, monkeypatch,
                                                                                 caplog):
    def boom(self, record):
        raise KeyError("secret internal detail")

    monkeypatch.setattr(Service, "client_spec", boom)
    with caplog.at_level(logging.INFO, logger="veil.serve"), http(env, server) as h:
        r = h.get("/v1/models/wine", headers={"x-request-id": "trace-500"})
        body = assert_json_error(r, 500, "last resort")
        assert body["error"] == "internal_error" and "secret internal detail" not in r.text
        assert r.headers["x-request-id"] == "trace-500"
        monkeypatch.undo()
        again = h.get("/v1/models/wine")
        assert again.status_code == 200
        metrics = h.get("/metrics").text
    assert 'veil_requests_total{route="/v1/models/{name}",status="500"} 1.0' in metrics
    unhandled = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert len(unhandled) == 1 and unhandled[0].request_id == "trace-500" and unhandled[0].exc_info
    assert any(getattr(r, "status", None) == 500 and r.getMessage() == "request" for r in caplog.records)


# --- protocol and schema -----------------------------------------------------------------------

def test_405_keeps_allow_and_401_asks_for_bearer(env, server):
    with http(env, server) as h:
        r = h.put("/v1/models")
        assert_json_error(r, 405, "PUT /v1/models")
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
        r = h.patch("/v1/keys/" + "0" * 32)
        assert_json_error(r, 405, "PATCH key")
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}
    with http(env, server, who=None) as anonymous:
        r = anonymous.get("/v1/models")
        assert_json_error(r, 401, "no token")
        assert r.headers["www-authenticate"] == "Bearer"


def test_schema_is_as_strict_as_the_server(env, server):
    with http(env, server) as h:
        spec = h.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                if param["in"] == "path" or param["name"] == "x-veil-key-id":
                    assert "pattern" in param["schema"], (path, method, param["name"])
                if param["name"] == "version":
                    schema = param["schema"]["anyOf"][0]
                    assert (schema["minimum"], schema["maximum"]) == (1, MAX_VERSION)
    schemas = spec["components"]["schemas"]
    for model, field in (("RegisterKeyJSON", "bundle"), ("PredictJSON", "ciphertexts")):
        assert schemas[model]["properties"][field]["format"] == "byte", (model, field)
    deploy_version = schemas["DeployRequest"]["properties"]["version"]["anyOf"][0]
    assert deploy_version["maximum"] == MAX_VERSION
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "delete" in spec["paths"]["/v1/keys/{key_id}"]


def test_request_ids_are_validated(env, server, caplog):
    bad = ["x" * 65, "a b", "<script>", "id\tx", "é"]
    with caplog.at_level(logging.INFO, logger="veil.serve"), http(env, server) as h:
        assert h.get("/healthz", headers={"x-request-id": "client-42.a:b_c"}).headers["x-request-id"] == \
            "client-42.a:b_c"
        for given in bad:
            got = h.get("/healthz", headers={"x-request-id": given.encode()}).headers["x-request-id"]
            assert got != given and re.fullmatch(r"[0-9a-f]{16}", got), given
    logged = {getattr(r, "request_id", None) for r in caplog.records}
    assert "client-42.a:b_c" in logged and not logged & set(bad)


# --- tokens, quotas, DELETE, key ownership ------------------------------------------------------

def test_tokens_are_added_and_revoked_without_restart(env, server):
    carol = add_token_to_file(env["tokens_file"], "carol", "client")
    with httpx.Client(base_url=server["url"], headers={"authorization": f"Bearer {carol}"}) as h:
        deadline = time.monotonic() + 10
        while h.get("/v1/models").status_code != 200:
            assert time.monotonic() < deadline, "added token not accepted"
            time.sleep(0.1)
        assert [r["name"] for r in revoke_tokens(env["tokens_file"], "carol")] == ["carol"]
        deadline = time.monotonic() + 10
        while h.get("/v1/models").status_code != 401:
            assert time.monotonic() < deadline, "revoked token still accepted"
            time.sleep(0.1)
    with http(env, server) as h:
        assert h.get("/v1/models").status_code == 200


def test_token_store_keeps_tokens_when_the_file_is_broken(tmp_path):
    path = tmp_path / "tokens.json"
    token = add_token_to_file(path, "dave", "client", max_keys=3)
    store = TokenStore.load(path, environ={})
    assert store.authenticate(f"Bearer {token}").max_keys == 3
    path.write_text("{not json")
    store.refresh(force=True)
    assert store.authenticate(f"Bearer {token}").name == "dave"
    path.unlink()
    store.refresh(force=True)
    with pytest.raises(UnauthorizedError):
        store.authenticate(f"Bearer {token}")


def test_cli_token_add_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "tokens.json")
    assert cli.main(["token", "add", "erin", "--tokens", path, "--max-keys", "5"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("veil_")
    assert cli.main(["token", "frank", "--role", "admin", "--tokens", path]) == 0
    capsys.readouterr()
    assert cli.main(["token", "list", "--tokens", path]) == 0
    listing = capsys.readouterr().out
    assert "erin" in listing and "frank" in listing and "max_keys=5" in listing and token not in listing
    erin_id = next(r["id"] for r in list_tokens(path) if r["name"] == "erin")
    assert cli.main(["token", "revoke", erin_id, "--tokens", path]) == 0
    assert "revoked erin" in capsys.readouterr().out
    assert [r["name"] for r in list_tokens(path)] == ["frank"]
    assert cli.main(["token", "revoke", "nobody", "--tokens", path]) == 2


def _bundles(n: int) -> list[bytes]:
    return [SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[i + 1]).public_bundle().to_bytes()
            for i in range(n)]


def test_key_quota_count_and_bytes_and_delete(env, tmp_path):
    bundles = _bundles(3)
    config = env["config"](data_dir=str(tmp_path / "data"), max_keys=2)
    with running_server(config) as url, httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {env['tokens']['alice']}"}) as h:
        ids = [h.post("/v1/keys", content=b).json()["key_id"] for b in bundles[:2]]
        assert h.post("/v1/keys", content=bundles[0]).status_code == 200, "re-registering is free"
        body = assert_json_error(h.post("/v1/keys", content=bundles[2]), 403, "third bundle")
        assert body["error"] == "quota_exceeded"
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {env['tokens']['bob']}"}) as bob:
            other = assert_json_error(bob.delete(f"/v1/keys/{ids[0]}"), 404, "bob deletes alice's key")
            unknown = assert_json_error(bob.delete("/v1/keys/" + "e" * 32), 404, "unknown key")
            assert other["detail"].replace(ids[0], "e" * 32) == unknown["detail"], "existence must not show"
            assert bob.post("/v1/keys", content=bundles[2]).status_code == 200, "quotas are per principal"
            assert_json_error(bob.delete("/v1/keys/" + "f" * 32), 404, "unknown key")
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {env['tokens']['admin']}"}) as adm:
            assert_json_error(adm.delete(f"/v1/keys/{ids[0]}"), 403, "admin deletes alice's key")
        r = h.delete(f"/v1/keys/{ids[0]}")
        assert r.status_code == 204 and r.content == b""
        assert_json_error(h.get(f"/v1/keys/{ids[0]}"), 404, "deleted key")
        assert_json_error(h.delete(f"/v1/keys/{ids[0]}"), 404, "deleted twice")
        assert h.post("/v1/keys", content=bundles[0]).status_code == 200, "quota freed by DELETE"
    size = len(bundles[0])
    config = env["config"](data_dir=str(tmp_path / "data2"), max_key_bytes=2 * size - 1)
    with running_server(config) as url, httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {env['tokens']['alice']}"}) as h:
        assert h.post("/v1/keys", content=bundles[0]).status_code == 200
        assert assert_json_error(h.post("/v1/keys", content=bundles[1]), 403, "bytes")["error"] == "quota_exceeded"


def test_per_token_quota_overrides_the_default(env, tmp_path):
    tokens = tmp_path / "tokens.json"
    small = add_token_to_file(tokens, "small", "client", max_keys=1)
    config = env["config"](data_dir=str(tmp_path / "data"), tokens_file=str(tokens), max_keys=10)
    bundles = _bundles(2)
    with running_server(config) as url, httpx.Client(base_url=url,
                                                    headers={"authorization": f"Bearer {small}"}) as h:
        assert h.post("/v1/keys", content=bundles[0]).status_code == 200
        assert_json_error(h.post("/v1/keys", content=bundles[1]), 403, "per-token quota")


def test_admin_cannot_predict_with_another_principals_key(env, server):
    with http(env, server, "admin", **{"x-veil-key-id": server["key_id"]}) as h:
        assert_json_error(h.post("/v1/models/wine/predict", content=server["request"]), 403, "admin borrows")
        assert h.get(f"/v1/keys/{server['key_id']}").json()["owner"] == "alice", "admins may read metadata"
    with http(env, server, **{"x-veil-key-id": server["key_id"]}) as h:
        assert h.post("/v1/models/wine/predict", content=server["request"]).status_code == 200


def test_client_sdk_deletes_its_key(env, server):
    bundle = _bundles(1)[0]
    with Client(server["url"], env["tokens"]["bob"]) as bob:
        key_id = bob.register(bundle)
        bob.delete_key(key_id)
        with pytest.raises(RequestError) as exc:
            bob.delete_key(key_id)
        assert exc.value.status == 404
        assert bob.register(bundle) == key_id, "registering again after deletion gets the same id"


# --- transport, docs, metrics ------------------------------------------------------------------

def test_plain_http_beyond_loopback_is_refused_unless_insecure(tmp_path, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    certs = make_certs(tmp_path)
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(ValueError, match="plain HTTP"):
            check_transport(ServerConfig(host=host))
        check_transport(ServerConfig(host=host, insecure=True))
        check_transport(ServerConfig(host=host, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key)))
    check_transport(ServerConfig(host="127.0.0.1"))
    assert cli.main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "refusing to serve plain HTTP" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["missing", "garbage", "wrong-key", "bad-ca"])
def test_tls_files_that_do_not_load_are_refused_naming_the_file(tmp_path, capsys, bad):
    """Before the server starts, not as ssl's bare "PEM lib" from inside uvicorn."""
    certs = make_certs(tmp_path)
    (tmp_path / "garbage.pem").write_text("not a certificate")
    cert, key, ca = str(certs.server_cert), str(certs.server_key), None
    named = {"missing": str(tmp_path / "absent.pem"), "garbage": str(tmp_path / "garbage.pem"),
             "wrong-key": str(certs.other_client_key), "bad-ca": str(tmp_path / "garbage.pem")}[bad]
    if bad == "wrong-key":
        key = named
    elif bad == "bad-ca":
        ca = named
    else:
        cert = named
    with pytest.raises(ValueError, match="cannot load") as exc:
        check_transport(ServerConfig(host="127.0.0.1", tls_cert=cert, tls_key=key, tls_client_ca=ca))
    assert named in str(exc.value)
    args = ["serve", "--data-dir", str(tmp_path / "data"), "--tls-cert", cert, "--tls-key", key]
    assert cli.main(args + (["--tls-client-ca", ca] if ca else [])) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_docs_are_served_without_any_external_asset(env, server):
    with httpx.Client(base_url=server["url"]) as h:
        for page in ("/docs", "/redoc"):
            html = h.get(page)
            assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
            urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html.text)
            assert urls, page
            for url in urls:
                assert not re.match(r"^(https?:)?//", url), (page, url)
                assert h.get(url).status_code == 200, (page, url)
            assert "googleapis" not in html.text and "cdn" not in html.text.lower()


def test_metrics_and_docs_can_require_a_token(env, tmp_path):
    config = env["config"](data_dir=str(tmp_path / "data"), protect_metrics=True, protect_docs=True)
    with running_server(config) as url, httpx.Client(base_url=url) as h:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert_json_error(h.get(path), 401, path)
            assert h.get(path, headers={"authorization": f"Bearer {env['tokens']['bob']}"}).status_code == 200
        assert h.get("/healthz").status_code == 200


# --- artefacts bound to their version ----------------------------------------------------------

def test_rolled_back_model_file_answers_409(env, tmp_path):
    config = env["config"](data_dir=str(tmp_path / "data"))
    with running_server(config) as url:
        with Client(url, env["tokens"]["admin"]) as admin:
            assert admin.deploy(env["wine_dir"], "rb")["version"] == 1
            assert admin.deploy(env["other_dir"], "rb")["version"] == 2
        models = tmp_path / "data" / "models" / "rb"
        for kind in ("server", "client"):
            shutil.copyfile(models / f"1.{kind}.enc", models / f"2.{kind}.enc")
        with sqlite3.connect(tmp_path / "data" / "registry.sqlite3") as db:
            (meta,) = db.execute("SELECT meta FROM models WHERE name = 'rb' AND version = 1").fetchone()
            db.execute("UPDATE models SET meta = ? WHERE name = 'rb' AND version = 2", (meta,))
        with http(env, {"url": url}) as h:
            body = assert_json_error(h.get("/v1/models/rb?version=2"), 409, "rolled back client")
            assert body["error"] == "integrity_check_failed"
            assert h.get("/v1/models/rb?version=1").status_code == 200
        with Client(url, env["tokens"]["alice"]) as alice, pytest.raises(RequestError) as exc:
            alice.predict(env["X"][:2], "rb", version=2)
        assert exc.value.status == 409


def test_predictions_still_match_after_hardening(env, server):
    with Client(server["url"], env["tokens"]["alice"]) as alice:
        pred = alice.predict(env["X"][:20], "wine")
    assert np.array_equal(pred, env["wine"].predict(env["X"][:20]))
