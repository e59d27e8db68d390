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
- ``inv_sqrt_wide``: for w given with 2*frac_bits fractional bits, exact comparisons pick one of
  5 buckets of width 2^8, `inv_sqrt` on the rescaled value; relative error <= 1% for w in
  [2^-32, 32] (measured <= 0.1% above 100 units of 2^-32), w = 0 read as 2^-32. For Adam.
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



WIDE_OCTAVES = 8  # each bucket of `inv_sqrt_wide` spans a factor 2^8 of its input


def inv_sqrt_wide(rt: P.Runtime, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1/sqrt(w) and sqrt(w) (shares with frac_bits) of w >= 0 given with 2*frac_bits fractional bits.

    Range reduction by exact comparisons against public powers of two: w is placed in one of
    about 2 frac_bits / 8 buckets [2^(-3-8j), 2^(5-8j)), scaled by 2^(8j) into [1/8, 32) (inside
    `inv_sqrt`'s domain) and the result is scaled back by 2^(4j). All comparisons are batched
    (8 rounds); the bucket selection costs two Beaver products of its secret one-hot. Relative
    error is that of `inv_sqrt` (<= 1%) for w in [2^(-2 frac_bits), 32]; w = 0 (or a negative
    rounding residue) is treated as one unit, 2^(-2 frac_bits), so the result stays finite.
    Used for Adam's second moment, which underflows with frac_bits fractional bits.
    """
    f = rt.frac_bits
    lows = []
    j = 0
    while True:
        e = 2 * f - 3 - WIDE_OCTAVES * j
        lows.append(max(e, 0))
        if e <= 0:
            break
        j += 1
    nb = len(lows)
    thr = torch.tensor([1 << e for e in lows], dtype=torch.int64).reshape((nb,) + (1,) * w2.dim())
    c = P.ge_zero(rt, w2.unsqueeze(0) - P.public(rt, thr.expand((nb, *w2.shape)).contiguous()))
    onehot = torch.cat([c[:1], c[1:] - c[:-1]], 0)  # integer 0/1 shares, at most one is 1
    bottom = P.public(rt, torch.ones_like(w2)) - c[-1]
    sel = P.beaver(rt, "mul", onehot, w2.unsqueeze(0).expand_as(onehot).contiguous())
    mult = torch.tensor([1 << (WIDE_OCTAVES * k) for k in range(nb)], dtype=torch.int64)
    u2 = (sel * mult.reshape((nb,) + (1,) * w2.dim())).sum(0)
    u = P.truncate(rt, u2) + bottom * rt.scale  # in [1/8, 32), or 1 in the bottom bucket
    y = inv_sqrt(rt, u)
    s = P.mul(rt, u, y)
    both = torch.stack([y, s], 0).unsqueeze(0).expand((nb, 2, *w2.shape)).contiguous()
    prod = P.beaver(rt, "mul", onehot.unsqueeze(1).expand_as(both).contiguous(), both)
    half = WIDE_OCTAVES // 2
    up = torch.tensor([1 << (half * k) for k in range(nb)], dtype=torch.int64)
    down = torch.tensor([1 << (f - half * k) if half * k <= f else 0 for k in range(nb)], dtype=torch.int64)
    shape = (nb,) + (1,) * w2.dim()
    inv = (prod[:, 0] * up.reshape(shape)).sum(0) + bottom * (rt.scale * rt.scale)
    root = P.truncate(rt, (prod[:, 1] * down.reshape(shape)).sum(0))
    return inv, root
