"""The model families of `veil.ml`, written once: which module holds each family's estimators,
which library classes they wrap, and the one dispatcher that converts a fitted library model.

`veil.ml`'s lazy imports (torch and xgboost load on first use of their family), the conversion
`from_sklearn_model` and the documentation's table of estimators all read `FAMILIES`; a new family
is one entry here plus its module (an estimator class per library class, on the mixins of
`veil.ml.base`, with a `from_sklearn_model` classmethod when it converts fitted models).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One model family: `estimators` are the names veil's classes share with the library classes
    they wrap (`cls._library`); `extras` are other public names its module lends to `veil.ml`;
    `lazy` families are imported on first use; `converts` says whether a fitted library model of
    the family can be converted (`from_sklearn_model`)."""

    name: str
    module: str
    estimators: tuple[str, ...]
    summary: str
    lazy: bool = False
    converts: bool = True
    raw_features_only: bool = False
    extras: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("linear", "veil.ml.linear",
           ("LogisticRegression", "LinearSVC", "SGDClassifier", "LinearRegression", "Ridge", "Lasso", "ElasticNet",
            "LinearSVR", "SGDRegressor", "PoissonRegressor", "GammaRegressor", "TweedieRegressor"),
           "scikit-learn's linear and generalised linear models (a scaler Pipeline in front is folded in)"),
    Family("trees", "veil.ml.trees",
           ("DecisionTreeClassifier", "DecisionTreeRegressor", "GradientBoostingClassifier",
            "GradientBoostingRegressor", "RandomForestClassifier", "RandomForestRegressor", "XGBClassifier",
            "XGBRegressor"),
           "decision trees, random forests and gradient boosting (scikit-learn), XGBoost: thresholds on a "
           "public grid of raw features", lazy=True, raw_features_only=True),
    Family("neural", "veil.ml.neural", ("MLPClassifier", "MLPRegressor"),
           "multi-layer perceptrons with polynomial activations, trained in torch; and any torch module through "
           "compile_torch_model", lazy=True, converts=False,
           extras=("CompiledTorchModel", "compile_torch_model", "mlp_from_torch")),
)


def family_of(name: str) -> Family | None:
    """The family whose estimators include `name` (a veil or library class name), or None."""
    return next((f for f in FAMILIES if name in f.estimators), None)


def estimator_class(name: str) -> type:
    """veil's estimator class called `name` (importing its family's module)."""
    family = family_of(name)
    if family is None:
        raise KeyError(name)
    return getattr(importlib.import_module(family.module), name)


def _supported() -> str:
    return ", ".join(n for f in FAMILIES if f.converts for n in f.estimators)


def from_sklearn_model(model: Any, X: Any = None, n_bits: Any = None) -> Any:
    """Convert any supported fitted scikit-learn model (or scaler Pipeline, whose last step may
    already be a veil estimator) or xgboost model to its veil class; with `X`, compile it too (tree
    models need X: their public grid is drawn from it). `n_bits` is the trees' grid resolution;
    linear models accept and ignore it (see `EncryptedLinearModel.from_sklearn_model`)."""
    from sklearn import neural_network
    from sklearn.pipeline import Pipeline

    final = model.steps[-1][1] if isinstance(model, Pipeline) else model
    name = type(final).__name__
    if isinstance(final, neural_network.MLPClassifier | neural_network.MLPRegressor):
        raise TypeError(f"a scikit-learn {name} cannot be converted: its activations (ReLU, tanh, logistic) "
                        f"are not polynomials, which is all CKKS evaluates. Train veil.ml.{name} instead: "
                        "the same parameters, with a polynomial activation, then compile(X) and save")
    family = family_of(name)
    if family is not None and family.converts:
        cls = estimator_class(name)
        if type(final) is cls._library or type(final) is cls:
            if family.raw_features_only and final is not model:
                raise TypeError(f"{family.name} models take raw features: convert the fitted model itself, "
                                "not a Pipeline (their thresholds are on a public grid, no scaling needed)")
            return cls.from_sklearn_model(model, X, **({} if n_bits is None else {"n_bits": n_bits}))
    raise TypeError(f"no encrypted equivalent for {name}; supported: {_supported()}")
