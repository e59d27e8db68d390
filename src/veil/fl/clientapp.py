"""The data owners' side: `OwnerClient` and the `ClientApp` that runs it under the privacy mods.

An owner answers two kinds of fit message: statistics (`veil-task: stats`, the vectors of
`veil.fl.preprocessing`) and training (its learner, fitted on its own rows scaled by the federated
scaler). Under SecAgg+ it refuses to send what the server could not check inside the sum (a non-finite
or out-of-range update, more rows than the round's public max_weight) and `masked_only_mod` replaces
the reply fields Flower leaves in clear. `make_client_app(owner_factory=...)` is the seam for other
owner behaviour (the robustness tests plug in owners that crash, stall or send malformed updates):
the factory builds each owner's Flower client, and the privacy mods wrap it unchanged.

The owners' rows are resolved here only (`_owners`: explicit partitions, or the named dataset's
training split cut as the configuration says); the ServerApp never calls these functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Code, FitRes, Parameters, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from veil.errors import FederatedConfigError, FederationError
from veil.fl import preprocessing as prep
from veil.fl.config import FLConfig, Task, config_source, resolve_task
from veil.fl.data import Dataset, load_dataset
from veil.fl.partition import partition
from veil.fl.preprocessing import FederatedScaler


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


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


class OwnerClient(NumPyClient):
    """One data owner: trains its learner on its private rows and returns the new weights.

    A fit message whose config says `veil-task: stats` asks instead for the owner's feature statistics
    (see `veil.fl.preprocessing`); training messages carry the federated scaler (`veil-scaler`), which
    the owner applies to its own rows, and the federation's row count (`veil-total`)."""

    def __init__(self, learner: Any, X: np.ndarray, y: np.ndarray, cfg: FLConfig) -> None:
        self.learner, self.X, self.y, self.cfg = learner, X, y, cfg

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


OwnerFactory = Callable[[int, Any, np.ndarray, np.ndarray, FLConfig], Client]
"""`(partition_id, learner, X, y, cfg) -> flwr.client.Client`: builds one owner's Flower client."""


def owner_client(partition_id: int, learner: Any, X: np.ndarray, y: np.ndarray, cfg: FLConfig) -> Client:
    """The default `OwnerFactory`: an honest `OwnerClient` (the same for every partition id)."""
    return OwnerClient(learner, X, y, cfg).to_client()


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


def make_client_app(config: FLConfig | None = None, partitions: list | None = None, task: Task | None = None,
                    owner_factory: OwnerFactory = owner_client) -> ClientApp:
    """The data owners' `ClientApp`. Without `config` it reads the Flower run config (deployment);
    without `partitions` owner `partition-id` (from its node config) loads its share of `dataset`.
    `task` (the public description every party agrees on) defaults to the named dataset's.

    `owner_factory` builds each owner's Flower client from its partition id, learner, rows and the
    configuration (`owner_client`, an honest `OwnerClient`, unless given); the privacy mods (SecAgg+,
    client-side clipping) wrap whatever it returns."""
    resolve = config_source(config)

    def client_fn(context: Context) -> Client:
        cfg = resolve(context)
        pid = int(context.node_config["partition-id"])
        X, y = _owners(cfg, partitions)[pid]
        return owner_factory(pid, cfg.learner(resolve_task(cfg, task)), X, y, cfg)

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
