"""What every encrypted estimator shares, whatever its model family (as Concrete ML's base).

A family implements two hooks: `_plain_raw(X)` (the model's raw outputs in plaintext, the
reference for `fhe="disable"`) and `_build_circuit(X, **options)` (calibrate and return a
program-layer circuit). This mixin then provides the `fhe` switch, the in-process client, pickling
and `save`, which writes a model-agnostic artefact that `veil serve` and `ModelServer` load.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from veil.errors import NotCompiledError
from veil.ml.outputs import OutputSpec
from veil.program import Circuit, Client, load_client, load_server, parallel
from veil.program.common import local_transport

FHE_MODES = ("disable", "simulate", "execute")
SERVER_FILE = "server.json"
CLIENT_FILE = "client.json"
FORMAT = "veil-model/1"
READABLE_FORMATS = (FORMAT, "veil-linear/1")
_FINITE_KW = ("ensure_all_finite" if "ensure_all_finite" in inspect.signature(check_array).parameters
              else "force_all_finite")


def check_features(estimator: Any, X: Any, encrypted: bool) -> np.ndarray:
    """Validated dense X as float64. For the encrypted path float32 stays float32 and finiteness
    is left to the client's per-chunk check, so a large input is neither copied nor scanned with
    float64 temporaries (the client converts chunk by chunk, exactly, and refuses NaN or infinity
    with ValueError)."""
    if not encrypted:
        return validate_data(estimator, X, reset=False, dtype=np.float64)
    return validate_data(estimator, X, reset=False, dtype=(np.float64, np.float32), **{_FINITE_KW: False})


class EncryptedModelMixin:
    """The `fhe` modes, client, pickling and artefacts on top of two per-family hooks."""

    circuit_: Circuit
    output_spec_: OutputSpec

    def _plain_raw(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    _fitted_attr = "program_"

    def _check_X(self, X: Any, encrypted: bool = False) -> np.ndarray:
        """Validated inputs of a fitted estimator (`_fitted_attr` names what fitting sets)."""
        check_is_fitted(self, self._fitted_attr)
        return check_features(self, X, encrypted)

    def _set_circuit(self, circuit: Circuit) -> None:
        """Install a compiled circuit; the in-process client (keys for the previous one) goes."""
        self.circuit_ = circuit
        self.__dict__.pop("fhe_client_", None)

    def _forget_circuit(self) -> None:
        """After (re)fitting: a compiled circuit and its client describe the previous model."""
        for attr in ("circuit_", "fhe_client_"):
            self.__dict__.pop(attr, None)

    def _raw(self, X: Any, fhe: str, layout: str = "auto", workers: int | None = None,
             executor: Any = None) -> np.ndarray:
        """Raw outputs (n_samples, n_outputs) computed in the requested mode. With fhe="execute",
        inputs above one chunk (`parallel.default_chunk_rows`) run chunk by chunk in `workers`
        local processes (None: one per CPU; 1: chunked in this process), so memory stays bounded
        whatever the number of rows; smaller inputs run here in one go. An `executor` (e.g.
        `veil.program.cluster.RayExecutor`) runs the chunks elsewhere instead, whatever the number
        of rows: any object with `parallel.execute_chunked`'s keyword interface as its `execute`
        method. Either way the client runs its whole protocol (`infer`: one round trip, or one per
        stage of a staged program)."""
        if fhe not in FHE_MODES:
            raise ValueError(f"fhe must be one of {FHE_MODES}, got {fhe!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        if executor is not None and not callable(getattr(executor, "execute", None)):
            raise TypeError(f"executor must have an execute(X, ...) method, got {type(executor).__name__}")
        if executor is not None and workers is not None:
            raise ValueError("pass workers (local processes) or executor, not both")
        X = self._check_X(X, encrypted=fhe == "execute")
        if fhe == "disable":
            return self._plain_raw(X)
        if not hasattr(self, "circuit_"):
            raise NotCompiledError(f"call compile(X_calibration) before predicting with fhe={fhe!r}")
        client = self.fhe_client
        name = client.choose_layout(len(X)) if layout == "auto" else layout
        if fhe == "simulate":
            return self.circuit_.simulate(X, name)
        if executor is not None or len(X) > parallel.default_chunk_rows(client, name):
            setup = {"server_dict": self.circuit_.to_dict(), "client_spec": self.circuit_.client_spec(),
                     "load_server": load_server, "load_client": load_client,
                     "keys": {name: client.keys(name).to_bytes()}, "layout": name}
            if executor is not None:
                return executor.execute(X, **setup)
            return parallel.execute_chunked(X, workers=workers, **setup)
        return client.infer(X, name, local_transport(self.circuit_, client))

    @property
    def fhe_client(self) -> Client:
        """The in-process client (keys are generated lazily per layout and kept here)."""
        if not hasattr(self, "circuit_"):
            raise NotCompiledError("model is not compiled")
        if "fhe_client_" not in self.__dict__:
            self.fhe_client_ = load_client(self.circuit_.client_spec())
        return self.fhe_client_

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("fhe_client_", None)
        if "circuit_" in state:
            state["circuit_"] = state["circuit_"].to_dict()
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("circuit_"), dict):
            state["circuit_"] = load_server(state["circuit_"])
        self.__dict__.update(state)

    def save(self, path: str | Path) -> Path:
        """Write `server.json` (the circuit, no client secrets) and `client.json` (parameters,
        input bounds and post-processing, no weights) into directory `path`."""
        if not hasattr(self, "circuit_"):
            raise NotCompiledError("compile the model before saving it for deployment")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        server = {"format": FORMAT, "model": type(self).__name__, "circuit": self.circuit_.to_dict()}
        client = {"format": FORMAT, "model": type(self).__name__, "circuit": self.circuit_.client_spec(),
                  "output": self.output_spec_.to_dict()}
        (path / SERVER_FILE).write_text(json.dumps(server))
        (path / CLIENT_FILE).write_text(json.dumps(client))
        return path
