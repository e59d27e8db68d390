"""View, copy, indexing and creation ops: local on the shares; views alias their base (`common.view_of`)."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from veil.mpc import primitives as P
from veil.mpc import ring
from veil.mpc._ops.common import (
    is_shared,
    public_value,
    share_of,
    to_share,
    view_of,
    wrap,
    write,
)
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError

aten = torch.ops.aten

_STRUCTURAL = [
    aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand,
    aten.squeeze, aten.unsqueeze, aten.slice, aten.select, aten.clone, aten.detach, aten.alias,
    aten.narrow, aten.contiguous, aten.flatten, aten.unflatten, aten.repeat, aten.flip, aten.roll,
    aten.index_select, aten.movedim, aten.expand_as, aten.view_as, aten.lift_fresh, aten.unfold,
    aten.diagonal, aten.gather, aten.index,
]


@register(*_STRUCTURAL)
def _structural(rt, func, *args, **kwargs):
    kwargs.pop("memory_format", None)
    out = func(*tree_map(lambda a: share_of(a) if is_shared(a) else a, args), **kwargs)
    src = args[0]
    pub = None
    if is_shared(src) and src._pub is not None:
        pub = func(src._pub, *args[1:], **kwargs)
    if isinstance(out, list | tuple):
        return type(out)(view_of(o, src) for o in out)
    res = view_of(out, src, pub)
    if func.overloadpacket in (aten.detach, aten.alias) and is_shared(src):
        for attr in _CARRIED:
            if hasattr(src, attr):
                setattr(res, attr, getattr(src, attr))
    return res


_CARRIED = ("_mask", "_softmax")


@register(aten.split, aten.split_with_sizes, aten.unbind, aten.chunk)
def _multi(rt, func, x, *args, **kwargs):
    return [view_of(o, x) for o in func(share_of(x), *args, **kwargs)]


@register(aten._to_copy)
def _to_copy(rt, func, x, **kwargs):
    return wrap(share_of(x).clone(), x._pub)


@register(aten.cat, aten.stack)
def _cat(rt, func, tensors, dim=0):
    return wrap(func([to_share(rt, t) for t in tensors], dim))


@register(aten.constant_pad_nd)
def _pad(rt, func, x, pad, value=0):
    if value:
        raise ProtocolError("only zero padding")
    return wrap(func(share_of(x), pad, 0))


@register(aten.ones_like, aten.zeros_like, aten.empty_like, aten.full_like)
def _like(rt, func, x, fill=None, **kwargs):
    v = 1.0 if func.overloadpacket is aten.ones_like else 0.0
    if func.overloadpacket is aten.full_like:
        v = float(fill)
    pub = torch.full(tuple(x.shape), v)
    return wrap(P.public(rt, ring.encode(pub, rt.frac_bits)), pub)


@register(aten.new_zeros, aten.new_ones, aten.new_empty)
def _new(rt, func, x, size, **kwargs):
    pub = torch.full(tuple(size), 1.0 if func.overloadpacket is aten.new_ones else 0.0)
    return wrap(P.public(rt, ring.encode(pub, rt.frac_bits)), pub)


@register(aten.zero_, aten.fill_)
def _fill(rt, func, x, value=0.0):
    pub = torch.full(tuple(x.shape), float(public_value(value)))
    write(x, P.public(rt, ring.encode(pub, rt.frac_bits)))
    x._pub = pub
    return x


@register(aten.copy_)
def _copy(rt, func, dst, src, non_blocking=False):
    pub = public_value(src)
    write(dst, to_share(rt, src).expand(dst.shape))
    dst._pub = None if pub is None else torch.as_tensor(pub, dtype=torch.float32).expand(dst.shape).clone()
    return dst


@register(aten.index_put_, aten.index_put)
def _index_put(rt, func, x, indices, values, accumulate=False):
    """``x[indices] = values`` (or ``+=`` with accumulate); indices are public, values may be secret."""
    if any(is_shared(i) for i in indices if i is not None):
        raise ProtocolError("index_put with secret indices would reveal them; indices must be public")
    vals = to_share(rt, values)
    if func.overloadpacket is aten.index_put_:
        out = x._ring.clone().index_put_(indices, vals, accumulate)
        return write(x, out)
    return wrap(x._ring.index_put(indices, vals, accumulate))


@register(aten.masked_fill_.Scalar, aten.masked_fill.Scalar, aten.masked_fill_.Tensor, aten.masked_fill.Tensor)
def _masked_fill(rt, func, x, mask, value):
    """Fill where a public boolean mask is set with a public or secret scalar value."""
    if is_shared(mask):
        raise ProtocolError("masked_fill with a secret mask would reveal it; the mask must be public")
    out = torch.where(mask, to_share(rt, value), x._ring)
    if func.overloadpacket is aten.masked_fill_:
        return write(x, out)
    return wrap(out)


@register(aten.conj, aten.resolve_conj, aten.resolve_neg, aten.positive)
def _ident(rt, func, x):
    return x


@register(aten.is_same_size)
def _same_size(rt, func, a, b):
    return tuple(a.shape) == tuple(b.shape)


@register(aten._local_scalar_dense, aten.eq, aten.ne, aten.allclose, aten.equal)
def _forbidden(rt, func, *args, **kwargs):
    raise ProtocolError(f"{func} would reveal a secret value; use MPCTensor.reveal(to=...)")



@register(aten.embedding)
def _embedding(rt, func, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """Rows of a shared table at public indices (local); secret indices are refused."""
    if is_shared(indices):
        raise ProtocolError("embedding with secret indices would need an oblivious lookup; indices must be public")
    return wrap(share_of(weight)[indices])


@register(aten.embedding_dense_backward)
def _embedding_bw(rt, func, grad, indices, num_weights, padding_idx=-1, scale_grad_by_freq=False):
    if scale_grad_by_freq:
        raise ProtocolError("embedding with scale_grad_by_freq is not supported under MPC")
    g = to_share(rt, grad)
    dim = g.shape[-1]
    out = torch.zeros((num_weights, dim), dtype=torch.int64)
    out.index_add_(0, indices.reshape(-1), g.reshape(-1, dim))
    if padding_idx is not None and padding_idx >= 0:
        out[padding_idx] = 0
    return wrap(out)
