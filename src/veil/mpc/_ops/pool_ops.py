"""Average pooling (exact division by the window size) and max pooling (comparison tournaments)."""

from __future__ import annotations

import torch

from veil.mpc import primitives as P
from veil.mpc import ring
from veil.mpc._ops.common import (
    pair,
    share_of,
    to_share,
    windows,
    wrap,
)
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor

aten = torch.ops.aten


@register(aten.avg_pool2d)
def _avgpool(rt, func, x, kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True, div=None):
    k = pair(kernel)
    st = pair(stride) if stride else k
    pad = pair(padding)
    if ceil_mode or (not count_include_pad and (pad[0] or pad[1])):
        raise ProtocolError("avg_pool2d: ceil_mode / count_include_pad=False not supported")
    tot = windows(share_of(x), k, st, pad).sum((-1, -2))
    return wrap(P.div_public(rt, tot, div or k[0] * k[1]))


@register(aten.avg_pool2d_backward)
def _avgpool_bw(rt, func, grad, x, kernel, stride, padding, ceil_mode, count_include_pad, div):
    k = pair(kernel)
    st = pair(stride) if stride else k
    pad = pair(padding)
    g = to_share(rt, grad)
    n, c, oh, ow = g.shape
    cols = g.permute(0, 2, 3, 1)[..., None, None].expand(n, oh, ow, c, k[0], k[1])
    tot = ring.fold(cols, x.shape, k[0], k[1], st, pad)
    return wrap(P.div_public(rt, tot, div or k[0] * k[1]))


@register(aten.max_pool2d_with_indices)
def _maxpool(rt, func, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    k = pair(kernel)
    st = pair(stride) if stride else k
    pad = pair(padding)
    if ceil_mode or pair(dilation) != (1, 1):
        raise ProtocolError("max_pool2d: ceil_mode / dilation not supported")
    if pad[0] or pad[1]:
        raise ProtocolError("max_pool2d: padding not supported (zero padding would change the max)")
    win = windows(share_of(x), k, st, pad)
    n, c, oh, ow = win.shape[:4]
    vals, onehot = P.max_last(rt, win.reshape(n, c, oh, ow, k[0] * k[1]))
    idx = MPCTensor(onehot, dtype=torch.int64)
    idx._window = (k, st, pad)
    return wrap(vals), idx


@register(aten.max_pool2d_with_indices_backward)
def _maxpool_bw(rt, func, grad, x, kernel, stride, padding, dilation, ceil_mode, indices):
    k, st, pad = indices._window
    onehot = indices._share
    g = to_share(rt, grad)
    prod = P.beaver(rt, "mul", g.unsqueeze(-1).expand(onehot.shape).contiguous(), onehot)
    n, c, oh, ow = g.shape
    cols = prod.reshape(n, c, oh, ow, k[0], k[1]).permute(0, 2, 3, 1, 4, 5)
    return wrap(ring.fold(cols, x.shape, k[0], k[1], st, pad))



def _adaptive_window(x, output_size) -> tuple[int, int]:
    h, w = x.shape[-2:]
    oh, ow = pair(output_size)
    if h % oh or w % ow:
        raise ProtocolError(f"adaptive pooling from {h}x{w} to {oh}x{ow}: only whole windows are supported "
                            "(the input size must be a multiple of the output size)")
    return h // oh, w // ow


@register(aten.adaptive_max_pool2d)
def _adaptive_maxpool(rt, func, x, output_size):
    """Adaptive max pooling with equal windows: max pooling with kernel = stride = input / output."""
    k = _adaptive_window(x, output_size)
    return _maxpool(rt, func, x, k, k)


@register(aten.adaptive_max_pool2d_backward)
def _adaptive_maxpool_bw(rt, func, grad, x, indices):
    k, st, pad = indices._window
    return _maxpool_bw(rt, func, grad, x, k, st, pad, 1, False, indices)


@register(aten.upsample_nearest2d)
def _upsample_nearest(rt, func, x, output_size=None, scales_h=None, scales_w=None):
    """Nearest upsampling by whole factors: every value repeated (local, public indices)."""
    fh, fw = _factors(x.shape, output_size)
    return wrap(share_of(x).repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3))


@register(aten.upsample_nearest2d_backward)
def _upsample_nearest_bw(rt, func, grad, output_size, input_size, scales_h=None, scales_w=None):
    fh, fw = _factors(input_size, output_size)
    g = to_share(rt, grad)
    n, c, h, w = input_size
    return wrap(g.reshape(n, c, h, fh, w, fw).sum((3, 5)))


def _factors(input_shape, output_size) -> tuple[int, int]:
    h, w = input_shape[-2:]
    oh, ow = output_size
    if oh % h or ow % w:
        raise ProtocolError("nearest upsampling by whole factors only (output size a multiple of the input size)")
    return oh // h, ow // w
