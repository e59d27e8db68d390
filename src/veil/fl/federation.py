"""Flower apps for veil: a `ClientApp` per data owner and a `ServerApp` that runs the rounds.

Both use Flower's compatibility API (`NumPyClient`, `flwr.server.strategy`, `DefaultWorkflow`),
the only one on which SecAgg+ works in Flower 1.41. The same app objects run on the simulation
engine (configuration captured in Python) and the deployment engine (configuration read from the
run config and each SuperNode's node config).

The server app never holds an owner's rows: it gets the configuration, its own held-out set and the
task's public description (`Task`: feature count and label set), and under SecAgg+ it learns row counts
only as sums inside the secure aggregate (see `masked_only_mod` and `veil.fl.preprocessing`).
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
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp.grid import Grid

from veil.errors import FederatedConfigError, FederationError
from veil.fl import preprocessing as prep
from veil.fl.data import Dataset, HeldOut, held_out, load_dataset
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

    `secagg_max_rows` is the public bound on one owner's rows under SecAgg+: the first round counts rows
    in units of it (an owner with more drops out visibly), and the resulting bound on the total is
    SecAgg+'s max_weight for weighting owners by rows (`veil.fl.preprocessing`, "SecAgg+ and row counts").
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
    secagg_max_rows: int = 100_000
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
        if self.secagg_max_rows < 1:
            raise FederatedConfigError(f"secagg_max_rows must be >= 1, got {self.secagg_max_rows}")
        if self.secagg and self.dp == "server":
            raise FederatedConfigError("dp='server' clips each owner's update on the server, which under SecAgg+ "
                                       "holds only their sum (the epsilon would not hold): use dp='client'")
        self.fault_map()

    def row_weighted(self, stage: int | None = None) -> bool:
        """Whether owners weigh by their row count in a training round (`stage` None) or statistics
        stage `stage` (see `veil.fl.preprocessing`); otherwise each owner weighs 1.

        Never under DP (one owner then moves the mean by at most C/m), nor in statistics stages 0 and 1,
        which only fix units and count rows (and so need no `max_weight` under SecAgg+)."""
        if self.dp != "off":
            return False
        return stage is None or (stage >= 2 and self.stats_noise == 0)

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


@dataclass
class Task:
    """The learning task's public description, agreed by every party before training: the number of
    features and the label set (None for regression). Server and owners build the same model from it,
    so neither derives it from another owner's rows."""

    n_features: int
    classes: np.ndarray | None = None

    @classmethod
    def of_arrays(cls, n_features: int, labels: list[np.ndarray]) -> Task:
        """The description of a split its author holds whole (a simulation): the union of its labels,
        or None when they are not integers (regression)."""
        y = np.concatenate([np.asarray(part) for part in labels])
        return cls(n_features, np.unique(y) if y.dtype.kind in "iub" else None)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


@functools.lru_cache(maxsize=4)
def _held_out(name: str, seed: int) -> HeldOut:
    return held_out(name, seed=seed)


@functools.lru_cache(maxsize=4)
def _partitions(name: str, seed: int, clients: int, scheme: str, alpha: float) -> list:
    data = _dataset(name, seed)
    return partition(data.X_train, data.y_train, clients, scheme, alpha, seed)


def _owners(cfg: FLConfig, partitions: list | None) -> list:
    """The owners' rows (owner side only): `partitions`, or the named dataset's training split cut as
    `cfg` says, of which each SuperNode takes its own."""
    if partitions is not None:
        return partitions
    return _partitions(cfg.dataset, cfg.seed, cfg.clients, cfg.partition, cfg.alpha)


def _task(cfg: FLConfig, task: Task | None) -> Task:
    """`task`, or the named dataset's description."""
    if task is not None:
        return task
    view = _held_out(cfg.dataset, cfg.seed)
    return Task(view.n_features, view.classes)


def _learner(cfg: FLConfig, task: Task) -> Any:
    return make_learner(cfg.model, task.n_features, task.classes, max_iter=cfg.max_iter, epochs=cfg.epochs,
                        lr=cfg.lr, seed=cfg.seed)


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

    def _weight(self, n: int, stage: int | None, config: dict) -> int:
        """This owner's weight in a round (`FLConfig.row_weighted`): its `n` rows, or 1. Under SecAgg+ a
        row weight goes inside the masked vector as n / max_weight, so it must not exceed the round's
        public `veil-max-weight`: SecAgg+ would only log a warning and clip."""
        if not self.cfg.row_weighted(stage):
            return 1
        if self.cfg.secagg and n > float(config.get("veil-max-weight", 0)):
            raise FederatedConfigError("this owner holds more rows than the round's SecAgg+ max_weight (an owner "
                                       "that missed the statistics rounds, or rows beyond secagg_max_rows)")
        return n

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
        if self.cfg.secagg:
            # the server sees only the sum, so it cannot drop a bad update: SecAgg+ would silently clip a
            # large one and turn NaN into garbage integers in the sum; failing makes the owner a visible dropout
            if not all(np.isfinite(w).all() for w in weights):
                raise FederatedConfigError("non-finite update (NaN or infinity): not sent through SecAgg+")
            if max(float(np.abs(w).max(initial=0.0)) for w in weights) > self.cfg.secagg_clip:
                raise FederatedConfigError(f"update exceeds the SecAgg+ clipping range {self.cfg.secagg_clip}; "
                                           "raise secagg_clip")
        if self.fault in FAULTS[:4]:
            weights = _fault(weights, self.fault)
        return weights, self._weight(n, None, config), {}

    def _statistics(self, config: dict) -> tuple[list[np.ndarray], int, dict]:
        stage = int(config["veil-stage"])
        reference = np.frombuffer(config.get("veil-reference", b""), dtype="<f8")
        d = self.X.shape[1]
        bound = config.get("veil-row-bound")
        vector = prep.owner_stats(self.X, stage, [reference[i * d:(i + 1) * d] for i in range(len(reference) // d)],
                                  minmax=bool(config.get("veil-minmax", False)),
                                  count_unit=float(config.get("veil-count-unit", 1.0)),
                                  row_bound=None if bound is None else float(bound))
        prep.check_owner_vector(vector, self.cfg.secagg)
        return [vector], self._weight(len(self.X), stage, config), {}

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


def _statistics_stage(msg: Any) -> int | None:
    """The statistics stage a fit message asks for, or None for training (and other messages)."""
    if not msg.has_content():
        return None
    record = msg.content.config_records.get("fitins.config")
    if record is None or record.get("veil-task") != "stats":
        return None
    return int(record["veil-stage"])


def masked_only_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Outside `secaggplus_mod`: under SecAgg+ an owner's replies carry nothing in clear but the SecAgg+
    protocol's own record.

    Flower's `secaggplus_mod` puts the owner's weight (its row count) inside the masked vector and clears
    the parameters, but leaves the reply's other `FitRes` fields in clear: `num_examples` (the row count
    again), `metrics` and `status`. The server's `SecAggPlusWorkflow` builds one `FitRes` per owner from
    them for the strategy, all carrying the same aggregate as parameters, so their weights cannot change
    what any strategy computes. The reply is rebuilt from the protocol record (public keys, encrypted
    shares, masked vector, key shares) and, in the masked-vector stage, constants: `num_examples` 1 (a
    positive count, as the validating strategies require), no metrics, status OK. Messages outside the
    SecAgg+ training protocol (evaluation, queries) are refused: they would be answered in clear."""
    if msg.metadata.message_type != MessageType.TRAIN:
        raise FederationError(f"under SecAgg+ an owner answers only SecAgg+ training messages, not "
                              f"{msg.metadata.message_type!r}")
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = None if configs is None else configs.get(Key.STAGE)  # read first: secaggplus_mod pops it
    reply = call_next(msg, ctx)
    if reply.has_error():
        return reply
    content = RecordDict({RECORD_KEY_CONFIGS: reply.content.config_records[RECORD_KEY_CONFIGS]})
    if stage == Stage.COLLECT_MASKED_VECTORS:
        if compat.recorddict_to_fitres(reply.content, keep_input=True).status.code != Code.OK:
            raise FederationError("the owner's fit did not succeed")
        placeholder = FitRes(Status(Code.OK, "Success"), Parameters(tensors=[], tensor_type="numpy.ndarray"), 1, {})
        for key, record in compat.fitres_to_recorddict(placeholder, keep_input=False).items():
            content[key] = record
        content.array_records["fitres.parameters"].clear()  # as secaggplus_mod leaves it
    return Message(content, reply_to=msg)


def make_client_app(config: FLConfig | None = None, partitions: list | None = None,
                    task: Task | None = None) -> ClientApp:
    """The data owners' `ClientApp`. Without `config` it reads the Flower run config (deployment);
    without `partitions` owner `partition-id` (from its node config) loads its share of `dataset`.
    `task` (the public description every party agrees on) defaults to the named dataset's."""
    resolve: ConfigSource = (lambda ctx: config) if config is not None else _from_context

    def client_fn(context: Context) -> Client:
        cfg = resolve(context)
        pid = int(context.node_config["partition-id"])
        X, y = _owners(cfg, partitions)[pid]
        fault = cfg.fault_map().get(pid)
        if fault == "garbage":
            return GarbageClient()
        return OwnerClient(_learner(cfg, _task(cfg, task)), X, y, cfg, fault).to_client()

    def clip(msg: Any, ctx: Context, call_next: Any) -> Any:
        # client-side clipping of model updates (dp="client") and, under SecAgg+ with DP statistics,
        # of statistics vectors (not the row count, stage 0): each with the clipping norm its DP wrapper
        # put in the fit config
        cfg = resolve(ctx)
        stage = _statistics_stage(msg)
        if (stage is not None and stage > 0 and cfg.stats_noise > 0 and cfg.secagg) or (
                stage is None and cfg.dp == "client"):
            return fixedclipping_mod(msg, ctx, call_next)
        return call_next(msg, ctx)

    def privacy_mods(msg: Any, ctx: Context, call_next: Any) -> Any:
        cfg = resolve(ctx)
        chain = call_next
        if cfg.dp == "client" or (cfg.stats_noise > 0 and cfg.secagg):
            chain = functools.partial(clip, call_next=chain)
        if cfg.secagg:
            chain = functools.partial(masked_only_mod, call_next=functools.partial(secaggplus_mod, call_next=chain))
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
    """Flower's SecAgg+ fit workflow, or None without SecAgg+. Owners' weights travel inside the masked
    vectors as weight / `max_weight`, a public bound on every owner's weight (1 when all weigh 1)."""
    if not cfg.secagg:
        return None
    shares, threshold = cfg.secagg_params()
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, clipping_range=clipping_range,
                              quantization_range=prep.SECAGG_LEVELS, max_weight=max_weight,
                              timeout=cfg.round_timeout or None)


def _max_weight(cfg: FLConfig, stage: int | None, rows_bound: int) -> float:
    """SecAgg+'s max_weight for a round: the public upper bound on the row count when owners weigh by
    rows (`FLConfig.row_weighted`), else 1."""
    return float(rows_bound) if cfg.row_weighted(stage) else 1.0


def _statistics_round(grid: Grid, context: Context, cfg: FLConfig, stage: int, config: dict[str, Any], size: int,
                      rows_bound: int, name: str) -> tuple[np.ndarray, int, list[dict[str, Any]]]:
    """One statistics round named `name`: every owner's vector of length `size` for `stage` of
    `veil.fl.preprocessing` (`config` goes into the fit config), through SecAgg+ when `cfg.secagg`, with
    the statistics' DP noise except for the row count (stage 0); returns (the aggregate, the number of
    owners aggregated, the updates dropped)."""
    config = {"veil-task": "stats", "veil-stage": stage, **config}
    if cfg.secagg and cfg.row_weighted(stage):
        config["veil-max-weight"] = float(rows_bound)
    strategy = build_stats_strategy(cfg, size, lambda _rnd: dict(config), noise=stage > 0)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = _fit_workflow(cfg, prep.STATS_CLIPPING_RANGE, _max_weight(cfg, stage, rows_bound))
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    if strategy.last is None:
        raise FederationError(f"statistics round {name}: no owner's statistics could be aggregated")
    return strategy.last[0], strategy.aggregated[-1], [{**row, "round": name} for row in strategy.rejected]


def federated_count(grid: Grid, context: Context, cfg: FLConfig) -> tuple[int, list[dict[str, Any]]]:
    """Under SecAgg+ without statistics rounds that count rows (`scaling="off"`, or DP statistics): one
    unweighted SecAgg+ round of n_i / B (B = `cfg.secagg_max_rows`, public) -> (an upper bound on the
    federation's row count, to be the training rounds' public max_weight; the updates dropped). See
    `preprocessing.rows_upper_bound`. It carries no DP noise (`stats_noise` does not cover it): the
    server learns the total row count, and nothing per owner."""
    bound = float(cfg.secagg_max_rows)
    vector, owners, rejected = _statistics_round(grid, context, cfg, 0, {"veil-row-bound": bound},
                                                 prep.stats_size(0, 0), 0, "count")
    return prep.rows_upper_bound(float(vector[0]), owners, bound), rejected


def federated_statistics(grid: Grid, context: Context, cfg: FLConfig,
                         n_features: int) -> tuple[FederatedScaler, dict[str, Any]]:
    """Run the statistics rounds of `veil.fl.preprocessing` (through SecAgg+ when `cfg.secagg`) and
    return the federated scaler with a summary (rounds, owners aggregated, total rows, wall time).

    Under SecAgg+ with row weights the first stage also counts rows (unweighted, n_i / `secagg_max_rows`):
    its upper bound on the row count (`rows_bound` in the summary) is the public max_weight of the later
    statistics rounds and of training, so the server chooses it without seeing any owner's count."""
    start = time.perf_counter()
    minmax = cfg.scaling == "minmax"
    bound = float(cfg.secagg_max_rows) if cfg.secagg and cfg.row_weighted(2) else None
    reference: list[np.ndarray] = []
    aggregated, rejected = [], []
    m = s = r = np.zeros(n_features)
    varies = np.ones(n_features, dtype=bool)
    n_total, rows_bound, count_unit, done = 0, 0, 1.0, False
    exact = not cfg.secagg and cfg.stats_noise == 0  # float64 end to end: no magnitude or refinement rounds
    if exact:
        reference = [np.ones(n_features)]
    stage = 0
    while not done:
        stage += 1
        step = min(stage + 1, 3) if exact else min(stage, 3)
        blob = np.concatenate(reference).astype("<f8").tobytes() if reference else b""
        config: dict[str, Any] = {"veil-minmax": minmax, "veil-reference": blob, "veil-count-unit": count_unit}
        if step == 1 and bound is not None:
            config["veil-row-bound"] = bound
        vector, owners, dropped = _statistics_round(grid, context, cfg, step, config,
                                                    prep.stats_size(step, n_features, minmax), rows_bound,
                                                    f"stats-{stage}")
        aggregated.append(owners)
        rejected.extend(dropped)
        if step == 1:
            r, count_unit, varies = prep.reference_unit(vector, bound)
            if bound is not None:
                rows_bound = prep.rows_upper_bound(float(vector[-1]), owners, bound)
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
    summary = {"rounds": stage, "owners_aggregated": aggregated, "n_samples": n_total, "rows_bound": rows_bound,
               "wall_time": time.perf_counter() - start, "rejected": rejected, "secagg": cfg.secagg,
               "noise_multiplier": cfg.stats_noise, "clipping_norm": cfg.stats_clip if cfg.stats_noise else None}
    if cfg.stats_noise > 0:
        summary["epsilon"] = prep.stats_epsilon(cfg.stats_noise, stage, cfg.delta)
        summary["delta"] = cfg.delta
    return scaler, summary


def make_server_app(config: FLConfig | None = None, test: tuple[np.ndarray, np.ndarray] | None = None,
                    task: Task | None = None, on_round: Callable[[dict], None] | None = None,
                    on_result: Callable[[FLResult], None] | None = None,
                    on_error: Callable[[BaseException], None] | None = None) -> ServerApp:
    """The `ServerApp`: federated statistics and scaler (unless `scaling="off"`), then `rounds` rounds of
    the strategy (through SecAgg+ if asked), evaluating the global model on the server's held-out set
    after each round, checkpointing it when `checkpoint_dir` is set, and reporting a result.

    It takes no owner's rows: `test` is the server's own held-out set and `task` the public task
    description (both default to the named dataset's held-out split and description, `data.held_out`).
    Under SecAgg+ with row weights, the public max_weight comes from a secure count (first statistics
    stage, or `federated_count`), never from the owners' partitions.

    With `resume` (a checkpoint directory) the scaler, history and global model come from the
    checkpoint and training continues after its last completed round. `on_error` receives any
    exception that stops the run (engines that call `sys.exit` would otherwise lose it)."""
    resolve: ConfigSource = (lambda ctx: config) if config is not None else _from_context
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        try:
            _serve(resolve(context), grid, context, test, task, on_round, on_result)
        except BaseException as exc:
            if on_error is not None:
                on_error(exc)
            raise

    return app


def _serve(cfg: FLConfig, grid: Any, context: Context, test: tuple[np.ndarray, np.ndarray] | None,
           task: Task | None, on_round: Callable[[dict], None] | None,
           on_result: Callable[[FLResult], None] | None) -> None:
    start = time.perf_counter()
    grid = RoundTimeoutGrid(grid, cfg.round_timeout or None)
    task = _task(cfg, task)
    if test is None:
        view = _held_out(cfg.dataset, cfg.seed)
        test = (view.X, view.y)
    X_test, y_test = test
    learner = _learner(cfg, task)
    result = FLResult(cfg, weights=learner.get_weights(), n_features=task.n_features,
                      classes=None if task.classes is None else task.classes.tolist())
    done, n_total, rows_bound = 0, 0, 0
    if cfg.resume:
        saved = load_checkpoint(Path(cfg.resume))
        result.weights, result.history, result.scaler = saved.weights, saved.history, saved.scaler
        result.statistics, result.rejected = saved.statistics, saved.rejected
        done = int(saved.history[-1]["round"]) if saved.history else 0
        n_total = int((saved.statistics or {}).get("n_samples", 0))
        rows_bound = int((saved.statistics or {}).get("rows_bound", 0))
    elif cfg.scaling != "off":
        result.scaler, result.statistics = federated_statistics(grid, context, cfg, task.n_features)
        n_total, rows_bound = result.statistics["n_samples"], result.statistics["rows_bound"]
        result.rejected.extend(result.statistics.pop("rejected"))
    if cfg.secagg and cfg.row_weighted() and not rows_bound:
        rows_bound, dropped = federated_count(grid, context, cfg)
        result.rejected.extend(dropped)
    X_eval = result.transform(X_test)
    fit_extra: dict[str, Any] = {}
    if result.scaler is not None:
        fit_extra["veil-scaler"] = result.scaler.pack()
    if n_total:
        fit_extra["veil-total"] = n_total
    if cfg.secagg and cfg.row_weighted():
        fit_extra["veil-max-weight"] = float(rows_bound)
    remaining = cfg.rounds - done
    if remaining <= 0:
        raise FederatedConfigError(f"the checkpoint already holds {done} rounds; ask for more than {cfg.rounds}")

    def evaluate_fn(server_round: int, weights: list[np.ndarray], _: dict) -> tuple[float, dict]:
        if server_round > len(strategy.aggregated):
            # Flower's SecAgg+ workflow ends a round without calling the strategy when too few owners answer
            raise FederationError(f"round {done + server_round}: no aggregate (SecAgg+ stopped: fewer owners "
                                  "answered than its reconstruction threshold)")
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
    workflow = _fit_workflow(cfg, cfg.secagg_clip, _max_weight(cfg, None, rows_bound))
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
