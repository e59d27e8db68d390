"""Helpers shared by the op families: wrapping shares, public operands, fixed-point scaling."""

from __future__ import annotations

import math

import torch

from veil.mpc import checks, ring
from veil.mpc import primitives as P
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor, _Store


def is_shared(x) -> bool:
    return isinstance(x, MPCTensor)


def share_of(x) -> torch.Tensor:
    return x._share


def wrap(share: torch.Tensor, pub: torch.Tensor | None = None, store: _Store | None = None) -> MPCTensor:
    """Wrap a share; ``store`` makes the result an alias of the tensor that owns that storage."""
    t = MPCTensor(share, store=store)
    t._pub = pub
    return t


def aliases(out: torch.Tensor, share: torch.Tensor) -> bool:
    """Whether ``out`` is a view of the storage of ``share``."""
    return out.numel() > 0 and out.untyped_storage().data_ptr() == share.untyped_storage().data_ptr()


def view_of(out: torch.Tensor, src, pub=None) -> MPCTensor:
    """Wrap the result of an op on ``src``'s share, aliasing ``src`` if the op returned a view."""
    store = src._store if is_shared(src) and aliases(out, share_of(src)) else None
    return wrap(out, pub, store)


def write(x: MPCTensor, share: torch.Tensor) -> MPCTensor:
    """In-place update: write ``share`` into x's share storage, so every alias of it sees the change.

    A share with internal overlap (an expanded view) is refused, as torch refuses in-place writes
    to such tensors: a write could not reach every element that aliases it.
    """
    target = x._ring
    if any(st == 0 and n > 1 for st, n in zip(target.stride(), target.shape, strict=True)):
        raise ProtocolError("in-place write to an expanded tensor (elements share memory); clone() it first")
    target.copy_(share)
    x._store.gen += 1
    return x


def public_value(x):
    """Plain value of a public operand (tensor, python number, or MPCTensor known to be public)."""
    if is_shared(x):
        return x._pub
    return x


def is_integer(v) -> bool:
    if isinstance(v, bool | int):
        return True
    return isinstance(v, torch.Tensor) and not v.is_floating_point()


def encode_public(rt: P.Runtime, v) -> torch.Tensor:
    """Shares of a public real operand."""
    return P.public(rt, ring.encode(torch.as_tensor(v, dtype=torch.float64), rt.frac_bits))


def to_share(rt: P.Runtime, x) -> torch.Tensor:
    return share_of(x) if is_shared(x) else encode_public(rt, x)


def reciprocal_integer(v) -> int | None:
    """d if the public scalar v is 1/d for an integer 2 <= |d| <= 2^62 (up to float rounding), else None."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = float(v.reshape(()))
    if not isinstance(v, float) or v == 0.0 or not math.isfinite(v) or abs(v) >= 1.0:
        return None
    inv = 1.0 / v
    d = round(inv)
    if 2 <= abs(d) <= P.MAX_DIVISOR and abs(inv - d) <= 1e-6 * abs(d):
        return d
    return None


def mul_public(rt: P.Runtime, s: torch.Tensor, v) -> torch.Tensor:
    """Shares times a public value: integers stay exact, 1/n is an exact division by n, other
    reals are encoded with frac_bits fractional bits then truncated (`checks.scaled` in the
    range-check mode)."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point():
        v = float(v)
    if is_integer(v) or (isinstance(v, float) and float(v).is_integer() and abs(v) < 2**40):
        m = torch.as_tensor(v).to(torch.int64) if isinstance(v, torch.Tensor) else int(v)
        checks.scaled(rt, s, m, 1, "product with a public value")
        return s * m
    d = reciprocal_integer(v)
    if d is not None:
        return P.div_public(rt, s, d)
    vt = torch.as_tensor(v, dtype=torch.float64)
    top = float(vt.abs().max()) if vt.numel() else 0.0
    if not math.isfinite(top):
        raise ProtocolError("cannot multiply by a non-finite public value")
    # v = m / 2^k with m of frac_bits significant bits: relative error 2^-frac_bits whatever |v|
    # (encoding v itself with frac_bits fractional bits would lose all precision for |v| << 1)
    k = rt.frac_bits + (max(0, math.ceil(-math.log2(top))) if 0.0 < top < 1.0 else 0)
    m = ring.encode(vt, k)
    checks.scaled(rt, s, m, 1 << k, "product with a public value")
    return P.div_public(rt, s * m, 1 << k)


def div_public(rt: P.Runtime, s: torch.Tensor, v) -> torch.Tensor:
    """Shares divided by a public value: exact division for integers, else times 1/v."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.reshape(()).item()
    integral = isinstance(v, bool | int) or (isinstance(v, float) and v.is_integer())
    if integral and v != 0 and abs(v) <= P.MAX_DIVISOR:
        return P.div_public(rt, s, int(v))
    return mul_public(rt, s, 1.0 / torch.as_tensor(v, dtype=torch.float64))


def mul(rt: P.Runtime, a, b) -> MPCTensor:
    """Fixed-point elementwise product of two operands, either of them public (checked in the
    range-check mode)."""
    pa, pb = public_value(a), public_value(b)
    if pa is not None and pb is not None:
        v = torch.as_tensor(pa) * torch.as_tensor(pb)
        return wrap(P.public(rt, ring.encode(v, rt.frac_bits)), v)
    if pb is not None:
        return wrap(mul_public(rt, share_of(a), pb))
    if pa is not None:
        return wrap(mul_public(rt, share_of(b), pa))
    if a is b:
        return wrap(square(rt, share_of(a)))
    out = P.mul(rt, share_of(a), share_of(b))
    checks.product(rt, "mul", share_of(a), share_of(b), {}, out, None, "elementwise product")
    return wrap(out)


def square(rt: P.Runtime, s: torch.Tensor, what: str = "square") -> torch.Tensor:
    """Fixed-point square of shares (`P.square_fixed`), |x| < 2^15 checked in the range-check mode."""
    checks.square(rt, s, what)
    return P.square_fixed(rt, s)


def bilinear_fixed(rt: P.Runtime, op: str, x, y, params: dict | None = None) -> torch.Tensor:
    """Fixed-point bilinear map where either operand may be public (checked in the range-check mode)."""
    params = params or {}
    px, py = public_value(x), public_value(y)
    if px is not None and py is not None:
        raise ProtocolError("bilinear op on two public values")
    xs = share_of(x) if px is None else ring.encode(px, rt.frac_bits)
    ys = share_of(y) if py is None else ring.encode(py, rt.frac_bits)
    if px is None and py is None:
        out = P.product(rt, op, xs, ys, params)
    else:
        out = P.truncate(rt, ring.bilinear(op, xs, ys, params))
    checks.product(rt, op, xs, ys, params, out, "x" if px is not None else "y" if py is not None else None,
                   f"product ({op})")
    return out


def combine(rt, a, b, alpha) -> torch.Tensor:
    """Shares of a + alpha * b."""
    return to_share(rt, a) + scaled(rt, b, alpha)


def scaled(rt, b, alpha) -> torch.Tensor:
    if alpha == 1:
        return to_share(rt, b)
    if alpha == -1:
        return -to_share(rt, b)
    if is_shared(b):
        return mul_public(rt, share_of(b), alpha)
    return encode_public(rt, torch.as_tensor(b, dtype=torch.float64) * alpha)


def reduce(rt, s: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == 0:
        return s
    if reduction == 1:
        return P.div_public(rt, s.sum(), s.numel())
    return s.sum()


def pair(v) -> tuple[int, int]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (int(v[0]), int(v[-1]))


def windows(s: torch.Tensor, k, st, pad) -> torch.Tensor:
    if pad[0] or pad[1]:
        s = torch.nn.functional.pad(s, (pad[1], pad[1], pad[0], pad[0]))
    return s.unfold(2, k[0], st[0]).unfold(3, k[1], st[1])


def scalar(v) -> float | None:
    """A public real scalar operand as a float (None if it is not one)."""
    v = public_value(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad:
        return float(v.reshape(()))
    return None

