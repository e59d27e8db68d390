"""Issue 19, second attack: `RayExecutor` with ``ship_keys=False`` against a recording stand-in
for ray (in this process, no cluster): every byte handed to Ray (actor constructors, method
arguments, `ray.put`) is pickled as Ray would and searched for the client's secret key, and a
failing chunk keeps its veil type. The real-cluster scenarios are in test_cluster.py."""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
from sklearn.datasets import load_iris

from veil import ml
from veil.errors import VeilError
from veil.program import cluster


class _Ref:
    def __init__(self, fn, args) -> None:
        try:
            self.value, self.error = fn(*args), None
        except Exception as exc:  # Ray hands a task's exception to `get`
            self.value, self.error = None, exc


class FakeRay(types.ModuleType):
    """What `RayExecutor` calls of ray, run eagerly here; `shipped` holds every pickled argument."""

    def __init__(self) -> None:
        super().__init__("ray")
        self.shipped: list[bytes] = []

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict:
        return {"CPU": 2}

    def put(self, value):
        self.shipped.append(pickle.dumps(value))
        return value

    def get(self, refs):
        many = isinstance(refs, list)
        out = []
        for ref in refs if many else [refs]:
            if ref.error is not None:
                raise ref.error
            out.append(ref.value)
        return out if many else out[0]

    def kill(self, actor) -> None:
        return None

    def remote(self, **_):
        ray = self

        def wrap(cls):
            class Handle:
                def __init__(self, instance) -> None:
                    self.instance = instance

                def __getattr__(self, name):
                    method = getattr(self.instance, name)
                    return types.SimpleNamespace(remote=lambda *a: (ray.shipped.append(pickle.dumps(a)),
                                                                    _Ref(method, a))[1])

            def make(*args):
                ray.shipped.append(pickle.dumps(args))
                return Handle(cls(*args))

            return types.SimpleNamespace(remote=make)

        return wrap


@pytest.fixture
def fake_ray(monkeypatch, tmp_path):
    for name in ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
        (tmp_path / name).write_text("x")
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("RAY_USE_TLS", "1")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the token authentication a run also requires
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    monkeypatch.setattr(cluster._RayImportWatch, "tls_at_import", True)
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    exceptions = types.ModuleType("ray.exceptions")
    for name in ("RayTaskError", "RayActorError", "WorkerCrashedError", "ObjectLostError"):
        setattr(exceptions, name, type(name, (Exception,), {}))
    monkeypatch.setitem(sys.modules, "ray.exceptions", exceptions)
    return ray


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return ml.LogisticRegression(max_iter=500).fit(X, y).compile(X), X


def test_without_ship_keys_no_byte_of_the_secret_key_is_handed_to_ray(fake_ray, iris):
    model, X = iris
    with cluster.RayExecutor(ship_keys=False, actors=2) as ex:
        got = model.predict(X, fhe="execute", executor=ex)
    assert np.mean(got == model.predict(X)) >= 0.98
    secret = model.fhe_client.keys(model.fhe_client.choose_layout(len(X))).to_bytes()
    windows = [secret[at:at + 64] for at in range(len(secret) // 8, len(secret) - 64, len(secret) // 8)]
    assert len(windows) >= 6 and len(fake_ray.shipped) >= 3
    for blob in fake_ray.shipped:
        assert not any(w in blob for w in windows), "a piece of the secret key was handed to ray"
    fake_ray.shipped.clear()
    with cluster.RayExecutor(ship_keys=True, actors=1) as ex:  # the control: the search finds a shipped key
        model.predict(X, fhe="execute", executor=ex)
    assert any(all(w in blob for w in windows) for blob in fake_ray.shipped)


def test_a_chunk_the_driver_refuses_raises_its_veil_error_with_its_rows(fake_ray, iris):
    model, X = iris
    bad = np.array(X, dtype=float)
    bad[7, 2] = np.nan
    with cluster.RayExecutor(ship_keys=False, actors=1) as ex, pytest.raises(VeilError) as info:
        model.predict(bad, fhe="execute", executor=ex)
    assert any("rows 0:" in note for note in getattr(info.value, "__notes__", [])), info.value
