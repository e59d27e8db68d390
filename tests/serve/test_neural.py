"""Leveled programs (MLPs with polynomial activations) served end to end: deployed over HTTP, keys
registered once per layout, ciphertexts evaluated by the in-process server and by Redis workers,
and malformed leveled artefacts refused with 4xx JSON errors."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits

from veil import cli, ml
from veil.program.planner import output_noise, unit_bounds
from veil.serve import Client
from veil.serve.auth import add_token_to_file
from veil.serve.client import DEFAULT_MAX_REQUEST_BYTES
from veil.serve.crypto import ArtefactCipher
from veil.serve.server import ServerConfig

from .helpers import running_server
from .test_cluster import process, redis_server

pytestmark = pytest.mark.timeout(300)
N_QUERY = 24


def _raw_execute(model, X, layout):
    """In-process encrypted raw outputs (logits or regression values) in one layout."""
    return model._raw(X, "execute", layout)


def _close(served: np.ndarray, local: np.ndarray, model, X: np.ndarray, layout: str) -> None:
    """Served and in-process encrypted raw outputs (independent encryptions, so independent CKKS
    noise) each lie within 6 planned standard deviations (`output_noise` of the layout's plan) of
    the plaintext program's outputs: the planned bound, not a fixed tolerance, so a plan whose
    noise grows is judged by what it promises."""
    circuit = model.circuit_
    plan = circuit.plans[layout]
    box = np.asarray(plan.input_bounds)
    sigma = output_noise(circuit.stages, box, unit_bounds(circuit.stages, box), plan.params, plan.scale_bits,
                         plan.relin_last, layout, plan.geometry)
    plain = circuit.evaluate(circuit.encode(X))
    assert served.shape == local.shape == plain.shape
    for name, out in (("served", served), ("in-process", local)):
        worst = float(np.max(np.abs(out - plain)))
        assert worst <= 6 * sigma, f"{name} {layout} error {worst:.3g} above 6 x planned {sigma:.3g}"


def _close_predictions(served: np.ndarray, local: np.ndarray, rtol: float) -> None:
    """Served and in-process regression predictions (in the target's units, independent encryptions)
    agree to `rtol` of their magnitude."""
    scale = float(np.abs(local).max())
    np.testing.assert_allclose(served, local, rtol=rtol, atol=rtol * scale)


@contextlib.contextmanager
def _user(url: str, token: str, **kw):
    """A client that deletes the bundles it registered when done: a row-layout bundle of these
    networks is ~40 MB and the default key quota (256 MiB per principal) holds six of them."""
    with Client(url, token, **kw) as client:
        try:
            yield client
        finally:
            for key_id in list(client._key_ids.values()):
                client.delete_key(key_id)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("neural")
    Xc, yc = load_digits(return_X_y=True)
    Xc, yc = Xc[:400], yc[:400]
    clf = ml.MLPClassifier(hidden_layer_sizes=(16,), max_iter=40, random_state=0).fit(Xc, yc).compile(Xc)
    Xr, yr = load_diabetes(return_X_y=True)
    Xr, yr = Xr[:200], yr[:200]
    reg = ml.MLPRegressor(hidden_layer_sizes=(8,), activation="square", max_iter=60, random_state=0)
    reg = reg.fit(Xr, yr).compile(Xr)
    tokens = root / "tokens.json"
    names = {"admin": add_token_to_file(tokens, "admin", "admin"),
             "alice": add_token_to_file(tokens, "alice", "client")}
    key = ArtefactCipher.generate_key().hex()
    key_file = root / "model.key"
    key_file.write_text(key)

    def config(**kw) -> ServerConfig:
        base = {"data_dir": str(root / "data"), "tokens_file": str(tokens), "model_key_file": str(key_file)}
        return ServerConfig(**dict(base, **kw))

    return {"root": root, "tokens": names, "key": key, "config": config,
            "digits": (clf, clf.save(root / "digits"), Xc[:N_QUERY]),
            "diabetes": (reg, reg.save(root / "diabetes"), Xr[:N_QUERY])}


@pytest.fixture(scope="module")
def server(setup):
    with running_server(setup["config"]()) as url:
        with Client(url, setup["tokens"]["admin"]) as admin:
            for name in ("digits", "diabetes"):
                admin.deploy(setup[name][1], name)
        yield url


@pytest.mark.parametrize("layout", ["batch", "row"])
def test_classifier_served_equals_in_process_execution(setup, server, layout):
    model, _, X = setup["digits"]
    with _user(server, setup["tokens"]["alice"]) as client:
        raw = client.predict_raw(X, "digits", layout=layout)
        _close(raw, _raw_execute(model, X, layout), model, X, layout)
        np.testing.assert_allclose(raw, model.program_.evaluate(X), rtol=1e-3, atol=1e-3)
        assert np.array_equal(client.predict(X, "digits", layout=layout), model.predict(X, fhe="execute"))
        np.testing.assert_allclose(client.predict_proba(X, "digits", layout=layout),
                                   model.predict_proba(X), atol=1e-4)


@pytest.mark.parametrize("name", ["digits", "diabetes"])
@pytest.mark.parametrize("layout", ["batch", "row"])
def test_served_evaluation_is_the_in_process_evaluation(setup, server, name, layout):
    """The same request bytes under the same keys: the server's answer decrypts to exactly what
    the in-process circuit computes (evaluation is deterministic; only encryption is random)."""
    model, _, X = setup[name]
    with _user(server, setup["tokens"]["alice"]) as client:
        version, mc = client.model(name)
        _, request = mc.encrypt(X, layout)
        served = client.send(name, version, client.register(mc.public_bundle_bytes(layout)), request)
    local = model.circuit_.run(request, mc.circuit.public_bundle(layout))
    assert np.array_equal(mc.decrypt(served), mc.decrypt(local))


@pytest.mark.parametrize("layout", ["batch", "row"])
def test_regressor_served_equals_in_process_execution(setup, server, layout):
    model, _, X = setup["diabetes"]
    with _user(server, setup["tokens"]["alice"]) as client:
        pred = client.predict(X, "diabetes", layout=layout)
    assert pred.shape == (len(X),)
    # targets are un-standardized in the last layer (x ~77 here), which scales CKKS noise with them
    _close_predictions(pred, model.predict(X, fhe="execute", layout=layout), rtol=2e-5)
    np.testing.assert_allclose(pred, model.predict(X), rtol=1e-4)


def test_model_detail_describes_kind_depth_and_keys(setup, server):
    model, _, _ = setup["digits"]
    with _user(server, setup["tokens"]["alice"]) as client:
        listed = {m["name"]: m for m in client.models()}
        detail = client._request("GET", "/v1/models/digits").json()
    for info in (listed["digits"], detail):
        assert info["kind"] == "leveled" and info["depth"] == len(model.circuit_.stages) == 3
        assert info["layouts"] == ["batch", "row"]
        for layout, plan in model.circuit_.plans.items():
            assert info["keys"][layout] == {"params": plan.params.fingerprint, "relin": plan.relin,
                                            "rotation_steps": sorted(plan.rotation_steps)}
    assert detail["keys"]["row"]["relin"] and detail["keys"]["row"]["rotation_steps"]
    assert not detail["keys"]["batch"]["rotation_steps"]


def test_keys_registered_once_and_bundles_hold_only_needed_keys(setup, server):
    model, _, X = setup["digits"]
    with _user(server, setup["tokens"]["alice"]) as client:
        _, mc = client.model("digits")
        for layout in ("batch", "row"):
            client.predict_raw(X[:4], "digits", layout=layout)
            client.predict_raw(X[4:8], "digits", layout=layout)
            bundle = mc.circuit.public_bundle(layout)
            plan = model.circuit_.plans[layout]
            assert tuple(sorted(bundle.rotation_steps)) == tuple(sorted(plan.rotation_steps))
            assert (bundle.relin_keys is not None) == plan.relin
        assert len(client._key_ids) == 2  # one bundle per layout, each registered once


def test_chunks_are_sized_to_the_model(setup, server):
    model, _, X = setup["digits"]
    with _user(server, setup["tokens"]["alice"]) as client:
        _, mc = client.model("digits")
        rows = client.chunk_rows(mc, "batch")
        assert rows == mc.circuit.plans["batch"].params.slot_count  # one batch of 4096 fits 64 MiB
        request = mc.encrypt(np.repeat(X, -(-rows // len(X)), axis=0)[:rows], "batch")[1]
        assert len(request) <= DEFAULT_MAX_REQUEST_BYTES
        with _user(server, setup["tokens"]["alice"], max_request_bytes=2 * 1024 * 1024) as small:
            assert small.chunk_rows(mc, "row") < 200
            assert small.chunk_rows(mc, "batch") == rows  # one group is the least a request holds
            raw = small.predict_raw(X, "digits", layout="row")
        _close(raw, _raw_execute(model, X, "row"), model, X, "row")


def test_cli_keygen_reports_bundle_sizes_and_predict_uses_the_keys(setup, server, tmp_path, capsys):
    model, _, X = setup["digits"]
    token = setup["tokens"]["alice"]
    keys = tmp_path / "keys"
    assert cli.main(["keygen", "--model", "digits", "--out", str(keys), "--server", server, "--token", token]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("key id" in line and "MB" in line for line in lines)
    row_mb = float(next(line for line in lines if " row:" in line).split("public bundle ")[1].split(" MB")[0])
    assert row_mb > 1.0  # Galois and relinearization keys
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", str(tmp_path / "x.csv"), "--model", "digits", "--server", server, "--token", token,
                     "--keys", str(keys), "--out", str(out), "--layout", "row"]) == 0
    with Client(server, token) as client:
        for line in lines:
            client.delete_key(line.split("key id ")[1].split(",")[0])
    labels = np.loadtxt(out, delimiter=",", skiprows=1)
    assert np.array_equal(labels, model.predict(X, fhe="execute"))


def _artefacts(path) -> dict:
    return {kind: json.loads((path / f"{kind}.json").read_text()) for kind in ("server", "client")}


def _malformed(setup) -> dict[str, dict]:
    digits = _artefacts(setup["digits"][1])
    diabetes = _artefacts(setup["diabetes"][1])
    cases = {}
    cases["client-of-another-network"] = dict(digits, client=diabetes["client"])
    shorter = copy.deepcopy(digits)
    shorter["server"]["circuit"]["program"]["ops"] = shorter["server"]["circuit"]["program"]["ops"][:-1]
    cases["stage-missing"] = shorter
    bounds = copy.deepcopy(digits)
    bounds["client"]["circuit"]["plans"]["batch"]["input_bounds"][0] += 1.0
    cases["client-plan-differs"] = bounds
    steps = copy.deepcopy(digits)
    steps["server"]["circuit"]["plans"]["row"]["rotation_steps"] = [1]
    steps["client"]["circuit"]["plans"]["row"]["rotation_steps"] = [1]
    cases["rotation-steps-forged-on-both"] = steps
    kinds = copy.deepcopy(digits)
    kinds["client"]["circuit"]["kind"] = "affine"
    cases["kind-mismatch"] = kinds
    weights = copy.deepcopy(digits)
    weights["server"]["circuit"]["program"]["ops"][0]["weight"] = "nan"
    cases["weights-not-a-matrix"] = weights
    chain = copy.deepcopy(digits)
    chain["server"]["circuit"]["plans"]["batch"]["params"]["coeff_modulus_bits"] = [60]
    cases["modulus-chain-too-short"] = chain
    return cases


def test_malformed_leveled_artefacts_answer_4xx_json(setup, server):
    cases = _malformed(setup)
    with httpx.Client(base_url=server, headers={"authorization": f"Bearer {setup['tokens']['admin']}"},
                      timeout=60) as http:
        for name, body in cases.items():
            response = http.post("/v1/models", json=dict(body, name=f"bad-{name}"))
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            assert response.json()["error"] and response.json()["detail"], name
        assert not [m for m in http.get("/v1/models").json() if m["name"].startswith("bad-")]


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_leveled_models_through_redis_workers(setup, tmp_path):
    env = dict(os.environ, VEIL_MODEL_KEY=setup["key"])
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server(tmp_path / "redis"))
        front = stack.enter_context(running_server(setup["config"](queue=url, queue_timeout=60.0,
                                                                   data_dir=str(tmp_path / "front"))))
        stack.enter_context(process([sys.executable, "-m", "veil.serve.worker", "--queue", url, "--name", "nw1",
                                     "--data-dir", str(tmp_path / "worker")], env, tmp_path / "nw1.log"))
        with Client(front, setup["tokens"]["admin"]) as admin:
            admin.deploy(setup["digits"][1], "digits")
            admin.deploy(setup["diabetes"][1], "diabetes")
        clf, _, Xc = setup["digits"]
        reg, _, Xr = setup["diabetes"]
        with _user(front, setup["tokens"]["alice"], retries=0) as client:
            for layout in ("batch", "row"):
                raw = client.predict_raw(Xc, "digits", layout=layout)
                _close(raw, _raw_execute(clf, Xc, layout), clf, Xc, layout)
                assert np.array_equal(client.predict(Xc, "digits", layout=layout), clf.predict(Xc, fhe="execute"))
            _close_predictions(client.predict(Xr, "diabetes", layout="batch"),
                               reg.predict(Xr, fhe="execute", layout="batch"), rtol=2e-5)
