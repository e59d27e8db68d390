"""Sums, means (exact division by the public count) and maxima."""

from __future__ import annotations

import math

import torch

from veil.mpc import primitives as P
from veil.mpc._ops.common import (
    share_of,
    wrap,
)
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor

aten = torch.ops.aten


@register(aten.sum)
def _sum(rt, func, x, dim=None, keepdim=False, dtype=None):
    s = share_of(x)
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return wrap(s.sum())
    return wrap(s.sum(dim, keepdim=keepdim))


@register(aten.mean)
def _mean(rt, func, x, dim=None, keepdim=False, dtype=None):
    s = share_of(x)
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        n, tot = s.numel(), s.sum()
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        n = math.prod(s.shape[d] for d in dims)
        tot = s.sum(dims, keepdim=keepdim)
    return wrap(P.div_public(rt, tot, n))


@register(aten.max.dim, aten.amax)
def _max(rt, func, x, dim=-1, keepdim=False):
    if isinstance(dim, list | tuple):
        if len(dim) != 1:
            raise ProtocolError("max over one dimension at a time")
        dim = dim[0]
    v, onehot = P.max_last(rt, share_of(x).movedim(dim, -1))
    if keepdim:
        v = v.unsqueeze(dim)
    if func.overloadpacket is aten.amax:
        return wrap(v)
    idx = MPCTensor(onehot, dtype=torch.int64)
    return wrap(v), idx

