"""The range-check mode: leaving the fixed-point range raises `RangeError` instead of giving garbage.

Fixed-point values live in Z_2^64 with ``frac_bits`` (f) fractional bits. Without checks, these
limits are stated, not enforced: a product is exact while its exact value satisfies |x y| <
2^(62 - 2f) (2^30 for f = 16: `primitives.div_public`), a square while |x| < 2^(31 - f); the
approximations meet their bounds inside `approx.DOMAINS`. Beyond, the ring wraps around silently.

Inside ``with veil.mpc.range_checks():`` (entered by every party at the same point of its
program, like any other operation) the aten rules also compute, for each secret operand, secret
bits "outside the range" by exact comparisons (`primitives.ge_zero`), and add them to a secret
counter. Nothing is opened then. At each *check point* the parties open one bit, [counter > 0]:

- when the block is left normally, at every `MPCTensor.reveal` inside it (before the value is
  revealed, so a wrapped value is never revealed) and at an explicit `check_ranges()`;
- if the bit is 1, every party raises `RangeError`, naming the kinds of checks since the last
  check point (which ops were checked is public: it follows the program, not the data).

What is revealed: that one bit per check point, to every party; in a run that completes, nothing
beyond "every checked value was in range". Which op or element left the range is not revealed
(add `check_ranges()` calls to narrow it down; each reveals one more bit). Results written with
``ctx.reveal`` of `veil.mpc.sharefile` are not opened, so the block's exit checks them: keep
that call inside the block and call `check_ranges()` before it.

What is checked, and the cost (each check is one batch of comparisons: 8 rounds):

- elementwise products, matrix products and convolutions of two secrets, or of a secret and a
  public tensor (`product`). In raw units (values times 2^f), for one output with K terms
  (`terms`: 1 elementwise, the contracted length of a matrix product, C kh kw of a
  convolution), x_k and y_k its operands' elements and P = sum x_k y_k its exact value (2f
  fractional bits): the output out is exact while P lies in [-2^62, 2^62)
  (`primitives.div_public`); otherwise out - P / 2^f is a nonzero multiple of 2^(64 - f), up to
  one unit. Three checks, with all their comparisons in one batch (f = 16: hx = hy = 8, g = 23):

  1. size: sum |x_k| + sum |y_k| <= R = 2^(62 - hy) (2^54), without a comparison per element:
     u = v / 2^32 for every operand element (exact division for operands in the fixed-point
     range, |v| < 2^62, where `primitives.div_public` is exact; |u| <= 2^30, so u^2 never wraps)
     gives |v| <= 2^32 (|u| + 1), and by Cauchy-Schwarz sum |v| <= 2^32 (sqrt(2K S) + 2K) for S
     the sum of the output's 2K squares u^2. S is summed as 2^t sum q + sum l (u^2 = 2^t q + l,
     2^t > 4K, so neither sum wraps) and V = sum q + (sum l) / 2^t <= vmax is one comparison
     per output (`ProductBounds` derives vmax);
  2. fine: ``fine`` = bilinear(x / 2^hx, y / 2^hy) (hx + hy = f) differs from P / 2^f by at most
     sum (|x_k| / 2^hx + |y_k| / 2^hy + 3) + 1 <= 2^46 + 3K + 1 < tau = 2^(63 - f) under check 1,
     and |out - fine| < tau is checked: a wrong out is off by j 2^(64 - f) with 0 < |j| < 2^f
     while |P| < 2^(63 + f), at least 2^(64 - f) - tau > tau from fine (only a j that 2^f
     divides vanishes in the ring);
  3. coarse: ``coarse`` = bilinear(x / 2^g, y / 2^g), g = f + hy - 1, approximates P / 2^(2g)
     within R / 2^g + 3K (2^31 + 3K) and, under check 1, never wraps (|coarse| <= (R/2)^2 /
     2^(2g) + ... < 2^61); |coarse| < top = 2^(62 + f - 2g) (2^32) holds for every |P| < 2^62 and
     fails for every |P| >= 2^(63 + f), the products check 2 cannot see.

  So a wrong product always raises, whatever the operands (outside check 1's bound by check 1
  itself). The check never fires while every output's exact value |P| < 2^(62 - 2f) (2^30 for
  f = 16: the documented product range) and, in real units, ||x row||^2 + ||y column||^2 <=
  2^73 / K (f = 16: e.g. |x|, |y| <= 2^36 elementwise, or one operand up to 2^36 / K per element
  times a tiny one). Cost, on top of the product's 2 rounds: three exact divisions of the
  operands (by 2^hx, 2^g, 2^32), two Beaver products of them (local if an operand is public),
  a square of u with its division by 2^t, one division per output and 5 comparisons per
  output: 16 rounds (14 with a public operand). Beyond MAX_TERMS = 2^18 terms per output, where
  vmax leaves no room, check 1 compares every operand element instead (|v| <= R / 2K: two
  comparisons per element, no squares; 12 rounds, 10 with a public operand).
- squares (|x| < 2^(31 - f)); secret times public scalar or tensor (|x v| < 2^62 in raw units,
  per element); the untruncated squares of the normalisation layers (|x - mean| < 2^(31 - f))
  and their variances (< 2^20: `_ops.norm_ops`), a secret running variance of BatchNorm in eval
  mode (0 <= var + eps < 2^30); Adam's exact g^2; the wide products of BCEWithLogitsLoss
  (`_ops.common.mul_wide`: |x t| < 2^(62 - f) for a public target, |t| <= 1 for a secret one);
  the sum of an MSELoss with ``reduction="sum"`` when it can leave the ring (`_ops.common.sum_div`);
- the inputs of exp, reciprocal (and division by a secret), log, sqrt/rsqrt (`approx.DOMAINS`),
  of BCELoss on probabilities, and the sum of exponentials of a softmax or log-softmax over
  more than 100 classes.

Not checked: other additions and sums (keep them within the fixed-point range, 2^(62 - f) = 2^46); the
products inside the approximations (their domains bound them); the products that layer rules
compute on shares directly (`primitives.mul`: normalised values and their gradients, softmax's
backward, Adam's update, BCELoss's gradient), whose factors are normalised values,
probabilities or inverse roots, times an upstream gradient that is not checked there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from veil.mpc import approx, ring
from veil.mpc import primitives as P
from veil.mpc.errors import ProtocolError, RangeError

__all__ = ["Pending", "active", "check_ranges", "domain", "flush", "product", "range_checks", "scaled", "square",
           "within"]


class Pending:
    """The secret count of values found outside their range since the last check point, and
    the (public) names of the checks that contributed to it."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.what: list[str] = []

    def add(self, n: torch.Tensor, what: str) -> None:
        """Add integer shares ``n`` (a scalar) to the count; ``what`` names the check."""
        self.count = n if self.count is None else self.count + n
        if what not in self.what:
            self.what.append(what)


@contextlib.contextmanager
def range_checks() -> Iterator[None]:
    """Run the block in the range-check mode (see the module docstring); nested blocks share one count."""
    rt = P.current()
    if rt.checks is not None:
        yield
        return
    rt.checks = Pending()
    try:
        yield
        flush(rt)
    finally:
        rt.checks = None


def check_ranges() -> None:
    """A check point inside `range_checks`: open one bit, raise `RangeError` if it is set."""
    flush(P.current())


def active(rt: P.Runtime) -> bool:
    """Whether this party runs in the range-check mode."""
    return rt.checks is not None


def flush(rt: P.Runtime) -> None:
    """Open [count > 0] (one comparison and one opening of a single bit); raise if it is set."""
    pending = rt.checks
    if pending is None or pending.count is None:
        return
    count, what = pending.count, pending.what
    pending.count, pending.what = None, []
    bit = P.ge_zero(rt, count.reshape(1) - P.public(rt, torch.ones(1, dtype=torch.int64)))
    if int(P.open_ring(rt, bit)[0]) != 0:
        raise RangeError("a secret value left the range of its operation in one of: " + ", ".join(what)
                         + " (see veil.mpc.checks)")


def _count_negative(rt: P.Runtime, parts: list[torch.Tensor], what: str) -> None:
    """Count the elements below zero of the shares in ``parts`` (one batch of comparisons)."""
    parts = [p.reshape(-1) for p in parts if p.numel()]
    if not parts:
        return
    inside = P.ge_zero(rt, torch.cat(parts))
    total = P.public(rt, torch.tensor(inside.numel(), dtype=torch.int64))
    rt.checks.add(total - inside.sum(), what)


def _bound(rt: P.Runtime, v, like: torch.Tensor) -> torch.Tensor:
    """Shares of the public raw bound(s) ``v`` (an int or an int64 tensor) broadcast to ``like``."""
    return P.public(rt, torch.as_tensor(v, dtype=torch.int64).expand(like.shape).contiguous())


def _count_outside(rt: P.Runtime, x: torch.Tensor, lo, hi, what: str) -> None:
    """Count the elements of shares ``x`` below raw ``lo`` or above raw ``hi`` (ints or public
    int64 tensors broadcastable to x; None for no bound)."""
    parts = []
    if lo is not None:
        parts.append(x - _bound(rt, lo, x))
    if hi is not None:
        parts.append(_bound(rt, hi, x) - x)
    _count_negative(rt, parts, what)


def within(rt: P.Runtime, x: torch.Tensor, lo: float | None, hi: float | None, what: str,
           frac_bits: int | None = None) -> None:
    """Check lo <= x <= hi for shares x with ``frac_bits`` (default the runtime's) fractional bits."""
    if not active(rt):
        return
    f = rt.frac_bits if frac_bits is None else frac_bits
    enc = [None if b is None else int(ring.encode(float(b), f)) for b in (lo, hi)]
    _count_outside(rt, x, enc[0], enc[1], what)


def domain(rt: P.Runtime, x: torch.Tensor, name: str) -> None:
    """Check that shares x lie in the input range ``approx.DOMAINS[name]`` of an approximation."""
    lo, hi = approx.DOMAINS[name]
    within(rt, x, lo, hi, f"{name} input in [{lo:g}, {hi:g}]")


SQUARE_LIMIT = (1 << 31) - 1  # |x| <= this raw value: x^2 < 2^62 - 2^32, inside `P.division_range`


def square(rt: P.Runtime, x: torch.Tensor, what: str) -> None:
    """Check that the ring square of shares x does not wrap: |x| < 2^31 in raw units."""
    if active(rt):
        _count_outside(rt, x, -SQUARE_LIMIT, SQUARE_LIMIT, what)


def scaled(rt: P.Runtime, x: torch.Tensor, v: torch.Tensor | int, divisor: int, what: str) -> None:
    """Check that x * v (v a public raw integer scalar or tensor) followed by a division by
    ``divisor`` (1 for none) stays in `primitives.division_range`: |x| <= (2^62 - divisor) / |v|."""
    if not active(rt):
        return
    v = torch.as_tensor(v, dtype=torch.int64).abs()
    if v.numel() == 0 or int(v.max()) <= 1:
        return
    x = x.expand(torch.broadcast_shapes(x.shape, v.shape))
    limit = (P.MAX_DIVISOR - divisor) // v.clamp(min=1)
    bound = torch.where(v > 1, limit, torch.full_like(limit, P.MAX_DIVISOR))
    _count_outside(rt, x, -bound, bound, what)


def terms(op: str, x_shape, y_shape) -> int:
    """How many terms are summed into one output element of ``ring.bilinear(op, x, y)`` (at most,
    for convolutions): 1 for "mul", the contracted length for "matmul", C kh kw for "conv2d" and
    O kh kw for "conv2d_gi" (y the kernel), N Ho Wo for "conv2d_gw" (y the output gradient)."""
    if op == "mul":
        return 1
    if op == "matmul":
        return max(1, int(x_shape[-1]))
    if op == "conv2d":
        return max(1, int(y_shape[1]) * int(y_shape[2]) * int(y_shape[3]))
    if op in ("conv2d_gi", "conv2d_gw"):
        return max(1, int(y_shape[0]) * int(y_shape[2]) * int(y_shape[3]))
    raise ProtocolError(f"unknown bilinear op {op!r}")


MAX_TERMS = 1 << 18  # terms per output of a checked product
SQUARE_CUT = 32  # u = v / 2^32: |u| <= 2^30 for an operand in the fixed-point range, so u^2 never wraps


class ProductBounds:
    """The constants of `product` for f fractional bits and k terms per output, in raw units.

    ``hx``, ``hy`` (hx + hy = f) cut the operands of the fine recomputation and ``g`` those of
    the coarse one; ``l1`` is the bound R on sum |x| + sum |y| over the terms of an output, which
    the check of the truncated squares certifies when their scaled sum ``V`` is at most ``vmax``
    (``t``: the bits that sum is divided by); ``tau`` bounds |out - fine| (half the jump 2^(64 -
    f) of a wrong output) and ``top`` |coarse|. The constructor checks every inequality the
    module docstring relies on with exact integers and refuses a frac_bits or k for which one
    fails (`ProtocolError`).
    """

    def __init__(self, f: int, k: int) -> None:
        self.hx, self.hy = hx, hy = f // 2, f - f // 2
        self.g = g = f + hy - 1
        self.tau = 1 << (63 - f)
        self.top = 1 << (62 + f - 2 * g)
        self.l1 = 1 << (62 - hy)
        self.t = (2 * k).bit_length() + 1
        root = (self.l1 >> SQUARE_CUT) - 2 * k  # sum |v| <= 2^32 (sqrt(2k S) + 2k) <= l1 iff S <= root^2 / 2k
        self.vmax = ((root * root // (2 * k)) >> self.t) - 1 if k <= MAX_TERMS else None
        self.limit = self.l1 // (2 * k)  # beyond MAX_TERMS: every element |v| <= limit instead
        fine_err = (self.l1 >> hx) + 3 * k + 2
        coarse_err = (self.l1 >> g) + 3 * k + 1
        ok = ((self.vmax is None or self.vmax >= 0) and self.limit > 0 and fine_err < self.tau and 63 + f >= 2 * g
              and (1 << (63 + f - 2 * g)) - coarse_err >= self.top  # |P| >= 2^(63 + f): |coarse| >= top
              and (1 << max(0, 62 - 2 * g)) + 1 + coarse_err < self.top  # |P| < 2^62: |coarse| < top
              and ((self.l1 // 2) ** 2 >> (2 * g)) + (self.l1 >> g) + 2 * k + 1 + self.top < 1 << 62)  # no wrap
        if not ok:
            raise ProtocolError(f"the range-check mode cannot check products with frac_bits={f} and {k} terms "
                                "per output")


def product(rt: P.Runtime, op: str, x: torch.Tensor, y: torch.Tensor, params: dict, out: torch.Tensor,
            public: str | None, what: str) -> None:
    """Check a fixed-point product ``out`` = bilinear(op, x, y) / 2^f (see the module docstring):
    the operands' size, the fine recomputation and the coarse one, in one batch of comparisons.
    ``public`` names the operand ("x" or "y") given as a public raw tensor, the other ones being
    shares; what derives from a public operand is computed in the clear (`P.public`)."""
    if not active(rt):
        return
    b = ProductBounds(rt.frac_bits, terms(op, x.shape, y.shape))

    def divided(bits: int, bits_y: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x / 2^bits, y / 2^bits_y): exact divisions of shares (one batch), floors of a public operand."""
        by = bits if bits_y is None else bits_y
        if public is None and by == bits:
            flat = P.truncate(rt, torch.cat([x.reshape(-1), y.reshape(-1)]), bits)
            return flat[: x.numel()].reshape(x.shape), flat[x.numel():].reshape(y.shape)
        xr = torch.div(x, 1 << bits, rounding_mode="floor") if public == "x" else P.truncate(rt, x, bits)
        yr = torch.div(y, 1 << by, rounding_mode="floor") if public == "y" else P.truncate(rt, y, by)
        return xr, yr

    def bilinear(xr: torch.Tensor, yr: torch.Tensor) -> torch.Tensor:
        return P.beaver(rt, op, xr, yr, params) if public is None else ring.bilinear(op, xr, yr, params)

    diff = out - bilinear(*divided(b.hx, b.hy))
    coarse = bilinear(*divided(b.g))
    parts = []
    for v, t in ((diff, b.tau), (coarse, b.top)):  # |v| < t
        parts += [_bound(rt, t - 1, v) - v, v + _bound(rt, t - 1, v)]
    if b.vmax is None:  # more terms than the squares can certify: each element |v| <= limit
        for name, v in (("x", x), ("y", y)):
            if name != public:
                parts += [v + _bound(rt, b.limit, v), _bound(rt, b.limit, v) - v]
            elif bool((v.abs() > b.limit).any()):  # a public operand's bound is public: count it in the clear
                rt.checks.add(P.public(rt, torch.tensor(1, dtype=torch.int64)), what)
        _count_negative(rt, parts, what)
        return
    # the truncated squares u^2 of both operands, split as 2^t q + l, summed over each output's terms
    us = divided(SQUARE_CUT)
    secret = [u for name, u in zip("xy", us, strict=True) if name != public]
    sq, qs = P.square_divided(rt, torch.cat([u.reshape(-1) for u in secret]), 1 << b.t)
    q_l, off = {}, 0
    for name, u in zip("xy", us, strict=True):
        if name == public:
            q = torch.div(u * u, 1 << b.t, rounding_mode="floor")
            q, low = P.public(rt, q), P.public(rt, u * u - (q << b.t))
        else:
            q = qs[off: off + u.numel()].reshape(u.shape)
            low = sq[off: off + u.numel()].reshape(u.shape) - q * (1 << b.t)
            off += u.numel()
        q_l[name] = (q, low)
    ones_x, ones_y = torch.ones_like(x), torch.ones_like(y)
    sums = [ring.bilinear(op, q_l["x"][i], ones_y, params) + ring.bilinear(op, ones_x, q_l["y"][i], params)
            for i in (0, 1)]
    size = sums[0] + P.truncate(rt, sums[1], b.t)
    _count_negative(rt, [*parts, _bound(rt, b.vmax, size) - size], what)
