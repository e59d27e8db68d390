"""Non-linear functions by iterative approximations built on products and comparisons.

Measured error bounds (frac_bits=16, checked by tests/mpc/test_approx.py against float64 torch):

- ``exp``: limit (1 + x/2^8)^(2^8), 8 squarings. Its relative error is about x^2/512:
  |exp(x) - e^x| <= e^x (x^2/400 + 0.01) + 0.001 for x in [-8, 4], and <= 0.001 for x in
  [-250, -8]. Invalid for x < -256 (1 + x/256 changes sign) and inaccurate for x > 4.
- ``reciprocal``: Newton-Raphson y <- y(2 - xy) from y0 = 3 exp(0.5 - x) + 0.003, 10 iterations.
  Relative error <= 1% for x in [0.5, 100].
- ``log``: 2 Householder iterations (order 8) from y0 = x/120 - 20 exp(-2x - 1) + 3.
  Absolute error <= 0.05 for x in [0.1, 100].
- ``inv_sqrt``: Newton y <- y(3 - x y^2)/2 from y0 = 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024,
  4 iterations; ``sqrt = x * inv_sqrt(x)``. Relative error <= 1% for x in [0.05, 50].
- ``sigmoid``: sigma(|x|) = 1/(1 + exp(-|x|)) (denominator in [1, 2]) and the sign bit.
  Absolute error <= 0.01 for |x| <= 250.
- ``softmax``: max subtraction (tournament comparisons), exp, reciprocal of the sum
  (which lies in [1, k]). Absolute error <= 0.02 per probability for k <= 100 classes.
"""

from __future__ import annotations

import torch

from veil.mpc import primitives as P

EXP_ITERS = 8


def _pub(rt: P.Runtime, v: float, like: torch.Tensor) -> torch.Tensor:
    return P.public(rt, torch.full_like(like, round(v * rt.scale)))


def mul_const(rt: P.Runtime, x: torch.Tensor, c: float) -> torch.Tensor:
    """x * c for a public real c (one truncation, no communication for 2 parties)."""
    return P.truncate(rt, x * round(c * rt.scale))


def exp(rt: P.Runtime, x: torch.Tensor) -> torch.Tensor:
    """e^x by the limit formula (see the module docstring for the error)."""
    y = P.truncate(rt, x, EXP_ITERS) + _pub(rt, 1.0, x)
    for _ in range(EXP_ITERS):
        y = P.truncate(rt, P.square(rt, y))
    return y


def reciprocal(rt: P.Runtime, x: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """1/x for x > 0 by Newton-Raphson."""
    y = mul_const(rt, exp(rt, _pub(rt, 0.5, x) - x), 3.0) + _pub(rt, 0.003, x)
    two = _pub(rt, 2.0, x)
    for _ in range(iters):
        y = P.mul(rt, y, two - P.mul(rt, x, y))
    return y


def log(rt: P.Runtime, x: torch.Tensor, iters: int = 2, order: int = 8) -> torch.Tensor:
    """Natural logarithm for x > 0 by Householder iterations."""
    y = mul_const(rt, x, 1 / 120) - mul_const(rt, exp(rt, -2 * x - _pub(rt, 1.0, x)), 20.0) + _pub(rt, 3.0, x)
    for _ in range(iters):
        h = _pub(rt, 1.0, x) - P.mul(rt, x, exp(rt, -y))
        acc = h
        hp = h
        for k in range(2, order + 1):
            hp = P.mul(rt, hp, h)
            acc = acc + mul_const(rt, hp, 1.0 / k)
        y = y - acc
    return y


def inv_sqrt(rt: P.Runtime, x: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """1/sqrt(x) for x > 0 by Newton iterations."""
    e = exp(rt, -(mul_const(rt, x, 0.5) + _pub(rt, 0.2, x)))
    y = mul_const(rt, e, 2.2) + _pub(rt, 0.2, x) - mul_const(rt, x, 1 / 1024)
    three = _pub(rt, 3.0, x)
    for _ in range(iters):
        y = mul_const(rt, P.mul(rt, y, three - P.mul(rt, x, P.truncate(rt, P.square(rt, y)))), 0.5)
    return y


def sqrt(rt: P.Runtime, x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) = x / sqrt(x) for x > 0."""
    return P.mul(rt, x, inv_sqrt(rt, x))


def sigmoid(rt: P.Runtime, x: torch.Tensor) -> torch.Tensor:
    """Logistic function, stable for every input through |x| and the sign bit."""
    s = P.ge_zero(rt, x)
    sign = 2 * s - P.public(rt, torch.ones_like(s))
    ax = P.beaver(rt, "mul", x, sign)
    pos = reciprocal(rt, _pub(rt, 1.0, x) + exp(rt, -ax), iters=6)
    one = _pub(rt, 1.0, x)
    return one - pos + P.beaver(rt, "mul", 2 * pos - one, s)


def softmax(rt: P.Runtime, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax along ``dim``: exp(x - max) / sum."""
    xt = x.movedim(dim, -1)
    m, _ = P.max_last(rt, xt)
    e = exp(rt, xt - m.unsqueeze(-1))
    r = reciprocal(rt, e.sum(-1, keepdim=True))
    return P.mul(rt, e, r.expand_as(e)).movedim(-1, dim)

