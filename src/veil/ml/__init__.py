"""scikit-learn-compatible encrypted models built on `veil.program`.

The neural-network names (MLPs, `compile_torch_model`, activations) import torch on first use
only, and the tree ensembles xgboost, so linear models, servers and worker processes do not pay
their start-up and memory.
"""

import importlib
from typing import Any

from veil.ml.deploy import ModelClient, ModelServer
from veil.ml.linear import (
    ESTIMATORS,
    TREE_NAMES,
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

_LAZY = {name: "veil.ml.neural" for name in
         ("CompiledTorchModel", "MLPClassifier", "MLPRegressor", "compile_torch_model", "mlp_from_torch")}
_LAZY.update({name: "veil.ml.torch_compile" for name in
              ("Polynomial", "Square", "UnsupportedLayerError", "relu_polynomial", "replace_relu")})
_LAZY.update({name: "veil.ml.trees" for name in TREE_NAMES})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'veil.ml' has no attribute {name!r}")


__all__ = [
    "ESTIMATORS",
    "CircuitClient",
    "CompiledTorchModel",
    "DecisionTreeClassifier",
    "DecisionTreeRegressor",
    "ElasticNet",
    "EncryptedLinearModel",
    "GammaRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
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
    "RandomForestClassifier",
    "RandomForestRegressor",
    "Ridge",
    "SGDClassifier",
    "SGDRegressor",
    "Square",
    "TweedieRegressor",
    "UnsupportedLayerError",
    "XGBClassifier",
    "XGBRegressor",
    "compile_torch_model",
    "from_sklearn_model",
    "mlp_from_torch",
    "relu_polynomial",
    "replace_relu",
]
