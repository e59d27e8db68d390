"""Flower strategies by name, validated updates and Flower's DP wrappers.

Every strategy is subclassed so that `aggregate_fit` first checks each client's update against the
global model's layout (array count, shapes, real floating dtype, all finite) and drops bad ones
with a logged reason instead of letting them crash or poison the round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Error
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from veil.errors import FederatedConfigError, FederationError
from veil.fl.names import STRATEGIES

if TYPE_CHECKING:
    from veil.fl.config import FLConfig

log = logging.getLogger("veil.fl")

def check_update(arrays: list[np.ndarray], expected: list[tuple[int, ...]]) -> str | None:
    """Why an update does not fit the model (None when it does)."""
    if len(arrays) != len(expected):
        return f"expected {len(expected)} arrays, got {len(arrays)}"
    for i, (a, shape) in enumerate(zip(arrays, expected, strict=True)):
        if a.shape != shape:
            return f"array {i}: expected shape {shape}, got {a.shape}"
        if a.dtype.kind != "f":
            return f"array {i}: expected a real floating dtype, got {a.dtype}"
        if not np.isfinite(a).all():
            return f"array {i}: contains NaN or infinity"
    return None


class ValidatingMixin:
    """Drops client updates that do not match the model layout before the strategy aggregates."""

    expected: list[tuple[int, ...]]
    rejected: list[dict[str, Any]]
    aggregated: list[int]
    min_clients: int = 1
    last: list[np.ndarray] | None = None
    sampled: int = 0

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        instructions = super().configure_fit(server_round, parameters, client_manager)  # type: ignore[misc]
        self.sampled = len(instructions)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        good = []
        failures = _distinct(failures)
        for failure in failures:  # crashed owners, and (after a timeout) owners that never answered
            reason = f"client failed: {failure}" if isinstance(failure, BaseException) else "client failed"
            log.warning("round %d: %s", server_round, reason)
            self.rejected.append({"round": server_round, "node_id": None, "reason": reason[:500]})
        for _ in range(self.sampled - len(results) - len(failures)):
            log.warning("round %d: an owner did not answer within the round timeout", server_round)
            self.rejected.append({"round": server_round, "node_id": None,
                                  "reason": "no reply within the round timeout"})
        for proxy, res in results:
            try:
                arrays = parameters_to_ndarrays(res.parameters)
                reason = check_update(arrays, self.expected)
            except Exception as exc:  # undecodable bytes from an untrusted client
                reason = f"undecodable parameters: {type(exc).__name__}"
            if reason is None and not res.num_examples > 0:
                reason = f"non-positive num_examples {res.num_examples}"
            if reason is None:
                good.append((proxy, res))
            else:
                log.warning("round %d: dropped update from node %s: %s", server_round, proxy.node_id, reason)
                self.rejected.append({"round": server_round, "node_id": int(proxy.node_id), "reason": reason})
        if len(good) < self.min_clients:
            raise FederationError(f"round {server_round}: {len(good)} valid updates, fewer than the minimum of "
                                  f"{self.min_clients} ({len(results)} replies, {len(failures)} failures)")
        if not good:
            log.warning("round %d: no valid update, global model unchanged", server_round)
            return None, {}
        self.aggregated.append(len(good))
        params, metrics = super().aggregate_fit(server_round, good, failures)  # type: ignore[misc]
        if params is not None:
            self.last = parameters_to_ndarrays(params)
        return params, metrics


def _distinct(failures: list) -> list:
    """`failures` with each failed reply once: Flower's SecAgg+ workflow lists a reply that carries an
    error twice (two exceptions wrapping the same `Error`)."""
    seen, out = set(), []
    for failure in failures:
        error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
        if not isinstance(error, Error):
            out.append(failure)
        elif id(error) not in seen:
            seen.add(id(error))
            out.append(failure)
    return out


def validating(cls: type[Strategy]) -> type[Strategy]:
    """`cls` subclassed with update validation."""
    return type(f"Validating{cls.__name__}", (ValidatingMixin, cls), {})


def _base(cfg: FLConfig, initial: Parameters, evaluate_fn: Callable | None, validate: bool,
          fit_config: Callable[[int], dict] | None = None, name: str | None = None,
          fraction_fit: float | None = None) -> Strategy:
    name = (name or cfg.strategy).lower()
    fraction = cfg.fraction_fit if fraction_fit is None else fraction_fit
    common = {"fraction_fit": fraction, "fraction_evaluate": 0.0, "min_fit_clients": cfg.min_fit(fraction),
              "min_evaluate_clients": 0, "min_available_clients": cfg.clients, "evaluate_fn": evaluate_fn,
              "initial_parameters": initial,
              "on_fit_config_fn": fit_config or (lambda rnd: {"server_round": rnd})}
    classes: dict[str, tuple[type, dict]] = {
        "fedavg": (FedAvg, {}),
        "fedprox": (FedProx, {"proximal_mu": cfg.proximal_mu}),
        "fedadam": (FedAdam, {"eta": cfg.server_lr, "eta_l": cfg.lr}),
        "fedyogi": (FedYogi, {"eta": cfg.server_lr, "eta_l": cfg.lr}),
        "fedtrimmedavg": (FedTrimmedAvg, {"beta": cfg.trim_beta}),
        "fedmedian": (FedMedian, {}),
        "krum": (Krum, {"num_malicious_clients": 1, "num_clients_to_keep": 0}),
    }
    if name not in classes:
        raise FederatedConfigError(f"unknown strategy {cfg.strategy!r}; choose one of {STRATEGIES}")
    if name == "fedprox" and not cfg.model.startswith("torch"):
        raise FederatedConfigError("FedProx's proximal term needs a torch model: scikit-learn solvers cannot add it")
    cls, extra = classes[name]
    return (validating(cls) if validate else cls)(**common, **extra)


def build_strategy(cfg: FLConfig, initial: list[np.ndarray], evaluate_fn: Callable | None,
                   fit_config: Callable[[int], dict] | None = None) -> Strategy:
    """The named strategy, wrapped in Flower's DP wrapper when `cfg.dp` asks, with validation outermost.

    `fit_config(round)` gives each round's fit config (default: the round number only). The strategy
    samples `cfg.fraction_fit` of the owners and stops the run when fewer than `cfg.min_clients` valid
    updates come back (crashed, timed-out and rejected owners are dropped from that round)."""
    params = ndarrays_to_parameters(initial)
    if cfg.dp == "off":
        strategy = _base(cfg, params, evaluate_fn, True, fit_config)
    else:
        inner = _base(cfg, params, evaluate_fn, False, fit_config)
        wrapper = (DifferentialPrivacyServerSideFixedClipping if cfg.dp == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        strategy = validating(wrapper)(inner, noise_multiplier=cfg.noise_multiplier,
                                       clipping_norm=cfg.clipping_norm,
                                       num_sampled_clients=cfg.min_fit(cfg.fraction_fit))
    return _track(strategy, initial, cfg.min_clients)


def build_stats_strategy(cfg: FLConfig, size: int, fit_config: Callable[[int], dict],
                         noise: bool = True) -> Strategy:
    """FedAvg over every owner's statistics vector of length `size` (see `veil.fl.preprocessing`).

    With `cfg.stats_noise` > 0 (and `noise`) it is wrapped in Flower's fixed-clipping Gaussian DP (each
    vector clipped to L2 norm `cfg.stats_clip`, owners weighted equally): server-side clipping, or
    client-side clipping under SecAgg+, where the server only holds the sum. `noise=False` is for the
    row count SecAgg+ needs as a public bound (`statistics_rounds.federated_count`), which noise would not bound."""
    initial = [np.zeros(size)]
    params = ndarrays_to_parameters(initial)
    if cfg.stats_noise <= 0 or not noise:
        strategy = _base(cfg, params, None, True, fit_config, name="fedavg", fraction_fit=1.0)
    else:
        inner = _base(cfg, params, None, False, fit_config, name="fedavg", fraction_fit=1.0)
        wrapper = (DifferentialPrivacyClientSideFixedClipping if cfg.secagg
                   else DifferentialPrivacyServerSideFixedClipping)
        strategy = validating(wrapper)(inner, noise_multiplier=cfg.stats_noise, clipping_norm=cfg.stats_clip,
                                       num_sampled_clients=cfg.clients)
    return _track(strategy, initial, cfg.min_clients)


def _track(strategy: Strategy, initial: list[np.ndarray], min_clients: int) -> Strategy:
    strategy.expected = [tuple(a.shape) for a in initial]
    strategy.rejected = []
    strategy.aggregated = []
    strategy.min_clients = min_clients
    strategy.last = None
    return strategy
