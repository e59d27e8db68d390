"""Cluster serving against a real redis-server on loopback: front ends queue requests on a Redis
stream, `veil worker` processes answer; shared registries, killed workers, errors, readiness."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from sklearn.datasets import load_diabetes, load_wine
from sklearn.preprocessing import StandardScaler

from veil import ml
from veil.he import PublicBundle, SecretKeys, preset
from veil.serve import Client, RequestError
from veil.serve import worker as worker_module
from veil.serve.auth import TokenStore, add_token_to_file, revoke_tokens
from veil.serve.backends.base import MAX_VERSION, KeyQuota, KeyRecord, legacy_key_id, scoped_key_id
from veil.serve.backends.redis import RedisKeyNames, RedisStore, RemoteError, decode_result, encode_result, post_result
from veil.serve.crypto import ArtefactCipher
from veil.serve.errors import ConflictError, NotFoundError, QuotaExceededError, ServeError, UnauthorizedError
from veil.serve.server import ServerConfig, build
from veil.serve.service import Service
from veil.serve.worker import run_worker

from .helpers import free_port, make_certs, open_sockets, process, redis_server, running_server, wait_for

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]
KEYS = RedisKeyNames()


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    tokens = root / "tokens.json"
    names = {"admin": add_token_to_file(tokens, "admin", "admin"),
             "alice": add_token_to_file(tokens, "alice", "client"),
             "bob": add_token_to_file(tokens, "bob", "client")}
    key = ArtefactCipher.generate_key().hex()
    key_file = root / "model.key"
    key_file.write_text(key)
    env = dict(os.environ, VEIL_MODEL_KEY=key)
    Xw, yw = load_wine(return_X_y=True)
    Xw = StandardScaler().fit_transform(Xw)[::3]
    yw = yw[::3]
    Xd, yd = load_diabetes(return_X_y=True)
    Xd, yd = Xd[:120], yd[:120]
    wine = ml.LogisticRegression(max_iter=2000).fit(Xw, yw).compile(Xw)
    diabetes = ml.PoissonRegressor(alpha=0.01, max_iter=1000).fit(Xd, yd).compile(Xd)
    models = {"wine": (wine, wine.save(root / "wine"), Xw),
              "diabetes": (diabetes, diabetes.save(root / "diabetes"), Xd)}

    def config(url: str, **kw) -> ServerConfig:
        base = {"queue": url, "data_dir": str(root / "data"), "tokens_file": str(tokens),
                "model_key_file": str(key_file), "queue_timeout": 30.0}
        return ServerConfig(**dict(base, **kw))

    def worker(url: str, name: str, claim_idle: float = 1.0, pause: float = 0.0):
        program = ["-m", "tests.serve.slow_worker", str(pause)] if pause else ["-m", "veil.serve.worker"]
        wenv = dict(env, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
        return process([sys.executable, *program, "--queue", url, "--name", name,
                        "--claim-idle", str(claim_idle), "--data-dir", str(root / "worker-data")],
                       wenv, root / f"{name}.log")

    return {"root": root, "tokens": names, "env": env, "models": models, "config": config, "worker": worker}


@pytest.fixture(scope="module")
def cluster(setup):
    """One Redis, one in-thread front end in queue mode, two worker processes, both models deployed."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server(setup["root"] / "redis-main"))
        front = stack.enter_context(running_server(setup["config"](url)))
        workers = [stack.enter_context(setup["worker"](url, f"w{i}")) for i in (1, 2)]
        with Client(front, setup["tokens"]["admin"]) as admin:
            for name, (_, path, _) in setup["models"].items():
                admin.deploy(path, name)
        yield {"redis": url, "front": front, "workers": workers, "db": redis.Redis.from_url(url)}


@pytest.fixture
def lone_redis(setup, tmp_path):
    """A fresh Redis per test, for tests that control exactly which workers exist."""
    with redis_server(tmp_path / "redis") as url:
        yield url


def _stats(db: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in db.hgetall(KEYS.stats).items()}


def _pending(db: redis.Redis) -> int:
    with contextlib.suppress(redis.ResponseError):
        return int(db.xpending(KEYS.stream, KEYS.group)["pending"])
    return 0


def test_end_to_end_classification_and_regression(setup, cluster):
    wine, _, Xw = setup["models"]["wine"]
    diabetes, _, Xd = setup["models"]["diabetes"]
    before = _stats(cluster["db"]).get("answered", 0)
    with Client(cluster["front"], setup["tokens"]["alice"], retries=0) as client:
        raw = client.predict_raw(Xw, "wine", layout="batch")
        np.testing.assert_allclose(raw, wine.decision_function(Xw, fhe="execute", layout="batch"), atol=1e-3)
        assert np.array_equal(client.predict(Xw, "wine", layout="row"), wine.predict(Xw, fhe="execute"))
        pred = client.predict(Xd, "diabetes")
        np.testing.assert_allclose(pred, diabetes.predict(Xd, fhe="execute"), rtol=1e-3)
        np.testing.assert_allclose(pred, diabetes.predict(Xd), rtol=1e-3)
    db = cluster["db"]
    assert _stats(db)["answered"] - before == 3
    assert db.xlen(KEYS.stream) == 0 and _pending(db) == 0
    assert not list(db.scan_iter(KEYS.result("*")))
    assert all(w.poll() is None for w in cluster["workers"])


def test_concurrent_requests_are_each_answered_once(setup, cluster):
    wine, _, Xw = setup["models"]["wine"]
    db = cluster["db"]
    before = _stats(db)
    results: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        with Client(cluster["front"], setup["tokens"]["alice"], retries=0) as client:
            results[i] = client.predict(Xw[i::6], "wine")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(6))
    for i, got in results.items():
        assert np.array_equal(got, wine.predict(Xw[i::6]))
    after = _stats(db)
    assert after["answered"] - before.get("answered", 0) == 6
    assert after.get("duplicates", 0) == before.get("duplicates", 0)


def test_registries_are_shared_between_front_ends(setup, cluster):
    wine, path, Xw = setup["models"]["wine"]
    port = free_port()
    code = ("from veil.serve.server import ServerConfig, serve; "
            f"serve(ServerConfig(host='127.0.0.1', port={port}, queue={cluster['redis']!r}, "
            f"data_dir={str(setup['root'] / 'data2')!r}, tokens_file={str(setup['root'] / 'tokens.json')!r}, "
            "queue_timeout=30.0, log_level='warning'))")
    second = f"http://127.0.0.1:{port}"
    with process([sys.executable, "-c", code], setup["env"], setup["root"] / "front2.log") as proc:
        wait_for(lambda: httpx.get(f"{second}/healthz").status_code == 200, 30, "second front end")
        with Client(cluster["front"], setup["tokens"]["alice"]) as first_client:
            _, mc = first_client.model("wine")
            name, request = mc.encrypt(Xw[:7], "batch")
            key_id = first_client.register(mc.public_bundle_bytes(name))
        headers = {"authorization": f"Bearer {setup['tokens']['alice']}", "x-veil-key-id": key_id}
        with httpx.Client(base_url=second, headers=headers, timeout=60) as http:
            assert http.get(f"/v1/keys/{key_id}").json()["owner"] == "alice"
            assert {("wine", 1), ("diabetes", 1)} <= {(m["name"], m["version"]) for m in
                                                    http.get("/v1/models").json()}
            response = http.post("/v1/models/wine/predict", content=request)
            assert response.status_code == 200 and response.headers["x-veil-model-version"] == "1"
            assert np.array_equal(mc.predict(mc.decrypt(response.content)), wine.predict(Xw[:7]))
            assert http.get("/readyz").status_code == 200
        versions: list[int] = []
        lock = threading.Lock()

        def deploy(url: str) -> None:
            with Client(url, setup["tokens"]["admin"], retries=0) as admin:
                version = admin.deploy(path, "shared")["version"]
            with lock:
                versions.append(version)

        threads = [threading.Thread(target=deploy, args=(u,)) for u in [cluster["front"], second] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(versions) == list(range(1, 9))
        with Client(second, setup["tokens"]["admin"]) as admin:
            with pytest.raises(RequestError) as exc:
                admin.deploy(path, "shared", version=3)
            assert exc.value.status == 409
        with Client(cluster["front"], setup["tokens"]["alice"]) as client:
            assert client.model("shared")[0] == 8
        assert proc.poll() is None


def test_errors_through_the_queue_keep_their_status(setup, cluster):
    _, _, Xw = setup["models"]["wine"]
    _, _, Xd = setup["models"]["diabetes"]
    db = cluster["db"]
    with Client(cluster["front"], setup["tokens"]["alice"]) as client:
        _, mc = client.model("wine")
        name, request = mc.encrypt(Xw[:4], "batch")
        key_id = client.register(mc.public_bundle_bytes(name))
        _, mcd = client.model("diabetes")
        _, request_d = mcd.encrypt(Xd[:4], "batch")
    headers = {"authorization": f"Bearer {setup['tokens']['alice']}", "x-veil-key-id": key_id}
    before = _stats(db).get("answered", 0)
    with httpx.Client(base_url=cluster["front"], headers=headers, timeout=60) as http:
        queued = {  # evaluated by a worker, which answers with the error
            "garbage ciphertexts": (http.post("/v1/models/wine/predict", content=b"garbage" * 100), 400),
            "truncated": (http.post("/v1/models/wine/predict", content=request[: len(request) // 3]), 400),
            "wrong shape": (http.post("/v1/models/wine/predict", content=request_d), 422),
        }
        refused = {  # refused by the front end before queueing
            "unknown key": (http.post("/v1/models/wine/predict", content=request,
                                      headers={"x-veil-key-id": "0" * 32}), 404),
            "unknown model": (http.post("/v1/models/nope/predict", content=request), 404),
            "unknown version": (http.post("/v1/models/wine/predict?version=9", content=request), 404),
            "bad name": (http.post("/v1/models/.x/predict", content=request), 400),
            "another's key": (http.post("/v1/models/wine/predict", content=request,
                                        headers={"authorization": f"Bearer {setup['tokens']['bob']}"}), 404),
        }
        for what, (response, status) in {**queued, **refused}.items():
            assert response.status_code == status, (what, response.status_code, response.text[:200])
            assert set(response.json()) == {"error", "detail"}, what
        assert queued["garbage ciphertexts"][0].json()["error"] == "WireFormatError"
        assert _stats(db)["answered"] - before == len(queued)
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.post("/v1/models/wine/predict", content=request).status_code == 200
    assert all(w.poll() is None for w in cluster["workers"])


def test_malformed_jobs_are_dropped_and_workers_survive(setup, cluster):
    db = cluster["db"]
    db.xadd(KEYS.stream, {"junk": b"\xff"})
    db.xadd(KEYS.stream, {"id": "x", "timeout": "not a number"})
    wait_for(lambda: db.xlen(KEYS.stream) == 0 and _pending(db) == 0, 30, "malformed jobs to be dropped")
    assert all(w.poll() is None for w in cluster["workers"])
    wine, _, Xw = setup["models"]["wine"]
    with Client(cluster["front"], setup["tokens"]["alice"], retries=0) as client:
        assert np.array_equal(client.predict(Xw[:5], "wine"), wine.predict(Xw[:5]))


def test_worker_errors_round_trip_as_the_same_http_error():
    with pytest.raises(RemoteError) as exc:
        decode_result(encode_result(error=NotFoundError("unknown key id")))
    assert (exc.value.status, exc.value.code, str(exc.value)) == (404, "not_found", "unknown key id")
    with pytest.raises(RemoteError) as exc:
        decode_result(encode_result(error=KeyError("boom")))
    assert exc.value.status == 500 and "boom" not in str(exc.value)
    assert decode_result(encode_result(3, b"\x00\nbody")) == (3, b"\x00\nbody")


def test_answers_are_posted_once(lone_redis):
    db = redis.Redis.from_url(lone_redis)
    assert post_result(db, KEYS, "r1", b"first", 60, "w1") is True
    assert post_result(db, KEYS, "r1", b"second", 60, "w2") is False
    assert db.lrange(KEYS.result("r1"), 0, -1) == [b"first"]
    assert _stats(db) == {"answered": 1, "duplicates": 1}
    assert 0 < db.ttl(KEYS.result("r1")) <= 60 and 0 < db.ttl(KEYS.done("r1")) <= 60


def test_redis_store_versions_and_keys_are_atomic(lone_redis):
    stores = [RedisStore(lone_redis), RedisStore(lone_redis)]
    versions: list[int] = []
    lock = threading.Lock()

    def deploy(store: RedisStore) -> None:
        for _ in range(10):
            record = store.put_model("m", None, {"n_features": 1}, b"s" * 10, b"c")
            with lock:
                versions.append(record.version)

    threads = [threading.Thread(target=deploy, args=(stores[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(versions) == list(range(1, 41))
    with pytest.raises(ConflictError):
        stores[0].put_model("m", 7, {}, b"", b"")
    assert stores[1].put_model("m", 100, {}, b"", b"").version == 100
    assert stores[0].put_model("m", None, {}, b"", b"").version == 101
    got = stores[1].get_model("m", 5)
    assert got is not None and (got.version, got.server_blob, got.meta) == (5, b"s" * 10, {"n_features": 1})
    assert stores[0].get_model("m").version == 101 and stores[0].get_model("m", 102) is None
    assert stores[0].get_model("absent") is None
    assert [(r.name, r.version) for r in stores[1].list_models()][:3] == [("m", 1), ("m", 2), ("m", 3)]

    record = KeyRecord("k1", "alice", "p", (1, 2), 1.5, b"\x00bundle")
    assert stores[0].put_key(record) == record
    assert stores[1].put_key(KeyRecord("k1", "alice", "p", (1, 2), 9.0, b"\x00bundle")) == record
    with pytest.raises(ConflictError):
        stores[1].put_key(KeyRecord("k1", "mallory", "p", (), 2.0, b"\x00bundle"))
    assert stores[1].get_key("k1") == record and stores[1].get_key("nope") is None


def _predict_in_thread(url: str, token: str, X: np.ndarray, out: dict, key: int) -> threading.Thread:
    def run() -> None:
        try:
            with Client(url, token, retries=0) as client:
                out[key] = client.predict(X, "wine")
        except Exception as exc:
            out[key] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_killed_worker_loses_nothing(setup, lone_redis):
    wine, path, Xw = setup["models"]["wine"]
    db = redis.Redis.from_url(lone_redis)
    with running_server(setup["config"](lone_redis, queue_timeout=60.0)) as front:
        with Client(front, setup["tokens"]["admin"]) as admin:
            admin.deploy(path, "wine")
        with setup["worker"](lone_redis, "victim", pause=60) as victim:
            out: dict[int, object] = {}
            token = setup["tokens"]["alice"]
            threads = [_predict_in_thread(front, token, Xw[i::3], out, i) for i in range(3)]
            wait_for(lambda: db.xlen(KEYS.stream) == 3 and _pending(db) == 1, 30, "victim holding one job")
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
        assert not out, "no answer can exist while the only worker is paused or dead"
        with setup["worker"](lone_redis, "rescuer") as rescuer:
            for t in threads:
                t.join(60)
            assert rescuer.poll() is None
        for i in range(3):
            assert isinstance(out[i], np.ndarray), out[i]
            assert np.array_equal(out[i], wine.predict(Xw[i::3]))
    stats = _stats(db)
    assert stats["answered"] == 3 and stats.get("duplicates", 0) == 0 and "timeouts" not in stats
    assert db.xlen(KEYS.stream) == 0 and _pending(db) == 0


def test_slow_worker_robbed_of_its_job_does_not_answer_twice(setup, lone_redis):
    wine, path, Xw = setup["models"]["wine"]
    db = redis.Redis.from_url(lone_redis)
    with running_server(setup["config"](lone_redis)) as front:
        with Client(front, setup["tokens"]["admin"]) as admin:
            admin.deploy(path, "wine")
        with setup["worker"](lone_redis, "slow", claim_idle=60, pause=10) as slow:
            out: dict[int, object] = {}
            thread = _predict_in_thread(front, setup["tokens"]["alice"], Xw, out, 0)
            wait_for(lambda: _pending(db) == 1, 30, "slow worker holding the job")
            with setup["worker"](lone_redis, "fast", claim_idle=1):
                thread.join(60)
                assert np.array_equal(out[0], wine.predict(Xw))
                wait_for(lambda: _stats(db).get("duplicates") == 1, 30, "the slow worker's late answer")
            assert slow.poll() is None
    assert _stats(db)["answered"] == 1
    assert [db.get(k) for k in db.scan_iter(KEYS.done("*"))] == [b"fast"]
    assert not list(db.scan_iter(KEYS.result("*"))) and _pending(db) == 0


def test_queue_timeout_answers_503_and_late_jobs_are_never_evaluated(setup, lone_redis):
    _, path, Xw = setup["models"]["wine"]
    db = redis.Redis.from_url(lone_redis)
    with running_server(setup["config"](lone_redis, queue_timeout=1.5)) as front:
        with Client(front, setup["tokens"]["admin"]) as admin:
            admin.deploy(path, "wine")
        with Client(front, setup["tokens"]["alice"], retries=0) as client, pytest.raises(RequestError) as exc:
            client.predict(Xw[:3], "wine")
        assert exc.value.status == 503 and "no worker answered" in exc.value.detail
        assert _stats(db) == {"timeouts": 1} and db.xlen(KEYS.stream) == 0
        db.xadd(KEYS.stream, {"id": "late", "name": "wine", "version": "1", "key_id": "k",
                              "timeout": "0.001", "payload": b""})
        with setup["worker"](lone_redis, "latecomer"):
            wait_for(lambda: db.xlen(KEYS.stream) == 0, 30, "the expired job to be dropped")
        assert _stats(db) == {"timeouts": 1, "expired": 1} and _pending(db) == 0
        assert not db.exists(KEYS.result("late"))


def test_worker_stops_gracefully_on_sigterm(setup, lone_redis):
    db = redis.Redis.from_url(lone_redis)
    with setup["worker"](lone_redis, "polite") as worker:
        wait_for(lambda: [c["name"] for c in db.xinfo_consumers(KEYS.stream, KEYS.group)] == [b"polite"],
                 30, "worker to join")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    assert db.xinfo_consumers(KEYS.stream, KEYS.group) == []


def test_run_worker_in_a_thread_stops_on_its_event(setup, lone_redis):
    db = redis.Redis.from_url(lone_redis)
    stop, result = threading.Event(), {}

    def run() -> None:
        config = setup["config"](lone_redis)
        result["handled"] = run_worker(config, name="inproc", claim_idle=1, stop_event=stop)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: [c["name"] for c in db.xinfo_consumers(KEYS.stream, KEYS.group)] == [b"inproc"],
             30, "worker to join")
    stop.set()
    thread.join(15)
    assert not thread.is_alive() and result == {"handled": 0}
    assert db.xinfo_consumers(KEYS.stream, KEYS.group) == []


@pytest.mark.parametrize("ending", ["stopped", "failed"])
def test_a_worker_leaves_no_redis_connection_open_however_it_ends(setup, lone_redis, monkeypatch, ending):
    """`run_worker` closes its store's and its job loop's Redis clients when it returns or raises: both
    had a socket open while it served a job (the store looked the key up), and once it has ended
    redis-server lists no client but the test's own."""
    db = redis.Redis.from_url(lone_redis)
    made = []

    class Recorded(worker_module.Worker):  # the worker run_worker makes, to look at its clients
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def run(self, stop_event: threading.Event, max_jobs: int | None = None) -> int:
            handled = super().run(stop_event, max_jobs)
            if ending == "failed":
                raise RuntimeError("the job loop failed")
            return handled

    monkeypatch.setattr(worker_module, "Worker", Recorded)
    stop, result = threading.Event(), {}

    def run() -> None:
        try:
            result["handled"] = run_worker(setup["config"](lone_redis), name="closing", claim_idle=1, stop_event=stop)
        except RuntimeError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: [c["name"] for c in db.xinfo_consumers(KEYS.stream, KEYS.group)] == [b"closing"],
             30, "worker to join")
    db.xadd(KEYS.stream, {"id": "job-1", "name": "wine", "version": "1", "key_id": "unknown", "timeout": "30",
                          "payload": b""})
    wait_for(lambda: db.exists(KEYS.done("job-1")), 30, "the job to be answered")
    [worker] = made
    assert open_sockets(worker.client) == 1 and open_sockets(worker.service.store.client) == 1
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    assert result == ({"handled": 1} if ending == "stopped" else {"error": "the job loop failed"})
    assert open_sockets(worker.client) == 0 and open_sockets(worker.service.store.client) == 0
    wait_for(lambda: [c["id"] for c in db.client_list()] == [str(db.client_id())], 10,
             "the worker's connections to close")


def test_worker_refuses_to_start_without_the_model_key(monkeypatch, tmp_path, lone_redis):
    monkeypatch.delenv("VEIL_MODEL_KEY", raising=False)
    monkeypatch.delenv("VEIL_MODEL_KEY_FILE", raising=False)
    with pytest.raises(SystemExit) as exc:
        run_worker(ServerConfig(queue=lone_redis, data_dir=str(tmp_path)))
    assert "model key" in str(exc.value)
    assert not (tmp_path / "model.key").exists()


def test_readiness_reports_not_ready_when_redis_is_down(setup, tmp_path):
    with redis_server(tmp_path / "redis") as url, running_server(setup["config"](url)) as front:
        assert httpx.get(f"{front}/readyz").status_code == 200
        db = redis.Redis.from_url(url)
        with contextlib.suppress(redis.ConnectionError):
            db.shutdown(nosave=True)
        wait_for(lambda: httpx.get(f"{front}/readyz", timeout=30).status_code == 503, 30, "not ready")
        body = httpx.get(f"{front}/readyz", timeout=30).json()
        assert body["status"] == "not ready"
        assert body["checks"]["store"].startswith("error") and body["checks"]["executor"].startswith("error")
        headers = {"authorization": f"Bearer {setup['tokens']['alice']}", "x-veil-key-id": "0" * 32}
        response = httpx.post(f"{front}/v1/models/wine/predict", content=b"x", headers=headers, timeout=30)
        assert response.status_code == 503 and response.json()["error"] == "unavailable"
        assert httpx.get(f"{front}/healthz").json() == {"status": "ok"}


def test_redis_store_quotas_deletion_and_last_version(lone_redis):
    store, other = RedisStore(lone_redis), RedisStore(lone_redis)
    quota = KeyQuota(max_keys=2, max_bytes=100)
    first, second = (KeyRecord(f"k{i}", "alice", "p", (), 1.0, bytes([i]) * 40) for i in (1, 2))
    assert store.put_key(first, quota) == first and other.put_key(second, quota) == second
    assert store.put_key(first, quota) == first, "the same bundle again is free"
    with pytest.raises(QuotaExceededError):
        store.put_key(KeyRecord("k3", "alice", "p", (), 1.0, b"x"), quota)
    assert store.put_key(KeyRecord("k3", "bob", "p", (), 1.0, b"x"), quota).owner == "bob"
    assert store.delete_key("k1", "bob") is False and store.get_key("k1") == first
    assert store.delete_key("k1", "alice") is True and store.get_key("k1") is None
    assert store.key_owner("k2") == "alice" and store.key_owner("k1") is None
    with pytest.raises(QuotaExceededError):
        store.put_key(KeyRecord("k4", "alice", "p", (), 1.0, b"y" * 61), quota)
    assert store.put_key(KeyRecord("k4", "alice", "p", (), 1.0, b"y" * 60), quota).key_id == "k4"

    reserved = sorted(s.reserve_version("r") for s in (store, other, store, other))
    assert reserved == [1, 2, 3, 4]
    assert store.put_model("r", 2, {}, b"s", b"c").version == 2
    assert other.reserve_version("r") == 5, "a reservation is never handed out twice"
    store.put_model("last", MAX_VERSION, {}, b"s", b"c")
    with pytest.raises(ConflictError):
        store.put_model("last", None, {}, b"s", b"c")
    with pytest.raises(ConflictError):
        other.reserve_version("last")
    with pytest.raises(ServeError):
        store.put_model("r", MAX_VERSION + 1, {}, b"s", b"c")


def test_front_end_warns_when_redis_has_no_persistence(setup, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="veil.serve"):
        with redis_server(tmp_path / "bare") as url:
            build(setup["config"](url))
        warned = [r.getMessage() for r in caplog.records if "persistence" in r.getMessage()]
        assert len(warned) == 1 and "appendonly yes" in warned[0] and "loses every" in warned[0]
        caplog.clear()
        with redis_server(tmp_path / "aof", "--appendonly", "yes") as url:
            build(setup["config"](url))
        assert not [r for r in caplog.records if "persistence" in r.getMessage() or "RDB" in r.getMessage()]


def _serve_one_prediction(setup, url: str) -> None:
    """Deploy, register and predict through `url` with an in-thread worker on the same URL."""
    wine, path, Xw = setup["models"]["wine"]
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(setup["config"](url),),
                              kwargs={"name": "tls-or-auth", "claim_idle": 5, "stop_event": stop}, daemon=True)
    worker.start()
    try:
        with running_server(setup["config"](url)) as front:
            with Client(front, setup["tokens"]["admin"]) as admin:
                admin.deploy(path, "wine")
            with Client(front, setup["tokens"]["alice"], retries=0) as client:
                assert np.array_equal(client.predict(Xw[:4], "wine"), wine.predict(Xw[:4]))
            assert httpx.get(f"{front}/readyz").status_code == 200
    finally:
        stop.set()
        worker.join(15)


def test_redis_with_a_password(setup, tmp_path):
    with redis_server(tmp_path / "auth", "--requirepass", "s3cret-pw",
                      url="redis://:s3cret-pw@127.0.0.1:{port}/0") as url:
        _serve_one_prediction(setup, url)
        wrong = url.replace("s3cret-pw", "wrong")
        with running_server(setup["config"](wrong)) as front:
            body = httpx.get(f"{front}/readyz").json()
            assert body["status"] == "not ready" and body["checks"]["store"].startswith("error")


def test_redis_over_tls(setup, tmp_path):
    certs = make_certs(tmp_path)
    tls = ("--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
           "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no")
    with redis_server(tmp_path / "tls", *tls,
                      url="rediss://127.0.0.1:{port}/0?ssl_ca_certs=" + str(certs.ca)) as url:
        _serve_one_prediction(setup, url)
        plain = url.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.RedisError):
            redis.Redis.from_url(plain, socket_timeout=2).ping()


# --- issue 19: key ids private to their principal, cluster-wide -----------------------------------

def test_two_principals_share_a_keyless_bundle_cluster_wide(setup, cluster):
    """Bob registering the wine model's batch bundle (parameters only, the same for everyone) no longer
    locks alice out: each gets an id of their own, and bob's view of alice's id is that of no key."""
    wine, _, Xw = setup["models"]["wine"]
    ids, bundles = {}, {}
    for who in ("bob", "alice"):
        with Client(cluster["front"], setup["tokens"][who], retries=0) as client:
            assert np.array_equal(client.predict(Xw, "wine", layout="batch"), wine.predict(Xw))
            _, mc = client.model("wine")
            bundles[who] = mc.public_bundle_bytes("batch")
            ids[who] = client.register(bundles[who])
    assert bundles["alice"] == bundles["bob"] and PublicBundle.from_bytes(bundles["bob"]).rotation_steps == ()
    assert ids["alice"] != ids["bob"]
    db = cluster["db"]
    assert {db.hget(KEYS.key(ids[w]), "owner").decode() for w in ids} == {"alice", "bob"}
    with httpx.Client(base_url=cluster["front"], headers={"authorization": f"Bearer {setup['tokens']['bob']}"},
                      timeout=60) as bob:
        for kid in (ids["alice"], "f" * 32):
            r = bob.get(f"/v1/keys/{kid}")
            assert r.status_code == 404 and r.json()["detail"] == f"unknown key id {kid!r}: register the public " \
                                                                  "bundle first"


def test_redis_key_ids_quota_and_legacy_ids(lone_redis):
    stores = [RedisStore(lone_redis), RedisStore(lone_redis)]
    secret = stores[0].key_id_secret()
    assert stores[1].key_id_secret() == secret and len(secret) == 32, "one secret for every front end"
    quota = KeyQuota(max_keys=5, max_bytes=10_000)
    results: list[tuple[str, object]] = []
    lock = threading.Lock()

    def register(i: int) -> None:
        owner = ("alice", "bob")[i % 2]
        bundle = b"same" * 10 if i % 3 == 0 else bytes([i]) * 100
        record = KeyRecord(scoped_key_id(secret, owner, bundle), owner, "p", (), 1.0, bundle)
        try:
            got: object = stores[(i // 2) % 2].put_key(record, quota)
        except QuotaExceededError as exc:
            got = exc
        with lock:
            results.append((owner, got))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 24
    db = redis.Redis.from_url(lone_redis)
    for owner in ("alice", "bob"):
        stored = {r.key_id for o, r in results if o == owner and isinstance(r, KeyRecord)}
        assert len(stored) == 5 and all(stores[0].key_owner(k) == owner for k in stored)
        assert int(db.hget(KEYS.usage(owner), "count")) == 5
        assert int(db.hget(KEYS.usage(owner), "bytes")) == sum(len(stores[0].get_key(k).bundle) for k in stored)

    # a key registered before ids were scoped, under its content hash, as veil before issue 19 stored it
    bundle = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[1]).public_bundle().to_bytes()
    legacy = stores[0].put_key(KeyRecord(legacy_key_id(bundle), "carol", "p", (1,), 1.0, bundle))
    service = Service(stores[1], ArtefactCipher(ArtefactCipher.generate_key()))
    tokens = TokenStore()
    tokens.add("carol-token", "carol", "client")
    tokens.add("dave-token", "dave", "client")
    carol, dave = tokens.authenticate("Bearer carol-token"), tokens.authenticate("Bearer dave-token")
    assert service.register_key(carol, bundle).key_id == legacy.key_id, "the owner's old id, no second copy"
    assert int(db.hget(KEYS.usage("carol"), "count")) == 1
    theirs = service.register_key(dave, bundle)
    assert theirs.owner == "dave" and theirs.key_id != legacy.key_id


def test_redis_registration_after_revocation_does_not_commit(lone_redis, tmp_path):
    path = tmp_path / "tokens.json"
    token = add_token_to_file(path, "erin", "client")
    tokens = TokenStore.load(path, environ={})
    service = Service(RedisStore(lone_redis), ArtefactCipher(ArtefactCipher.generate_key()))
    erin = tokens.authenticate(f"Bearer {token}")
    bundle = SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[2]).public_bundle().to_bytes()
    revoke_tokens(path, "erin")
    with pytest.raises(UnauthorizedError):
        service.register_key(erin, bundle)
    db = redis.Redis.from_url(lone_redis)
    assert not list(db.scan_iter(KEYS.key("*"))) and not db.exists(KEYS.usage("erin"))
