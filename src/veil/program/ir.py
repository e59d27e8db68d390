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
    """Element-wise c0 + c1 x + c2 x^2 (degree at most 2: one multiplicative level).

    Each coefficient is a number (the same polynomial on every element) or, for a per-element
    polynomial, a vector with one entry per element: lowered graphs carry a value past a layer of
    squares as the identity (0, 1, 0) beside the squared elements (a skip connection), and
    branches may use different activations. Per-element polynomials run in the batch layout only
    (one ciphertext per element); see `veil.program.planner`."""

    coeffs: tuple

    def __post_init__(self) -> None:
        raw = self.coeffs
        entries = [_matrix(v, "polynomial coefficients")
                   for v in (raw if isinstance(raw, tuple | list | np.ndarray) else [raw])]
        if not 1 <= len(entries) <= MAX_POLY_DEGREE + 1 or any(e.ndim > 1 for e in entries):
            raise ShapeError(f"polynomials of degree 0 to {MAX_POLY_DEGREE} are supported, given by up to "
                             f"{MAX_POLY_DEGREE + 1} numbers or vectors, got {len(entries)} coefficients")
        c: tuple
        if all(e.ndim == 0 for e in entries):
            c = tuple(float(e) for e in entries) + (0.0,) * (MAX_POLY_DEGREE + 1 - len(entries))
        else:
            widths = {e.size for e in entries if e.ndim == 1}
            width = widths.pop() if len(widths) == 1 else 0
            if not 0 < width <= MAX_DIM:
                raise ShapeError("per-element polynomial coefficients must be vectors of one length")
            vectors = [np.broadcast_to(e, (width,)).copy() for e in entries]
            vectors += [np.zeros(width)] * (MAX_POLY_DEGREE + 1 - len(vectors))
            for v in vectors:
                v.setflags(write=False)
            c = tuple(vectors)
        object.__setattr__(self, "coeffs", c)

    @classmethod
    def per_element(cls, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> Poly:
        """A polynomial from coefficient vectors, uniform (numbers) when every element has the same."""
        vectors = [np.asarray(v, dtype=np.float64).ravel() for v in (c0, c1, c2)]
        if all(np.all(v == v[0]) for v in vectors):
            return cls(tuple(float(v[0]) for v in vectors))
        return cls(tuple(vectors))

    @property
    def width(self) -> int | None:
        """Number of elements of a per-element polynomial (None: the same on any width)."""
        return None if self.is_uniform else len(self.coeffs[0])

    @property
    def is_uniform(self) -> bool:
        return isinstance(self.coeffs[0], float)

    def vectors(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(c0, c1, c2) as vectors of `width` entries."""
        c0, c1, c2 = (np.broadcast_to(np.asarray(c, dtype=np.float64), (width,)) for c in self.coeffs)
        return c0, c1, c2

    def element(self, i: int) -> tuple[float, float, float]:
        """The coefficients of element `i`."""
        if self.is_uniform:
            return self.coeffs
        return tuple(float(c[i]) for c in self.coeffs)

    @property
    def degree(self) -> int:
        nz = [i for i, v in enumerate(self.coeffs) if np.any(np.asarray(v) != 0.0)]
        return nz[-1] if nz else 0

    def __call__(self, X: np.ndarray) -> np.ndarray:
        c0, c1, c2 = self.coeffs
        return c0 + X * (c1 + c2 * X)

    def to_dict(self) -> dict:
        return {"op": "poly", "coeffs": [c if isinstance(c, float) else c.tolist() for c in self.coeffs]}


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
            elif op.width not in (None, width):
                raise ShapeError(f"operation {i} is a polynomial of {op.width} elements on {width} values")
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
                if not isinstance(coeffs, list) or not all(
                        (isinstance(c, int | float) and not isinstance(c, bool))
                        or (isinstance(c, list) and 0 < len(c) <= MAX_DIM) for c in coeffs):
                    raise WireFormatError("polynomial coefficients must be a list of numbers or of vectors")
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
    with k = sqrt|c2|, t = k z and s the sign of c2. In a per-element polynomial, the elements of
    degree below 2 fold wholly into the Linear (c1 scales their row, c0 joins their bias) and are
    left as the identity (0, 1, 0).
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
        if op.is_uniform:
            c0, c1, c2 = op.coeffs
            if op.degree < 2:
                ops[-1] = Linear(c1 * prev.weight, c1 * prev.bias + c0)
            else:
                k = float(np.sqrt(abs(c2)))
                ops[-1] = Linear(k * prev.weight, k * prev.bias)
                ops.append(Poly((c0, c1 / k, float(np.sign(c2)))))
            continue
        c0, c1, c2 = op.vectors(width)
        square = c2 != 0.0
        k = np.where(square, np.sqrt(np.abs(c2)), 1.0)
        row = np.where(square, k, c1)  # squared elements: t = k z; the others: c1 z + c0, folded
        ops[-1] = Linear(row[:, None] * prev.weight, row * prev.bias + np.where(square, 0.0, c0))
        if square.any():
            ops.append(Poly.per_element(np.where(square, c0, 0.0), np.where(square, c1 / k, 1.0), np.sign(c2)))
    return ops
