"""Drop-in encrypted versions of scikit-learn's linear estimators.

Each class takes exactly its scikit-learn counterpart's constructor parameters, fits with
scikit-learn, and adds `compile(X_calibration)` plus an `fhe` switch on every prediction method:
"disable" (plaintext), "simulate" (quantization, noise and wrap-around of CKKS, no encryption)
and "execute" (real CKKS encryption, client and server on this machine).

With fhe="execute", inputs of more than one chunk (`veil.program.parallel.DEFAULT_CHUNK_CTS` full
ciphertexts, 16,384 rows for the batch layout) run chunk by chunk in `workers` local processes
(`workers=None`: one per CPU; `workers=1`: chunked in this process), so memory stays bounded
whatever the number of rows and every core is used; smaller inputs run in-process in one go. The
keyword is on the prediction methods, not `__init__`, because the constructors mirror
scikit-learn's signatures exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from sklearn import linear_model, svm
from sklearn.base import BaseEstimator
from sklearn.metrics import d2_tweedie_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, StandardScaler
from sklearn.utils.validation import check_is_fitted

from veil.ml.base import EncryptedClassifierMixin, EncryptedModelMixin, EncryptedRegressorMixin, library_init
from veil.program import Linear, Program, compile_program
from veil.program.affine import DEFAULT_HEADROOM
from veil.program.outputs import OutputSpec


def fold_standardization(W: np.ndarray, b: np.ndarray, mean: np.ndarray,
                         scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W ((x - mean) / scale) + b as one affine map on raw x."""
    W2 = W / scale
    return W2, b - W2 @ mean


def fold_scaler(scaler: Any, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge an affine scaler in front of the model into its weights: the client sends raw features."""
    if isinstance(scaler, StandardScaler):
        scale = scaler.scale_ if scaler.scale_ is not None else np.ones(W.shape[1])
        mean = scaler.mean_ if scaler.with_mean else np.zeros(W.shape[1])
        return fold_standardization(W, b, mean, scale)
    if isinstance(scaler, MinMaxScaler):
        return W * scaler.scale_, b + W @ scaler.min_
    if isinstance(scaler, MaxAbsScaler):
        return W / scaler.scale_, b
    raise TypeError(f"cannot fold a {type(scaler).__name__} into an encrypted linear model; "
                    "supported: StandardScaler, MinMaxScaler, MaxAbsScaler")


class EncryptedLinearModel(EncryptedModelMixin, BaseEstimator):
    """Shared machinery: fit through scikit-learn, compile to a `LinearCircuit`, predict per mode."""

    _fitted_attr = "weights_"

    _library: ClassVar[type]
    _task: ClassVar[str]

    def _make_sklearn(self) -> Any:
        return self._library(**self.get_params())

    def __sklearn_tags__(self) -> Any:
        tags = self._make_sklearn().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> EncryptedLinearModel:
        """Fit the underlying scikit-learn estimator (plaintext training); returns self."""
        if sp.issparse(X):
            raise TypeError("sparse input is not supported: encrypted inference packs dense "
                            "features into CKKS slots; pass X.toarray()")
        model = self._make_sklearn()
        if sample_weight is None:
            model.fit(X, y)
        else:
            model.fit(X, y, sample_weight=sample_weight)
        self._absorb(model)
        return self

    def _absorb(self, model: Any, scalers: tuple = ()) -> None:
        for name, value in vars(model).items():
            if name.endswith("_") and not name.startswith("_"):
                setattr(self, name, value)
        self.sklearn_model_ = model
        coef = np.asarray(model.coef_, dtype=np.float64)
        W = np.atleast_2d(coef)
        b = np.broadcast_to(np.atleast_1d(np.asarray(model.intercept_, dtype=np.float64)),
                            (W.shape[0],)).copy()
        for scaler in reversed(scalers):
            W, b = fold_scaler(scaler, W, b)
        self.weights_, self.bias_ = W, b
        self.program_ = Program(W.shape[1], [Linear(W, b)])
        self.n_features_in_ = W.shape[1]
        if scalers:
            self.__dict__.pop("feature_names_in_", None)
            if hasattr(scalers[0], "feature_names_in_"):
                self.feature_names_in_ = scalers[0].feature_names_in_
        self.output_spec_ = self._output_spec(model, coef)
        self._forget_circuit()

    def _output_spec(self, model: Any, coef: np.ndarray) -> OutputSpec:
        return OutputSpec("regressor", ravel=coef.ndim == 1)

    @classmethod
    def from_sklearn_model(cls, sklearn_model: Any, X: Any = None, n_bits: Any = None,
                           rounding_threshold_bits: Any = None) -> EncryptedLinearModel:
        """Wrap a fitted scikit-learn estimator (or a Pipeline of scalers then the estimator, which
        may itself be a fitted veil estimator); with `X`, also compile on it right away.

        The signature is Concrete ML's, so code written for it runs unchanged. `n_bits` and
        `rounding_threshold_bits` are accepted and ignored: they size Concrete's integer
        quantization, whereas CKKS works on fixed-point reals whose scales `compile` derives from
        the calibration data, so there is no bit width to choose."""
        del n_bits, rounding_threshold_bits
        model = sklearn_model
        scalers: tuple = ()
        if isinstance(model, Pipeline):
            steps = [s for _, s in model.steps if s is not None and s != "passthrough"]
            scalers, model = tuple(steps[:-1]), steps[-1]
        if isinstance(model, EncryptedLinearModel):
            check_is_fitted(model, "sklearn_model_")
            inner = model.sklearn_model_
            if not np.array_equal(np.atleast_2d(np.asarray(inner.coef_, dtype=np.float64)), model.weights_):
                raise TypeError(f"this {type(model).__name__} already has scalers folded into its weights; "
                                "convert the original scikit-learn Pipeline instead")
            model = inner
        if not isinstance(model, cls._library):
            raise TypeError(f"{cls.__name__} wraps {cls._library.__name__}, got {type(model).__name__}")
        check_is_fitted(model)
        est = cls(**model.get_params(deep=False))
        est._absorb(model, scalers)
        if X is not None:
            est.compile(X)
        return est

    def compile(self, X: Any, headroom: float = DEFAULT_HEADROOM, presets: dict[str, str] | None = None,
                input_bounds: float | np.ndarray | None = None) -> EncryptedLinearModel:
        """Calibrate CKKS scales on representative inputs so outputs fit the modulus; returns self.

        `input_bounds` (scalar or per feature) states the largest |x| the model must accept; by
        default twice the largest magnitude in X. Inputs beyond it are refused with PrecisionError."""
        X = self._check_X(X)
        self._set_circuit(compile_program(self.program_, X, input_bounds, headroom, presets))
        return self

    def _plain_raw(self, X: np.ndarray) -> np.ndarray:
        return X @ self.weights_.T + self.bias_


class _ClassifierBase(EncryptedClassifierMixin, EncryptedLinearModel):
    _task = "classifier"
    _has_decision_function = True

    def _proba_kind(self, model: Any) -> str | None:
        return None

    def _output_spec(self, model: Any, coef: np.ndarray) -> OutputSpec:
        return OutputSpec("classifier", classes=tuple(model.classes_), proba=self._proba_kind(model))


class _RegressorBase(EncryptedRegressorMixin, EncryptedLinearModel):
    _task = "regressor"


class _GLMBase(_RegressorBase):
    """Generalised linear models: the log link is applied on the client after decryption."""

    def _power(self) -> float:
        raise NotImplementedError

    def _link(self) -> str:
        return "log"

    def _output_spec(self, model: Any, coef: np.ndarray) -> OutputSpec:
        return OutputSpec("regressor", link=self._link(), tweedie_power=self._power())

    def score(self, X: Any, y: Any, sample_weight: Any = None, fhe: str = "disable") -> float:
        """D^2, the fraction of deviance explained, as scikit-learn's GLMs report."""
        return float(d2_tweedie_score(y, self.predict(X, fhe=fhe), sample_weight=sample_weight,
                                      power=self._power()))


def _classifier(sk_cls: type, proba: Any = None) -> type:
    ns: dict[str, Any] = {"_library": sk_cls, "__init__": library_init(sk_cls),
                          "__doc__": f"Encrypted-inference {sk_cls.__name__} (CKKS)."}
    if proba is not None:
        ns["_proba_kind"] = proba
    return type(sk_cls.__name__, (_ClassifierBase,), ns)


def _regressor(sk_cls: type, base: type = _RegressorBase, **extra: Any) -> type:
    ns: dict[str, Any] = {"_library": sk_cls, "__init__": library_init(sk_cls),
                          "__doc__": f"Encrypted-inference {sk_cls.__name__} (CKKS).", **extra}
    return type(sk_cls.__name__, (base,), ns)


def _logreg_proba(self: Any, model: Any) -> str:
    ovr = (len(model.classes_) <= 2 or getattr(model, "solver", None) == "liblinear"
           or getattr(model, "multi_class", None) == "ovr")
    return "ovr_log" if ovr else "softmax"


def _sgd_proba(self: Any, model: Any) -> str | None:
    return {"log_loss": "ovr_log", "modified_huber": "modified_huber"}.get(model.loss)


def _tweedie_link(self: Any) -> str:
    if self.link == "auto":
        return "identity" if self.power <= 0 else "log"
    return self.link


LogisticRegression = _classifier(linear_model.LogisticRegression, _logreg_proba)
LinearSVC = _classifier(svm.LinearSVC)
SGDClassifier = _classifier(linear_model.SGDClassifier, _sgd_proba)
LinearRegression = _regressor(linear_model.LinearRegression)
Ridge = _regressor(linear_model.Ridge)
Lasso = _regressor(linear_model.Lasso)
ElasticNet = _regressor(linear_model.ElasticNet)
LinearSVR = _regressor(svm.LinearSVR)
SGDRegressor = _regressor(linear_model.SGDRegressor)
PoissonRegressor = _regressor(linear_model.PoissonRegressor, _GLMBase, _power=lambda self: 1.0)
GammaRegressor = _regressor(linear_model.GammaRegressor, _GLMBase, _power=lambda self: 2.0)
TweedieRegressor = _regressor(linear_model.TweedieRegressor, _GLMBase,
                              _power=lambda self: float(self.power), _link=_tweedie_link)

ESTIMATORS: tuple[type, ...] = (
    LogisticRegression, LinearSVC, SGDClassifier, LinearRegression, Ridge, Lasso, ElasticNet,
    LinearSVR, SGDRegressor, PoissonRegressor, GammaRegressor, TweedieRegressor,
)
for _cls in ESTIMATORS:
    _cls.__module__ = __name__
    _cls.__qualname__ = _cls.__name__
