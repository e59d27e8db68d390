"""Datasets for federated experiments: bundled scikit-learn sets by name or any `.npz` with X and y."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split

from veil.errors import FederatedConfigError

BUNDLED = {
    "digits": (datasets.load_digits, "classification"),
    "iris": (datasets.load_iris, "classification"),
    "wine": (datasets.load_wine, "classification"),
    "breast_cancer": (datasets.load_breast_cancer, "classification"),
    "diabetes": (datasets.load_diabetes, "regression"),
}


@dataclass
class Dataset:
    """A train/test split; the test part plays the server's held-out evaluation and calibration set."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    task: str

    @property
    def classes(self) -> np.ndarray | None:
        """All labels (a client may hold only some of them), or None for regression."""
        if self.task != "classification":
            return None
        return np.unique(np.concatenate([self.y_train, self.y_test]))


@dataclass
class HeldOut:
    """The server's part of a named dataset: its held-out rows and the task's public description (the
    number of features and the label set, None for regression), never the training rows the owners split."""

    X: np.ndarray
    y: np.ndarray
    n_features: int
    classes: np.ndarray | None


def held_out(name: str, test_size: float = 0.2, seed: int = 0) -> HeldOut:
    """The held-out split of `load_dataset(name, test_size, seed)` and the task description.

    A bundled or `.npz` dataset is one file holding every row, so it is read whole and split; the
    training split is dropped here, before anything on the server could use it."""
    data = load_dataset(name, test_size, seed)
    return HeldOut(data.X_test, data.y_test, data.X_test.shape[1], data.classes)


def load_dataset(name: str, test_size: float = 0.2, seed: int = 0) -> Dataset:
    """A bundled dataset by name, or a `.npz` file with arrays X and y (task inferred from y's dtype).

    The split is seeded (experiment design, not key material) so every process sees the same one."""
    if name in BUNDLED:
        loader, task = BUNDLED[name]
        X, y = loader(return_X_y=True)
    elif name.endswith(".npz") and Path(name).is_file():
        X, y = _read_npz(name)
        task = "classification" if y.dtype.kind in "iub" else "regression"
    elif name.endswith(".npz"):
        raise FederatedConfigError(f"dataset file {name!r} does not exist (relative to {Path.cwd()})")
    else:
        raise FederatedConfigError(f"unknown dataset {name!r}: use one of {sorted(BUNDLED)} "
                                   "or a .npz file with X and y")
    X = np.asarray(X, dtype=np.float64)
    stratify = y if task == "classification" else None
    try:
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed,
                                                            stratify=stratify)
    except ValueError as exc:  # e.g. a class with a single row cannot be stratified
        raise FederatedConfigError(f"dataset {name!r} cannot be split into train and test: {exc}") from None
    return Dataset(X_train, y_train, X_test, y_test, task)


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """X (2-D, finite numbers) and y (1-D, one per row) from an .npz file, or `FederatedConfigError`
    saying what is wrong (unreadable file, missing array, wrong shape or type); pickles are refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("X", "y") if k not in data.files]
            if missing:
                raise FederatedConfigError(f"{path} has no array {' or '.join(missing)} (it holds {data.files})")
            X, y = data["X"], data["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FederatedConfigError(f"cannot read {path} as an .npz file with X and y: {exc}") from None
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y) or len(X) == 0:
        raise FederatedConfigError(f"{path}: X must be 2-D (rows, features) and y 1-D with one label per row; "
                                   f"got X {X.shape} and y {y.shape}")
    if X.dtype.kind not in "iufb" or y.dtype.kind not in "iufb":
        raise FederatedConfigError(f"{path}: X and y must be numeric, got {X.dtype} and {y.dtype}")
    if not np.all(np.isfinite(X)):
        raise FederatedConfigError(f"{path}: X holds NaN or infinite values")
    return X, y
