"""IID and Dirichlet splits: disjoint, complete, reproducible, and skewed as asked."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from veil.fl.partition import dirichlet_partition, iid_partition, partition


def _check_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n


def test_iid_is_disjoint_complete_balanced_and_seeded():
    parts = iid_partition(103, 10, seed=1)
    _check_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=2), strict=True))


def _dominant_share(y, parts):
    return float(np.mean([np.bincount(y[p]).max() / len(p) for p in parts]))


def test_dirichlet_is_disjoint_complete_and_label_skewed():
    _, y = load_digits(return_X_y=True)
    skewed = dirichlet_partition(y, 10, alpha=0.1, seed=0)
    _check_cover(skewed, len(y))
    assert min(len(p) for p in skewed) >= 1
    near_iid = dirichlet_partition(y, 10, alpha=1000.0, seed=0)
    # with alpha=0.1 most owners are dominated by one class; with a huge alpha none is
    assert _dominant_share(y, skewed) > 0.5
    assert _dominant_share(y, near_iid) < 0.2
    assert _dominant_share(y, iid_partition(len(y), 10)) < 0.2


def test_partition_on_arrays_and_errors():
    X, y = np.arange(40).reshape(20, 2), np.repeat([0, 1], 10)
    parts = partition(X, y, 4, "dirichlet", alpha=0.5, seed=3)
    assert sum(len(p[1]) for p in parts) == 20
    for Xi, yi in parts:
        assert np.array_equal(Xi[:, 0] // 2 // 10, yi)  # rows stay with their labels
    with pytest.raises(ValueError, match="scheme"):
        partition(X, y, 2, "zipf")
    with pytest.raises(ValueError):
        iid_partition(5, 6)
    with pytest.raises(ValueError):
        dirichlet_partition(y, 2, alpha=0.0)
