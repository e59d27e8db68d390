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
import math
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
from flwr.serverapp.grid import Grid

from veil.errors import FederatedConfigError, FederationError
from veil.fl import preprocessing as prep
from veil.fl.data import Dataset, load_dataset
from veil.fl.learners import make_learner
from veil.fl.partition import partition
from veil.fl.preprocessing import FederatedScaler
from veil.fl.privacy import PrivacyReport, privacy_report
from veil.fl.strategies import build_stats_strategy, build_strategy

log = logging.getLogger("veil.fl")

PROGRESS_FILE = "progress.jsonl"
CHECKPOINT_DIR = "checkpoint"
FAULTS = ("shape", "count", "nan", "dtype", "garbage", "crash", "slow")


@dataclass
class FLConfig:
    """Everything that defines a federated run; flat so it travels as a Flower run config.

    Defaults converge: with federated standardization (`scaling="standard"`), one local L-BFGS
    iteration per round (`max_iter=1`) and 15 rounds, 5 IID or Dirichlet(0.5) owners reach central
    accuracy (StandardScaler + the same estimator) on the bundled datasets. Many local iterations
    instead let each owner converge to its own optimum, and FedAvg of those drifts away from the
    central one under label skew. Torch models take 10 local epochs of SGD at `lr=0.3` (batches of 32)
    on standardized features, which reaches central accuracy on the same datasets.
    """

    dataset: str = "digits"
    model: str = "logreg"
    clients: int = 10
    rounds: int = 15
    strategy: str = "fedavg"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    max_iter: int = 1
    epochs: int = 10
    lr: float = 0.3
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
    slow_seconds: float = 5.0
    out_dir: str = ""
    scaling: str = "standard"
    stats_noise: float = 0.0
    stats_clip: float = 1.0
    fraction_fit: float = 1.0
    min_clients: int = 2
    round_timeout: float = 0.0
    checkpoint_dir: str = ""
    resume: str = ""

    def __post_init__(self) -> None:
        if self.dp not in ("off", "server", "client"):
            raise FederatedConfigError(f"dp must be 'off', 'server' or 'client', got {self.dp!r}")
        if self.clients < 2:
            raise FederatedConfigError("a federation needs at least 2 clients")
        if self.rounds < 1:
            raise FederatedConfigError("rounds must be >= 1")
        if self.scaling not in prep.SCALINGS:
            raise FederatedConfigError(f"scaling must be one of {prep.SCALINGS}, got {self.scaling!r}")
        if not 0 < self.fraction_fit <= 1:
            raise FederatedConfigError(f"fraction_fit must be in (0, 1], got {self.fraction_fit}")
        if not 1 <= self.min_clients <= self.clients:
            raise FederatedConfigError(f"min_clients must be in [1, clients={self.clients}], got {self.min_clients}")
        if self.round_timeout < 0 or self.stats_noise < 0 or self.stats_clip <= 0:
            raise FederatedConfigError("round_timeout and stats_noise must be >= 0 and stats_clip > 0")
        self.fault_map()

    def min_fit(self, fraction: float) -> int:
        """Owners sampled per round: `fraction` of all, at least `min_clients`."""
        return max(self.min_clients, math.ceil(fraction * self.clients))

    def fault_map(self) -> dict[int, str]:
        """Injected faults for robustness experiments: "0:shape,3:nan" -> {0: "shape", 3: "nan"}."""
        out = {}
        for item in filter(None, (s.strip() for s in self.faults.split(","))):
            pid, _, kind = item.partition(":")
            if kind not in FAULTS:
                raise FederatedConfigError(f"unknown fault {kind!r}; choose from {FAULTS}")
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
        shares = self.secagg_shares or self.min_fit(self.fraction_fit)
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
    scaler: FederatedScaler | None = None
    statistics: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    traffic: dict[str, int] | None = None

    def accuracy(self) -> list[float]:
        return [h.get("accuracy", float("nan")) for h in self.history]

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Raw features as the owners scaled them for training (identity without a federated scaler)."""
        X = np.asarray(X, dtype=np.float64)
        return X if self.scaler is None else self.scaler.transform(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Plaintext predictions of the global model on raw features."""
        learner = self.learner()
        model = learner.sklearn_model() if hasattr(learner, "sklearn_model") else None
        if model is not None:
            return model.predict(self.transform(X))
        import torch

        with torch.no_grad():
            out = learner.model(torch.as_tensor(self.transform(X), dtype=torch.float32)).numpy()
        if learner.task != "classification":
            return out.reshape(len(out), -1)[:, 0]
        labels = learner.classes if learner.classes is not None else np.arange(out.shape[1])
        return labels[out.argmax(1)]

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
                "n_features": self.n_features, "classes": classes,
                "scaler": None if self.scaler is None else self.scaler.to_dict(), "statistics": self.statistics,
                "export": self.export, "traffic": self.traffic}


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
    """One data owner: trains its learner on its private rows and returns the new weights.

    A fit message whose config says `veil-task: stats` asks instead for the owner's feature statistics
    (see `veil.fl.preprocessing`); training messages carry the federated scaler (`veil-scaler`), which
    the owner applies to its own rows, and the federation's row count (`veil-total`)."""

    def __init__(self, learner: Any, X: np.ndarray, y: np.ndarray, cfg: FLConfig, fault: str | None = None) -> None:
        self.learner, self.X, self.y, self.cfg, self.fault = learner, X, y, cfg, fault

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return self.learner.get_weights()

    def _weight(self, n: int) -> int:
        # under DP every owner gets the same weight, so one owner moves the mean by at most C/m
        return 1 if self.cfg.dp != "off" else n

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        if self.fault == "crash":
            raise RuntimeError("injected fault: this owner crashes")
        if self.fault == "slow":
            time.sleep(self.cfg.slow_seconds)
        if config.get("veil-task") == "stats":
            return self._statistics(config)
        X = self.X
        if "veil-scaler" in config:
            center, scale = FederatedScaler.unpack(config["veil-scaler"])
            X = (np.asarray(X, dtype=np.float64) - center) / scale
        self.learner.set_weights(parameters)
        n = self.learner.fit(X, self.y, config)
        weights = self.learner.get_weights()
        if self.cfg.secagg and max(float(np.abs(w).max()) for w in weights) > self.cfg.secagg_clip:
            # SecAgg+ would silently clip it; failing makes the owner a visible dropout instead
            raise FederatedConfigError(f"update exceeds the SecAgg+ clipping range {self.cfg.secagg_clip}; "
                                       "raise secagg_clip")
        if self.fault in FAULTS[:4]:
            weights = _fault(weights, self.fault)
        return weights, self._weight(n), {}

    def _statistics(self, config: dict) -> tuple[list[np.ndarray], int, dict]:
        stage = int(config["veil-stage"])
        reference = np.frombuffer(config.get("veil-reference", b""), dtype="<f8")
        d = self.X.shape[1]
        vector = prep.owner_stats(self.X, stage, [reference[i * d:(i + 1) * d] for i in range(len(reference) // d)],
                                  minmax=bool(config.get("veil-minmax", False)),
                                  count_unit=float(config.get("veil-count-unit", 1.0)))
        prep.check_owner_vector(vector, self.cfg.secagg)
        weight = 1 if self.cfg.stats_noise > 0 or self.cfg.dp != "off" else len(self.y)
        return [vector], weight, {}

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


def _is_statistics(msg: Any) -> bool:
    if not msg.has_content():
        return False
    record = msg.content.config_records.get("fitins.config")
    return record is not None and record.get("veil-task") == "stats"


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

    def clip(msg: Any, ctx: Context, call_next: Any) -> Any:
        # client-side clipping of model updates (dp="client") and, under SecAgg+ with DP statistics,
        # of statistics vectors: each with the clipping norm its DP wrapper put in the fit config
        cfg = resolve(ctx)
        stats = _is_statistics(msg)
        if (stats and cfg.stats_noise > 0 and cfg.secagg) or (not stats and cfg.dp == "client"):
            return fixedclipping_mod(msg, ctx, call_next)
        return call_next(msg, ctx)

    def privacy_mods(msg: Any, ctx: Context, call_next: Any) -> Any:
        cfg = resolve(ctx)
        chain = call_next
        if cfg.dp == "client" or (cfg.stats_noise > 0 and cfg.secagg):
            chain = functools.partial(clip, call_next=chain)
        if cfg.secagg:
            chain = functools.partial(secaggplus_mod, call_next=chain)
        return chain(msg, ctx)

    return ClientApp(client_fn=client_fn, mods=[privacy_mods])


class RoundTimeoutGrid(Grid):
    """A Flower `Grid` whose `send_and_receive` waits at most `timeout` seconds unless told otherwise.

    Flower's `DefaultWorkflow` fit step waits for every reply; through this wrapper an owner that crashes
    or hangs is simply missing from the round's replies, and the strategy decides whether enough remain."""

    def __init__(self, grid: Grid, timeout: float | None) -> None:
        self.grid, self.timeout = grid, timeout

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Any:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Any:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Any) -> Any:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        return self.grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout)


def _fit_workflow(cfg: FLConfig, clipping_range: float, max_weight: float) -> Any:
    if not cfg.secagg:
        return None
    shares, threshold = cfg.secagg_params()
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, clipping_range=clipping_range,
                              max_weight=max_weight, timeout=cfg.round_timeout or None)


def federated_statistics(grid: Grid, context: Context, cfg: FLConfig, n_features: int,
                         max_rows: int) -> tuple[FederatedScaler, dict[str, Any]]:
    """Run the statistics rounds of `veil.fl.preprocessing` (through SecAgg+ when `cfg.secagg`) and
    return the federated scaler with a summary (rounds, owners aggregated, wall time)."""
    start = time.perf_counter()
    minmax = cfg.scaling == "minmax"
    equal = cfg.stats_noise > 0 or cfg.dp != "off"
    reference: list[np.ndarray] = []
    aggregated, rejected = [], []
    m = s = r = np.zeros(n_features)
    varies = np.ones(n_features, dtype=bool)
    n_total, count_unit, done = 0, 1.0, False
    exact = not cfg.secagg and cfg.stats_noise == 0  # float64 end to end: no magnitude or refinement rounds
    if exact:
        reference = [np.ones(n_features)]
    stage = 0
    while not done:
        stage += 1
        step = min(stage + 1, 3) if exact else min(stage, 3)
        blob = np.concatenate(reference).astype("<f8").tobytes() if reference else b""
        config = {"veil-task": "stats", "veil-stage": step, "veil-minmax": minmax, "veil-reference": blob,
                  "veil-count-unit": count_unit}
        strategy = build_stats_strategy(cfg, prep.stats_size(step, n_features, minmax),
                                        lambda _rnd, c=config: dict(c))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        workflow = _fit_workflow(cfg, prep.STATS_CLIPPING_RANGE, 1.0 if equal else float(max_rows))
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
        if strategy.last is None:
            raise FederationError(f"statistics round {stage}: no owner's statistics could be aggregated")
        vector, owners = strategy.last[0], strategy.aggregated[-1]
        aggregated.append(owners)
        rejected.extend({**row, "round": f"stats-{stage}"} for row in strategy.rejected)
        if step == 1:
            r, count_unit, varies = prep.reference_unit(vector, owners)
            reference = [r]
        elif step == 2 and exact:
            scaler = prep.scaler_from_moments(vector, owners)
            n_total, done = scaler.n_samples, not minmax
            m, s = scaler.mean, np.where(scaler.std > 0, scaler.std, 1.0)
            reference = [m, s]
        elif step == 2:
            m, s, n_total = prep.first_moments(vector, r, owners, count_unit)
            reference = [m, s]
        else:
            scaler = prep.final_scaler(cfg.scaling, vector, m, s, n_total)
            m, s, done = prep.refine(vector, m, s, varies)
            # under DP every round costs privacy and noise would keep features "unresolved": one refinement
            done = done or exact or cfg.stats_noise > 0 or stage >= prep.MAX_PASSES
            reference = [m, s]
    summary = {"rounds": stage, "owners_aggregated": aggregated, "n_samples": n_total,
               "wall_time": time.perf_counter() - start, "rejected": rejected, "secagg": cfg.secagg,
               "noise_multiplier": cfg.stats_noise, "clipping_norm": cfg.stats_clip if cfg.stats_noise else None}
    if cfg.stats_noise > 0:
        summary["epsilon"] = prep.stats_epsilon(cfg.stats_noise, stage, cfg.delta)
        summary["delta"] = cfg.delta
    return scaler, summary


def make_server_app(config: FLConfig | None = None, test: tuple[np.ndarray, np.ndarray] | None = None,
                    partitions: list | None = None, on_round: Callable[[dict], None] | None = None,
                    on_result: Callable[[FLResult], None] | None = None,
                    on_error: Callable[[BaseException], None] | None = None) -> ServerApp:
    """The `ServerApp`: federated statistics and scaler (unless `scaling="off"`), then `rounds` rounds of
    the strategy (through SecAgg+ if asked), evaluating the global model on the server's held-out set
    after each round, checkpointing it when `checkpoint_dir` is set, and reporting a result.

    With `resume` (a checkpoint directory) the scaler, history and global model come from the
    checkpoint and training continues after its last completed round. `on_error` receives any
    exception that stops the run (engines that call `sys.exit` would otherwise lose it)."""
    resolve: ConfigSource = (lambda ctx: config) if config is not None else _from_context
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        try:
            _serve(resolve(context), grid, context, test, partitions, on_round, on_result)
        except BaseException as exc:
            if on_error is not None:
                on_error(exc)
            raise

    return app


def _serve(cfg: FLConfig, grid: Any, context: Context, test: tuple[np.ndarray, np.ndarray] | None,
           partitions: list | None, on_round: Callable[[dict], None] | None,
           on_result: Callable[[FLResult], None] | None) -> None:
    start = time.perf_counter()
    grid = RoundTimeoutGrid(grid, cfg.round_timeout or None)
    if test is None:
        data = _dataset(cfg.dataset, cfg.seed)
        test = (data.X_test, data.y_test)
    X_test, y_test = test
    learner = _learner(cfg, partitions)
    n_features, classes = _shape_of(cfg, partitions)
    result = FLResult(cfg, weights=learner.get_weights(), n_features=n_features,
                      classes=None if classes is None else classes.tolist())
    max_rows = max(len(p[1]) for p in _owners(cfg, partitions))
    done, n_total = 0, 0
    if cfg.resume:
        saved = load_checkpoint(Path(cfg.resume))
        result.weights, result.history, result.scaler = saved.weights, saved.history, saved.scaler
        result.statistics, result.rejected = saved.statistics, saved.rejected
        done = int(saved.history[-1]["round"]) if saved.history else 0
        n_total = int((saved.statistics or {}).get("n_samples", 0))
    elif cfg.scaling != "off":
        result.scaler, result.statistics = federated_statistics(grid, context, cfg, n_features, max_rows)
        n_total = result.statistics["n_samples"]
        result.rejected.extend(result.statistics.pop("rejected"))
    X_eval = result.transform(X_test)
    fit_extra: dict[str, Any] = {}
    if result.scaler is not None:
        fit_extra["veil-scaler"] = result.scaler.pack()
    if n_total:
        fit_extra["veil-total"] = n_total
    remaining = cfg.rounds - done
    if remaining <= 0:
        raise FederatedConfigError(f"the checkpoint already holds {done} rounds; ask for more than {cfg.rounds}")

    def evaluate_fn(server_round: int, weights: list[np.ndarray], _: dict) -> tuple[float, dict]:
        learner.set_weights(weights)
        loss, metrics = learner.evaluate(X_eval, y_test)
        result.weights = [np.array(w) for w in weights]
        result.round_weights.append(result.weights)
        if done and server_round == 0:
            return loss, metrics  # the resumed model was evaluated before the interruption
        row = {"round": done + server_round, "loss": loss, **metrics, "time": time.perf_counter() - start}
        result.history.append(row)
        if cfg.out_dir:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(cfg.out_dir) / PROGRESS_FILE, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if cfg.checkpoint_dir:
            result.rejected = [*kept, *strategy.rejected]
            save_checkpoint(result, Path(cfg.checkpoint_dir))
        if on_round is not None:
            on_round(row)
        return loss, metrics

    kept = list(result.rejected)
    strategy = build_strategy(cfg, result.weights, evaluate_fn,
                              lambda rnd: {"server_round": done + rnd, **fit_extra})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
    # weights are scaled by num_examples / max_weight before quantization: the largest owner
    # uses the whole quantization range
    workflow = _fit_workflow(cfg, cfg.secagg_clip, 1.0 if cfg.dp != "off" else float(max_rows))
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    result.rejected = [*kept, *strategy.rejected]
    if cfg.dp != "off":
        result.privacy = privacy_report(cfg.dp, cfg.noise_multiplier, cfg.clipping_norm, cfg.min_fit(cfg.fraction_fit),
                                        cfg.rounds, cfg.delta, min(strategy.aggregated, default=cfg.clients))
    result.wall_time = time.perf_counter() - start
    if on_result is not None:
        on_result(result)
    if cfg.out_dir:
        save_result(result, Path(cfg.out_dir))


def save_result(result: FLResult, out: Path) -> None:
    """Write `result.json` and the global weights `weights.npz` into `out`, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "weights.npz.tmp", "wb") as fh:
        np.savez(fh, *result.weights)
    (out / "weights.npz.tmp").replace(out / "weights.npz")
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(out / "result.json")


def load_result(out: Path) -> FLResult:
    """Read back what `save_result` wrote (e.g. by a ServerApp in another process)."""
    data = json.loads((out / "result.json").read_text())
    with np.load(out / "weights.npz") as npz:
        weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    privacy = PrivacyReport(**data["privacy"]) if data["privacy"] else None
    scaler = FederatedScaler.from_dict(data["scaler"]) if data.get("scaler") else None
    return FLResult(FLConfig(**data["config"]), data["history"], weights, data["rejected"], privacy,
                    data["wall_time"], data["n_features"], data["classes"], scaler=scaler,
                    statistics=data.get("statistics"), export=data.get("export"), traffic=data.get("traffic"))


def save_checkpoint(result: FLResult, directory: Path) -> None:
    """The global model, scaler and history after the last completed round (written after every round)."""
    save_result(result, directory)


def load_checkpoint(directory: Path) -> FLResult:
    """What `save_checkpoint` wrote; `directory` may also be a run's output directory holding `checkpoint/`."""
    directory = Path(directory)
    if (directory / CHECKPOINT_DIR / "result.json").exists():
        directory = directory / CHECKPOINT_DIR
    if not (directory / "result.json").exists():
        raise FederatedConfigError(f"no checkpoint in {directory}")
    return load_result(directory)
