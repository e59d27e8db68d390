"""scikit-learn-compatible encrypted models built on `veil.program`.

The neural-network names (MLPs, `compile_torch_model`, activations) import torch on first use
only, and the tree ensembles xgboost, so linear models, servers and worker processes do not pay
their start-up and memory.
"""

import importlib
from typing import Any

from veil.ml.families import FAMILIES, family_of, from_sklearn_model
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
)
from veil.program.affine import LinearCircuit, LinearClient
from veil.program.artefact import ModelClient, ModelServer
from veil.program.outputs import OutputSpec

_LAZY = {name: family.module for family in FAMILIES if family.lazy for name in family.estimators + family.extras}
_LAZY.update({name: "veil.ml.torch_compile" for name in
              ("Polynomial", "Square", "UnsupportedLayerError", "relu_polynomial", "replace_relu")})
TREE_NAMES = family_of("XGBClassifier").estimators  # type: ignore[union-attr]
"""Tree ensembles (`veil.ml.trees`, imported on first use: it loads xgboost)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'veil.ml' has no attribute {name!r}")


__all__ = [
    "ESTIMATORS",
    "FAMILIES",
    "TREE_NAMES",
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
    "LinearClient",
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
