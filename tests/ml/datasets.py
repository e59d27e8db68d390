"""Datasets the tests use, standardized as a user would before fitting a linear model."""

from functools import cache

import numpy as np
from sklearn import datasets
from sklearn.preprocessing import StandardScaler

CLASSIFICATION = ("iris", "wine", "breast_cancer", "digits")
REGRESSION = ("diabetes",)


@cache
def load(name: str, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    if scaled and name != "digits":
        X = StandardScaler().fit_transform(X)
    return X, y
