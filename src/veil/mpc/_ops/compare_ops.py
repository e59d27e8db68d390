"""Comparisons as secret booleans, logical ops, ``where`` and ``clamp``.

A comparison of secret values gives a *secret* boolean tensor: an `MPCTensor` of dtype bool whose
shares encode 0 or 1 in fixed point, so masks combine with the ordinary fixed-point rules (and is
a product, where(c, a, b) is b + c (a - b)). Nothing is opened: turning a secret boolean into a
Python bool (``if x > 0:``) still raises, as ``.item()`` does. Equality tests (eq, ne) are not
provided. Every comparison is exact (`primitives.ge_zero`, 8 rounds); ``x > c`` is ``x - c >= 1``
unit of 2^-frac_bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from veil.mpc import primitives as P
from veil.mpc._ops.common import encode_public, is_shared, mul, share_of, to_share
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor

aten = torch.ops.aten


def _boolean(rt, bits: torch.Tensor) -> MPCTensor:
    """Integer 0/1 shares as a secret boolean tensor (fixed-point 0/1 shares)."""
    return MPCTensor(bits * rt.scale, dtype=torch.bool)


def _ge(rt, a, b, strict: bool) -> MPCTensor:
    d = to_share(rt, a) - to_share(rt, b)
    if strict:
        d = d - P.public(rt, torch.ones_like(d))
    return _boolean(rt, P.ge_zero(rt, d))


def _comparison(swap: bool, strict: bool) -> Callable:
    """The rule of one comparison: a >= b (``swap``: b >= a), strictly if ``strict``."""

    def rule(rt, func, a, b):
        return _ge(rt, b, a, strict) if swap else _ge(rt, a, b, strict)

    return rule


for _name, _swap, _strict in (("ge", False, False), ("gt", False, True), ("le", True, False), ("lt", True, True)):
    _op = getattr(aten, _name)
    register(_op.Scalar, _op.Tensor)(_comparison(_swap, _strict))


def _as_bool(rt, t) -> MPCTensor:
    if is_shared(t):
        return t
    return MPCTensor(encode_public(rt, torch.as_tensor(t).to(torch.float64)), dtype=torch.bool)


def _check_bool(*ts) -> None:
    if any(is_shared(t) and t.dtype != torch.bool for t in ts):
        raise ProtocolError("bitwise ops on secret values are only provided for booleans (comparison results)")


@register(aten.bitwise_and.Tensor)
def _bitwise_and(rt, func, a, b):
    _check_bool(a, b)
    return _and(rt, aten.logical_and.default, a, b)


@register(aten.bitwise_or.Tensor)
def _bitwise_or(rt, func, a, b):
    _check_bool(a, b)
    return _or(rt, aten.logical_or.default, a, b)


@register(aten.bitwise_not)
def _bitwise_not(rt, func, a):
    _check_bool(a)
    return _not(rt, aten.logical_not.default, a)


@register(aten.logical_and, aten.logical_and_)
def _and(rt, func, a, b):
    out = share_of(mul(rt, _as_bool(rt, a), _as_bool(rt, b)))
    if func.overloadpacket is aten.logical_and_:
        a._ring.copy_(out)
        a._store.gen += 1
        return a
    return MPCTensor(out, dtype=torch.bool)


@register(aten.logical_or)
def _or(rt, func, a, b):
    x, y = _as_bool(rt, a), _as_bool(rt, b)
    return MPCTensor(share_of(x) + share_of(y) - share_of(mul(rt, x, y)), dtype=torch.bool)


@register(aten.logical_not)
def _not(rt, func, a):
    x = _as_bool(rt, a)
    return MPCTensor(encode_public(rt, torch.ones(x.shape)) - share_of(x), dtype=torch.bool)


@register(aten.where.self)
def _where(rt, func, cond, a, b):
    """b + cond (a - b): one product; a public condition selects locally."""
    if not is_shared(cond):
        return MPCTensor(torch.where(cond, *torch.broadcast_tensors(to_share(rt, a), to_share(rt, b))))
    av, bv = to_share(rt, a), to_share(rt, b)
    shape = torch.broadcast_shapes(cond.shape, av.shape, bv.shape)
    diff = MPCTensor((av - bv).expand(shape).contiguous())
    c = MPCTensor(share_of(cond).expand(shape).contiguous(), dtype=torch.bool)
    return MPCTensor(bv.expand(shape) + share_of(mul(rt, c, diff)))


@register(aten.clamp, aten.clamp_min, aten.clamp_max)
def _clamp(rt, func, x, lo=None, hi=None):
    """clamp(x, lo, hi) = lo + relu(x - lo) - relu(x - hi) for public scalar bounds (exact)."""
    if func.overloadpacket is aten.clamp_max:
        lo, hi = None, lo
    for bound in (lo, hi):
        if bound is not None and (is_shared(bound) or (isinstance(bound, torch.Tensor) and bound.numel() != 1)):
            raise ProtocolError("clamp bounds must be public scalars under MPC")
    xs = to_share(rt, x)
    parts = []
    if lo is not None:
        parts.append(xs - encode_public(rt, float(lo)))
    if hi is not None:
        parts.append(xs - encode_public(rt, float(hi)))
    r, _ = P.relu(rt, torch.stack(parts))
    out = xs if lo is None else encode_public(rt, float(lo)) + r[0]
    if hi is not None:
        out = out - r[-1]
    return MPCTensor(out)
