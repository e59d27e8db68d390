"""Splitting an array dataset among simulated data owners (IID or label-skewed Dirichlet).

Partitions use a seeded `numpy.random.Generator`: this is experiment design (which owner holds
which rows), not key material, so reproducibility matters more than unpredictability.
"""

from __future__ import annotations

import numpy as np

from veil.errors import FederatedConfigError


def iid_partition(n_samples: int, n_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle row indices and cut them into `n_clients` near-equal parts."""
    if n_clients < 1 or n_clients > n_samples:
        raise FederatedConfigError(f"need 1 <= n_clients <= n_samples, got {n_clients} for {n_samples} samples")
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part) for part in np.array_split(order, n_clients)]


def dirichlet_partition(y: np.ndarray, n_clients: int, alpha: float = 0.5, seed: int = 0,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients by proportions drawn from Dir(alpha).

    Small `alpha` gives owners few classes each; large `alpha` approaches IID. Redraws until every
    client holds at least `min_size` rows."""
    y = np.asarray(y)
    if alpha <= 0:
        raise FederatedConfigError("alpha must be positive")
    if n_clients < 1 or n_clients * min_size > len(y):
        raise FederatedConfigError(f"cannot give {n_clients} clients {min_size} rows each out of {len(y)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise FederatedConfigError(f"no Dirichlet(alpha={alpha}) split gave every client {min_size} rows "
                               f"in {max_tries} tries")


def partition(X: np.ndarray, y: np.ndarray, n_clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split arrays (X, y) into per-client (X_i, y_i) with scheme "iid" or "dirichlet"."""
    X, y = np.asarray(X), np.asarray(y)
    if len(X) != len(y):
        raise FederatedConfigError("X and y have different lengths")
    if scheme == "iid":
        parts = iid_partition(len(y), n_clients, seed)
    elif scheme == "dirichlet":
        parts = dirichlet_partition(y, n_clients, alpha, seed)
    else:
        raise FederatedConfigError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
    return [(X[p], y[p]) for p in parts]
