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
from veil.ml.neural import CompiledTorchModel, MLPClassifier, MLPRegressor, compile_torch_model, mlp_from_torch
from veil.ml.outputs import OutputSpec
from veil.ml.torch_compile import Polynomial, Square, UnsupportedLayerError, relu_polynomial, replace_relu
from veil.program.affine import CircuitClient, LinearCircuit

__all__ = [
    "ESTIMATORS",
    "CircuitClient",
    "CompiledTorchModel",
    "ElasticNet",
    "EncryptedLinearModel",
    "GammaRegressor",
    "Lasso",
    "LinearCircuit",
    "LinearRegression",
    "LinearSVC",
    "LinearSVR",
    "LogisticRegression",
    "MLPClassifier",
    "MLPRegressor",
    "ModelClient",
    "ModelServer",
    "OutputSpec",
    "PoissonRegressor",
    "Polynomial",
    "Ridge",
    "SGDClassifier",
    "SGDRegressor",
    "Square",
    "TweedieRegressor",
    "UnsupportedLayerError",
    "compile_torch_model",
    "from_sklearn_model",
    "mlp_from_torch",
    "relu_polynomial",
    "replace_relu",
]
