"""Run a federation on one machine with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from veil.errors import FederatedConfigError, FederationError
from veil.fl.clientapp import OwnerFactory, make_client_app, owner_client
from veil.fl.config import FLConfig, FLResult, Task
from veil.fl.serverapp import make_server_app

OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def offline_env(home: str | Path | None = None) -> dict[str, str]:
    """Environment for Flower and Ray without network calls; FLWR_HOME under `home` when given."""
    env = dict(OFFLINE_ENV)
    if home is not None:
        env["FLWR_HOME"] = str(Path(home) / "flwr")
        env["UV_CACHE_DIR"] = str(Path(home) / "uv")
        env["RAY_TMPDIR"] = str(Path(home))
    return env


ENGINES = ("ray", "inprocess")


def run_simulation(config: FLConfig, partitions: list | None = None,
                   test: tuple[np.ndarray, np.ndarray] | None = None,
                   on_round: Callable[[dict], None] | None = None, workdir: str | Path | None = None,
                   cpus_per_client: float = 1.0, engine: str = "ray",
                   owner_factory: OwnerFactory = owner_client) -> FLResult:
    """Train with `config.clients` virtual SuperNodes; returns the server's result.

    `partitions` (list of per-owner (X, y)) and `test` (held-out (X, y)) replace the named dataset, so
    any array dataset can be federated: the owners' apps get the partitions, the server app only `test`
    and the task description (feature count, the union of the owners' labels) that this function, which
    holds the whole split, derives as the owners would agree on it. `engine` is Flower's simulation engine
    ("ray"; its files go to `workdir`, a fresh temporary directory if None) or veil's in-process grid
    ("inprocess", see `veil.fl.inprocess`): the same apps, without Ray's start-up, and the result's
    `traffic` counts the serialized messages each way. `owner_factory` builds each owner's Flower client
    (`veil.fl.clientapp.make_client_app`; honest owners unless given). A run stopped by too few clients
    or a failing statistics round raises `FederationError` with the server's reason."""
    if partitions is not None and (test is None or len(partitions) != config.clients):
        raise FederatedConfigError("with explicit partitions give one per client and a held-out test set")
    if engine not in ENGINES:
        raise FederatedConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    box: list[FLResult] = []
    errors: list[BaseException] = []
    task = None if partitions is None else Task.of_arrays(np.asarray(test[0]).shape[1], [p[1] for p in partitions])
    server = make_server_app(config, test, task, on_round, box.append, errors.append)
    client = make_client_app(config, partitions, task, owner_factory)
    start = time.perf_counter()
    if engine == "inprocess":
        from veil.fl.inprocess import run_server_app

        try:
            traffic = run_server_app(server, client, config.clients, config.to_run_config())
        except FederationError:
            raise
        except Exception as exc:
            raise FederationError(f"the ServerApp failed: {type(exc).__name__}: {exc}") from exc
        result = _checked(box, config, start)
        result.traffic = traffic
        return result
    from flwr.simulation import run_simulation as flwr_run_simulation

    with tempfile.TemporaryDirectory(prefix="veil-fl-", dir=workdir) as tmp:
        # Ray's socket paths must stay short, hence a short temporary directory of our own
        backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                   "init_args": {"_temp_dir": tmp, "num_cpus": max(1, os.cpu_count() or 1)}}
        try:
            flwr_run_simulation(server_app=server, client_app=client, num_supernodes=config.clients,
                                backend_config=backend)
        except SystemExit as exc:
            if errors:
                raise FederationError(str(errors[0])) from errors[0]
            raise FederationError(f"Flower simulation exited with code {exc.code}") from None
        finally:
            _shutdown_ray()
    if errors:
        raise FederationError(str(errors[0])) from errors[0]
    return _checked(box, config, start)


def _checked(box: list[FLResult], config: FLConfig, start: float) -> FLResult:
    if not box:
        raise FederationError("the ServerApp finished without a result")
    result = box[0]
    result.wall_time = time.perf_counter() - start
    if len(result.history) != config.rounds + 1:
        raise FederationError(f"expected evaluations for rounds 0..{config.rounds}, got {len(result.history)}")
    return result


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
