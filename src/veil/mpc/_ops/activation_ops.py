"""Activations beyond ReLU and sigmoid, built on the exact comparison and `approx`, with their
backward rules. What a backward needs from the forward (a sign mask, a sigmoid) is kept on the
input tensor (`MPCTensor._aux`, dropped if the input is written) so it is computed once.

Error bounds (frac_bits=16; tests/mpc/test_activations.py checks them against float64 torch):

- exact up to fixed-point rounding (a few 2^-16, no approximation): LeakyReLU, Hardtanh/ReLU6,
  abs and sign (so L1Loss), through ReLU's exact comparison. ``sign(0)`` is +1 here, 0 in torch.
- through `approx.sigmoid` (absolute error <= 0.01, for every input): tanh = 2 sigmoid(2x) - 1
  (<= 0.02), SiLU x sigmoid(x) (<= 0.01 |x|), GELU as x sigmoid(1.702 x) (the usual sigmoid form
  of GELU: <= 0.021 from torch's exact erf GELU, plus 0.01 |x|), and the gradients of Softplus
  and of BCEWithLogitsLoss.
- BCELoss (probabilities in): log through `approx.log` on 64 p, valid for p in [0.0016, 0.9984]
  (error <= 0.1 per element), gradient for p in [0.008, 0.992] (1% relative); both ranges are
  checked in the range-check mode (`veil.mpc.checks`).
- through `approx.exp_nonpos` / `approx.log`, for every input: ELU (alpha (exp(x) - 1) for x <= 0,
  error <= 0.01 alpha) and the values of Softplus and BCEWithLogitsLoss (log(1 + exp(-|x|)),
  absolute error <= 0.05); the exponent is clamped at -32 (one more ReLU, 8 rounds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from veil.mpc import approx, checks
from veil.mpc import primitives as P
from veil.mpc._ops.common import encode_public, mul, mul_public, reduce, share_of, to_share, wrap
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError

aten = torch.ops.aten
GELU_K = 1.702  # GELU(x) ~ x sigmoid(1.702 x)


def _cached(x, key, make: Callable):
    """``make()`` once per input tensor (until the input is written)."""
    aux = x._aux
    if aux is None:
        aux = {}
        x._aux = aux
    if key not in aux:
        aux[key] = make()
    return aux[key]


def _relu_of(rt, x):
    """(relu(x) shares, ReluMask) of an input, computed once."""
    return _cached(x, "relu", lambda: P.relu(rt, to_share(rt, x)))


def _sigmoid_of(rt, x, k: float = 1.0) -> torch.Tensor:
    """Shares of sigmoid(k x), computed once per input and k."""
    return _cached(x, ("sigmoid", k), lambda: approx.sigmoid(rt, mul_public(rt, to_share(rt, x), k)))


def _one(rt, like: torch.Tensor) -> torch.Tensor:
    return encode_public(rt, torch.ones(like.shape))


# ---- piecewise linear: exact -------------------------------------------------------------------


@register(aten.leaky_relu)
def _leaky_relu(rt, func, x, slope=0.01):
    r, _ = _relu_of(rt, x)
    return wrap(mul_public(rt, to_share(rt, x), float(slope)) + mul_public(rt, r, 1.0 - float(slope)))


@register(aten.leaky_relu_backward)
def _leaky_relu_bw(rt, func, grad, x, slope, self_is_result):
    if self_is_result:
        raise ProtocolError("in-place LeakyReLU is not supported under MPC; use inplace=False")
    _, mask = _relu_of(rt, x)
    g = to_share(rt, grad)
    return wrap(mul_public(rt, g, float(slope)) + mul_public(rt, mask.apply(rt, g), 1.0 - float(slope)))


def _clamp_of(rt, x, lo: float, hi: float):
    """relu of (x - lo', x - hi) stacked, and its mask, lo' = lo + 2^-frac_bits: then
    clamp(x) = lo' + relu(x - lo') - relu(x - hi) and the mask is [x > lo], [x >= hi], so the
    gradient is zero at both ends as in torch (the saturated low value is lo + 2^-frac_bits)."""
    xs = to_share(rt, x)
    low = P.public(rt, torch.full_like(xs, round(lo * rt.scale) + 1))
    return _cached(x, ("clamp", lo, hi), lambda: P.relu(rt, torch.stack([xs - low, xs - encode_public(rt, hi)])))


@register(aten.hardtanh)
def _hardtanh(rt, func, x, lo=-1.0, hi=1.0):
    if not lo < hi:
        raise ProtocolError("hardtanh needs min < max")
    r, _ = _clamp_of(rt, x, float(lo), float(hi))
    return wrap(P.public(rt, torch.full_like(r[0], round(float(lo) * rt.scale) + 1)) + r[0] - r[1])


@register(aten.hardtanh_backward)
def _hardtanh_bw(rt, func, grad, x, lo, hi):
    _, mask = _clamp_of(rt, x, float(lo), float(hi))
    g = to_share(rt, grad)
    both = mask.apply(rt, torch.stack([g, g]))  # g [x > lo], g [x >= hi]
    return wrap(both[0] - both[1])


@register(aten.abs)
def _abs(rt, func, x):
    r, _ = _relu_of(rt, x)
    return wrap(2 * r - to_share(rt, x))


@register(aten.sgn, aten.sign)
def _sign(rt, func, x):
    _, mask = _relu_of(rt, x)
    return wrap((2 * mask.b - P.public(rt, torch.ones_like(mask.b))) * rt.scale)


# ---- smooth: through sigmoid, exp and log ------------------------------------------------------


@register(aten.tanh)
def _tanh(rt, func, x):
    return wrap(2 * _sigmoid_of(rt, x, 2.0) - _one(rt, x))


@register(aten.tanh_backward)
def _tanh_bw(rt, func, grad, out):
    o = to_share(rt, out)
    return mul(rt, grad, wrap(_one(rt, out) - P.square_fixed(rt, o)))


@register(aten.silu)
def _silu(rt, func, x):
    return mul(rt, x, wrap(_sigmoid_of(rt, x)))


@register(aten.silu_backward)
def _silu_bw(rt, func, grad, x):
    return _sigmoid_form_bw(rt, grad, x, 1.0)


def _sigmoid_form_bw(rt, grad, x, k: float):
    """d/dx [x sigmoid(k x)] = s + k x s (1 - s), s = sigmoid(k x); times grad."""
    s = wrap(_sigmoid_of(rt, x, k))
    s1 = mul(rt, s, wrap(_one(rt, x) - share_of(s)))
    d = share_of(s) + mul_public(rt, share_of(mul(rt, x, s1)), k)
    return mul(rt, grad, wrap(d))


@register(aten.gelu)
def _gelu(rt, func, x, approximate="none"):
    return mul(rt, x, wrap(_sigmoid_of(rt, x, GELU_K)))


@register(aten.gelu_backward)
def _gelu_bw(rt, func, grad, x, approximate="none"):
    return _sigmoid_form_bw(rt, grad, x, GELU_K)


def _log1p_exp_neg_abs(rt, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(-|z|)) given relu(z) = r (so |z| = 2r - z); the argument of log is in (1, 2]."""
    return approx.log(rt, _one(rt, z) + approx.exp_nonpos(rt, z - 2 * r))


@register(aten.softplus)
def _softplus(rt, func, x, beta=1.0, threshold=20.0):
    z = mul_public(rt, to_share(rt, x), float(beta)) if beta != 1 else to_share(rt, x)
    r, _ = P.relu(rt, z)
    out = r + _log1p_exp_neg_abs(rt, z, r)
    return wrap(out if beta == 1 else mul_public(rt, out, 1.0 / float(beta)))


@register(aten.softplus_backward)
def _softplus_bw(rt, func, grad, x, beta=1.0, threshold=20.0):
    return mul(rt, grad, wrap(_sigmoid_of(rt, x, float(beta))))


@register(aten.elu)
def _elu(rt, func, x, alpha=1.0, scale=1.0, input_scale=1.0):
    if scale != 1 or input_scale != 1:
        raise ProtocolError("only ELU (scale = input_scale = 1) is supported under MPC, not SELU/CELU")
    r, _ = _relu_of(rt, x)
    neg = to_share(rt, x) - r  # min(x, 0)
    e = _cached(x, "elu_exp", lambda: approx.exp_nonpos(rt, neg))
    return wrap(r + mul_public(rt, e - _one(rt, x), float(alpha)))


@register(aten.elu_backward)
def _elu_bw(rt, func, grad, alpha, scale, input_scale, is_result, x):
    if is_result or scale != 1 or input_scale != 1:
        raise ProtocolError("only ELU (scale = input_scale = 1, not in place) is supported under MPC")
    _, mask = _relu_of(rt, x)
    r, _ = _relu_of(rt, x)
    e = _cached(x, "elu_exp", lambda: approx.exp_nonpos(rt, to_share(rt, x) - r))
    g = to_share(rt, grad)
    gb = mask.apply(rt, g)  # g [x >= 0]
    ge = share_of(mul(rt, wrap(g - gb), wrap(mul_public(rt, e, float(alpha)))))  # g [x < 0] alpha e^x
    return wrap(gb + ge)


# ---- BCEWithLogitsLoss --------------------------------------------------------------------------


@register(aten.binary_cross_entropy_with_logits)
def _bce_logits(rt, func, x, target, weight=None, pos_weight=None, reduction=1):
    """relu(x) - x t + log(1 + exp(-|x|)), averaged or summed as asked."""
    if weight is not None or pos_weight is not None:
        raise ProtocolError("BCEWithLogitsLoss with weight or pos_weight is not supported under MPC")
    xs = to_share(rt, x)
    r, _ = _relu_of(rt, x)
    xt = share_of(mul(rt, x, target))
    return wrap(reduce(rt, r - xt + _log1p_exp_neg_abs(rt, xs, r), reduction))


# ---- BCELoss (probabilities as input) -----------------------------------------------------------

BCE_SCALE = 64.0  # log(p) = log(64 p) - log(64): `approx.log` is accurate on [0.1, 100]


def _bce_check(weight):
    if weight is not None:
        raise ProtocolError("BCELoss with weight is not supported under MPC")


@register(aten.binary_cross_entropy)
def _bce(rt, func, p, target, weight=None, reduction=1):
    """-(t log p + (1 - t) log(1 - p)); valid for p in [0.0016, 0.9984] (64 p and 64 (1 - p) at
    least 0.1), absolute error <= 0.1 per element there (two logarithms)."""
    _bce_check(weight)
    ps, ts = to_share(rt, p), to_share(rt, target)
    checks.within(rt, ps, 0.0016, 0.9984, "BCELoss probability in [0.0016, 0.9984]")
    one = _one(rt, p)
    both = mul_public(rt, torch.stack([ps, one - ps]), BCE_SCALE)
    logs = approx.log(rt, both) - encode_public(rt, float(torch.log(torch.tensor(BCE_SCALE))))
    terms = share_of(mul(rt, wrap(torch.stack([ts, one - ts])), wrap(logs)))
    return wrap(reduce(rt, -(terms[0] + terms[1]), reduction))


@register(aten.binary_cross_entropy_backward)
def _bce_bw(rt, func, grad, p, target, weight=None, reduction=1):
    """grad (p - t) / (p (1 - p)); the reciprocal of 64 p (1 - p) is accurate for p in [0.008, 0.992]."""
    _bce_check(weight)
    ps, ts = to_share(rt, p), to_share(rt, target)
    checks.within(rt, ps, 0.008, 0.992, "BCELoss gradient probability in [0.008, 0.992]")
    var = P.mul(rt, ps, _one(rt, p) - ps)
    inv = mul_public(rt, approx.reciprocal(rt, mul_public(rt, var, BCE_SCALE)), BCE_SCALE)
    d = share_of(mul(rt, wrap(ps - ts), wrap(inv)))
    if reduction == 1:
        d = P.div_public(rt, d, d.numel())
    return mul(rt, grad, wrap(d))
