"""Test double: data owners that misbehave, plugged in through `make_client_app(owner_factory=...)`.

`faulty_owners({1: "crash", 3: "nan"})` is an `OwnerFactory` under which the owners named keep their
rows and learner but break in one way each, every other owner staying an honest `OwnerClient`:

- `shape`, `count`, `nan`, `dtype`: after honest local training (and the owner's own SecAgg+ checks)
  the training update is replaced by zeros with one row too many, one array too few, NaN everywhere,
  or complex arrays; statistics replies stay honest;
- `garbage`: every reply (statistics and training) is bytes that do not decode to arrays at all;
- `crash`: every fit raises; `slow`: every fit first sleeps `slow_seconds`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.client import Client
from flwr.common import Code, FitIns, FitRes, Parameters, Status

from veil.fl.clientapp import OwnerClient, OwnerFactory, owner_client
from veil.fl.config import FLConfig

CORRUPTIONS = ("shape", "count", "nan", "dtype")
FAULTS = (*CORRUPTIONS, "garbage", "crash", "slow")


def corrupt(weights: list[np.ndarray], kind: str) -> list[np.ndarray]:
    """A deliberately broken update of kind `kind` (one of `CORRUPTIONS`), to show the server drops it."""
    if kind == "shape":
        return [np.zeros((w.shape[0] + 1, *w.shape[1:])) for w in weights]
    if kind == "count":
        return weights[:-1]
    if kind == "nan":
        return [np.full_like(w, np.nan) for w in weights]
    return [w.astype(np.complex128) for w in weights]


class FaultyOwner(OwnerClient):
    """An `OwnerClient` with one fault of `FAULTS` other than `garbage`."""

    def __init__(self, learner: Any, X: np.ndarray, y: np.ndarray, cfg: FLConfig, fault: str,
                 slow_seconds: float) -> None:
        super().__init__(learner, X, y, cfg)
        self.fault, self.slow_seconds = fault, slow_seconds

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        if self.fault == "crash":
            raise RuntimeError("injected fault: this owner crashes")
        if self.fault == "slow":
            time.sleep(self.slow_seconds)
        weights, weight, metrics = super().fit(parameters, config)
        if self.fault in CORRUPTIONS and config.get("veil-task") != "stats":
            weights = corrupt(weights, self.fault)
        return weights, weight, metrics


class GarbageClient(Client):
    """A data owner whose update is bytes that do not decode to arrays at all."""

    def fit(self, ins: FitIns) -> FitRes:
        params = Parameters(tensors=[b"\x93NUMPY not really"], tensor_type="numpy.ndarray")
        return FitRes(Status(Code.OK, "ok"), params, 10, {})


def faulty_owners(faults: dict[int, str], slow_seconds: float = 5.0) -> OwnerFactory:
    """An `OwnerFactory` giving owner `pid` the fault `faults[pid]` (honest owners elsewhere); an unknown
    fault name is a `ValueError` here, so that a typo cannot leave a robustness test with honest owners."""
    unknown = sorted(kind for kind in faults.values() if kind not in FAULTS)
    if unknown:
        raise ValueError(f"unknown fault {unknown}; choose from {FAULTS}")

    def build(pid: int, learner: Any, X: np.ndarray, y: np.ndarray, cfg: FLConfig) -> Client:
        fault = faults.get(pid)
        if fault is None:
            return owner_client(pid, learner, X, y, cfg)
        if fault == "garbage":
            return GarbageClient()
        return FaultyOwner(learner, X, y, cfg, fault, slow_seconds).to_client()

    return build
