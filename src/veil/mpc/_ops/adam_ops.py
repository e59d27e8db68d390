"""Adam's moment estimates and their square roots with extended precision (predicated rules).

torch.optim.Adam (single-tensor path, which torch takes for tensor subclasses) runs
  m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
  d = (v.sqrt() / c).add_(eps); p.addcdiv_(m, d, value=-s)
lerp_(g, a) on m keeps the same kind of view as below (M' = M (1 - a) + a = 1 - beta1^t), so the
bias-corrected first moment is not rounded to 2^-frac_bits and then amplified by 1/(1 - beta1^t).
With frac_bits fixed point, v ~ g^2 underflows. Instead, a tensor updated by addcmul_(g, g) keeps
the exact view ``_moment = (M, w)``: value = M * w with M public and w, the *normalised* average
of the squares, shared with 2*frac_bits fractional bits. mul_ by a public c only changes M;
addcmul_(g, g, value=a) sets M' = M + a and w' = w + (a / M') (g^2 - w), g^2 being the exact
(untruncated) square. For Adam, M is exactly 1 - beta2^t, so w is the bias-corrected v_hat, of
the order of g^2 and never rescaled by 1 - beta2 = 10^-3. sqrt of such a tensor uses the
wide-range `approx.inv_sqrt_wide` and keeps ``_sqrt_view = (1/sqrt(w), sqrt(M), 0)``; division
by and addition of public scalars update mult/add; addcdiv_ by such a denominator multiplies by
the reciprocal directly. Any other write to the tensor drops these views (they are `_Derived`),
and every tensor still holds a correct ordinary share, so other ops are unaffected. Only public
constants (M, a, c, eps) decide which rule applies; nothing is opened.

Each rule here is registered with a ``when`` predicate, and the ordinary rule of the same op
(in `pointwise_ops`) runs whenever the predicate does not hold.
"""

from __future__ import annotations

import math

import torch

from veil.mpc import approx, checks
from veil.mpc import primitives as P
from veil.mpc._ops.common import is_shared, mul_public, public_value, scalar, share_of, to_share, wrap, write
from veil.mpc._ops.pointwise_ops import _add, _div, add_inplace
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor

aten = torch.ops.aten
EPS_IGNORED = 2.0**-10  # relative change of the denominator below which a public addend is dropped


def _secret(t) -> bool:
    return is_shared(t) and public_value(t) is None


# ---- second moment: v.mul_(beta2).addcmul_(g, g, value=1 - beta2) -------------------------


def _scales_moment(x, b) -> bool:
    c = scalar(b)
    return is_shared(x) and x._moment is not None and c is not None and c > 0


@register(aten.mul_.Tensor, aten.mul_.Scalar, when=_scales_moment)
def _moment_mul_(rt, func, x, b):
    m, w = x._moment
    c = scalar(b)
    write(x, mul_public(rt, share_of(x), c))
    x._moment = (m * c, w)
    return x


def _squares_into(x, t1, t2, value=1) -> bool:
    a = scalar(value)
    return is_shared(x) and t1 is t2 and _secret(t1) and a is not None and a > 0


@register(aten.addcmul_, when=_squares_into)
def _moment_addcmul_(rt, func, x, t1, t2, value=1):
    checks.square(rt, share_of(t1), "square of the gradient in Adam")
    return _ema(rt, x, P.square(rt, share_of(t1)), scalar(value), 1.0)  # exact g^2, 2*frac_bits bits


def _ema(rt, x, e2: torch.Tensor, a: float, keep: float) -> MPCTensor:
    """x <- keep * x + a * e (e given by e2 with 2*frac_bits bits), keeping the exact view _moment."""
    if x._moment is not None:
        m, w = x._moment
    elif x._pub is not None and not bool(x._pub.any()):
        m, w = 0.0, None
    else:
        m, w = 1.0, share_of(x) * rt.scale
    m2 = m * keep + a
    if w is None or m == 0:
        w2 = e2
    else:
        # (e - w) a/m2 in two halves: the truncated values stay below 2^(3f/2 + 16) |e - w| (a/m2),
        # not 2^(2f + 16); the rounding added, a/m2 * 2^(-3f/2), is far below w's resolution needs
        h = rt.frac_bits // 2
        w2 = w + P.truncate(rt, P.truncate(rt, e2 - w, h) * round(a / m2 * rt.scale), rt.frac_bits - h)
    write(x, mul_public(rt, P.truncate(rt, w2), m2))
    x._moment = (m2, w2)
    return x


# ---- first moment: m.lerp_(g, 1 - beta1) ----------------------------------------------------


def _averages_in(x, end, weight) -> bool:
    a = scalar(weight)
    return is_shared(x) and _secret(end) and a is not None and 0 < a <= 1


@register(aten.lerp_.Scalar, when=_averages_in)
def _moment_lerp_(rt, func, x, end, weight):
    a = scalar(weight)
    return _ema(rt, x, share_of(end) * rt.scale, a, 1.0 - a)


# ---- denominator: (v.sqrt() / c).add_(eps) --------------------------------------------------


@register(aten.sqrt, when=lambda x: is_shared(x) and x._moment is not None)
def _moment_sqrt(rt, func, x):
    m, w = x._moment
    inv, root = approx.inv_sqrt_wide(rt, w)
    k = math.sqrt(m)
    out = wrap(mul_public(rt, root, k))
    out._sqrt_view = (inv, k, 0.0)
    return out


def _divides_root(a, b) -> bool:
    c = scalar(b)
    return is_shared(a) and a._sqrt_view is not None and c is not None and c > 0


@register(aten.div.Tensor, aten.div.Scalar, when=_divides_root)
def _root_div(rt, func, a, b):
    inv, k, add = a._sqrt_view
    c = scalar(b)
    out = _div(rt, func, a, b)
    out._sqrt_view = (inv, k / c, add / c)
    return out


def _adds_to_root(a, b, alpha=1) -> bool:
    return is_shared(a) and a._sqrt_view is not None and scalar(b) is not None and scalar(alpha) is not None


@register(aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar, when=_adds_to_root)
def _root_add(rt, func, a, b, alpha=1):
    inv, k, add = a._sqrt_view
    generic = add_inplace if func.overloadpacket is aten.add_ else _add
    out = generic(rt, func, a, b, alpha)
    out._sqrt_view = (inv, k, add + scalar(b) * float(alpha))
    return out


# ---- the step: p.addcdiv_(m, d, value=-s) ---------------------------------------------------


def _divides_by_root(x, t1, t2, value=1) -> bool:
    return (is_shared(t2) and t2._sqrt_view is not None and t2._sqrt_view[1] > 0 and scalar(value) is not None
            and _secret(t1))


@register(aten.addcdiv_, aten.addcdiv, when=_divides_by_root)
def _root_addcdiv(rt, func, x, t1, t2, value=1):
    inv, k, add = t2._sqrt_view  # t2 = k sqrt(w) + add, inv = 1/sqrt(w) <= 2^frac_bits
    v = scalar(value)
    num, scale = share_of(t1), 1.0
    if t1._moment is not None:  # Adam's first moment: M1 * w1, w1 (= bias-corrected m) more precise
        scale, w1 = t1._moment
        num = P.truncate(rt, w1)
    q = P.mul(rt, num, inv)  # t1 / sqrt(w) / scale
    r = add / k * rt.scale  # largest add / (k sqrt(w))
    if r < -0.4:
        raise ProtocolError("addcdiv: denominator may be close to zero")
    if abs(r) > EPS_IGNORED:  # t1 / (k sqrt(w) + add) = t1 / (k sqrt(w)) * 1 / (1 + add inv / k)
        if r > 99:
            raise ProtocolError("Adam eps too large for the fixed-point range (eps <= 0.0015)")
        c = round(add / k * rt.scale * rt.scale)  # 2*frac_bits: add / k may be far below 2^-frac_bits
        z = P.public(rt, torch.full_like(inv, rt.scale)) + P.truncate(rt, P.truncate(rt, inv * c))
        q = P.mul(rt, q, approx.reciprocal(rt, z))
    out = to_share(rt, x) + mul_public(rt, q, v * scale / k)
    if func is aten.addcdiv_.default:
        return write(x, out)
    return wrap(out)
