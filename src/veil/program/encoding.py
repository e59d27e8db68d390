"""Public input encodings: what a client computes on its own plaintext before encrypting.

`ThermometerEncoding` compares each feature with a public grid of edges and sends the bits
beta[f, k] = [x_f > edge_f[k]] (a thermometer code: for edges e_0 < e_1 < ..., the bits of one
feature are non-increasing in k). A comparison `x_f <= e_f[k]` on the server is then the slot
selection 1 - beta[f, k], and an interval e_f[a] < x_f <= e_f[b] is beta[f, a] - beta[f, b]: both
linear in the encrypted bits, with no approximation. This is how tree ensembles run under CKKS
(see `veil.ml.trees`).

What the encoding reveals, and to whom: the grid is public (it is in the client specification).
It says nothing about which edges a model compares with, how its trees are shaped, or its leaf
values; the server sees only ciphertexts. A uniform grid reveals each feature's calibration range
(as Concrete ML's public input quantization does); a quantile grid reveals the calibration data's
quantiles at the grid's resolution.
"""

from __future__ import annotations

import numpy as np

from veil.errors import ShapeError, WireFormatError
from veil.he.wire import strict_int

KIND = "thermometer"
MAX_EDGES = 255
MAX_WIDTH = 1 << 16


class ThermometerEncoding:
    """Per-feature sorted edges; `encode(X)` gives the bits feature by feature, edge by edge."""

    def __init__(self, edges: list) -> None:
        if not isinstance(edges, list | tuple) or not edges:
            raise WireFormatError("a thermometer encoding needs a list of edges per feature")
        parsed = []
        for f, row in enumerate(edges):
            try:
                arr = np.asarray(row, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond a float
                raise WireFormatError(f"edges of feature {f} must be numbers") from None
            if arr.ndim != 1 or not 1 <= len(arr) <= MAX_EDGES:
                raise ShapeError(f"feature {f} needs 1 to {MAX_EDGES} edges, got shape {arr.shape}")
            if not np.all(np.isfinite(arr)) or np.any(np.diff(arr) <= 0):
                raise ShapeError(f"edges of feature {f} must be finite and strictly increasing")
            parsed.append(arr)
        self.edges = parsed
        self.offsets = np.cumsum([0] + [len(e) for e in parsed])
        if self.width > MAX_WIDTH:
            raise ShapeError(f"the encoding has {self.width} bits, more than {MAX_WIDTH}")

    @property
    def n_features(self) -> int:
        return len(self.edges)

    @property
    def width(self) -> int:
        """Number of encoded bits (the program's inputs)."""
        return int(self.offsets[-1])

    def bit(self, feature: int, edge: int) -> int:
        """Index of beta[feature, edge] in the encoded vector."""
        return int(self.offsets[feature]) + edge

    def encode(self, X: np.ndarray) -> np.ndarray:
        """(n, width) float64 bits; X must be (n, n_features) and finite (checked by the caller)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ShapeError(f"expected an array of shape (n, {self.n_features}), got {X.shape}")
        out = np.empty((len(X), self.width))
        for f, e in enumerate(self.edges):
            out[:, self.offsets[f]:self.offsets[f + 1]] = X[:, f:f + 1] > e[None, :]
        return out

    def to_dict(self) -> dict:
        return {"kind": KIND, "edges": [e.tolist() for e in self.edges]}

    @classmethod
    def from_dict(cls, d: object) -> ThermometerEncoding:
        """Parse untrusted JSON strictly."""
        if not isinstance(d, dict) or d.get("kind") != KIND or not isinstance(d.get("edges"), list):
            raise WireFormatError("not a thermometer encoding")
        strict_int(len(d["edges"]), "number of encoded features", 1, MAX_WIDTH, ShapeError)
        if not all(isinstance(row, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in row)
                   for row in d["edges"]):
            raise WireFormatError("edges must be lists of numbers")  # numpy would parse "1.5" and True
        return cls(d["edges"])


def load_encoding(d: object) -> ThermometerEncoding | None:
    """The encoding of a specification (`None` when the program takes raw features)."""
    return None if d is None else ThermometerEncoding.from_dict(d)
