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

from veil.fl.names import STRATEGIES

if TYPE_CHECKING:
    from veil.fl.federation import FLConfig

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

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        good = []
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
        if not good:
            log.warning("round %d: no valid update, global model unchanged", server_round)
            return None, {}
        self.aggregated.append(len(good))
        return super().aggregate_fit(server_round, good, failures)  # type: ignore[misc]


def validating(cls: type[Strategy]) -> type[Strategy]:
    """`cls` subclassed with update validation."""
    return type(f"Validating{cls.__name__}", (ValidatingMixin, cls), {})


def _base(cfg: FLConfig, initial: Parameters, evaluate_fn: Callable, validate: bool) -> Strategy:
    name = cfg.strategy.lower()
    common = {"fraction_fit": 1.0, "fraction_evaluate": 0.0, "min_fit_clients": cfg.clients,
              "min_evaluate_clients": 0, "min_available_clients": cfg.clients, "evaluate_fn": evaluate_fn,
              "initial_parameters": initial, "on_fit_config_fn": lambda rnd: {"server_round": rnd}}
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
        raise ValueError(f"unknown strategy {cfg.strategy!r}; choose one of {STRATEGIES}")
    if name == "fedprox" and not cfg.model.startswith("torch"):
        raise ValueError("FedProx's proximal term needs a torch model: scikit-learn solvers cannot add it")
    cls, extra = classes[name]
    return (validating(cls) if validate else cls)(**common, **extra)


def build_strategy(cfg: FLConfig, initial: list[np.ndarray], evaluate_fn: Callable) -> Strategy:
    """The named strategy, wrapped in Flower's DP wrapper when `cfg.dp` asks, with validation outermost."""
    params = ndarrays_to_parameters(initial)
    expected = [tuple(a.shape) for a in initial]
    if cfg.dp == "off":
        strategy = _base(cfg, params, evaluate_fn, validate=True)
    else:
        inner = _base(cfg, params, evaluate_fn, validate=False)
        wrapper = (DifferentialPrivacyServerSideFixedClipping if cfg.dp == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        strategy = validating(wrapper)(inner, noise_multiplier=cfg.noise_multiplier,
                                       clipping_norm=cfg.clipping_norm, num_sampled_clients=cfg.clients)
    strategy.expected = expected
    strategy.rejected = []
    strategy.aggregated = []
    return strategy
