"""Normalisation layers (BatchNorm in training and eval mode, LayerNorm, GroupNorm), dropout and
public random masks.

Statistics are exact where they are linear: means divide by the public count exactly
(`P.div_public`), the variance is kept with 2*frac_bits fractional bits (from untruncated
squares of x - mean) so small variances do not underflow, and 1/sqrt(var + eps) comes from
`approx.inv_sqrt_wide`: relative error <= 1% plus 2^-frac_bits absolute (so 1% + 2^-16
sqrt(var) relative), for any variance. Normalised outputs and gradients therefore carry a
relative error of about 1% of their size (tests/mpc/test_norm.py bounds them at 0.03 for
unit-scale data, tests/mpc/test_range.py at a variance of 1600).

Range (`_stats`): every |x - mean| < 2^(31 - frac_bits) = 2^15 (its ring square
must not wrap) and var < 2^20: the squares are summed with VAR_SUM_BITS bits of headroom
(truncated by t = bit_length(n) - VAR_SUM_BITS bits first when the count n needs it, one round),
so their sum cannot wrap for any n while var < 2^20. Both are checked in the range-check mode
(`veil.mpc.checks`).
"""

from __future__ import annotations

import torch

from veil.mpc import approx, checks, ring
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
    if not training:
        out = _bn(rt, x, weight, bias, mean, var, eps)
        empty = wrap(torch.zeros(0, dtype=torch.int64))
        return out, empty, empty
    return _bn_train(rt, x, weight, bias, mean, var, momentum, eps)


def _channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast over (N, C, ...)."""
    return t.reshape((1, -1) + (1,) * (dim - 2))


VAR_SUM_BITS = 9  # the sum of n squares keeps n / 2^t < 2^9, so it cannot wrap while var < 2^21
VAR_LIMIT = 2.0**20  # the documented (and checked) variance range of `_stats`


def _stats(rt, xs: torch.Tensor, dims: list[int], n: int, eps: float):
    """(mean, x - mean, 1/sqrt(var + eps), var + eps) of shares over ``dims`` (kept); the first
    three with frac_bits fractional bits, the last with 2*frac_bits.

    The squares of x - mean are exact (2*frac_bits fractional bits); when n >= 2^VAR_SUM_BITS
    each is first divided by 2^t, t = bit_length(n) - VAR_SUM_BITS (exact division, one round;
    absolute error of var at most n 2^-(2 frac_bits + 7), 2^-23 for n = 2^16), so that
    their sum stays below 2^62 for var < 2^21; then `approx.inv_sqrt_wide` (one batch of
    comparisons, two Beaver products, Newton steps). Range-check mode: |x - mean| < 2^15 and,
    from a sum of squares truncated so far that it never wraps, var < VAR_LIMIT."""
    mean = P.div_public(rt, xs.sum(dims, keepdim=True), n)
    xc = xs - mean
    checks.square(rt, xc, "normalisation: |x - mean| < 2^15")
    sq = P.square(rt, xc)
    t = max(0, n.bit_length() - VAR_SUM_BITS)
    if checks.active(rt):
        # n / 2^bit_length(n) < 1: this coarse sum never wraps; var < VAR_LIMIT iff it is below n VAR_LIMIT 2^-bl
        bl = n.bit_length()
        coarse = P.truncate(rt, sq, bl).sum(dims, keepdim=True)
        checks.within(rt, coarse, None, VAR_LIMIT * n / 2**bl, f"normalisation: variance < {VAR_LIMIT:g}",
                      frac_bits=2 * rt.frac_bits)
    if t:
        sq = P.truncate(rt, sq, t)
    var2 = P.div_public(rt, sq.sum(dims, keepdim=True), n) * (1 << t)
    var2 = var2 + P.public(rt, torch.full_like(var2, round(eps * rt.scale * rt.scale)))
    inv, _ = approx.inv_sqrt_wide(rt, var2)
    return mean, xc, inv, var2


def _times(rt, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fixed-point product of shares, b broadcast to a's shape."""
    return P.mul(rt, a, b.expand_as(a).contiguous())


def _affine(rt, xhat: torch.Tensor, weight, bias, shape_of) -> torch.Tensor:
    out = xhat
    if weight is not None:
        out = share_of(mul(rt, wrap(out), wrap(shape_of(to_share(rt, weight)).expand_as(out).contiguous())))
    if bias is not None:
        out = out + shape_of(to_share(rt, bias))
    return out


def _bn_train(rt, x, weight, bias, running_mean, running_var, momentum, eps):
    """Batch statistics over (N, spatial...) per channel; running statistics updated in place."""
    xs = to_share(rt, x)
    dims = [0, *range(2, x.dim())]
    n = xs.numel() // xs.shape[1]
    if n < 2:
        raise ProtocolError("BatchNorm in training mode needs more than one value per channel")
    mean, xc, inv, var2 = _stats(rt, xs, dims, n, eps)
    out = _affine(rt, _times(rt, xc, inv), weight, bias, lambda t: _channel(t, x.dim()))
    m = float(momentum) if momentum is not None else 0.1
    with torch.no_grad():
        if running_mean is not None and isinstance(running_mean, MPCTensor):
            write(running_mean, mul_public(rt, share_of(running_mean), 1.0 - m) + mul_public(rt, mean.reshape(-1), m))
        if running_var is not None and isinstance(running_var, MPCTensor):
            unbiased = mul_public(rt, P.truncate(rt, var2.reshape(-1)), m * n / (n - 1))
            write(running_var, mul_public(rt, share_of(running_var), 1.0 - m) + unbiased)
    return wrap(out), wrap(mean.reshape(-1)), wrap(inv.reshape(-1))


def _norm_input_grad(rt, g: torch.Tensor, xhat: torch.Tensor, inv: torch.Tensor, dims, n: int) -> torch.Tensor:
    """d/dx of xhat = (x - mean) inv, for an upstream gradient g of xhat:
    inv (g - mean(g) - xhat mean(g xhat)), means over the normalised ``dims``."""
    mg = P.div_public(rt, g.sum(dims, keepdim=True), n)
    mgx = P.div_public(rt, P.mul(rt, g, xhat).sum(dims, keepdim=True), n)
    return _times(rt, g - mg - _times(rt, xhat, mgx), inv)


@register(aten.native_batch_norm_backward)
def _bn_bw(rt, func, grad, x, weight, running_mean, running_var, save_mean, save_invstd, train, eps, mask):
    xs, g = to_share(rt, x), to_share(rt, grad)
    dims = [0, *range(2, x.dim())]
    shape_of = lambda t: _channel(t, x.dim())  # noqa: E731
    if train:
        mean, inv = shape_of(to_share(rt, save_mean)), shape_of(to_share(rt, save_invstd))
    else:
        pv = public_value(running_var)
        if pv is None:
            raise ProtocolError("BatchNorm backward in eval mode needs public running statistics")
        inv = shape_of(encode_public(rt, 1.0 / torch.sqrt(torch.as_tensor(pv, dtype=torch.float64) + eps)))
        mean = shape_of(to_share(rt, running_mean))
    xhat = _times(rt, xs - mean, inv)
    gw_in = g if weight is None else share_of(mul(rt, wrap(g), wrap(shape_of(to_share(rt, weight)).expand_as(g)
                                                                    .contiguous())))
    gi = gw = gb = None
    if mask[0]:
        n = xs.numel() // xs.shape[1]
        gi = wrap(_norm_input_grad(rt, gw_in, xhat, inv, dims, n) if train else _times(rt, gw_in, inv))
    if mask[1] and weight is not None:
        gw = wrap(P.mul(rt, g, xhat).sum(dims))
    if mask[2]:
        gb = wrap(g.sum(dims))
    return gi, gw, gb


@register(aten.native_layer_norm)
def _layer_norm(rt, func, x, normalized_shape, weight, bias, eps):
    """LayerNorm over the last len(normalized_shape) dimensions."""
    xs = to_share(rt, x)
    k = len(normalized_shape)
    dims = list(range(x.dim() - k, x.dim()))
    n = 1
    for d in dims:
        n *= xs.shape[d]
    mean, xc, inv, _ = _stats(rt, xs, dims, n, eps)
    out = _affine(rt, _times(rt, xc, inv), weight, bias, lambda t: t)
    return wrap(out), wrap(mean), wrap(inv)


@register(aten.native_layer_norm_backward)
def _layer_norm_bw(rt, func, grad, x, normalized_shape, mean, rstd, weight, bias, mask):
    xs, g = to_share(rt, x), to_share(rt, grad)
    k = len(normalized_shape)
    dims = list(range(x.dim() - k, x.dim()))
    n = 1
    for d in dims:
        n *= xs.shape[d]
    inv = to_share(rt, rstd)
    xhat = _times(rt, xs - to_share(rt, mean), inv)
    gx = g if weight is None else share_of(mul(rt, wrap(g), wrap(to_share(rt, weight).expand_as(g).contiguous())))
    batch = list(range(x.dim() - k))
    gi = wrap(_norm_input_grad(rt, gx, xhat, inv, dims, n)) if mask[0] else None
    gw = wrap(P.mul(rt, g, xhat).sum(batch)) if mask[1] and weight is not None else None
    gb = wrap(g.sum(batch)) if mask[2] and bias is not None else None
    return gi, gw, gb


@register(aten.native_group_norm)
def _group_norm(rt, func, x, weight, bias, n_batch, channels, hxw, groups, eps):
    """GroupNorm: statistics per (sample, group of channels), then a per-channel affine map."""
    xs = to_share(rt, x).reshape(n_batch, groups, -1)
    mean, xc, inv, _ = _stats(rt, xs, [2], xs.shape[2], eps)
    xhat = _times(rt, xc, inv).reshape(x.shape)
    out = _affine(rt, xhat, weight, bias, lambda t: _channel(t, x.dim()))
    return wrap(out), wrap(mean.reshape(n_batch, groups)), wrap(inv.reshape(n_batch, groups))


@register(aten.native_group_norm_backward)
def _group_norm_bw(rt, func, grad, x, mean, rstd, weight, n_batch, channels, hxw, groups, mask):
    xs, g = to_share(rt, x), to_share(rt, grad)
    shape_of = lambda t: _channel(t, x.dim())  # noqa: E731
    inv = to_share(rt, rstd).reshape(n_batch, groups, 1)
    xhat = _times(rt, xs.reshape(n_batch, groups, -1) - to_share(rt, mean).reshape(n_batch, groups, 1), inv)
    gx = g if weight is None else share_of(mul(rt, wrap(g), wrap(shape_of(to_share(rt, weight)).expand_as(g)
                                                                 .contiguous())))
    gi = gw = gb = None
    if mask[0]:
        gi = wrap(_norm_input_grad(rt, gx.reshape(n_batch, groups, -1), xhat, inv, [2], xhat.shape[2])
                  .reshape(x.shape))
    if mask[1] and weight is not None:
        gw = wrap(P.mul(rt, g, xhat.reshape(x.shape)).sum([0, *range(2, x.dim())]))
    if mask[2]:
        gb = wrap(g.sum([0, *range(2, x.dim())]))
    return gi, gw, gb


def _bn(rt, x, weight, bias, mean, var, eps) -> MPCTensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    pv = public_value(var)
    if pv is not None:
        inv = wrap(encode_public(rt, 1.0 / torch.sqrt(torch.as_tensor(pv, dtype=torch.float64) + eps)), None)
        inv._pub = (1.0 / torch.sqrt(torch.as_tensor(pv, dtype=torch.float64) + eps)).float()
    else:  # var with 2*frac_bits fractional bits (exact: var * 2^frac_bits) into the wide-range inverse root
        v2 = (share_of(var) + encode_public(rt, torch.full(tuple(var.shape), eps))) * rt.scale
        inv = wrap(approx.inv_sqrt_wide(rt, v2)[0])
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

