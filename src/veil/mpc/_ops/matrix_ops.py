"""Matrix products and convolutions (Beaver triples over bilinear maps) and their gradients."""

from __future__ import annotations

import torch

from veil.mpc._ops.common import (
    bilinear_fixed,
    mul_public,
    scaled,
    to_share,
    wrap,
)
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError

aten = torch.ops.aten


@register(aten.mm, aten.bmm, aten.matmul)
def _mm(rt, func, a, b):
    return wrap(bilinear_fixed(rt, "matmul", a, b))


@register(aten.addmm)
def _addmm(rt, func, bias, a, b, beta=1, alpha=1):
    prod = bilinear_fixed(rt, "matmul", a, b)
    if alpha != 1:
        prod = mul_public(rt, prod, alpha)
    return wrap(prod + scaled(rt, bias, beta))


@register(aten.convolution)
def _conv(rt, func, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    if w.dim() != 4:
        raise ProtocolError(f"veil.mpc supports 2-d convolutions (Conv2d) only, not a {w.dim() - 2}-d convolution "
                            f"(aten.convolution with a {tuple(w.shape)} kernel)")
    if transposed or groups != 1 or any(d != 1 for d in dilation):
        raise ProtocolError("only plain convolutions (groups=1, dilation=1) are supported, not transposed, "
                            "grouped/depthwise or dilated ones (aten.convolution)")
    params = {"stride": list(stride), "padding": list(padding)}
    out = bilinear_fixed(rt, "conv2d", x, w, params)
    if bias is not None:
        out = out + to_share(rt, bias).reshape(1, -1, 1, 1)
    return wrap(out)


@register(aten.convolution_backward)
def _conv_bw(rt, func, grad, x, w, bias_sizes, stride, padding, dilation, transposed, outpad, groups, mask):
    params = {"stride": list(stride), "padding": list(padding)}
    gi = gw = gb = None
    if mask[0]:
        gi = wrap(bilinear_fixed(rt, "conv2d_gi", grad, w, {**params, "input_shape": list(x.shape)}))
    if mask[1]:
        gw = wrap(bilinear_fixed(rt, "conv2d_gw", x, grad, {**params, "weight_shape": list(w.shape)}))
    if mask[2]:
        gb = wrap(to_share(rt, grad).sum((0, 2, 3)))
    return gi, gw, gb

