"""The serving backend seam (`veil.serve.backends`): backends chosen by name, each answering the
`Store`, `Executor` and `Backend` protocols of `backends.base` method for method, unknown or
contradictory choices refused with a clear error, and only the chosen backend's client loaded."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from typing import get_type_hints

import pytest

from veil import cli
from veil.serve import backends
from veil.serve.app import create_app
from veil.serve.auth import TokenStore
from veil.serve.backends import base
from veil.serve.backends.local import LocalExecutor, SQLiteStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.server import ServerConfig, build
from veil.serve.service import Service

from .helpers import open_sockets, record_collateral_sources, redis_server, wait_for

pytestmark = pytest.mark.timeout(120)
KEY = "22" * 32


def _members(protocol: type) -> dict[str, inspect.Signature]:
    """The methods a protocol declares, with their signatures."""
    return {name: inspect.signature(value) for name, value in vars(protocol).items()
            if inspect.isfunction(value) and not name.startswith("_")}


def _implementations() -> list[tuple[str, type, type]]:
    """(backend name, implementing class, protocol) for each part of each registered backend."""
    from veil.serve.backends.redis import RedisExecutor, RedisStore

    parts = {"local": (SQLiteStore, LocalExecutor), "redis": (RedisStore, RedisExecutor)}
    out = []
    for name in backends.BACKENDS:
        store, executor = parts[name]
        out += [(name, store, base.Store), (name, executor, base.Executor),
                (name, type(backends.backend(name)), base.Backend)]
    return out


def test_registry_names_the_two_backends():
    assert sorted(backends.BACKENDS) == ["local", "redis"]
    for name in backends.BACKENDS:
        assert backends.backend(name).name == name


@pytest.mark.parametrize(("name", "cls", "protocol"), _implementations(),
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_every_backend_answers_the_protocols_method_for_method(name, cls, protocol):
    """Each protocol method exists on the implementation with the same parameters (names, order,
    defaults; an implementation may add keyword parameters with defaults) and the same coroutine-ness."""
    for method, wanted in _members(protocol).items():
        found = getattr(cls, method, None)
        assert callable(found), f"{cls.__name__} ({name}) lacks {method}"
        assert inspect.iscoroutinefunction(found) == inspect.iscoroutinefunction(getattr(protocol, method)), method
        got = list(inspect.signature(found).parameters.values())
        want = list(wanted.parameters.values())
        assert [(p.name, p.default) for p in got[:len(want)]] == [(p.name, p.default) for p in want], method
        assert all(p.default is not inspect.Parameter.empty for p in got[len(want):]), method
    hints = get_type_hints(protocol)
    assert all(hasattr(cls, attribute) for attribute in hints), f"{cls.__name__} lacks {sorted(hints)}"


def test_unknown_backend_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown serving backend 'sqlite'; choose one of local, redis"):
        backends.backend("sqlite")
    with pytest.raises(ValueError, match="unknown serving backend 'memcached'"):
        build(ServerConfig(backend="memcached", data_dir=str(tmp_path), model_key_file=None))


def test_unknown_backend_on_the_command_line_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--backend", "sqlite"])
    assert info.value.code == 2
    assert "invalid choice: 'sqlite'" in capsys.readouterr().err


def test_contradictory_or_incomplete_choices_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VEIL_MODEL_KEY", KEY)
    with pytest.raises(ValueError, match="--queue is the Redis URL of the redis backend"):
        backends.backend_for(ServerConfig(backend="local", queue="redis://127.0.0.1:1/0"))
    with pytest.raises(ValueError, match="the redis backend needs a Redis URL"):
        build(ServerConfig(backend="redis", data_dir=str(tmp_path)))
    assert cli.main(["serve", "--backend", "local", "--queue", "redis://127.0.0.1:1/0",
                     "--data-dir", str(tmp_path)]) == 2
    assert "--queue is the Redis URL" in capsys.readouterr().err


def test_default_choice_follows_the_queue_option():
    assert backends.backend_for(ServerConfig()).name == "local"
    assert backends.backend_for(ServerConfig(queue="redis://127.0.0.1:1/0")).name == "redis"
    assert backends.backend_for(ServerConfig(backend="redis", queue="redis://127.0.0.1:1/0")).name == "redis"


def test_local_backend_builds_sqlite_and_in_process_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_MODEL_KEY", KEY)
    app, service = build(ServerConfig(backend="local", data_dir=str(tmp_path)))
    assert isinstance(service.store, SQLiteStore) and isinstance(app.app.state.executor, LocalExecutor)
    assert (tmp_path / "registry.sqlite3").exists()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_backend_by_name_builds_redis_store_and_queue(tmp_path, monkeypatch):
    from veil.serve.backends.redis import RedisExecutor, RedisStore

    monkeypatch.setenv("VEIL_MODEL_KEY", KEY)
    with redis_server(tmp_path / "redis") as url:
        app, service = build(ServerConfig(backend="redis", queue=url, data_dir=str(tmp_path / "data")))
        assert isinstance(service.store, RedisStore) and isinstance(app.app.state.executor, RedisExecutor)
        service.store.ping()
        app.app.state.executor.check()
    assert not (tmp_path / "data" / "registry.sqlite3").exists(), "the redis backend keeps nothing in SQLite"


class _ClosingExecutor(LocalExecutor):
    """The local executor, counting how often the app closes it."""

    closed = 0

    async def aclose(self) -> None:
        self.closed += 1


def test_app_shutdown_closes_its_executor(tmp_path):
    """The app's lifespan closes the executor exactly once, at shutdown and not before."""
    from starlette.testclient import TestClient

    service = Service(SQLiteStore(str(tmp_path)), ArtefactCipher(ArtefactCipher.generate_key()))
    executor = _ClosingExecutor(service)
    with TestClient(create_app(service, TokenStore(), executor)) as client:
        assert client.get("/readyz").status_code == 200
        assert executor.closed == 0
    assert executor.closed == 1


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_shutdown_closes_the_queue_connections(tmp_path, monkeypatch):
    """Stopping a redis-backend server closes its executor's two Redis connections (readiness and
    queue) and its store's: redis-server counts three clients fewer once the app's lifespan has ended."""
    import redis
    from starlette.testclient import TestClient

    monkeypatch.setenv("VEIL_MODEL_KEY", KEY)
    with redis_server(tmp_path / "redis") as url:
        observer = redis.Redis.from_url(url, socket_timeout=5)

        def connected() -> int:
            return int(observer.info("clients")["connected_clients"])

        app, _ = build(ServerConfig(backend="redis", queue=url, data_dir=str(tmp_path / "data")))
        executor = app.app.state.executor
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200  # the store's and the executor's sync client
            before = connected()
            assert client.portal.call(executor._async.ping)  # the queue's asyncio client
            running = connected()
            assert running == before + 1
        wait_for(lambda: connected() == running - 3, 10, "the executor's and the store's connections to close")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_shutdown_closes_the_store_and_nonce_clients(tmp_path, monkeypatch):
    """Stopping a redis-backend key broker closes the Redis clients of its model store and of its
    key-release nonce store, as it closes the executor's: each had a socket open while the server
    ran (readiness, a challenge) and none is left once the app's lifespan has ended."""
    from starlette.testclient import TestClient

    from tests.tee.fakeplatform import PLATFORM, FakePlatform, FakeVerifier
    from tests.tee.vectors import write_policy
    from veil.serve.backends.redis import RedisBackend

    machine = FakePlatform()
    write_policy(tmp_path, {PLATFORM: {"roots": [machine.root_pem], "measurements": [machine.measurement.hex()]}},
                 plugins={PLATFORM: FakeVerifier})
    made = []
    nonce_store = RedisBackend.nonce_store

    def recording(self, config):  # the nonce store the server makes, to look at its client
        made.append(nonce_store(self, config))
        return made[-1]

    monkeypatch.setattr(RedisBackend, "nonce_store", recording)
    monkeypatch.setenv("VEIL_MODEL_KEY", KEY)
    with redis_server(tmp_path / "redis") as url:
        app, service = build(ServerConfig(backend="redis", queue=url, data_dir=str(tmp_path / "data"),
                                          attest_policy=str(tmp_path / "policy.json"),
                                          attest_verifiers=(f"{PLATFORM}=tests.tee.fakeplatform:FakeVerifier",)))
        [nonces] = made
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200  # the store's client answers
            nonces.issue(os.urandom(32), "worker")  # the nonce store's client answers
            assert open_sockets(service.store.client) == 1
            assert open_sockets(nonces.client) == 1
        assert open_sockets(service.store.client) == 0
        assert open_sockets(nonces.client) == 0


def test_server_shutdown_closes_its_pccs_collateral_client(tmp_path, monkeypatch):
    """A server given --pccs-url keeps one PCCS source (its HTTP client) for its life: open while the
    server runs, closed once the app's lifespan has ended."""
    from starlette.testclient import TestClient

    made = record_collateral_sources(monkeypatch)
    monkeypatch.setenv("VEIL_MODEL_KEY", KEY)
    app, _ = build(ServerConfig(data_dir=str(tmp_path / "data"), pccs_url="http://127.0.0.1:9"))
    [source] = made
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert not source._http.is_closed
    assert source._http.is_closed


def test_local_server_loads_no_redis_client(tmp_path):
    """Only the chosen backend's module is imported: a local server never loads the Redis client."""
    code = ("import os, sys; os.environ['VEIL_MODEL_KEY'] = '22' * 32\n"
            "from veil.serve.server import ServerConfig, build\n"
            f"build(ServerConfig(data_dir={str(tmp_path)!r}))\n"
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('veil.serve.backends.redis')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
