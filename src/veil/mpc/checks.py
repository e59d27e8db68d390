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
  public tensor (`product`): the product is recomputed from operands truncated by f/2 bits
  each (so its ring value cannot wrap while |x y| < 2^(62 - f), 2^46 for f = 16, the range of
  any fixed-point value), and compared with the result: a wrap moves the result by 2^(64 - 2f)
  (2^32), the recomputation differs by at most (|x| + |y|) 2^(-f/2) per term, so the check
  never fires while the sum of |x| + |y| over the terms of an output stays below 2^(63 - 3f/2)
  (2^39). One more truncation round, Beaver product and comparison per product;
- squares (|x| < 2^(31 - f)); secret times public scalar or tensor (|x v| < 2^62 in raw units,
  per element); the untruncated squares of the normalisation layers (|x - mean| < 2^(31 - f))
  and their variances (< 2^20: `_ops.norm_ops`); Adam's exact g^2;
- the inputs of exp, reciprocal (and division by a secret), log, sqrt/rsqrt (`approx.DOMAINS`),
  of BCELoss on probabilities, and the sum of exponentials of a softmax or log-softmax over
  more than 100 classes.

Not checked: additions and sums (keep them within the fixed-point range, 2^(62 - f) = 2^46),
and products whose exact value is itself beyond 2^(62 - f). The products inside approximations
are not checked either: their domains bound them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from veil.mpc import approx, ring
from veil.mpc import primitives as P
from veil.mpc.errors import RangeError

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


def _count_outside(rt: P.Runtime, x: torch.Tensor, lo, hi, what: str) -> None:
    """Count the elements of shares ``x`` below raw ``lo`` or above raw ``hi`` (ints or public
    int64 tensors broadcastable to x; None for no bound)."""
    parts = []
    if lo is not None:
        parts.append(x - P.public(rt, torch.as_tensor(lo, dtype=torch.int64).expand(x.shape).contiguous()))
    if hi is not None:
        parts.append(P.public(rt, torch.as_tensor(hi, dtype=torch.int64).expand(x.shape).contiguous()) - x)
    if not parts or x.numel() == 0:
        return
    inside = P.ge_zero(rt, torch.stack(parts))
    total = P.public(rt, torch.tensor(inside.numel(), dtype=torch.int64))
    rt.checks.add(total - inside.sum(), what)


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


def product(rt: P.Runtime, op: str, x: torch.Tensor, y: torch.Tensor, params: dict, out: torch.Tensor,
            public: str | None, what: str) -> None:
    """Check a fixed-point product ``out`` = bilinear(op, x, y) / 2^f against a recomputation from
    operands truncated by f/2 bits (see the module docstring). ``public`` names the operand ("x"
    or "y") given as a public raw tensor, the other ones being shares."""
    if not active(rt):
        return
    f = rt.frac_bits
    hx, hy = f // 2, f - f // 2
    if public is None:
        flat = P.truncate(rt, torch.cat([x.reshape(-1), y.reshape(-1)]), hx) if hx == hy else None
        if flat is not None:
            xr, yr = flat[: x.numel()].reshape(x.shape), flat[x.numel():].reshape(y.shape)
        else:
            xr, yr = P.truncate(rt, x, hx), P.truncate(rt, y, hy)
        coarse = P.beaver(rt, op, xr, yr, params)
    else:
        xr = torch.div(x, 1 << hx, rounding_mode="floor") if public == "x" else P.truncate(rt, x, hx)
        yr = torch.div(y, 1 << hy, rounding_mode="floor") if public == "y" else P.truncate(rt, y, hy)
        coarse = ring.bilinear(op, xr, yr, params)
    diff = out - coarse
    tau = P.public(rt, torch.full_like(diff, 1 << (63 - f)))  # half the jump of a wrap, 2^(64 - f)
    big = P.ge_zero(rt, torch.stack([diff - tau, -diff - tau]))  # |diff| >= tau: at most one bit is 1
    rt.checks.add(big.sum(), what)
