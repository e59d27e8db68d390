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
from veil.mpc._ops.common import encode_public, mul, mul_public, mul_wide, reduce, share_of, to_share, wrap
from veil.mpc._ops.registry import register
from veil.mpc.errors import ProtocolError

aten = torch.ops.aten
GELU_K = 1.702  # GELU(x) ~ x sigmoid(1.702 x)


def _aux_of(x) -> dict:
    """The dict of values kept on an input tensor (`MPCTensor._aux`, dropped if it is written)."""
    aux = x._aux
    if aux is None:
        aux = {}
        x._aux = aux
    return aux


def _cached(x, key, make: Callable):
    """``make()`` once per input tensor (until the input is written)."""
    aux = _aux_of(x)
    if key not in aux:
        aux[key] = make()
    return aux[key]


def _relu_of(rt, x):
    """(relu(x) shares, ReluMask) of an input, computed once."""
    return _cached(x, "relu", lambda: P.relu(rt, to_share(rt, x)))


def _clamped_of(rt, x, k: float, relu: bool):
    """(s, m, km, r) of an input, computed once per k > 0: integer shares of s = [x >= 0], shares
    of m = min(|x|, EXP_FLOOR / k), of km = k m (in [0, EXP_FLOOR]) and, if ``relu``, of relu(x)
    (`approx.abs_clamped`). Clamping before scaling keeps k x and every later product bounded."""
    aux = _aux_of(x)
    got = aux.get(("clamped", k))
    if got is None or (relu and got[3] is None):
        s, m, r = approx.abs_clamped(rt, to_share(rt, x), approx.EXP_FLOOR / k, relu)
        got = aux[("clamped", k)] = (s, m, m if k == 1 else mul_public(rt, m, k), r)
    return got


def _pos_of(rt, x, k: float) -> torch.Tensor:
    """Shares of sigmoid(k |x|) (|x| clamped: `_clamped_of`), computed once per input and k > 0."""
    return _cached(x, ("sigmoid_pos", k), lambda: approx.sigmoid_pos(rt, _clamped_of(rt, x, k, False)[2]))


def _sigmoid_of(rt, x, k: float = 1.0) -> torch.Tensor:
    """Shares of sigmoid(k x) for a public k != 0, computed once per input and k."""
    if k < 0:
        return _one(rt, to_share(rt, x)) - _sigmoid_of(rt, x, -k)
    return _cached(x, ("sigmoid", k),
                   lambda: approx.sign_select(rt, _pos_of(rt, x, k), _clamped_of(rt, x, k, False)[0]))


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


def _sigmoid_form(rt, x, k: float):
    """x sigmoid(k x) = relu(x) - |x| sigmoid(-k |x|), the second term as m (1 - sigmoid(k m)) with
    m = min(|x|, EXP_FLOOR / k): every product is bounded, so it holds for every input (beyond the
    clamp the exact term is below e^-32 EXP_FLOOR)."""
    _, m, _, r = _clamped_of(rt, x, k, True)
    return wrap(r - P.mul(rt, m, _one(rt, m) - _pos_of(rt, x, k)))


def _sigmoid_form_bw(rt, grad, x, k: float):
    """d/dx [x sigmoid(k x)] = sigmoid(k x) + k x sigmoid(k x) (1 - sigmoid(k x)), times grad. The
    second term is (2s - 1) km p (1 - p) with p = sigmoid(k m) (`_clamped_of`): bounded products,
    and one Beaver product with the bit s for both signs."""
    s, _, km, _ = _clamped_of(rt, x, k, False)
    pos = _pos_of(rt, x, k)
    one = _one(rt, pos)
    v = P.mul(rt, km, P.mul(rt, pos, one - pos))
    signed = P.beaver(rt, "mul", torch.stack([2 * pos - one, v]), torch.stack([s, s]))
    d = one - pos + signed[0] + 2 * signed[1] - v  # sigmoid(k x) + (2s - 1) v
    return mul(rt, grad, wrap(d))


@register(aten.silu)
def _silu(rt, func, x):
    return _sigmoid_form(rt, x, 1.0)


@register(aten.silu_backward)
def _silu_bw(rt, func, grad, x):
    return _sigmoid_form_bw(rt, grad, x, 1.0)


@register(aten.gelu)
def _gelu(rt, func, x, approximate="none"):
    return _sigmoid_form(rt, x, GELU_K)


@register(aten.gelu_backward)
def _gelu_bw(rt, func, grad, x, approximate="none"):
    return _sigmoid_form_bw(rt, grad, x, GELU_K)


def _log1p_exp_neg(rt, a: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(-a)) for a in [0, EXP_FLOOR] (a clamped |x|); the argument of log is in (1, 2]."""
    return approx.log(rt, _one(rt, a) + approx.exp(rt, -a))


@register(aten.softplus)
def _softplus(rt, func, x, beta=1.0, threshold=20.0):
    """relu(x) + log(1 + exp(-beta |x|)) / beta, |x| clamped at EXP_FLOOR / beta before the scaling
    (`_clamped_of`), so beta x never leaves the ring; for beta < 0, softplus_beta(x) =
    -softplus_|beta|(-x) = x - relu(x) - log(1 + exp(-|beta x|)) / |beta|."""
    b = float(beta)
    if b == 0:
        raise ProtocolError("softplus with beta = 0 is not defined")
    _, _, km, r = _clamped_of(rt, x, abs(b), True)
    lg = _log1p_exp_neg(rt, km)
    lg = lg if b == 1 else mul_public(rt, lg, 1.0 / abs(b))
    return wrap(r + lg if b > 0 else to_share(rt, x) - r - lg)


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
    """relu(x) - x t + log(1 + exp(-|x|)), averaged or summed as asked; x t by `mul_wide`, exact
    while |x t| < 2^46 (every logit for targets |t| <= 1), where a fixed-point product would need
    |x t| < 2^30."""
    if weight is not None or pos_weight is not None:
        raise ProtocolError("BCEWithLogitsLoss with weight or pos_weight is not supported under MPC")
    _, m, _, r = _clamped_of(rt, x, 1.0, True)
    return wrap(reduce(rt, r - mul_wide(rt, x, target) + _log1p_exp_neg(rt, m), reduction))


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
