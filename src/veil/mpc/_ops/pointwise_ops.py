"""Elementwise ops: linear ones are local, products use Beaver triples, non-linear ones `approx`."""

from __future__ import annotations

import torch

from veil.mpc import approx, checks, ring
from veil.mpc import primitives as P
from veil.mpc._ops.common import (
    combine,
    div_public,
    encode_public,
    is_shared,
    mul,
    mul_public,
    public_value,
    scaled,
    share_of,
    square,
    to_share,
    wrap,
    write,
)
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import from_public

aten = torch.ops.aten


@register(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor, aten.rsub.Scalar)
def _add(rt, func, a, b, alpha=1):
    if func in (aten.rsub.Tensor, aten.rsub.Scalar):
        return wrap(combine(rt, b, a, -alpha))
    if func in (aten.sub.Tensor, aten.sub.Scalar):
        return wrap(combine(rt, a, b, -alpha))
    return wrap(combine(rt, a, b, alpha))


@register(aten.neg)
def _neg(rt, func, x):
    return wrap(-share_of(x), None if x._pub is None else -x._pub)


@register(aten.mul.Tensor, aten.mul.Scalar)
def _mulh(rt, func, a, b):
    return mul(rt, a, b)


@register(aten.div.Tensor, aten.div.Scalar)
def _div(rt, func, a, b):
    pb = public_value(b)
    if pb is not None:
        if not is_shared(a):
            raise ProtocolError("division of a public value by a public value")
        if a._pub is not None:
            v = (a._pub.double() / torch.as_tensor(pb, dtype=torch.float64)).float()
            return wrap(P.public(rt, ring.encode(v, rt.frac_bits)), v)
        return wrap(div_public(rt, share_of(a), pb))
    return mul(rt, a, wrap(_approx(rt, "reciprocal", share_of(b))))


def _inplace(outfn):
    def h(rt, func, x, *args, **kwargs):
        out = outfn(rt, func, x, *args, **kwargs)
        pub = out._pub
        write(x, out._share)
        x._pub = pub
        return x

    return h


@register(aten.addcmul_, aten.addcmul)
def _addcmul(rt, func, x, t1, t2, value=1):
    out = wrap(to_share(rt, x) + scaled(rt, mul(rt, t1, t2), value))
    if func.overloadpacket is aten.addcmul_:
        return write(x, out._share)
    return out


@register(aten.addcdiv_, aten.addcdiv)
def _addcdiv(rt, func, x, t1, t2, value=1):
    q = _div(rt, aten.div.Tensor, t1, t2)
    out = wrap(to_share(rt, x) + scaled(rt, q, value))
    if func.overloadpacket is aten.addcdiv_:
        return write(x, out._share)
    return out


@register(aten.lerp_.Scalar, aten.lerp.Scalar)
def _lerp(rt, func, x, end, weight):
    diff = wrap(to_share(rt, end) - to_share(rt, x))
    out = wrap(to_share(rt, x) + mul_public(rt, diff._share, float(weight)))
    if func is aten.lerp_.Scalar:
        return write(x, out._share)
    return out


@register(aten.relu)
def _relu(rt, func, x):
    out, mask = P.relu(rt, share_of(x))
    res = wrap(out)
    res._mask = mask
    return res


@register(aten.relu_)
def _relu_(rt, func, x):
    out, mask = P.relu(rt, share_of(x))
    write(x, out)
    x._mask = mask
    return x


@register(aten.threshold_backward)
def _relu_bw(rt, func, grad, out, threshold):
    mask = getattr(out, "_mask", None)
    if mask is None:
        return wrap(P.beaver(rt, "mul", share_of(grad), P.ge_zero(rt, share_of(out) - 1)))
    return wrap(mask.apply(rt, to_share(rt, grad)))


def _approx(rt, name: str, x: torch.Tensor) -> torch.Tensor:
    """``approx.<name>`` of shares x, its input checked against `approx.DOMAINS` in the range-check mode."""
    checks.domain(rt, x, name)
    return getattr(approx, name)(rt, x)


@register(aten.pow.Tensor_Scalar)
def _pow(rt, func, x, e):
    if e == 2:
        return wrap(square(rt, share_of(x)))
    if e == 1:
        return x
    if e == 0:
        return from_public(1.0, x)
    if isinstance(e, int) and e > 2:
        y = x
        for _ in range(e - 1):
            y = mul(rt, y, x)
        return y
    if e == 0.5:
        return _sqrt(rt, func, x)
    if e == -0.5:
        return _rsqrt(rt, func, x)
    if e == -1:
        return _recip(rt, func, x)
    raise ProtocolError(f"pow with exponent {e} is not supported")


@register(aten.square)
def _square(rt, func, x):
    return wrap(square(rt, share_of(x)))


@register(aten.exp)
def _exp(rt, func, x):
    return wrap(_approx(rt, "exp", share_of(x)))


@register(aten.log)
def _log(rt, func, x):
    return wrap(_approx(rt, "log", share_of(x)))


@register(aten.sqrt)
def _sqrt(rt, func, x):
    checks.domain(rt, share_of(x), "inv_sqrt")
    return wrap(approx.sqrt(rt, share_of(x)))


@register(aten.rsqrt)
def _rsqrt(rt, func, x):
    return wrap(_approx(rt, "inv_sqrt", share_of(x)))


@register(aten.reciprocal)
def _recip(rt, func, x):
    return wrap(_approx(rt, "reciprocal", share_of(x)))


@register(aten.sigmoid)
def _sigmoid(rt, func, x):
    return wrap(approx.sigmoid(rt, share_of(x)))


@register(aten.sigmoid_backward)
def _sigmoid_bw(rt, func, grad, out):
    one_minus = wrap(encode_public(rt, torch.ones(out.shape)) - share_of(out))
    return mul(rt, grad, mul(rt, out, one_minus))



add_inplace = register(aten.add_.Tensor, aten.add_.Scalar)(
    _inplace(lambda rt, f, a, b, alpha=1: wrap(combine(rt, a, b, alpha))))
register(aten.sub_.Tensor, aten.sub_.Scalar)(_inplace(lambda rt, f, a, b, alpha=1: wrap(combine(rt, a, b, -alpha))))
mul_inplace = register(aten.mul_.Tensor, aten.mul_.Scalar)(_inplace(lambda rt, f, a, b: mul(rt, a, b)))
register(aten.div_.Tensor, aten.div_.Scalar)(_inplace(lambda rt, f, a, b: _div(rt, aten.div.Tensor, a, b)))
