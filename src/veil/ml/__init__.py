"""scikit-learn-compatible encrypted models built on `veil.he`."""

from veil.ml.deploy import ModelClient, ModelServer
from veil.ml.linear import (
    ESTIMATORS,
    ElasticNet,
    EncryptedLinearModel,
    GammaRegressor,
    Lasso,
    LinearRegression,
    LinearSVC,
    LinearSVR,
    LogisticRegression,
    PoissonRegressor,
    Ridge,
    SGDClassifier,
    SGDRegressor,
    TweedieRegressor,
    from_sklearn_model,
)
from veil.ml.outputs import OutputSpec
from veil.program.affine import CircuitClient, LinearCircuit

__all__ = [
    "ESTIMATORS",
    "CircuitClient",
    "ElasticNet",
    "EncryptedLinearModel",
    "GammaRegressor",
    "Lasso",
    "LinearCircuit",
    "LinearRegression",
    "LinearSVC",
    "LinearSVR",
    "LogisticRegression",
    "ModelClient",
    "ModelServer",
    "OutputSpec",
    "PoissonRegressor",
    "Ridge",
    "SGDClassifier",
    "SGDRegressor",
    "TweedieRegressor",
    "from_sklearn_model",
]
