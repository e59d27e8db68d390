"""Losses and (log-)softmax with their backward rules."""

from __future__ import annotations

import torch

from veil.mpc import approx, checks
from veil.mpc import primitives as P
from veil.mpc._ops.common import (
    is_shared,
    mul,
    mul_public,
    public_value,
    reduce,
    share_of,
    square,
    to_share,
    wrap,
)
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError

aten = torch.ops.aten


@register(aten.mse_loss)
def _mse(rt, func, x, target, reduction=1):
    d = to_share(rt, x) - to_share(rt, target)
    return wrap(reduce(rt, square(rt, d, "square in mse_loss"), reduction))


@register(aten.mse_loss_backward)
def _mse_bw(rt, func, grad, x, target, reduction=1):
    d = wrap(to_share(rt, x) - to_share(rt, target))
    pg = public_value(grad)
    g = share_of(mul(rt, grad, d)) * 2 if pg is None else mul_public(rt, d._share, torch.as_tensor(pg) * 2)
    return wrap(P.div_public(rt, g, x.numel()) if reduction == 1 else g)


SOFTMAX_CLASSES = 100  # the sum of exponentials lies in [1, k], inside reciprocal's and log's range for k <= 100


def _check_sum(rt, tot: torch.Tensor, k: int, what: str) -> None:
    """Range-check mode: with more than SOFTMAX_CLASSES classes, the sum of exponentials must stay
    in the range of reciprocal and log (it is at least 1: the maximum's term)."""
    if k > SOFTMAX_CLASSES:
        checks.within(rt, tot, None, approx.DOMAINS["reciprocal"][1], f"sum of exponentials of {what}")


@register(aten._softmax)
def _softmax(rt, func, x, dim, half_to_float=False):
    _, e = approx.shifted_exp(rt, share_of(x).movedim(dim, -1))
    tot = e.sum(-1, keepdim=True)
    _check_sum(rt, tot, e.shape[-1], "softmax")
    return wrap(approx.normalise(rt, e, tot).movedim(-1, dim))


@register(aten._softmax_backward_data)
def _softmax_bw(rt, func, grad, out, dim, dtype):
    gy = mul(rt, grad, out)
    return wrap(share_of(gy) - share_of(mul(rt, out, wrap(share_of(gy).sum(dim, keepdim=True).expand(out.shape)))))


@register(aten._log_softmax)
def _log_softmax(rt, func, x, dim, half_to_float=False):
    z, e = approx.shifted_exp(rt, share_of(x).movedim(dim, -1))
    tot = e.sum(-1, keepdim=True)
    _check_sum(rt, tot, z.shape[-1], "log_softmax")
    lse = approx.log(rt, tot)
    out = wrap((z - lse).movedim(-1, dim))
    out._softmax = approx.normalise(rt, e, tot).movedim(-1, dim)
    return out


@register(aten._log_softmax_backward_data)
def _log_softmax_bw(rt, func, grad, out, dim, dtype):
    sm = getattr(out, "_softmax", None)
    if sm is None:
        sm = approx.exp_nonpos(rt, share_of(out))
    gsum = to_share(rt, grad).sum(dim, keepdim=True).expand(out.shape)
    return wrap(to_share(rt, grad) - P.mul(rt, sm, gsum))


@register(aten.nll_loss_forward)
def _nll(rt, func, x, target, weight, reduction, ignore_index):
    if is_shared(target) or weight is not None:
        raise ProtocolError("nll_loss needs public class indices and no weights; use one-hot targets")
    onehot = torch.nn.functional.one_hot(target, x.shape[-1]).to(torch.int64)
    picked = -(share_of(x) * onehot).sum(-1)
    total = wrap(torch.tensor(0, dtype=torch.int64))
    return wrap(reduce(rt, picked, reduction)), total


@register(aten.nll_loss_backward)
def _nll_bw(rt, func, grad, x, target, weight, reduction, ignore_index, total_weight):
    onehot = torch.nn.functional.one_hot(target, x.shape[-1]).to(torch.int64)
    g = -onehot * (to_share(rt, grad) if reduction == 0 else to_share(rt, grad).reshape(()))
    if reduction == 0:
        g = -onehot * to_share(rt, grad).unsqueeze(-1)
    if reduction == 1:
        g = P.div_public(rt, g, x.shape[0])
    return wrap(g)

