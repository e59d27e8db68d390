"""Matrix products and convolutions (Beaver triples over bilinear maps) and their gradients."""

from __future__ import annotations

import torch

from veil.mpc._ops.common import (
    bilinear_fixed,
    is_shared,
    mul_public,
    scaled,
    share_of,
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


def _mapped(t, fn):
    """Apply a local reshaping ``fn`` to a shared or public operand."""
    if is_shared(t):
        return wrap(fn(share_of(t)), None if t._pub is None else fn(t._pub))
    return fn(t)


def _block_diagonal(w, groups: int, out_ch: int):
    """A grouped kernel (O, C/g, kh, kw) as the full (O, C, kh, kw) kernel with zero blocks (local)."""
    if groups == 1:
        return w

    def full(t: torch.Tensor) -> torch.Tensor:
        o, cg = t.shape[0], t.shape[1]
        out = torch.zeros((o, cg * groups, *t.shape[2:]), dtype=t.dtype)
        og = o // groups
        for j in range(groups):
            out[j * og : (j + 1) * og, j * cg : (j + 1) * cg] = t[j * og : (j + 1) * og]
        return out

    return _mapped(w, full)


def _blocks(full: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of `_block_diagonal` on a gradient: keep each group's block."""
    if groups == 1:
        return full
    o, c = full.shape[0], full.shape[1]
    og, cg = o // groups, c // groups
    return torch.cat([full[j * og : (j + 1) * og, j * cg : (j + 1) * cg] for j in range(groups)], 0)


def _conv_geometry(x, w, stride, padding, dilation, transposed, output_padding):
    """Checks, and 1-d convolutions as 2-d ones of height 1: returns (x, w, stride, padding, outpad, squeeze)."""
    if w.dim() not in (3, 4):
        raise ProtocolError(f"veil.mpc supports 1-d and 2-d convolutions, not a {w.dim() - 2}-d convolution "
                            f"(aten.convolution with a {tuple(w.shape)} kernel)")
    if any(d != 1 for d in dilation):
        raise ProtocolError("dilated convolutions (aten.convolution with dilation > 1) are not supported")
    if w.dim() == 3:
        x = _mapped(x, lambda t: t.unsqueeze(2))
        w = _mapped(w, lambda t: t.unsqueeze(2))
        return x, w, [1, stride[0]], [0, padding[0]], [0, output_padding[0]], True
    return x, w, list(stride), list(padding), list(output_padding), False


def _transposed_shape(x_shape, w_shape, groups, stride, padding, outpad) -> list[int]:
    n, _, h, wd = x_shape
    return [n, w_shape[1] * groups, (h - 1) * stride[0] - 2 * padding[0] + w_shape[2] + outpad[0],
            (wd - 1) * stride[1] - 2 * padding[1] + w_shape[3] + outpad[1]]


@register(aten.convolution)
def _conv(rt, func, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    """Conv1d/Conv2d, grouped and depthwise (block-diagonal kernel: one Beaver product) and
    transposed (the adjoint map, `ring.conv2d_grad_input`); 1-d ones as 2-d of height 1."""
    x, w, stride, padding, outpad, squeeze = _conv_geometry(x, w, stride, padding, dilation, transposed,
                                                            output_padding)
    params = {"stride": stride, "padding": padding}
    if transposed:
        full = _block_diagonal(w, groups, w.shape[0])
        shape = _transposed_shape(x.shape, w.shape, groups, stride, padding, outpad)
        out = bilinear_fixed(rt, "conv2d_gi", x, full, {**params, "input_shape": shape})
    else:
        out = bilinear_fixed(rt, "conv2d", x, _block_diagonal(w, groups, w.shape[0]), params)
    if bias is not None:
        out = out + to_share(rt, bias).reshape(1, -1, 1, 1)
    return wrap(out.squeeze(2) if squeeze else out)


@register(aten.convolution_backward)
def _conv_bw(rt, func, grad, x, w, bias_sizes, stride, padding, dilation, transposed, outpad, groups, mask):
    """Gradients of `_conv`: every one a bilinear map of the same family (one Beaver product each)."""
    x, w, stride, padding, outpad, squeeze = _conv_geometry(x, w, stride, padding, dilation, transposed, outpad)
    if squeeze:
        grad = _mapped(grad, lambda t: t.unsqueeze(2))
    params = {"stride": stride, "padding": padding}
    full = _block_diagonal(w, groups, w.shape[0])
    gi = gw = gb = None
    if transposed:  # y = conv_gi(x, w): dy/dx is the forward convolution, dy/dw the weight gradient
        if mask[0]:
            gi = bilinear_fixed(rt, "conv2d", grad, full, params)
        if mask[1]:
            gw = _blocks(bilinear_fixed(rt, "conv2d_gw", grad, x, {**params, "weight_shape": list(full.shape)}),
                         groups)
    else:
        if mask[0]:
            gi = bilinear_fixed(rt, "conv2d_gi", grad, full, {**params, "input_shape": list(x.shape)})
        if mask[1]:
            gw = _blocks(bilinear_fixed(rt, "conv2d_gw", x, grad, {**params, "weight_shape": list(full.shape)}),
                         groups)
    if mask[2]:
        gb = wrap(to_share(rt, grad).sum((0, 2, 3)))
    if squeeze:
        gi = None if gi is None else gi.squeeze(2)
        gw = None if gw is None else gw.squeeze(2)
    return (None if gi is None else wrap(gi)), (None if gw is None else wrap(gw)), gb
