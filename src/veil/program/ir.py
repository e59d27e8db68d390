"""A small IR of encrypted computations: what a model asks the server to compute.

A `Program` maps a feature vector of length `n_inputs` through a chain of operations:

* `Linear(weight, bias)`: y = W x + b with plaintext W (out x in) and b; this is the plaintext
  matrix-vector product (convolutions, average pooling, flattening and folded batch norms are all
  linear maps, so compilers lower them to this op);
* `Poly(coeffs)`: an element-wise polynomial c0 + c1 x + c2 x^2 (the square activation is
  (0, 0, 1); a quadratic fitted to ReLU is another).

Programs are model-agnostic: `ml/` compiles estimators and torch modules into them, the planner
(`veil.program.planner`) turns them into per-layout plans of ciphertext operations (multiply by
plaintext, add, square, relinearize, rescale, rotate-and-sum) with levels and scales, and the
backends (SEAL, simulation, plaintext) run those plans. `evaluate` is the plaintext reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from veil.errors import ShapeError, WireFormatError
from veil.he.wire import strict_int

MAX_DIM = 1 << 16
MAX_OPS = 64
MAX_POLY_DEGREE = 2


def _matrix(value: object, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise WireFormatError(f"{what} must be numbers: {exc}") from None
    if not np.all(np.isfinite(arr)):
        raise ShapeError(f"{what} must be finite")
    return arr


@dataclass(frozen=True, eq=False)
class Linear:
    """y = weight @ x + bias, with weight of shape (out, in)."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        w = _matrix(self.weight, "linear weight")
        b = _matrix(self.bias, "linear bias").ravel()
        if w.ndim != 2 or not (0 < w.shape[0] <= MAX_DIM and 0 < w.shape[1] <= MAX_DIM):
            raise ShapeError(f"linear weight must be a non-empty matrix, got shape {w.shape}")
        if b.shape != (w.shape[0],):
            raise ShapeError(f"bias of shape {b.shape} does not match {w.shape[0]} outputs")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)

    @property
    def n_in(self) -> int:
        return self.weight.shape[1]

    @property
    def n_out(self) -> int:
        return self.weight.shape[0]

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return X @ self.weight.T + self.bias

    def to_dict(self) -> dict:
        return {"op": "linear", "weight": self.weight.tolist(), "bias": self.bias.tolist()}


@dataclass(frozen=True, eq=False)
class Poly:
    """Element-wise c0 + c1 x + c2 x^2 (degree at most 2: one multiplicative level)."""

    coeffs: tuple[float, ...]

    def __post_init__(self) -> None:
        c = tuple(float(v) for v in _matrix(self.coeffs, "polynomial coefficients").ravel())
        if not 1 <= len(c) <= MAX_POLY_DEGREE + 1:
            raise ShapeError(f"polynomials of degree 0 to {MAX_POLY_DEGREE} are supported, got {len(c) - 1}")
        object.__setattr__(self, "coeffs", c + (0.0,) * (MAX_POLY_DEGREE + 1 - len(c)))

    @property
    def degree(self) -> int:
        nz = [i for i, v in enumerate(self.coeffs) if v != 0.0]
        return nz[-1] if nz else 0

    def __call__(self, X: np.ndarray) -> np.ndarray:
        c0, c1, c2 = self.coeffs
        return c0 + X * (c1 + c2 * X)

    def to_dict(self) -> dict:
        return {"op": "poly", "coeffs": list(self.coeffs)}


Op = Linear | Poly
MAX_EXACT_WEIGHT = 16


def is_exact(op: Op) -> bool:
    """A Linear whose weights are small integers and whose every row has one: in the batch
    layout it is sums and differences of ciphertexts (plus a plaintext bias), exact and free of
    any rescale, so it costs no level (a row of zeros would have to be made from nothing)."""
    if not isinstance(op, Linear):
        return False
    W = op.weight
    return bool(np.all(np.round(W) == W) and np.all(np.abs(W) <= MAX_EXACT_WEIGHT)
                and np.all(np.any(W != 0, axis=1)))


class Program:
    """A chain of `Linear` and `Poly` ops on an input vector of `n_inputs` features."""

    def __init__(self, n_inputs: int, ops: list[Op]) -> None:
        self.n_inputs = strict_int(n_inputs, "n_inputs", 1, MAX_DIM, ShapeError)
        if not ops or len(ops) > MAX_OPS:
            raise ShapeError(f"a program holds 1 to {MAX_OPS} operations, got {len(ops)}")
        width = self.n_inputs
        for i, op in enumerate(ops):
            if not isinstance(op, Linear | Poly):
                raise ShapeError(f"operation {i} is a {type(op).__name__}, not Linear or Poly")
            if isinstance(op, Linear):
                if op.n_in != width:
                    raise ShapeError(f"operation {i} takes {op.n_in} inputs, the previous one gives {width}")
                width = op.n_out
        self.ops = list(ops)
        self.n_outputs = width

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        """The plaintext reference: what every backend must reproduce."""
        out = np.asarray(X, dtype=np.float64)
        for op in self.ops:
            out = op(out)
        return out

    @property
    def n_squares(self) -> int:
        return sum(1 for op in self.ops if isinstance(op, Poly) and op.degree == 2)

    def to_dict(self) -> dict:
        return {"n_inputs": self.n_inputs, "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, data: object) -> Program:
        """Parse untrusted JSON; any malformed structure is a `WireFormatError` or `ShapeError`."""
        if not isinstance(data, dict) or not isinstance(data.get("ops"), list):
            raise WireFormatError("a program is an object with n_inputs and a list of ops")
        ops: list[Op] = []
        for raw in data["ops"][:MAX_OPS + 1]:
            if not isinstance(raw, dict):
                raise WireFormatError("every op must be an object")
            kind = raw.get("op")
            if kind == "linear":
                ops.append(Linear(raw.get("weight"), raw.get("bias")))
            elif kind == "poly":
                coeffs = raw.get("coeffs")
                if not isinstance(coeffs, list):
                    raise WireFormatError("polynomial coefficients must be a list")
                ops.append(Poly(tuple(coeffs)))
            else:
                raise WireFormatError(f"unknown op {kind!r}; known: linear, poly")
        return cls(data.get("n_inputs"), ops)


def normalise(program: Program) -> list[Op]:
    """The same function as a strictly alternating chain Linear, Poly(degree 2), Linear, ...,
    ending in a Linear or a Poly, with every degree-2 polynomial's leading coefficient equal to
    +-1 (folded into the Linear before it) and no polynomial of degree below 2 left.

    Why: each remaining op then costs exactly one rescale (one level), consecutive linear maps
    (a convolution, a pooling, a dense layer) become one matrix product, and affine polynomials
    cost nothing. Folding c2 into the weights before it: c2 z^2 + c1 z + c0 = s t^2 + (c1/k) t + c0
    with k = sqrt|c2|, t = k z and s the sign of c2.
    """
    ops: list[Op] = []
    width = program.n_inputs
    for op in program.ops:
        if isinstance(op, Poly) and not (ops and isinstance(ops[-1], Linear)):
            ops.append(Linear(np.eye(width), np.zeros(width)))
        prev = ops[-1] if ops else None
        if isinstance(op, Linear):
            width = op.n_out
            if isinstance(prev, Linear):
                ops[-1] = Linear(op.weight @ prev.weight, op.weight @ prev.bias + op.bias)
            else:
                ops.append(op)
            continue
        assert isinstance(prev, Linear)
        c0, c1, c2 = op.coeffs
        if op.degree < 2:
            ops[-1] = Linear(c1 * prev.weight, c1 * prev.bias + c0)
        else:
            k = float(np.sqrt(abs(c2)))
            ops[-1] = Linear(k * prev.weight, k * prev.bias)
            ops.append(Poly((c0, c1 / k, float(np.sign(c2)))))
    return ops
