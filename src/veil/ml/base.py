"""What every encrypted estimator shares, whatever its model family (as Concrete ML's base).

A family supplies a few hooks: `_plain_raw(X)` (the model's raw outputs in plaintext, the
reference for `fhe="disable"`), fitting (through the library model) and `compile(X)` (which
builds the program-layer circuit and installs it with `_set_circuit`), and `output_spec_` (the
post-processing applied on the client). `EncryptedModelMixin` then provides the `fhe` switch
(`_raw`), the in-process client, pickling and `save`, which writes a model-agnostic artefact that
`veil serve` and `ModelServer` load. `EncryptedClassifierMixin` and `EncryptedRegressorMixin`
write `predict`, `predict_proba`, `decision_function` and `score` once, on top of `_raw` and
`output_spec_`, as scikit-learn's `ClassifierMixin`/`RegressorMixin` do. `library_init` mirrors
a library class's constructor for the families that wrap one (linear models, tree ensembles).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from veil.errors import NotCompiledError
from veil.program import AnyClient, Circuit, load_client, load_server, parallel
from veil.program.artefact import write_artefact
from veil.program.common import local_transport
from veil.program.outputs import OutputSpec

FHE_MODES = ("disable", "simulate", "execute")
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
    def fhe_client(self) -> AnyClient:
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
        return write_artefact(path, type(self).__name__, self.circuit_, self.output_spec_)


def library_init(library: type, defaults: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Callable[..., None]:
    """An `__init__` with `library`'s constructor parameters that only stores them (scikit-learn's
    convention), `defaults` replacing some of the library's defaults, then `extra` keyword-only
    parameters of veil's own. Parameters a base class takes through ``**kwargs`` (as xgboost's
    classes do) are followed up the MRO and become keyword-only; each keeps its kind otherwise."""
    defaults = dict(defaults or {})
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    seen: set[str] = set()
    base_class = False
    for klass in library.__mro__:
        if "__init__" not in klass.__dict__ or klass is object:
            continue
        more = False
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind == p.VAR_KEYWORD:
                more = True
            if p.name == "self" or p.name in seen or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            seen.add(p.name)
            kind = p.KEYWORD_ONLY if base_class else p.kind
            params.append(p.replace(kind=kind, default=defaults.get(p.name, p.default)))
        if not more:
            break
        base_class = True
    for name, default in (extra or {}).items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
    signature = inspect.Signature(params)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in list(bound.arguments.items())[1:]:
            setattr(self, name, value)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    more = f", plus {', '.join(extra)}" if extra else ""
    __init__.__doc__ = f"The parameters of :class:`{library.__module__}.{library.__name__}`{more}."
    return __init__


class EncryptedClassifierMixin(ClassifierMixin):
    """`predict`, `predict_proba`, `decision_function` and `score` for every encrypted classifier.

    Each takes ``fhe`` ("disable", "simulate", "execute"), ``layout``, ``workers`` and
    ``executor`` (see `EncryptedModelMixin._raw`) and post-processes the raw outputs on the
    client with the fitted `output_spec_`. `predict_proba` exists when the model has
    probabilities (`output_spec_.proba`), `decision_function` when the family sets
    `_has_decision_function` (as its library class has one)."""

    _has_decision_function = False
    output_spec_: OutputSpec

    def _decision_available(self) -> bool:
        return self._has_decision_function

    def _proba_available(self) -> bool:
        check_is_fitted(self, "output_spec_")
        return self.output_spec_.proba is not None

    def predict(self, X: Any, fhe: str = "disable", layout: str = "auto", workers: int | None = None,
                executor: Any = None) -> np.ndarray:
        """Class labels, decided on the client from the (decrypted) raw outputs."""
        raw = self._raw(X, fhe, layout, workers, executor)  # checks fitting first
        return self.output_spec_.predict(raw)

    @available_if(_proba_available)
    def predict_proba(self, X: Any, fhe: str = "disable", layout: str = "auto", workers: int | None = None,
                      executor: Any = None) -> np.ndarray:
        """Class probabilities, computed on the client from the (decrypted) raw outputs."""
        raw = self._raw(X, fhe, layout, workers, executor)  # checks fitting first
        return self.output_spec_.predict_proba(raw)

    @available_if(_decision_available)
    def decision_function(self, X: Any, fhe: str = "disable", layout: str = "auto", workers: int | None = None,
                          executor: Any = None) -> np.ndarray:
        """Signed distance (binary) or per-class scores, as the library returns them."""
        raw = self._raw(X, fhe, layout, workers, executor)  # checks fitting first
        return self.output_spec_.decision(raw)

    def score(self, X: Any, y: Any, sample_weight: Any = None, fhe: str = "disable") -> float:
        """Accuracy of `predict(X, fhe=fhe)`."""
        return float(accuracy_score(y, self.predict(X, fhe=fhe), sample_weight=sample_weight))


class EncryptedRegressorMixin(RegressorMixin):
    """`predict` and `score` (R^2) for every encrypted regressor, as `EncryptedClassifierMixin`."""

    output_spec_: OutputSpec

    def predict(self, X: Any, fhe: str = "disable", layout: str = "auto", workers: int | None = None,
                executor: Any = None) -> np.ndarray:
        """Predicted values, post-processed on the client (link, ravel) from the raw outputs."""
        raw = self._raw(X, fhe, layout, workers, executor)  # checks fitting first
        return self.output_spec_.predict(raw)

    def score(self, X: Any, y: Any, sample_weight: Any = None, fhe: str = "disable") -> float:
        """R^2 of `predict(X, fhe=fhe)`."""
        return float(r2_score(y, self.predict(X, fhe=fhe), sample_weight=sample_weight))
