"""Non-linear functions by iterative approximations built on products and comparisons.

Measured error bounds (frac_bits=16, checked by tests/mpc/test_protocols.py and test_range.py against
float64 torch):

- ``exp``: limit (1 + x/2^8)^(2^8), 8 squarings. Its relative error is about x^2/512:
  |exp(x) - e^x| <= e^x (x^2/400 + 0.01) + 0.001 for x in [-8, 4], and <= 0.001 for x in
  [-250, -8]. Invalid for x < -256 (1 + x/256 changes sign) and inaccurate for x > 4.
- ``reciprocal``: Newton-Raphson y <- y(2 - xy) from y0 = 3 exp(0.5 - x) + 0.003, 10 iterations.
  Relative error <= 1% for x in [0.5, 100].
- ``log``: 2 Householder iterations (order 8) from y0 = x/120 - 20 exp(-2x - 1) + 3.
  Absolute error <= 0.05 for x in [0.1, 100].
- ``inv_sqrt``: Newton y <- y(3 - x y^2)/2 from y0 = 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024,
  4 iterations; ``sqrt = x * inv_sqrt(x)``. Relative error <= 1% for x in [0.05, 50].
- ``exp_nonpos``: e^z for z <= 0 of any magnitude: z is raised to -32 first (one ReLU, 8
  rounds; e^-32 is below the fixed-point resolution), then ``exp``: absolute error <= 0.001
  below -8, as ``exp`` above.
- ``inv_sqrt_wide``: for w given with 2*frac_bits fractional bits, exact comparisons pick one of
  8 buckets of width 2^8 (for frac_bits = 16), `inv_sqrt` on the rescaled value (in [1/8, 64));
  the whole range of such values, [2^-32, 2^30): relative error <= 1% plus the output's
  resolution (2^-16 / |result|, so 1% + 2^-16 sqrt(w) for 1/sqrt(w)), w = 0 read as 2^-32. For
  Adam and the normalisation layers.
- ``sigmoid``: sigma(|x|) = 1/(1 + exp(-|x|)) (denominator in [1, 2]) and the sign bit, |x|
  clamped to 32 by comparisons batched with the sign's. Absolute error <= 0.01 for every x.
- ``softmax``: max subtraction (tournament comparisons), `exp_nonpos`, reciprocal of the sum
  (which lies in [1, k]). Absolute error <= 0.02 per probability for k <= 100 classes, for any
  gap between the logits (within the fixed-point range).

`DOMAINS` lists the input range in which each of ``exp``, ``reciprocal``, ``log`` and
``inv_sqrt`` meets its bound; outside it the result can be far off (``exp`` below -256 wraps
around the ring, Newton iterations diverge). The aten rules check them in the range-check mode
(`veil.mpc.checks`).
"""

from __future__ import annotations

import torch

from veil.mpc import primitives as P

EXP_ITERS = 8
EXP_FLOOR = 32.0  # e^-32 < 2^-46: `exp_nonpos` and `sigmoid` clamp their exponent here
DOMAINS = {"exp": (-250.0, 4.0), "reciprocal": (0.5, 100.0), "log": (0.1, 100.0), "inv_sqrt": (0.05, 50.0)}


def _pub(rt: P.Runtime, v: float, like: torch.Tensor) -> torch.Tensor:
    return P.public(rt, torch.full_like(like, round(v * rt.scale)))


def mul_const(rt: P.Runtime, x: torch.Tensor, c: float) -> torch.Tensor:
    """x * c for a public real c (one truncation: one round)."""
    return P.truncate(rt, x * round(c * rt.scale))


def exp(rt: P.Runtime, x: torch.Tensor) -> torch.Tensor:
    """e^x by the limit formula (see the module docstring for the error)."""
    y = P.truncate(rt, x, EXP_ITERS) + _pub(rt, 1.0, x)
    for _ in range(EXP_ITERS):
        y = P.square_fixed(rt, y)
    return y


def exp_nonpos(rt: P.Runtime, z: torch.Tensor) -> torch.Tensor:
    """e^z for z <= 0 of any magnitude: e^max(z, -EXP_FLOOR), the clamp by one ReLU (8 rounds)."""
    floor = _pub(rt, EXP_FLOOR, z)
    r, _ = P.relu(rt, z + floor)
    return exp(rt, r - floor)


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
        y = mul_const(rt, P.mul(rt, y, three - P.mul(rt, x, P.square_fixed(rt, y))), 0.5)
    return y


def sqrt(rt: P.Runtime, x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) = x / sqrt(x) for x > 0."""
    return P.mul(rt, x, inv_sqrt(rt, x))


def sigmoid(rt: P.Runtime, x: torch.Tensor) -> torch.Tensor:
    """Logistic function, stable for every input: sigma(-|x|) from |x| clamped to EXP_FLOOR.

    One batch of comparisons (8 rounds) gives s = [x >= 0], p = [x >= C], q = [x <= -C] (C =
    EXP_FLOOR); min(|x|, C) = x (2s - p + q - 1) + C (p + q), one product with integer bits.
    """
    c = _pub(rt, EXP_FLOOR, x)
    s, p, q = P.ge_zero(rt, torch.stack([x, x - c, -x - c]))
    one_int = P.public(rt, torch.ones_like(s))
    ax = P.beaver(rt, "mul", x, 2 * s - p + q - one_int) + (p + q) * round(EXP_FLOOR * rt.scale)
    pos = reciprocal(rt, _pub(rt, 1.0, x) + exp(rt, -ax), iters=6)
    one = _pub(rt, 1.0, x)
    return one - pos + P.beaver(rt, "mul", 2 * pos - one, s)


def shifted_exp(rt: P.Runtime, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, e^z) for z = x - max(x) along the last dimension (tournament max, then `exp_nonpos`):
    the exponentials of softmax and log-softmax, valid for any gap between the entries."""
    m, _ = P.max_last(rt, x)
    z = x - m.unsqueeze(-1)
    return z, exp_nonpos(rt, z)


def normalise(rt: P.Runtime, e: torch.Tensor, tot: torch.Tensor) -> torch.Tensor:
    """e / tot along the last dimension (tot, the sum of e, kept as a dimension of size 1)."""
    return P.mul(rt, e, reciprocal(rt, tot).expand_as(e))


def softmax(rt: P.Runtime, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax along ``dim``: exp(x - max) / sum."""
    _, e = shifted_exp(rt, x.movedim(dim, -1))
    return normalise(rt, e, e.sum(-1, keepdim=True)).movedim(-1, dim)


WIDE_OCTAVES = 8  # each bucket of `inv_sqrt_wide` spans a factor 2^8 of its input


def _wide_buckets(f: int) -> tuple[list[int], int]:
    """Bucket exponents k of `inv_sqrt_wide` (bucket k holds w in [2^(-3-8k), 2^(5-8k)), the top
    one unbounded) and the number of buckets with k < 0 (those above 32)."""
    top = 0
    while 62 - 2 * f - WIDE_OCTAVES * top > 6:  # the top bucket, scaled, stays below 2^6
        top += 1
    ks = list(range(-top, 0))
    k = 0
    while True:
        ks.append(k)
        if 2 * f - 3 - WIDE_OCTAVES * k <= 0:
            return ks, top
        k += 1


def inv_sqrt_wide(rt: P.Runtime, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1/sqrt(w) and sqrt(w) (shares with frac_bits) of w >= 0 given with 2*frac_bits fractional bits.

    Range reduction by exact comparisons against public powers of two: w is placed in one of
    the buckets [2^(-3-8k), 2^(5-8k)) (`_wide_buckets`: k from -3 to 4 for frac_bits = 16, the
    top bucket holding everything from 2^21 to the ring's limit 2^30), scaled by 2^(8k) into
    [1/8, 64) (inside `inv_sqrt`'s accurate range) and the result is scaled back by 2^(4k). All
    comparisons are batched (8 rounds); the bucket selection costs two Beaver products of its
    secret one-hot and two truncations. Relative error is that of `inv_sqrt` (<= 1%) plus the
    resolution of the outputs (2^-frac_bits absolute) for every w in [2^(-2 frac_bits), 2^(62 - 2
    frac_bits)); w = 0 (or a negative rounding residue) is treated as one unit, 2^(-2 frac_bits),
    so the result stays finite. Used for Adam's second moment (which underflows with frac_bits
    fractional bits) and for the variances of the normalisation layers.
    """
    f = rt.frac_bits
    ks, top = _wide_buckets(f)
    nb = len(ks)
    shape = (nb,) + (1,) * w2.dim()
    lows = [max(2 * f - 3 - WIDE_OCTAVES * k, 0) for k in ks]
    thr = torch.tensor([1 << e for e in lows], dtype=torch.int64).reshape(shape)
    c = P.ge_zero(rt, w2.unsqueeze(0) - P.public(rt, thr.expand((nb, *w2.shape)).contiguous()))
    onehot = torch.cat([c[:1], c[1:] - c[:-1]], 0)  # integer 0/1 shares, at most one is 1
    bottom = P.public(rt, torch.ones_like(w2)) - c[-1]
    sel = P.beaver(rt, "mul", onehot, w2.unsqueeze(0).expand_as(onehot).contiguous())
    # u = w 2^(8k), through w 2^(8(k + top)) (below 2^(5 + 2f + 8 top) < 2^62) and one division
    mult = torch.tensor([1 << (WIDE_OCTAVES * (k + top)) for k in ks], dtype=torch.int64).reshape(shape)
    u = P.truncate(rt, (sel * mult).sum(0), f + WIDE_OCTAVES * top) + bottom * rt.scale  # [1/8, 64), or 1
    y = inv_sqrt(rt, u)
    s = P.mul(rt, u, y)
    both = torch.stack([y, s], 0).unsqueeze(0).expand((nb, 2, *w2.shape)).contiguous()
    prod = P.beaver(rt, "mul", onehot.unsqueeze(1).expand_as(both).contiguous(), both)
    # 1/sqrt(w) = y 2^(4k) and sqrt(w) = s 2^(-4k), both through one division by 2^e
    half = WIDE_OCTAVES // 2
    e = max(f, half * top)
    up = torch.tensor([1 << (half * k + e) for k in ks], dtype=torch.int64).reshape(shape)
    down = torch.tensor([1 << (e - half * k) if half * k <= e else 0 for k in ks], dtype=torch.int64).reshape(shape)
    scaled = P.truncate(rt, torch.stack([(prod[:, 0] * up).sum(0), (prod[:, 1] * down).sum(0)]), e)
    return scaled[0] + bottom * (rt.scale * rt.scale), scaled[1]
