"""Batch normalisation (eval mode), dropout and public random masks."""

from __future__ import annotations

import torch

from veil.mpc import approx, ring
from veil.mpc import primitives as P
from veil.mpc._ops.common import (
    encode_public,
    mul,
    mul_public,
    public_value,
    share_of,
    to_share,
    wrap,
    write,
)
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor

aten = torch.ops.aten


@register(aten._native_batch_norm_legit_no_training)
def _bn_eval(rt, func, x, weight, bias, mean, var, momentum, eps):
    out = _bn(rt, x, weight, bias, mean, var, eps)
    empty = wrap(torch.zeros(0, dtype=torch.int64))
    return out, empty, empty


@register(aten.native_batch_norm, aten._native_batch_norm_legit)
def _bn_native(rt, func, x, weight, bias, mean, var, training, momentum, eps):
    if training:
        raise ProtocolError("BatchNorm in training mode is not supported under MPC; call model.eval()")
    out = _bn(rt, x, weight, bias, mean, var, eps)
    empty = wrap(torch.zeros(0, dtype=torch.int64))
    return out, empty, empty


def _bn(rt, x, weight, bias, mean, var, eps) -> MPCTensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    pv = public_value(var)
    if pv is not None:
        inv = wrap(encode_public(rt, 1.0 / torch.sqrt(torch.as_tensor(pv, dtype=torch.float64) + eps)), None)
        inv._pub = (1.0 / torch.sqrt(torch.as_tensor(pv, dtype=torch.float64) + eps)).float()
    else:
        inv = wrap(approx.inv_sqrt(rt, share_of(var) + encode_public(rt, torch.full(tuple(var.shape), eps))))
    scale = inv if weight is None else mul(rt, inv, weight)
    centered = wrap(to_share(rt, x) - to_share(rt, mean).reshape(shape))
    sc = wrap(share_of(scale).reshape(shape), None if scale._pub is None else scale._pub.reshape(shape))
    out = mul(rt, centered, wrap(share_of(sc).expand(x.shape).contiguous(), None if sc._pub is None
                                else sc._pub.expand(x.shape)))
    if bias is not None:
        out = wrap(share_of(out) + to_share(rt, bias).reshape(shape))
    return out


@register(aten.native_dropout)
def _dropout(rt, func, x, p, train):
    if not train or p == 0:
        return x, torch.ones(tuple(x.shape), dtype=torch.bool)
    u = rt.common.random(tuple(x.shape))
    keep = (u & ((1 << 24) - 1)).double() >= p * (1 << 24)
    return wrap(mul_public(rt, share_of(x) * keep.to(torch.int64), 1.0 / (1.0 - p))), keep


@register(aten.bernoulli_)
def _bernoulli_(rt, func, x, p=0.5, generator=None):
    """Public random 0/1 values (e.g. dropout masks), identical in every party (common key)."""
    u = rt.common.random(tuple(x.shape))
    keep = ((u & ((1 << 24) - 1)).double() < float(p) * (1 << 24)).float()
    write(x, P.public(rt, ring.encode(keep, rt.frac_bits)))
    x._pub = keep
    return x


@register(aten.native_dropout_backward)
def _dropout_bw(rt, func, grad, mask, scale):
    return wrap(mul_public(rt, to_share(rt, grad) * mask.to(torch.int64), float(scale)))

