"""Trusted execution end to end, over TLS on loopback, with the test-only attester of
`tests.tee.fakeplatform` (its roots are trusted only by this module's policy file):

- key release: a `veil serve --queue --attest-policy` front end and `veil worker --attest-provider`
  processes on a real redis-server; a worker that attests gets the key and serves, one with another
  measurement or no evidence exits without it (refusals logged and on /metrics), a replayed nonce,
  a nonce of another worker token or an expired one gets nothing, and nonces are shared (once)
  between front ends;
- clients that trust an enclave: `veil.Client(attest=policy)` against `veil serve --attest-provider`
  predicts on plaintext, and refuses, before sending anything, a relay that terminates TLS with its
  own key, a server replaying old evidence, another measurement and a server that is no enclave;
- the new endpoints answer 401 to a caller without a token before reading any byte of a body.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_iris

from tests.tee.fakeplatform import DIR_ENV, PLATFORM, FakePlatform
from veil import ml
from veil.net import free_port
from veil.serve import Client, RequestError
from veil.serve.auth import add_token_to_file
from veil.serve.backends.redis import RedisNonceStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.server import ServerConfig, build
from veil.tee import (
    AttestationError,
    BindingError,
    Challenge,
    KeyGrant,
    KeyRequester,
    MeasurementError,
    NoEvidenceError,
    NonceError,
    load_policy,
)
from veil.tee.plugins import PluginError

from .helpers import make_certs, process, record_collateral_sources, redis_server, running_server, wait_for
from .test_attack_review import closed_by_server, head, read_response

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]
GOOD, OTHER = b"\x11" * 48, b"\x22" * 48
VERIFIER = f"{PLATFORM}=tests.tee.fakeplatform:FakeVerifier"
needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


@pytest.fixture(scope="module")
def tee(tmp_path_factory):
    """Certificates, tokens, two fake machines (both roots trusted, only GOOD measured in), the policy, a model."""
    root = tmp_path_factory.mktemp("tee")
    certs = make_certs(root)
    tokens = root / "tokens.json"
    names = {"admin": "admin", "alice": "client", "w-good": "worker", "w-other": "worker", "w-none": "worker"}
    token = {name: add_token_to_file(tokens, name, role) for name, role in names.items()}
    for name in ("w-good", "w-other", "w-none"):
        (root / f"{name}.token").write_text(token[name])
    machines = {"good": FakePlatform(GOOD), "other": FakePlatform(OTHER, root_name="Fake TEE Root B")}
    for name, machine in machines.items():
        machine.save(root / f"machine-{name}")
    policy_dir = root / "policy"
    policy_dir.mkdir()
    for name, machine in machines.items():
        (policy_dir / f"{name}.pem").write_bytes(machine.root_pem)
    policy_file = policy_dir / "policy.json"
    policy_file.write_text(json.dumps({"version": 1, "platforms": {PLATFORM: {
        "roots": ["good.pem", "other.pem"], "measurements": [GOOD.hex()]}}}))
    from tests.tee.fakeplatform import FakeVerifier

    policy = load_policy(policy_file, plugins={PLATFORM: FakeVerifier})
    key = ArtefactCipher.generate_key()
    (root / "model.key").write_text(key.hex())
    X, y = load_iris(return_X_y=True)
    model = ml.LogisticRegression(max_iter=1000).fit(X, y).compile(X)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    for name in ("VEIL_MODEL_KEY", "VEIL_MODEL_KEY_FILE", "VEIL_ADMIN_TOKEN"):
        env.pop(name, None)
    return {"root": root, "certs": certs, "tokens": tokens, "token": token, "machines": machines,
            "policy_file": policy_file, "policy": policy, "key": key, "X": X, "model": model,
            "model_dir": model.save(root / "iris"), "env": env}


def server_config(tee, **kw) -> ServerConfig:
    base = {"data_dir": str(tee["root"] / "data"), "tokens_file": str(tee["tokens"]),
            "model_key_file": str(tee["root"] / "model.key"), "tls_cert": str(tee["certs"].server_cert),
            "tls_key": str(tee["certs"].server_key)}
    return ServerConfig(**dict(base, **kw))


def tls(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def metric(url: str, ca: Path, name: str, **labels: str) -> float:
    """One sample of the server's Prometheus text (0 when absent)."""
    text = httpx.get(f"{url}/metrics", verify=tls(ca), timeout=10).text
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(name + wanted + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def front_end(tee, queue: str, log: Path) -> Iterator[str]:
    """`veil serve --queue ... --attest-policy ...` as its own process over TLS; yields its URL."""
    port = free_port()
    args = [sys.executable, "-m", "veil.cli", "serve", "--port", str(port), "--queue", queue,
            "--data-dir", str(tee["root"] / "front"), "--tokens", str(tee["tokens"]),
            "--model-key-file", str(tee["root"] / "model.key"), "--tls-cert", str(tee["certs"].server_cert),
            "--tls-key", str(tee["certs"].server_key), "--attest-policy", str(tee["policy_file"]),
            "--attest-verifier", VERIFIER, "--log-level", "info"]
    url = f"https://127.0.0.1:{port}"
    with process(args, tee["env"], log) as proc:
        wait_for(lambda: proc.poll() is None and httpx.get(f"{url}/healthz", verify=tls(tee["certs"].ca),
                                                             timeout=2).status_code == 200, 60, "veil serve")
        yield url


def worker_args(tee, queue: str, broker: str, token: str, name: str, *attest: str) -> list[str]:
    return [sys.executable, "-m", "veil.cli", "worker", "--queue", queue, "--name", name, "--claim-idle", "1",
            "--data-dir", str(tee["root"] / f"data-{name}"), "--key-broker", broker,
            "--key-broker-ca", str(tee["certs"].ca), "--key-broker-token-file", str(tee["root"] / f"{token}.token"),
            *attest]


def fake_attest(machine: str, tee) -> tuple[list[str], dict[str, str]]:
    return (["--attest-provider", "tests.tee.fakeplatform:provider"],
            dict(tee["env"], **{DIR_ENV: str(tee["root"] / f"machine-{machine}")}))


@pytest.fixture(scope="module")
def cluster(tee):
    """A redis-server and an attest-policy front end (its own process); the model deployed."""
    with contextlib.ExitStack() as stack:
        queue = stack.enter_context(redis_server(tee["root"] / "redis"))
        url = stack.enter_context(front_end(tee, queue, tee["root"] / "front.log"))
        with Client(url, tee["token"]["admin"], verify=str(tee["certs"].ca)) as admin:
            admin.deploy(tee["model_dir"], "iris")
        yield {"queue": queue, "url": url}


def exit_of(proc, log: Path, seconds: float = 90) -> tuple[int, str]:
    wait_for(lambda: proc.poll() is not None, seconds, "the worker to exit")
    return proc.returncode, log.read_text()


# --- key release to attested workers ------------------------------------------------------------

@needs_redis
def test_worker_that_attests_gets_the_key_and_serves(tee, cluster):
    args, env = fake_attest("good", tee)
    log = tee["root"] / "w-good.log"
    before = metric(cluster["url"], tee["certs"].ca, "veil_tee_key_grants_total", platform=PLATFORM)
    with process(worker_args(tee, cluster["queue"], cluster["url"], "w-good", "good", *args), env, log) as proc:
        wait_for(lambda: "model key released" in log.read_text() or proc.poll() is not None, 90, "key release")
        assert proc.poll() is None, log.read_text()[-2000:]
        X = tee["X"][::5]
        with Client(cluster["url"], tee["token"]["alice"], verify=str(tee["certs"].ca)) as client:
            assert np.array_equal(client.predict(X, "iris"), tee["model"].predict(X, fhe="disable"))
    assert metric(cluster["url"], tee["certs"].ca, "veil_tee_key_grants_total", platform=PLATFORM) == before + 1
    assert "VEIL_MODEL_KEY" not in env


@needs_redis
def test_worker_with_another_measurement_gets_no_key_and_exits(tee, cluster):
    args, env = fake_attest("other", tee)
    log = tee["root"] / "w-other.log"
    labels = {"platform": PLATFORM, "reason": "MeasurementError"}
    before = metric(cluster["url"], tee["certs"].ca, "veil_tee_key_refusals_total", **labels)
    with process(worker_args(tee, cluster["queue"], cluster["url"], "w-other", "other", *args), env, log) as proc:
        code, text = exit_of(proc, log)
    assert code == 2 and "refused the model key" in text and "MeasurementError" in text, text[-2000:]
    assert OTHER.hex() in text, "the worker is told which measurement was refused"
    assert metric(cluster["url"], tee["certs"].ca, "veil_tee_key_refusals_total", **labels) == before + 1
    front_log = (tee["root"] / "front.log").read_text()
    assert re.search(r"key release refused: platform=veil-test reason=MeasurementError", front_log)


@needs_redis
def test_worker_that_cannot_attest_gets_no_key_and_exits(tee, cluster):
    """`--attest sgx` here: no /dev/attestation, so the worker sends no evidence; the broker counts it."""
    log = tee["root"] / "w-none.log"
    labels = {"platform": "none", "reason": "NoEvidenceError"}
    before = metric(cluster["url"], tee["certs"].ca, "veil_tee_key_refusals_total", **labels)
    args = worker_args(tee, cluster["queue"], cluster["url"], "w-none", "none", "--attest", "sgx")
    with process(args, tee["env"], log) as proc:
        code, text = exit_of(proc, log)
    assert code == 2 and "NoEvidenceError" in text and "cannot attest" in text and "/dev/attestation" in text, text
    assert metric(cluster["url"], tee["certs"].ca, "veil_tee_key_refusals_total", **labels) == before + 1


@needs_redis
def test_worker_with_a_model_key_in_its_environment_is_refused(tee, cluster):
    args, env = fake_attest("good", tee)
    log = tee["root"] / "w-env.log"
    env = dict(env, VEIL_MODEL_KEY=tee["key"].hex())
    with process(worker_args(tee, cluster["queue"], cluster["url"], "w-good", "env", *args), env, log) as proc:
        code, text = exit_of(proc, log)
    assert code == 2 and "unset VEIL_MODEL_KEY" in text


@needs_redis
def test_an_attesting_worker_closes_its_pccs_source_once_the_key_is_released(tee, cluster, monkeypatch):
    """The collateral source a worker makes for its key request (--pccs-url) is closed when the
    request is over: the worker never asks the PCCS again."""
    from veil.serve.tee_setup import KeyBrokerOptions
    from veil.serve.worker import _cipher

    made = record_collateral_sources(monkeypatch)
    for name in ("VEIL_MODEL_KEY", "VEIL_MODEL_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(DIR_ENV, str(tee["root"] / "machine-good"))
    config = ServerConfig(attest_provider="tests.tee.fakeplatform:provider", pccs_url="http://127.0.0.1:9",
                          data_dir=str(tee["root"] / "data-closing"))
    broker = KeyBrokerOptions(cluster["url"], tee["token"]["w-good"], str(tee["certs"].ca))
    sealed = ArtefactCipher(tee["key"]).encrypt(b"model", "iris")
    assert _cipher(config, broker).decrypt(sealed, "iris") == b"model", "the broker's key was released"
    [source] = made
    assert source._http.is_closed


def _release(url: str, ca: Path, token: str, machine: FakePlatform, challenge_token: str | None = None
             ) -> tuple[KeyRequester, dict, httpx.Response]:
    """Ask for a challenge (with `challenge_token`, default `token`), attest, post the request."""
    with httpx.Client(base_url=url, verify=tls(ca), timeout=30) as http:
        got = http.post("/v1/tee/key-release/challenge",
                        headers={"authorization": f"Bearer {challenge_token or token}"})
        assert got.status_code == 200, got.text
        requester = KeyRequester(Challenge.from_dict(got.json()))
        body = requester.request(machine.attest(requester.report_data)).to_dict()
        answer = http.post("/v1/tee/key-release", json=body, headers={"authorization": f"Bearer {token}"})
    return requester, body, answer


@needs_redis
def test_replayed_nonce_and_another_workers_nonce_get_no_key(tee, cluster):
    ca, token, good = tee["certs"].ca, tee["token"], tee["machines"]["good"]
    labels = {"platform": PLATFORM, "reason": "NonceError"}
    before = metric(cluster["url"], ca, "veil_tee_key_refusals_total", **labels)
    requester, body, answer = _release(cluster["url"], ca, token["w-good"], good)
    assert answer.status_code == 200, answer.text
    assert requester.unwrap(KeyGrant.from_dict(answer.json())) == tee["key"]
    replay = httpx.post(f"{cluster['url']}/v1/tee/key-release", json=body, verify=tls(ca),
                        headers={"authorization": f"Bearer {token['w-good']}"})
    assert (replay.status_code, replay.json()["error"]) == (403, "NonceError")
    _, _, stolen = _release(cluster["url"], ca, token["w-other"], good, challenge_token=token["w-good"])
    assert (stolen.status_code, stolen.json()["error"]) == (403, "NonceError")
    assert "another worker" in stolen.json()["detail"]
    assert metric(cluster["url"], ca, "veil_tee_key_refusals_total", **labels) == before + 2


@needs_redis
def test_key_release_refuses_what_the_broker_did_not_challenge_or_that_binds_another_key(tee, cluster):
    """Attacks on POST /v1/tee/key-release over HTTP, none of which gets the key: genuine evidence over a
    nonce the worker made up; an honest worker's evidence posted with a relay's own public key; evidence
    over one challenge posted with another challenge's nonce; no evidence; and a correct request posted
    with a client token, refused before its nonce is touched (the worker then still gets the key)."""
    ca, url, good = tee["certs"].ca, cluster["url"], tee["machines"]["good"]
    worker, alice = ({"authorization": f"Bearer {tee['token'][n]}"} for n in ("w-good", "alice"))
    reasons = {("NonceError", PLATFORM): 1, ("BindingError", PLATFORM): 2, ("NoEvidenceError", "none"): 1}
    before = {r: metric(url, ca, "veil_tee_key_refusals_total", platform=p, reason=r) for r, p in reasons}
    with httpx.Client(base_url=url, verify=tls(ca), timeout=30) as http:
        def challenge() -> KeyRequester:
            got = http.post("/v1/tee/key-release/challenge", headers=worker)
            assert got.status_code == 200, got.text
            return KeyRequester(Challenge.from_dict(got.json()))

        def refused(body: dict, error: str, headers: dict = worker) -> None:
            answer = http.post("/v1/tee/key-release", json=body, headers=headers)
            assert (answer.status_code, answer.json()["error"]) == (403, error), answer.text
            assert "wrapped_key" not in answer.text

        context = challenge().challenge.context
        made_up = KeyRequester(Challenge(os.urandom(32), context, 60))
        refused(made_up.request(good.attest(made_up.report_data)).to_dict(), "NonceError")
        honest = challenge()
        body = honest.request(good.attest(honest.report_data)).to_dict()
        relay = KeyRequester(honest.challenge)
        refused(dict(body, public_key=base64.b64encode(relay.public_key).decode()), "BindingError")
        first, second = challenge(), challenge()
        body = first.request(good.attest(first.report_data)).to_dict()
        refused(dict(body, nonce=base64.b64encode(second.challenge.nonce).decode()), "BindingError")
        refused(challenge().request(None).to_dict(), "NoEvidenceError")
        honest = challenge()
        body = honest.request(good.attest(honest.report_data)).to_dict()
        refused(body, "forbidden", headers=alice)
        granted = http.post("/v1/tee/key-release", json=body, headers=worker)
        assert granted.status_code == 200, granted.text
        assert honest.unwrap(KeyGrant.from_dict(granted.json())) == tee["key"]
    for (reason, platform), count in reasons.items():
        assert metric(url, ca, "veil_tee_key_refusals_total", platform=platform, reason=reason) == \
            before[reason] + count, reason


@needs_redis
def test_worker_tokens_only_ask_for_keys_and_only_they_do(tee, cluster):
    """A worker token sits in an enclave's unmeasured files, readable by the host: it opens nothing else."""
    answer = httpx.post(f"{cluster['url']}/v1/tee/key-release/challenge", verify=tls(tee["certs"].ca),
                        headers={"authorization": f"Bearer {tee['token']['alice']}"})
    assert (answer.status_code, answer.json()["error"]) == (403, "forbidden")
    for path, body in (("/v1/tee/evidence", {"nonce": base64.b64encode(bytes(32)).decode()}),
                       ("/v1/models/iris/predict/plain", {"features": [[1.0, 2.0, 3.0, 4.0]]})):
        answer = httpx.post(f"{cluster['url']}{path}", json=body, verify=tls(tee["certs"].ca),
                            headers={"authorization": f"Bearer {tee['token']['w-good']}"})
        assert (answer.status_code, answer.json()["error"]) == (403, "forbidden"), path
    with Client(cluster["url"], tee["token"]["w-good"], verify=str(tee["certs"].ca)) as worker:
        for call in (worker.models, lambda: worker.model("iris"),
                     lambda: worker.register(ml.ModelClient.load(tee["model_dir"]).public_bundle_bytes("batch"))):
            with pytest.raises(RequestError) as refused:
                call()
            assert refused.value.status == 403


@needs_redis
def test_a_nonce_is_shared_by_the_front_ends_and_still_used_once(tee, cluster):
    """A second front end on the same Redis answers a challenge the first issued, exactly once."""
    config = server_config(tee, queue=cluster["queue"], data_dir=str(tee["root"] / "front-2"),
                           attest_policy=str(tee["policy_file"]), attest_verifiers=(VERIFIER,))
    ca, token, good = tee["certs"].ca, tee["token"]["w-good"], tee["machines"]["good"]
    with running_server(config) as second, httpx.Client(verify=tls(ca), timeout=30) as http:
        auth = {"authorization": f"Bearer {token}"}
        challenge = Challenge.from_dict(http.post(f"{cluster['url']}/v1/tee/key-release/challenge",
                                                  headers=auth).json())
        requester = KeyRequester(challenge)
        body = requester.request(good.attest(requester.report_data)).to_dict()
        answers = []
        threads = [threading.Thread(target=lambda u=u: answers.append(
            http.post(f"{u}/v1/tee/key-release", json=body, headers=auth))) for u in (second, cluster["url"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(a.status_code for a in answers) == [200, 403]
    granted = next(a for a in answers if a.status_code == 200)
    assert requester.unwrap(KeyGrant.from_dict(granted.json())) == tee["key"]


@needs_redis
def test_redis_nonce_store_is_single_use_expiring_bounded_and_bound_to_its_owner(tmp_path):
    with redis_server(tmp_path / "redis") as url:
        store = RedisNonceStore(url, ttl=0.3, max_pending=2)
        store.issue(b"a" * 32, "w1")
        with pytest.raises(NonceError, match="another worker"):
            store.consume(b"a" * 32, "w2")
        with pytest.raises(NonceError):
            store.consume(b"a" * 32, "w1")
        store.issue(b"b" * 32, "w1")
        wait_for(lambda: not store.client.exists(store.names.tee_nonce((b"b" * 32).hex())), 5, "expiry")
        with pytest.raises(NonceError, match="expired"):
            store.consume(b"b" * 32, "w1")
        store.ttl = 60
        for n in b"cde":
            store.issue(bytes([n]) * 32, "w1")
        assert store.client.zcard(store.names.tee_nonces) == 2
        with pytest.raises(NonceError):
            store.consume(b"c" * 32, "w1")
        store.consume(b"e" * 32, "w1")
        results = []
        store.issue(b"f" * 32, "w1")

        def race() -> None:
            try:
                store.consume(b"f" * 32, "w1")
                results.append("ok")
            except NonceError:
                results.append("refused")

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results) == ["ok"] + ["refused"] * 7


# --- clients that trust an enclave instead of encrypting ----------------------------------------

@contextlib.contextmanager
def enclave(tee, monkeypatch, machine: str = "good", factory: str = "provider", **kw) -> Iterator[str]:
    """`veil serve --attest-provider tests.tee.fakeplatform:FACTORY` (in a thread), the model deployed."""
    monkeypatch.setenv(DIR_ENV, str(tee["root"] / f"machine-{machine}"))
    config = server_config(tee, data_dir=str(tee["root"] / f"enclave-{machine}-{factory}"),
                           attest_provider=f"tests.tee.fakeplatform:{factory}", **kw)
    with running_server(config) as url:
        with Client(url, tee["token"]["admin"], verify=str(tee["certs"].ca)) as admin:
            admin.deploy(tee["model_dir"], "iris")
        yield url


def plain_requests(url: str, ca: Path) -> float:
    return metric(url, ca, "veil_requests_total", route="/v1/models/{name}/predict/plain", status="200")


def test_client_with_attest_verifies_the_enclave_then_sends_plaintext(tee, monkeypatch):
    X = tee["X"]
    with enclave(tee, monkeypatch) as url, \
            Client(url, tee["token"]["alice"], verify=str(tee["certs"].ca), attest=tee["policy"]) as client:
        assert np.array_equal(client.predict(X, "iris"), tee["model"].predict(X, fhe="disable"))
        np.testing.assert_allclose(client.predict_proba(X[:7], "iris"), tee["model"].predict_proba(X[:7]),
                                   rtol=1e-9, atol=1e-12)
        assert client.attested is not None and client.attested.claims.measurement == GOOD
        assert plain_requests(url, tee["certs"].ca) == 2


def test_client_refuses_a_relay_that_terminates_tls_with_its_own_key(tee, monkeypatch):
    """A man in the middle with a certificate the client's CA accepts forwards the evidence request to the
    real enclave; the evidence binds the enclave's key, not the relay's, so nothing is sent."""
    (tee["root"] / "relay").mkdir(exist_ok=True)
    relay_certs = make_certs(tee["root"] / "relay")
    with enclave(tee, monkeypatch) as url, tls_relay(url, relay_certs) as (relay, seen):
        with Client(relay, tee["token"]["alice"], verify=str(relay_certs.ca), attest=tee["policy"]) as client, \
                pytest.raises(BindingError, match="TLS key"):
            client.predict(tee["X"][:3], "iris")
        assert b"/v1/tee/evidence" in b"".join(seen), "the relay did carry the evidence request"
        assert b"predict" not in b"".join(seen) and b"/v1/models" not in b"".join(seen)
        assert plain_requests(url, tee["certs"].ca) == 0


def test_client_refuses_replayed_evidence(tee, monkeypatch):
    with enclave(tee, monkeypatch, factory="replaying_provider") as url:
        with Client(url, tee["token"]["alice"], verify=str(tee["certs"].ca), attest=tee["policy"]) as client, \
                pytest.raises(BindingError, match="nonce"):
            client.predict(tee["X"][:3], "iris")
        assert plain_requests(url, tee["certs"].ca) == 0


def test_client_refuses_another_measurement(tee, monkeypatch):
    with enclave(tee, monkeypatch, machine="other") as url:
        with Client(url, tee["token"]["alice"], verify=str(tee["certs"].ca), attest=tee["policy"]) as client, \
                pytest.raises(MeasurementError):
            client.predict(tee["X"][:3], "iris")
        assert plain_requests(url, tee["certs"].ca) == 0


def test_a_server_that_is_no_enclave_gets_nothing_and_refuses_plaintext(tee):
    with running_server(server_config(tee, data_dir=str(tee["root"] / "plain"))) as url:
        with Client(url, tee["token"]["admin"], verify=str(tee["certs"].ca)) as admin:
            admin.deploy(tee["model_dir"], "iris")
        with Client(url, tee["token"]["alice"], verify=str(tee["certs"].ca), attest=tee["policy"]) as client, \
                pytest.raises(NoEvidenceError, match="tee_unavailable"):
            client.predict(tee["X"][:3], "iris")
        direct = httpx.post(f"{url}/v1/models/iris/predict/plain", json={"features": [[1, 2, 3, 4]]},
                            verify=tls(tee["certs"].ca), headers={"authorization": f"Bearer {tee['token']['alice']}"})
        assert (direct.status_code, direct.json()["error"]) == (404, "tee_unavailable")
        for path in ("/v1/tee/key-release/challenge", "/v1/tee/evidence"):
            who = "w-good" if "key" in path else "alice"
            answer = httpx.post(f"{url}{path}", json={"nonce": base64.b64encode(bytes(32)).decode()},
                                verify=tls(tee["certs"].ca), headers={"authorization": f"Bearer {tee['token'][who]}"})
            assert (answer.status_code, answer.json()["error"]) == (404, "tee_unavailable"), path


def test_attest_needs_https_and_plugin_names_are_checked(tee, monkeypatch):
    monkeypatch.setenv(DIR_ENV, str(tee["root"] / "machine-good"))
    with pytest.raises(ValueError, match="needs --tls-cert"):
        build(server_config(tee, tls_cert=None, tls_key=None, attest_provider="tests.tee.fakeplatform:provider"))
    with Client("http://127.0.0.1:9", "t", attest=tee["policy"]) as client, \
            pytest.raises(AttestationError, match="https"):
        client.models()
    for bad in ({"attest_provider": "not a spec"}, {"attest_provider": "tests.tee.nowhere:provider"},
                {"attest_policy": str(tee["policy_file"]), "attest_verifiers": ("veil-test=os:nothing_here",)}):
        with pytest.raises(PluginError):
            build(server_config(tee, **bad))


def test_plaintext_with_the_wrong_shape_is_a_422(tee, monkeypatch):
    with enclave(tee, monkeypatch) as url:
        for features in ([[1.0, 2.0]], [[1.0, 2.0, 3.0, 4.0], [1.0]]):
            answer = httpx.post(f"{url}/v1/models/iris/predict/plain", json={"features": features},
                                verify=tls(tee["certs"].ca),
                                headers={"authorization": f"Bearer {tee['token']['alice']}"})
            assert answer.status_code == 422, answer.text
        answer = httpx.post(f"{url}/v1/tee/evidence", json={"nonce": "AAAA"}, verify=tls(tee["certs"].ca),
                            headers={"authorization": f"Bearer {tee['token']['alice']}"})
        assert answer.status_code in (400, 422)


# --- nothing parsed for a caller without a token ------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/tee/key-release/challenge", "/v1/tee/key-release", "/v1/tee/evidence",
                                  "/v1/models/iris/predict/plain"])
def test_new_endpoints_answer_401_before_reading_a_body(tee, monkeypatch, path):
    with enclave(tee, monkeypatch, attest_policy=str(tee["policy_file"]), attest_verifiers=(VERIFIER,)) as url:
        ctx = ssl.create_default_context(cafile=str(tee["certs"].ca))
        for authorization in ({}, {"authorization": "Bearer not-a-token"}):
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(head("POST", path, {"content-type": "application/json",
                                                 "content-length": str(64 << 20), **authorization}))
                sock.sendall(b'{"nonce": ')  # a body that is never completed, and not JSON either
                status, headers, body, rest = read_response(sock)
                assert (status, json.loads(body)["error"]) == (401, "unauthorized"), (path, status)
                assert headers["www-authenticate"] == "Bearer"
                assert closed_by_server(sock, rest)
        answer = httpx.post(f"{url}{path}", verify=tls(tee["certs"].ca))
        assert answer.status_code == 401


@contextlib.contextmanager
def tls_relay(upstream: str, certs) -> Iterator[tuple[str, list[bytes]]]:
    """A TLS-terminating relay on a free port (its own certificate) to `upstream`; records what clients send."""
    port = free_port()
    host, up_port = "127.0.0.1", int(upstream.rsplit(":", 1)[1])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    client_ctx = ssl._create_unverified_context()
    listener = socket.create_server((host, port))
    listener.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def relay(down: ssl.SSLSocket, up: ssl.SSLSocket) -> None:
        """Both directions of one connection in one thread (an SSL socket is not safe to read and write
        from two threads at once). A readable socket may hold a TLS record without application data (a
        TLS 1.3 session ticket): its read times out quickly instead of blocking the other direction."""
        other = {down: up, up: down}
        with contextlib.suppress(OSError, ValueError), down, up:
            while not stop.is_set():
                ready = [s for s in other if s.pending()] or select.select(list(other), [], [], 0.2)[0]
                for src in ready:
                    src.settimeout(0.2)
                    try:
                        data = src.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    if src is down:
                        seen.append(data)
                    other[src].settimeout(10)
                    other[src].sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                down = server_ctx.wrap_socket(raw, server_side=True)
                up = client_ctx.wrap_socket(socket.create_connection((host, up_port), timeout=10),
                                            server_hostname=host)
            except OSError:
                raw.close()
                continue
            threading.Thread(target=relay, args=(down, up), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"https://{host}:{port}", seen
    finally:
        stop.set()
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("kind", ["logreg", "mlp", "trees"])
def test_plaintext_outputs_equal_what_the_encrypted_path_decrypts(tmp_path, kind):
    """/predict/plain evaluates the deployed circuit itself: its raw outputs are the CKKS path's, up to
    CKKS's approximation, for an affine model, a leveled network and a tree ensemble."""
    from veil.serve.tee import plain_outputs

    X, y = load_iris(return_X_y=True)
    model = {"logreg": ml.LogisticRegression(max_iter=500),
             "mlp": ml.MLPClassifier(hidden_layer_sizes=(4,), max_iter=50, random_state=0),
             "trees": ml.DecisionTreeClassifier(max_depth=3, random_state=0)}[kind].fit(X, y).compile(X)
    path = model.save(tmp_path / kind)
    server, client = ml.ModelServer.load(path), ml.ModelClient.load(path)
    layout, request = client.encrypt(X[:16])
    decrypted = client.decrypt(server.run(request, server.load_bundle(client.public_bundle_bytes(layout))), 16)
    plain = plain_outputs(server.circuit, X)
    np.testing.assert_allclose(plain[:16], decrypted, atol=1e-3)
    assert np.array_equal(client.predict(plain), model.predict(X, fhe="disable"))


def test_a_worker_whose_broker_is_unreachable_gets_a_clear_error(tee):
    from veil.serve.attested import request_model_key
    from veil.tee import KeyReleaseError

    with pytest.raises(KeyReleaseError, match="cannot reach the key broker"):
        request_model_key(f"https://127.0.0.1:{free_port()}", "t", tee["machines"]["good"], attempts=2,
                          backoff=0.01, timeout=2)
