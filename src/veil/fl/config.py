"""What defines a federated run and what it produces: `FLConfig`, the public `Task` and `FLResult`.

`FLConfig` is flat so that it travels as a Flower run config (`to_run_config` / `from_run_config`, keys
with dashes) to the deployment engine's SuperLink and SuperNodes; `config_source` gives both apps the
same configuration on every engine (captured in Python for simulations, read from each message's context
on the deployment engine). `Task` is the learning task's public description, what every party knows of
the data before training; the server resolves it, and its own held-out rows, through `resolve_task` and
`held_out_view`, never through the owners' split. `FLResult` is the server's output (history, global
weights, dropped updates, scaler); `veil.fl.checkpoint` writes and reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.errors import FederatedConfigError
from veil.fl import preprocessing as prep
from veil.fl.data import HeldOut, held_out
from veil.fl.learners import make_learner
from veil.fl.preprocessing import FederatedScaler
from veil.fl.privacy import PrivacyReport

if TYPE_CHECKING:
    from flwr.app import Context

# fields that result.json files written by earlier versions carry and this one no longer has
RETIRED_FIELDS = ("faults", "slow_seconds")


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

    def secagg_params(self) -> tuple[int, int]:
        """(num_shares, reconstruction_threshold): defaults to all other owners and a strict majority."""
        shares = self.secagg_shares or self.min_fit(self.fraction_fit)
        threshold = self.secagg_threshold or max(2, shares // 2 + 1)
        return shares, min(threshold, shares - 1)

    def learner(self, task: Task) -> Any:
        """A fresh learner of this run's model for `task`, with the run's local training settings; the
        server, every owner and `FLResult.learner` build the same one."""
        return make_learner(self.model, task.n_features, task.classes, max_iter=self.max_iter, epochs=self.epochs,
                            lr=self.lr, seed=self.seed)

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FLConfig:
        """The config `dataclasses.asdict` wrote into a result.json. `RETIRED_FIELDS` (earlier versions
        wrote them, empty unless a robustness experiment injected faults) are dropped when inert; a run that
        injected faults, or any other unknown field, is a `FederatedConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - set(RETIRED_FIELDS))
        if unknown:
            raise FederatedConfigError(f"unknown configuration fields {unknown}")
        if data.get("faults"):
            raise FederatedConfigError(f"this result comes from a run with injected faults ({data['faults']!r}), "
                                       "which a configuration no longer holds")
        return cls(**{k: v for k, v in data.items() if k in names})


ConfigSource = Callable[["Context"], FLConfig]


def config_source(config: FLConfig | None) -> ConfigSource:
    """How an app finds its configuration for a message: `config` itself, or without it (deployment
    engine) the Flower run config of the message's context."""
    if config is not None:
        return lambda _context: config
    return lambda context: FLConfig.from_run_config(dict(context.run_config))


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
def _held_out(name: str, seed: int) -> HeldOut:
    return held_out(name, seed=seed)


def held_out_view(cfg: FLConfig) -> HeldOut:
    """The named dataset's held-out split and task description (`data.held_out`, cached: the deployment
    apps resolve it for every message), never its training split."""
    return _held_out(cfg.dataset, cfg.seed)


def resolve_task(cfg: FLConfig, task: Task | None) -> Task:
    """`task`, or the named dataset's description."""
    if task is not None:
        return task
    view = held_out_view(cfg)
    return Task(view.n_features, view.classes)


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
        learner = self.config.learner(Task(self.n_features, None if self.classes is None else np.asarray(self.classes)))
        learner.set_weights(self.weights if weights is None else weights)
        return learner

    def to_dict(self) -> dict[str, Any]:
        classes = None if self.classes is None else np.asarray(self.classes).tolist()
        return {"config": dataclasses.asdict(self.config), "history": self.history, "rejected": self.rejected,
                "privacy": None if self.privacy is None else self.privacy.to_dict(), "wall_time": self.wall_time,
                "n_features": self.n_features, "classes": classes,
                "scaler": None if self.scaler is None else self.scaler.to_dict(), "statistics": self.statistics,
                "export": self.export, "traffic": self.traffic}
