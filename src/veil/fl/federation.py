"""Flower apps for veil: a `ClientApp` per data owner and a `ServerApp` that runs the rounds.

Both use Flower's compatibility API (`NumPyClient`, `flwr.server.strategy`, `DefaultWorkflow`),
the only one on which SecAgg+ works in Flower 1.41. The same app objects run on the simulation
engine (configuration captured in Python) and the deployment engine (configuration read from the
run config and each SuperNode's node config).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from veil.fl.data import Dataset, load_dataset
from veil.fl.learners import make_learner
from veil.fl.partition import partition
from veil.fl.privacy import PrivacyReport, privacy_report
from veil.fl.strategies import build_strategy

log = logging.getLogger("veil.fl")

PROGRESS_FILE = "progress.jsonl"
FAULTS = ("shape", "count", "nan", "dtype", "garbage")


@dataclass
class FLConfig:
    """Everything that defines a federated run; flat so it travels as a Flower run config."""

    dataset: str = "digits"
    model: str = "logreg"
    clients: int = 10
    rounds: int = 5
    strategy: str = "fedavg"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    max_iter: int = 10
    epochs: int = 1
    lr: float = 0.05
    proximal_mu: float = 0.1
    trim_beta: float = 0.2
    server_lr: float = 0.1
    secagg: bool = False
    secagg_shares: int = 0
    secagg_threshold: int = 0
    secagg_clip: float = 8.0
    dp: str = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    faults: str = ""
    out_dir: str = ""

    def __post_init__(self) -> None:
        if self.dp not in ("off", "server", "client"):
            raise ValueError(f"dp must be 'off', 'server' or 'client', got {self.dp!r}")
        if self.clients < 2:
            raise ValueError("a federation needs at least 2 clients")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        self.fault_map()

    def fault_map(self) -> dict[int, str]:
        """Injected faults for robustness experiments: "0:shape,3:nan" -> {0: "shape", 3: "nan"}."""
        out = {}
        for item in filter(None, (s.strip() for s in self.faults.split(","))):
            pid, _, kind = item.partition(":")
            if kind not in FAULTS:
                raise ValueError(f"unknown fault {kind!r}; choose from {FAULTS}")
            out[int(pid)] = kind
        return out

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FLConfig:
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key in run_config:
                kind = type(f.default)
                value = run_config[key]
                kwargs[f.name] = (str(value).lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        return cls(**kwargs)

    def secagg_params(self) -> tuple[int, int]:
        """(num_shares, reconstruction_threshold): defaults to all other owners and a strict majority."""
        shares = self.secagg_shares or self.clients
        threshold = self.secagg_threshold or max(2, shares // 2 + 1)
        return shares, min(threshold, shares - 1)


@dataclass
class FLResult:
    """What a run produced: central evaluation per round, the global weights and what was dropped."""

    config: FLConfig
    history: list[dict[str, float]] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    privacy: PrivacyReport | None = None
    wall_time: float = 0.0
    n_features: int = 0
    classes: list | None = None
    round_weights: list[list[np.ndarray]] = field(default_factory=list)

    def accuracy(self) -> list[float]:
        return [h.get("accuracy", float("nan")) for h in self.history]

    def learner(self, weights: list[np.ndarray] | None = None) -> Any:
        """The global model (or `weights`, e.g. one of `round_weights`) as a learner: prediction,
        evaluation and `to_veil()`."""
        learner = make_learner(self.config.model, self.n_features,
                               None if self.classes is None else np.asarray(self.classes),
                               max_iter=self.config.max_iter, epochs=self.config.epochs, lr=self.config.lr,
                               seed=self.config.seed)
        learner.set_weights(self.weights if weights is None else weights)
        return learner

    def to_dict(self) -> dict[str, Any]:
        classes = None if self.classes is None else np.asarray(self.classes).tolist()
        return {"config": dataclasses.asdict(self.config), "history": self.history, "rejected": self.rejected,
                "privacy": None if self.privacy is None else self.privacy.to_dict(), "wall_time": self.wall_time,
                "n_features": self.n_features, "classes": classes}


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


@functools.lru_cache(maxsize=4)
def _partitions(name: str, seed: int, clients: int, scheme: str, alpha: float) -> list:
    data = _dataset(name, seed)
    return partition(data.X_train, data.y_train, clients, scheme, alpha, seed)


def _owners(cfg: FLConfig, partitions: list | None) -> list:
    if partitions is not None:
        return partitions
    return _partitions(cfg.dataset, cfg.seed, cfg.clients, cfg.partition, cfg.alpha)


def _shape_of(cfg: FLConfig, partitions: list | None) -> tuple[int, np.ndarray | None]:
    """(n_features, all classes or None): from the named dataset, or the union of the owners' labels."""
    if partitions is None:
        data = _dataset(cfg.dataset, cfg.seed)
        return data.X_train.shape[1], data.classes
    labels = np.concatenate([np.asarray(p[1]) for p in partitions])
    return np.asarray(partitions[0][0]).shape[1], np.unique(labels) if labels.dtype.kind in "iub" else None


def _learner(cfg: FLConfig, partitions: list | None) -> Any:
    n_features, classes = _shape_of(cfg, partitions)
    return make_learner(cfg.model, n_features, classes, max_iter=cfg.max_iter, epochs=cfg.epochs, lr=cfg.lr,
                        seed=cfg.seed)


def _fault(weights: list[np.ndarray], kind: str) -> list[np.ndarray]:
    """A deliberately broken update, to show the server drops it."""
    if kind == "shape":
        return [np.zeros((w.shape[0] + 1, *w.shape[1:])) for w in weights]
    if kind == "count":
        return weights[:-1]
    if kind == "nan":
        return [np.full_like(w, np.nan) for w in weights]
    return [w.astype(np.complex128) for w in weights]


class OwnerClient(NumPyClient):
    """One data owner: trains its learner on its private rows and returns the new weights."""

    def __init__(self, learner: Any, X: np.ndarray, y: np.ndarray, cfg: FLConfig, fault: str | None = None) -> None:
        self.learner, self.X, self.y, self.cfg, self.fault = learner, X, y, cfg, fault

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return self.learner.get_weights()

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        self.learner.set_weights(parameters)
        n = self.learner.fit(self.X, self.y, config)
        weights = self.learner.get_weights()
        if self.cfg.secagg and max(float(np.abs(w).max()) for w in weights) > self.cfg.secagg_clip:
            # SecAgg+ would silently clip it; failing makes the owner a visible dropout instead
            raise ValueError(f"update exceeds the SecAgg+ clipping range {self.cfg.secagg_clip}; raise secagg_clip")
        if self.fault:
            weights = _fault(weights, self.fault)
        # under DP every owner gets the same weight, so one owner moves the mean by at most C/m
        return weights, 1 if self.cfg.dp != "off" else n, {}

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        self.learner.set_weights(parameters)
        loss, metrics = self.learner.evaluate(self.X, self.y)
        return loss, len(self.y), metrics


class GarbageClient(Client):
    """A data owner whose update is bytes that do not decode to arrays at all."""

    def fit(self, ins: FitIns) -> FitRes:
        params = Parameters(tensors=[b"\x93NUMPY not really"], tensor_type="numpy.ndarray")
        return FitRes(Status(Code.OK, "ok"), params, 10, {})


ConfigSource = Callable[[Context], FLConfig]


def _from_context(context: Context) -> FLConfig:
    return FLConfig.from_run_config(dict(context.run_config))


def make_client_app(config: FLConfig | None = None, partitions: list | None = None) -> ClientApp:
    """The data owners' `ClientApp`. Without `config` it reads the Flower run config (deployment);
    without `partitions` owner `partition-id` (from its node config) loads its share of `dataset`."""
    resolve: ConfigSource = (lambda ctx: config) if config is not None else _from_context

    def client_fn(context: Context) -> Client:
        cfg = resolve(context)
        pid = int(context.node_config["partition-id"])
        X, y = _owners(cfg, partitions)[pid]
        fault = cfg.fault_map().get(pid)
        if fault == "garbage":
            return GarbageClient()
        return OwnerClient(_learner(cfg, partitions), X, y, cfg, fault).to_client()

    def privacy_mods(msg: Any, ctx: Context, call_next: Any) -> Any:
        cfg = resolve(ctx)
        chain = call_next
        if cfg.dp == "client":
            chain = functools.partial(fixedclipping_mod, call_next=chain)
        if cfg.secagg:
            chain = functools.partial(secaggplus_mod, call_next=chain)
        return chain(msg, ctx)

    return ClientApp(client_fn=client_fn, mods=[privacy_mods])


def make_server_app(config: FLConfig | None = None, test: tuple[np.ndarray, np.ndarray] | None = None,
                    partitions: list | None = None, on_round: Callable[[dict], None] | None = None,
                    on_result: Callable[[FLResult], None] | None = None) -> ServerApp:
    """The `ServerApp`: builds the strategy, runs `rounds` rounds (through SecAgg+ if asked),
    evaluates the global model on the server's held-out set after each round and reports a result."""
    resolve: ConfigSource = (lambda ctx: config) if config is not None else _from_context
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        cfg = resolve(context)
        start = time.perf_counter()
        if test is None:
            data = _dataset(cfg.dataset, cfg.seed)
            test_set = (data.X_test, data.y_test)
        else:
            test_set = test
        X_test, y_test = test_set
        learner = _learner(cfg, partitions)
        n_features, classes = _shape_of(cfg, partitions)
        result = FLResult(cfg, weights=learner.get_weights(), n_features=n_features,
                          classes=None if classes is None else classes.tolist())

        def evaluate_fn(server_round: int, weights: list[np.ndarray], _: dict) -> tuple[float, dict]:
            learner.set_weights(weights)
            loss, metrics = learner.evaluate(X_test, y_test)
            result.weights = [np.array(w) for w in weights]
            result.round_weights.append(result.weights)
            row = {"round": server_round, "loss": loss, **metrics, "time": time.perf_counter() - start}
            result.history.append(row)
            if cfg.out_dir:
                Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(cfg.out_dir) / PROGRESS_FILE, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            if on_round is not None:
                on_round(row)
            return loss, metrics

        strategy = build_strategy(cfg, result.weights, evaluate_fn)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)
        fit_workflow = None
        if cfg.secagg:
            shares, threshold = cfg.secagg_params()
            # weights are scaled by num_examples / max_weight before quantization: the largest owner
            # uses the whole quantization range
            max_weight = 1.0 if cfg.dp != "off" else float(max(len(p[1]) for p in _owners(cfg, partitions)))
            fit_workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                                              clipping_range=cfg.secagg_clip, max_weight=max_weight)
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        result.rejected = list(strategy.rejected)
        if cfg.dp != "off":
            result.privacy = privacy_report(cfg.dp, cfg.noise_multiplier, cfg.clipping_norm, cfg.clients,
                                            cfg.rounds, cfg.delta, min(strategy.aggregated, default=cfg.clients))
        result.wall_time = time.perf_counter() - start
        if on_result is not None:
            on_result(result)
        if cfg.out_dir:
            save_result(result, Path(cfg.out_dir))

    return app


def save_result(result: FLResult, out: Path) -> None:
    """Write `result.json` and the global weights `weights.npz` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "weights.npz", *result.weights)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(out / "result.json")


def load_result(out: Path) -> FLResult:
    """Read back what `save_result` wrote (e.g. by a ServerApp in another process)."""
    data = json.loads((out / "result.json").read_text())
    with np.load(out / "weights.npz") as npz:
        weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    privacy = PrivacyReport(**data["privacy"]) if data["privacy"] else None
    return FLResult(FLConfig(**data["config"]), data["history"], weights, data["rejected"], privacy,
                    data["wall_time"], data["n_features"], data["classes"])
