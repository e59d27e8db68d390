"""`MPCTensor`: a secret-shared tensor that ordinary torch.nn modules, losses, autograd and
optimizers run on, through ``__torch_dispatch__``.

Each party holds an MPCTensor whose ``_share`` is its additive share (int64, fixed point with
the runtime's ``frac_bits``). To PyTorch it looks like a float32 CPU tensor; every aten op that
reaches it is implemented by a protocol (or locally, when linear). Values are never revealed
implicitly: ``.item()``, printing values or boolean tests raise; use `MPCTensor.reveal`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map

from veil.mpc import approx, ring
from veil.mpc import primitives as P
from veil.mpc.errors import ProtocolError

aten = torch.ops.aten


class _Store:
    """Identity and write generation of one share storage, shared by a tensor and its views.

    Inside ``__torch_dispatch__`` views of the int64 shares do not share torch's version counter
    with their base, so writes are counted here: every in-place write through any tensor that
    aliases the storage bumps ``gen``, which invalidates the values derived from the old
    contents (`_Derived`) in the base and in every view alike.
    """

    __slots__ = ("gen",)

    def __init__(self) -> None:
        self.gen = 0


class _Derived:
    """An attribute derived from a tensor's current share contents (a cache, never a source of truth).

    Reads give None once the share was rebound or its storage written through any alias, so a
    public value or an Adam view can never describe contents that changed under it.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_derived" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        entry = obj.__dict__.get(self.slot)
        if entry is None:
            return None
        ring_, store, gen, value = entry
        if ring_ is not obj._ring or store is not obj._store or store.gen != gen:
            return None
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = None if value is None else (obj._ring, obj._store, obj._store.gen, value)


class MPCTensor(torch.Tensor):
    """This party's share of a secret tensor (a wrapper tensor subclass).

    ``_share`` is the int64 share (frac_bits fixed point). Views alias their base as in torch:
    a view op returns a wrapper around a view of the same share storage (with the same
    `_Store`), and in-place ops write into the share storage, so ``w[0].zero_()``, slice
    assignment and ``index_put_`` change the base, and writes to the base show in its views.

    Derived attributes (`_Derived`, dropped by any write): ``_pub``, the plaintext value when it
    is public; for torch.optim.Adam (see "Adam" below) ``_hp = (M, w)``, meaning the value is the
    public M times w, w shared with 2*frac_bits fractional bits, and ``_den = (inv, mult, add)``,
    meaning the value is mult * sqrt(w) + add with inv the shares of 1/sqrt(w); ``_mask`` and
    ``_softmax``, what a ReLU or log-softmax backward needs.
    """

    _ring: torch.Tensor
    _store: _Store
    _pub = _Derived()
    _hp = _Derived()
    _den = _Derived()
    _mask = _Derived()
    _softmax = _Derived()

    @staticmethod
    def __new__(cls, share: torch.Tensor, requires_grad: bool = False, dtype: torch.dtype = torch.float32,
                store: _Store | None = None):
        return torch.Tensor._make_wrapper_subclass(
            cls, share.shape, dtype=dtype, device=share.device, requires_grad=requires_grad
        )

    def __init__(self, share: torch.Tensor, requires_grad: bool = False, dtype: torch.dtype = torch.float32,
                 store: _Store | None = None):
        if share.dtype != torch.int64:
            raise ProtocolError("shares are int64 ring elements")
        self._ring = share
        self._store = store if store is not None else _Store()

    @property
    def _share(self) -> torch.Tensor:
        return self._ring

    @property
    def data(self) -> torch.Tensor:
        """The tensor without autograd history (an alias, as in torch)."""
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new) -> None:
        """``p.data = value``: this tensor now holds shares of ``value`` (shares, or a public value)."""
        if tuple(new.shape) != tuple(self.shape):
            raise ProtocolError(f".data = tensor of shape {tuple(new.shape)} on a tensor of shape {tuple(self.shape)}")
        if isinstance(new, MPCTensor):
            self._ring, self._store, self._pub = new._ring, new._store, new._pub
            return
        rt = P.current()
        pub = new.detach().to(torch.float32)
        self._ring, self._store = P.public(rt, ring.encode(pub, rt.frac_bits)), _Store()
        self._pub = pub

    def __repr__(self) -> str:
        return f"MPCTensor(shape={tuple(self.shape)}, share of party {P.current().rank})"

    def __tensor_flatten__(self):
        return ["_share"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return MPCTensor(inner["_share"])

    def reveal(self, to: int | None = None) -> torch.Tensor | None:
        """Plaintext value for party ``to`` (None for every other party), or for all if to is None."""
        rt = P.current()
        v = P.reveal_ring(rt, self._share.detach(), to)
        return None if v is None else ring.decode(v, rt.frac_bits)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func) or HANDLERS.get(func.overloadpacket)
        if handler is None:
            raise ProtocolError(f"veil.mpc does not implement {func} on secret-shared tensors")
        out = handler(P.current(), func, *args, **kwargs)
        # outer wrappers of views share their base's (empty) storage, in-place ops return their
        # input, as for TwoTensor: torch's own aliasing checks see what the shares do
        return return_and_correct_aliasing(func, args, kwargs, out)


def share(value: torch.Tensor | None, src: int, shape=None, requires_grad: bool = False) -> MPCTensor:
    """Party ``src`` secret-shares its plaintext ``value`` (the others pass None)."""
    rt = P.current()
    enc = ring.encode(value.detach(), rt.frac_bits) if rt.rank == src else None
    return MPCTensor(P.share_ring(rt, enc, src, shape), requires_grad=requires_grad)


def from_public(value: torch.Tensor | float, like: torch.Tensor | None = None) -> MPCTensor:
    """Trivial sharing of a value every party knows (party 0 holds it)."""
    rt = P.current()
    v = torch.as_tensor(value, dtype=torch.float32)
    if like is not None:
        v = v.expand(like.shape).contiguous()
    t = MPCTensor(P.public(rt, ring.encode(v, rt.frac_bits)))
    t._pub = v
    return t


# ---- helpers -----------------------------------------------------------------------------


def _isM(x) -> bool:
    return isinstance(x, MPCTensor)


def _sh(x) -> torch.Tensor:
    return x._share


def _W(share: torch.Tensor, pub: torch.Tensor | None = None, store: _Store | None = None) -> MPCTensor:
    """Wrap a share; ``store`` makes the result an alias of the tensor that owns that storage."""
    t = MPCTensor(share, store=store)
    t._pub = pub
    return t


def _aliases(out: torch.Tensor, share: torch.Tensor) -> bool:
    """Whether ``out`` is a view of the storage of ``share``."""
    return out.numel() > 0 and out.untyped_storage().data_ptr() == share.untyped_storage().data_ptr()


def _view_of(out: torch.Tensor, src, pub=None) -> MPCTensor:
    """Wrap the result of an op on ``src``'s share, aliasing ``src`` if the op returned a view."""
    store = src._store if _isM(src) and _aliases(out, _sh(src)) else None
    return _W(out, pub, store)


def _write(x: MPCTensor, share: torch.Tensor) -> MPCTensor:
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


def _public_value(x):
    """Plain value of a public operand (tensor, python number, or MPCTensor known to be public)."""
    if _isM(x):
        return x._pub
    return x


def _is_integer(v) -> bool:
    if isinstance(v, bool | int):
        return True
    return isinstance(v, torch.Tensor) and not v.is_floating_point()


def _enc_pub(rt: P.Runtime, v) -> torch.Tensor:
    """Shares of a public real operand."""
    return P.public(rt, ring.encode(torch.as_tensor(v, dtype=torch.float64), rt.frac_bits))


def _to_share(rt: P.Runtime, x) -> torch.Tensor:
    return _sh(x) if _isM(x) else _enc_pub(rt, x)


def _reciprocal_integer(v) -> int | None:
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


def _mul_public(rt: P.Runtime, s: torch.Tensor, v) -> torch.Tensor:
    """Shares times a public value: integers stay exact, 1/n is an exact division by n, other
    reals are encoded with frac_bits fractional bits then truncated."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point():
        v = float(v)
    if _is_integer(v):
        return s * (torch.as_tensor(v).to(torch.int64) if isinstance(v, torch.Tensor) else int(v))
    if isinstance(v, float) and float(v).is_integer() and abs(v) < 2**40:
        return s * int(v)
    d = _reciprocal_integer(v)
    if d is not None:
        return P.div_public(rt, s, d)
    vt = torch.as_tensor(v, dtype=torch.float64)
    top = float(vt.abs().max()) if vt.numel() else 0.0
    if not math.isfinite(top):
        raise ProtocolError("cannot multiply by a non-finite public value")
    # v = m / 2^k with m of frac_bits significant bits: relative error 2^-frac_bits whatever |v|
    # (encoding v itself with frac_bits fractional bits would lose all precision for |v| << 1)
    k = rt.frac_bits + (max(0, math.ceil(-math.log2(top))) if 0.0 < top < 1.0 else 0)
    return P.div_public(rt, s * ring.encode(vt, k), 1 << k)


def _div_public(rt: P.Runtime, s: torch.Tensor, v) -> torch.Tensor:
    """Shares divided by a public value: exact division for integers, else times 1/v."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.reshape(()).item()
    integral = isinstance(v, bool | int) or (isinstance(v, float) and v.is_integer())
    if integral and v != 0 and abs(v) <= P.MAX_DIVISOR:
        return P.div_public(rt, s, int(v))
    return _mul_public(rt, s, 1.0 / torch.as_tensor(v, dtype=torch.float64))


def _mul(rt: P.Runtime, a, b) -> MPCTensor:
    pa, pb = _public_value(a), _public_value(b)
    if pa is not None and pb is not None:
        v = torch.as_tensor(pa) * torch.as_tensor(pb)
        return _W(P.public(rt, ring.encode(v, rt.frac_bits)), v)
    if pb is not None:
        return _W(_mul_public(rt, _sh(a), pb))
    if pa is not None:
        return _W(_mul_public(rt, _sh(b), pa))
    if a is b:
        return _W(P.truncate(rt, P.square(rt, _sh(a))))
    return _W(P.mul(rt, _sh(a), _sh(b)))


def _bil(rt: P.Runtime, op: str, x, y, params: dict | None = None) -> torch.Tensor:
    """Fixed-point bilinear map where either operand may be public."""
    params = params or {}
    px, py = _public_value(x), _public_value(y)
    if px is None and py is None:
        return P.truncate(rt, P.beaver(rt, op, _sh(x), _sh(y), params))
    xs = _sh(x) if px is None else ring.encode(px, rt.frac_bits)
    ys = _sh(y) if py is None else ring.encode(py, rt.frac_bits)
    if px is not None and py is not None:
        raise ProtocolError("bilinear op on two public values")
    return P.truncate(rt, ring.bilinear(op, xs, ys, params))


# ---- handlers ----------------------------------------------------------------------------

HANDLERS: dict = {}


def _reg(*ops) -> Callable:
    def deco(fn):
        for op in ops:
            HANDLERS[op] = fn
        return fn

    return deco


_STRUCTURAL = [
    aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand,
    aten.squeeze, aten.unsqueeze, aten.slice, aten.select, aten.clone, aten.detach, aten.alias,
    aten.narrow, aten.contiguous, aten.flatten, aten.unflatten, aten.repeat, aten.flip, aten.roll,
    aten.index_select, aten.movedim, aten.expand_as, aten.view_as, aten.lift_fresh, aten.unfold,
    aten.diagonal, aten.gather, aten.index,
]


@_reg(*_STRUCTURAL)
def _structural(rt, func, *args, **kwargs):
    kwargs.pop("memory_format", None)
    out = func(*tree_map(lambda a: _sh(a) if _isM(a) else a, args), **kwargs)
    src = args[0]
    pub = None
    if _isM(src) and src._pub is not None:
        pub = func(src._pub, *args[1:], **kwargs)
    if isinstance(out, list | tuple):
        return type(out)(_view_of(o, src) for o in out)
    res = _view_of(out, src, pub)
    if func.overloadpacket in (aten.detach, aten.alias) and _isM(src):
        for attr in _CARRIED:
            if hasattr(src, attr):
                setattr(res, attr, getattr(src, attr))
    return res


_CARRIED = ("_mask", "_softmax")


@_reg(aten.split, aten.split_with_sizes, aten.unbind, aten.chunk)
def _multi(rt, func, x, *args, **kwargs):
    return [_view_of(o, x) for o in func(_sh(x), *args, **kwargs)]


@_reg(aten._to_copy)
def _to_copy(rt, func, x, **kwargs):
    return _W(_sh(x).clone(), x._pub)


@_reg(aten.cat, aten.stack)
def _cat(rt, func, tensors, dim=0):
    return _W(func([_to_share(rt, t) for t in tensors], dim))


@_reg(aten.constant_pad_nd)
def _pad(rt, func, x, pad, value=0):
    if value:
        raise ProtocolError("only zero padding")
    return _W(func(_sh(x), pad, 0))


@_reg(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor, aten.rsub.Scalar)
def _add(rt, func, a, b, alpha=1):
    if func in (aten.rsub.Tensor, aten.rsub.Scalar):
        return _W(_combine(rt, b, a, -alpha))
    if func in (aten.sub.Tensor, aten.sub.Scalar):
        return _W(_combine(rt, a, b, -alpha))
    return _W(_combine(rt, a, b, alpha))


def _combine(rt, a, b, alpha) -> torch.Tensor:
    """Shares of a + alpha * b."""
    return _to_share(rt, a) + _scaled(rt, b, alpha)


def _scaled(rt, b, alpha) -> torch.Tensor:
    if alpha == 1:
        return _to_share(rt, b)
    if alpha == -1:
        return -_to_share(rt, b)
    if _isM(b):
        return _mul_public(rt, _sh(b), alpha)
    return _enc_pub(rt, torch.as_tensor(b, dtype=torch.float64) * alpha)


@_reg(aten.neg)
def _neg(rt, func, x):
    return _W(-_sh(x), None if x._pub is None else -x._pub)


@_reg(aten.mul.Tensor, aten.mul.Scalar)
def _mulh(rt, func, a, b):
    return _mul(rt, a, b)


@_reg(aten.div.Tensor, aten.div.Scalar)
def _div(rt, func, a, b):
    pb = _public_value(b)
    if pb is not None:
        if not _isM(a):
            raise ProtocolError("division of a public value by a public value")
        if a._pub is not None:
            v = (a._pub.double() / torch.as_tensor(pb, dtype=torch.float64)).float()
            return _W(P.public(rt, ring.encode(v, rt.frac_bits)), v)
        return _W(_div_public(rt, _sh(a), pb))
    return _mul(rt, a, _W(approx.reciprocal(rt, _sh(b))))


@_reg(aten.sum)
def _sum(rt, func, x, dim=None, keepdim=False, dtype=None):
    s = _sh(x)
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return _W(s.sum())
    return _W(s.sum(dim, keepdim=keepdim))


@_reg(aten.mean)
def _mean(rt, func, x, dim=None, keepdim=False, dtype=None):
    s = _sh(x)
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        n, tot = s.numel(), s.sum()
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        n = math.prod(s.shape[d] for d in dims)
        tot = s.sum(dims, keepdim=keepdim)
    return _W(P.div_public(rt, tot, n))


@_reg(aten.mm, aten.bmm, aten.matmul)
def _mm(rt, func, a, b):
    return _W(_bil(rt, "matmul", a, b))


@_reg(aten.addmm)
def _addmm(rt, func, bias, a, b, beta=1, alpha=1):
    prod = _bil(rt, "matmul", a, b)
    if alpha != 1:
        prod = _mul_public(rt, prod, alpha)
    return _W(prod + _scaled(rt, bias, beta))


@_reg(aten.ones_like, aten.zeros_like, aten.empty_like, aten.full_like)
def _like(rt, func, x, fill=None, **kwargs):
    v = 1.0 if func.overloadpacket is aten.ones_like else 0.0
    if func.overloadpacket is aten.full_like:
        v = float(fill)
    pub = torch.full(tuple(x.shape), v)
    return _W(P.public(rt, ring.encode(pub, rt.frac_bits)), pub)


@_reg(aten.new_zeros, aten.new_ones, aten.new_empty)
def _new(rt, func, x, size, **kwargs):
    pub = torch.full(tuple(size), 1.0 if func.overloadpacket is aten.new_ones else 0.0)
    return _W(P.public(rt, ring.encode(pub, rt.frac_bits)), pub)


@_reg(aten.zero_, aten.fill_)
def _fill(rt, func, x, value=0.0):
    pub = torch.full(tuple(x.shape), float(_public_value(value)))
    _write(x, P.public(rt, ring.encode(pub, rt.frac_bits)))
    x._pub = pub
    return x


@_reg(aten.copy_)
def _copy(rt, func, dst, src, non_blocking=False):
    pub = _public_value(src)
    _write(dst, _to_share(rt, src).expand(dst.shape))
    dst._pub = None if pub is None else torch.as_tensor(pub, dtype=torch.float32).expand(dst.shape).clone()
    return dst


@_reg(aten.index_put_, aten.index_put)
def _index_put(rt, func, x, indices, values, accumulate=False):
    """``x[indices] = values`` (or ``+=`` with accumulate); indices are public, values may be secret."""
    if any(_isM(i) for i in indices if i is not None):
        raise ProtocolError("index_put with secret indices would reveal them; indices must be public")
    vals = _to_share(rt, values)
    if func.overloadpacket is aten.index_put_:
        out = x._ring.clone().index_put_(indices, vals, accumulate)
        return _write(x, out)
    return _W(x._ring.index_put(indices, vals, accumulate))


@_reg(aten.masked_fill_.Scalar, aten.masked_fill.Scalar, aten.masked_fill_.Tensor, aten.masked_fill.Tensor)
def _masked_fill(rt, func, x, mask, value):
    """Fill where a public boolean mask is set with a public or secret scalar value."""
    if _isM(mask):
        raise ProtocolError("masked_fill with a secret mask would reveal it; the mask must be public")
    out = torch.where(mask, _to_share(rt, value), x._ring)
    if func.overloadpacket is aten.masked_fill_:
        return _write(x, out)
    return _W(out)


def _inplace(outfn):
    def h(rt, func, x, *args, **kwargs):
        out = outfn(rt, func, x, *args, **kwargs)
        pub = out._pub
        _write(x, out._share)
        x._pub = pub
        return x

    return h


HANDLERS[aten.add_.Tensor] = _inplace(lambda rt, f, a, b, alpha=1: _W(_combine(rt, a, b, alpha)))
HANDLERS[aten.add_.Scalar] = HANDLERS[aten.add_.Tensor]
HANDLERS[aten.sub_.Tensor] = _inplace(lambda rt, f, a, b, alpha=1: _W(_combine(rt, a, b, -alpha)))
HANDLERS[aten.mul_.Tensor] = _inplace(lambda rt, f, a, b: _mul(rt, a, b))
HANDLERS[aten.mul_.Scalar] = HANDLERS[aten.mul_.Tensor]
HANDLERS[aten.div_.Tensor] = _inplace(lambda rt, f, a, b: _div(rt, aten.div.Tensor, a, b))
HANDLERS[aten.div_.Scalar] = HANDLERS[aten.div_.Tensor]


@_reg(aten.addcmul_, aten.addcmul)
def _addcmul(rt, func, x, t1, t2, value=1):
    out = _W(_to_share(rt, x) + _scaled(rt, _mul(rt, t1, t2), value))
    if func.overloadpacket is aten.addcmul_:
        return _write(x, out._share)
    return out


@_reg(aten.addcdiv_, aten.addcdiv)
def _addcdiv(rt, func, x, t1, t2, value=1):
    q = _div(rt, aten.div.Tensor, t1, t2)
    out = _W(_to_share(rt, x) + _scaled(rt, q, value))
    if func.overloadpacket is aten.addcdiv_:
        return _write(x, out._share)
    return out


@_reg(aten.lerp_.Scalar, aten.lerp.Scalar)
def _lerp(rt, func, x, end, weight):
    diff = _W(_to_share(rt, end) - _to_share(rt, x))
    out = _W(_to_share(rt, x) + _mul_public(rt, diff._share, float(weight)))
    if func is aten.lerp_.Scalar:
        return _write(x, out._share)
    return out


@_reg(aten.conj, aten.resolve_conj, aten.resolve_neg, aten.positive)
def _ident(rt, func, x):
    return x


# ---- activations and losses --------------------------------------------------------------


@_reg(aten.relu)
def _relu(rt, func, x):
    out, mask = P.relu(rt, _sh(x))
    res = _W(out)
    res._mask = mask
    return res


@_reg(aten.relu_)
def _relu_(rt, func, x):
    out, mask = P.relu(rt, _sh(x))
    _write(x, out)
    x._mask = mask
    return x


@_reg(aten.threshold_backward)
def _relu_bw(rt, func, grad, out, threshold):
    mask = getattr(out, "_mask", None)
    if mask is None:
        return _W(P.beaver(rt, "mul", _sh(grad), P.ge_zero(rt, _sh(out) - 1)))
    return _W(mask.apply(rt, _to_share(rt, grad)))


@_reg(aten.pow.Tensor_Scalar)
def _pow(rt, func, x, e):
    if e == 2:
        return _W(P.truncate(rt, P.square(rt, _sh(x))))
    if e == 1:
        return x
    if e == 0:
        return from_public(1.0, x)
    if isinstance(e, int) and e > 2:
        y = x
        for _ in range(e - 1):
            y = _mul(rt, y, x)
        return y
    if e == 0.5:
        return _W(approx.sqrt(rt, _sh(x)))
    if e == -0.5:
        return _W(approx.inv_sqrt(rt, _sh(x)))
    if e == -1:
        return _W(approx.reciprocal(rt, _sh(x)))
    raise ProtocolError(f"pow with exponent {e} is not supported")


@_reg(aten.square)
def _square(rt, func, x):
    return _W(P.truncate(rt, P.square(rt, _sh(x))))


def _reduce(rt, s: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == 0:
        return s
    if reduction == 1:
        return P.div_public(rt, s.sum(), s.numel())
    return s.sum()


@_reg(aten.mse_loss)
def _mse(rt, func, x, target, reduction=1):
    d = _to_share(rt, x) - _to_share(rt, target)
    return _W(_reduce(rt, P.truncate(rt, P.square(rt, d)), reduction))


@_reg(aten.mse_loss_backward)
def _mse_bw(rt, func, grad, x, target, reduction=1):
    d = _W(_to_share(rt, x) - _to_share(rt, target))
    pg = _public_value(grad)
    g = _sh(_mul(rt, grad, d)) * 2 if pg is None else _mul_public(rt, d._share, torch.as_tensor(pg) * 2)
    return _W(P.div_public(rt, g, x.numel()) if reduction == 1 else g)


@_reg(aten.exp)
def _exp(rt, func, x):
    return _W(approx.exp(rt, _sh(x)))


@_reg(aten.log)
def _log(rt, func, x):
    return _W(approx.log(rt, _sh(x)))


@_reg(aten.sqrt)
def _sqrt(rt, func, x):
    return _W(approx.sqrt(rt, _sh(x)))


@_reg(aten.rsqrt)
def _rsqrt(rt, func, x):
    return _W(approx.inv_sqrt(rt, _sh(x)))


@_reg(aten.reciprocal)
def _recip(rt, func, x):
    return _W(approx.reciprocal(rt, _sh(x)))


@_reg(aten.sigmoid)
def _sigmoid(rt, func, x):
    return _W(approx.sigmoid(rt, _sh(x)))


@_reg(aten.sigmoid_backward)
def _sigmoid_bw(rt, func, grad, out):
    one_minus = _W(_enc_pub(rt, torch.ones(out.shape)) - _sh(out))
    return _mul(rt, grad, _mul(rt, out, one_minus))


@_reg(aten._softmax)
def _softmax(rt, func, x, dim, half_to_float=False):
    return _W(approx.softmax(rt, _sh(x), dim))


@_reg(aten._softmax_backward_data)
def _softmax_bw(rt, func, grad, out, dim, dtype):
    gy = _mul(rt, grad, out)
    return _W(_sh(gy) - _sh(_mul(rt, out, _W(_sh(gy).sum(dim, keepdim=True).expand(out.shape)))))


@_reg(aten._log_softmax)
def _log_softmax(rt, func, x, dim, half_to_float=False):
    xs = _sh(x).movedim(dim, -1)
    m, _ = P.max_last(rt, xs)
    z = xs - m.unsqueeze(-1)
    e = approx.exp(rt, z)
    tot = e.sum(-1, keepdim=True)
    lse = approx.log(rt, tot)
    out = _W((z - lse).movedim(-1, dim))
    r = approx.reciprocal(rt, tot)
    out._softmax = P.mul(rt, e, r.expand_as(e)).movedim(-1, dim)
    return out


@_reg(aten._log_softmax_backward_data)
def _log_softmax_bw(rt, func, grad, out, dim, dtype):
    sm = getattr(out, "_softmax", None)
    if sm is None:
        sm = approx.exp(rt, _sh(out))
    gsum = _to_share(rt, grad).sum(dim, keepdim=True).expand(out.shape)
    return _W(_to_share(rt, grad) - P.mul(rt, sm, gsum))


@_reg(aten.nll_loss_forward)
def _nll(rt, func, x, target, weight, reduction, ignore_index):
    if _isM(target) or weight is not None:
        raise ProtocolError("nll_loss needs public class indices and no weights; use one-hot targets")
    onehot = torch.nn.functional.one_hot(target, x.shape[-1]).to(torch.int64)
    picked = -(_sh(x) * onehot).sum(-1)
    total = _W(torch.tensor(0, dtype=torch.int64))
    return _W(_reduce(rt, picked, reduction)), total


@_reg(aten.nll_loss_backward)
def _nll_bw(rt, func, grad, x, target, weight, reduction, ignore_index, total_weight):
    onehot = torch.nn.functional.one_hot(target, x.shape[-1]).to(torch.int64)
    g = -onehot * (_to_share(rt, grad) if reduction == 0 else _to_share(rt, grad).reshape(()))
    if reduction == 0:
        g = -onehot * _to_share(rt, grad).unsqueeze(-1)
    if reduction == 1:
        g = P.div_public(rt, g, x.shape[0])
    return _W(g)


# ---- convolution and pooling -------------------------------------------------------------


@_reg(aten.convolution)
def _conv(rt, func, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    if transposed or groups != 1 or any(d != 1 for d in dilation):
        raise ProtocolError("only plain convolutions (groups=1, dilation=1) are supported")
    params = {"stride": list(stride), "padding": list(padding)}
    out = _bil(rt, "conv2d", x, w, params)
    if bias is not None:
        out = out + _to_share(rt, bias).reshape(1, -1, 1, 1)
    return _W(out)


@_reg(aten.convolution_backward)
def _conv_bw(rt, func, grad, x, w, bias_sizes, stride, padding, dilation, transposed, outpad, groups, mask):
    params = {"stride": list(stride), "padding": list(padding)}
    gi = gw = gb = None
    if mask[0]:
        gi = _W(_bil(rt, "conv2d_gi", grad, w, {**params, "input_shape": list(x.shape)}))
    if mask[1]:
        gw = _W(_bil(rt, "conv2d_gw", x, grad, {**params, "weight_shape": list(w.shape)}))
    if mask[2]:
        gb = _W(_to_share(rt, grad).sum((0, 2, 3)))
    return gi, gw, gb


def _pair(v) -> tuple[int, int]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (int(v[0]), int(v[-1]))


def _windows(s: torch.Tensor, k, st, pad) -> torch.Tensor:
    if pad[0] or pad[1]:
        s = torch.nn.functional.pad(s, (pad[1], pad[1], pad[0], pad[0]))
    return s.unfold(2, k[0], st[0]).unfold(3, k[1], st[1])


@_reg(aten.avg_pool2d)
def _avgpool(rt, func, x, kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True, div=None):
    k = _pair(kernel)
    st = _pair(stride) if stride else k
    pad = _pair(padding)
    if ceil_mode or (not count_include_pad and (pad[0] or pad[1])):
        raise ProtocolError("avg_pool2d: ceil_mode / count_include_pad=False not supported")
    tot = _windows(_sh(x), k, st, pad).sum((-1, -2))
    return _W(P.div_public(rt, tot, div or k[0] * k[1]))


@_reg(aten.avg_pool2d_backward)
def _avgpool_bw(rt, func, grad, x, kernel, stride, padding, ceil_mode, count_include_pad, div):
    k = _pair(kernel)
    st = _pair(stride) if stride else k
    pad = _pair(padding)
    g = _to_share(rt, grad)
    n, c, oh, ow = g.shape
    cols = g.permute(0, 2, 3, 1)[..., None, None].expand(n, oh, ow, c, k[0], k[1])
    tot = ring.fold(cols, x.shape, k[0], k[1], st, pad)
    return _W(P.div_public(rt, tot, div or k[0] * k[1]))


@_reg(aten.max_pool2d_with_indices)
def _maxpool(rt, func, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    k = _pair(kernel)
    st = _pair(stride) if stride else k
    pad = _pair(padding)
    if ceil_mode or _pair(dilation) != (1, 1):
        raise ProtocolError("max_pool2d: ceil_mode / dilation not supported")
    if pad[0] or pad[1]:
        raise ProtocolError("max_pool2d: padding not supported (zero padding would change the max)")
    win = _windows(_sh(x), k, st, pad)
    n, c, oh, ow = win.shape[:4]
    vals, onehot = P.max_last(rt, win.reshape(n, c, oh, ow, k[0] * k[1]))
    idx = MPCTensor(onehot, dtype=torch.int64)
    idx._window = (k, st, pad)
    return _W(vals), idx


@_reg(aten.max_pool2d_with_indices_backward)
def _maxpool_bw(rt, func, grad, x, kernel, stride, padding, dilation, ceil_mode, indices):
    k, st, pad = indices._window
    onehot = indices._share
    g = _to_share(rt, grad)
    prod = P.beaver(rt, "mul", g.unsqueeze(-1).expand(onehot.shape).contiguous(), onehot)
    n, c, oh, ow = g.shape
    cols = prod.reshape(n, c, oh, ow, k[0], k[1]).permute(0, 2, 3, 1, 4, 5)
    return _W(ring.fold(cols, x.shape, k[0], k[1], st, pad))


@_reg(aten.max.dim, aten.amax)
def _max(rt, func, x, dim=-1, keepdim=False):
    if isinstance(dim, list | tuple):
        if len(dim) != 1:
            raise ProtocolError("max over one dimension at a time")
        dim = dim[0]
    v, onehot = P.max_last(rt, _sh(x).movedim(dim, -1))
    if keepdim:
        v = v.unsqueeze(dim)
    if func.overloadpacket is aten.amax:
        return _W(v)
    idx = MPCTensor(onehot, dtype=torch.int64)
    return _W(v), idx


def argmax_onehot(x: MPCTensor, dim: int = -1) -> MPCTensor:
    """Secret one-hot (integer 0/1 entries, not fixed point) of an argmax along ``dim``."""
    rt = P.current()
    _, onehot = P.max_last(rt, _sh(x).movedim(dim, -1))
    return MPCTensor(onehot.movedim(-1, dim), dtype=torch.int64)


# ---- normalisation and dropout -----------------------------------------------------------


@_reg(aten._native_batch_norm_legit_no_training)
def _bn_eval(rt, func, x, weight, bias, mean, var, momentum, eps):
    out = _bn(rt, x, weight, bias, mean, var, eps)
    empty = _W(torch.zeros(0, dtype=torch.int64))
    return out, empty, empty


@_reg(aten.native_batch_norm, aten._native_batch_norm_legit)
def _bn_native(rt, func, x, weight, bias, mean, var, training, momentum, eps):
    if training:
        raise ProtocolError("BatchNorm in training mode is not supported under MPC; call model.eval()")
    out = _bn(rt, x, weight, bias, mean, var, eps)
    empty = _W(torch.zeros(0, dtype=torch.int64))
    return out, empty, empty


def _bn(rt, x, weight, bias, mean, var, eps) -> MPCTensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    pv = _public_value(var)
    if pv is not None:
        inv = _W(_enc_pub(rt, 1.0 / torch.sqrt(torch.as_tensor(pv, dtype=torch.float64) + eps)), None)
        inv._pub = (1.0 / torch.sqrt(torch.as_tensor(pv, dtype=torch.float64) + eps)).float()
    else:
        inv = _W(approx.inv_sqrt(rt, _sh(var) + _enc_pub(rt, torch.full(tuple(var.shape), eps))))
    scale = inv if weight is None else _mul(rt, inv, weight)
    centered = _W(_to_share(rt, x) - _to_share(rt, mean).reshape(shape))
    sc = _W(_sh(scale).reshape(shape), None if scale._pub is None else scale._pub.reshape(shape))
    out = _mul(rt, centered, _W(_sh(sc).expand(x.shape).contiguous(), None if sc._pub is None
                                else sc._pub.expand(x.shape)))
    if bias is not None:
        out = _W(_sh(out) + _to_share(rt, bias).reshape(shape))
    return out


@_reg(aten.native_dropout)
def _dropout(rt, func, x, p, train):
    if not train or p == 0:
        return x, torch.ones(tuple(x.shape), dtype=torch.bool)
    u = rt.common.random(tuple(x.shape))
    keep = (u & ((1 << 24) - 1)).double() >= p * (1 << 24)
    return _W(_mul_public(rt, _sh(x) * keep.to(torch.int64), 1.0 / (1.0 - p))), keep


@_reg(aten.bernoulli_)
def _bernoulli_(rt, func, x, p=0.5, generator=None):
    """Public random 0/1 values (e.g. dropout masks), identical in every party (common key)."""
    u = rt.common.random(tuple(x.shape))
    keep = ((u & ((1 << 24) - 1)).double() < float(p) * (1 << 24)).float()
    _write(x, P.public(rt, ring.encode(keep, rt.frac_bits)))
    x._pub = keep
    return x


@_reg(aten.native_dropout_backward)
def _dropout_bw(rt, func, grad, mask, scale):
    return _W(_mul_public(rt, _to_share(rt, grad) * mask.to(torch.int64), float(scale)))


@_reg(aten.is_same_size)
def _same_size(rt, func, a, b):
    return tuple(a.shape) == tuple(b.shape)


@_reg(aten._local_scalar_dense, aten.eq, aten.ne, aten.gt, aten.lt, aten.ge, aten.le, aten.allclose)
def _forbidden(rt, func, *args, **kwargs):
    raise ProtocolError(f"{func} would reveal a secret value; use MPCTensor.reveal(to=...)")


# ---- Adam: moment estimates and their square roots with extended precision --------------
#
# torch.optim.Adam (single-tensor path, which torch takes for tensor subclasses) runs
#   m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
#   d = (v.sqrt() / c).add_(eps); p.addcdiv_(m, d, value=-s)
# lerp_(g, a) on m keeps the same kind of view as below (M' = M (1 - a) + a = 1 - beta1^t), so the
# bias-corrected first moment is not rounded to 2^-frac_bits and then amplified by 1/(1 - beta1^t).
# With frac_bits fixed point, v ~ g^2 underflows. Instead, a tensor updated by addcmul_(g, g)
# keeps the exact view _hp = (M, w): value = M * w with M public and w, the *normalised* average
# of the squares, shared with 2*frac_bits fractional bits. mul_ by a public c only changes M;
# addcmul_(g, g, value=a) sets M' = M + a and w' = w + (a / M') (g^2 - w), g^2 being the exact
# (untruncated) square. For Adam, M is exactly 1 - beta2^t, so w is the bias-corrected v_hat,
# of the order of g^2 and never rescaled by 1 - beta2 = 10^-3. sqrt of such a tensor uses the
# wide-range `approx.inv_sqrt_wide` and keeps _den = (1/sqrt(w), sqrt(M), 0); division by and
# addition of public scalars update mult/add; addcdiv_ by such a denominator multiplies by the
# reciprocal directly. Every ordinary write to the tensor drops these views (the ``_share``
# setter), and every tensor still holds a correct ordinary share, so other ops are unaffected.
# Only public constants (M, a, c, eps) decide which path is taken; nothing is opened.


def _scalar(v) -> float | None:
    """A public real scalar operand as a float (None if it is not one)."""
    v = _public_value(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad:
        return float(v.reshape(()))
    return None


_mul_inplace = HANDLERS[aten.mul_.Tensor]


def _mul_(rt, func, x, b):
    c = _scalar(b)
    hp = x._hp if _isM(x) else None
    if hp is None or c is None or c <= 0:
        return _mul_inplace(rt, func, x, b)
    m, w = hp
    _write(x, _mul_public(rt, _sh(x), c))
    x._hp = (m * c, w)
    return x


HANDLERS[aten.mul_.Tensor] = _mul_
HANDLERS[aten.mul_.Scalar] = _mul_
_addcmul_generic = _addcmul


@_reg(aten.addcmul_)
def _addcmul_hp(rt, func, x, t1, t2, value=1):
    a = _scalar(value)
    if not (_isM(x) and _isM(t1) and t1 is t2 and _public_value(t1) is None and a is not None and a > 0):
        return _addcmul_generic(rt, func, x, t1, t2, value)
    return _ema(rt, x, P.square(rt, _sh(t1)), a, 1.0)  # exact g^2, 2*frac_bits fractional bits


def _ema(rt, x, e2: torch.Tensor, a: float, keep: float) -> MPCTensor:
    """x <- keep * x + a * e (e given by e2 with 2*frac_bits bits), keeping the exact view _hp."""
    if x._hp is not None:
        m, w = x._hp
    elif x._pub is not None and not bool(x._pub.any()):
        m, w = 0.0, None
    else:
        m, w = 1.0, _sh(x) * rt.scale
    m2 = m * keep + a
    if w is None or m == 0:
        w2 = e2
    else:
        # (e - w) a/m2 in two halves: the truncated values stay below 2^(3f/2 + 16) |e - w| (a/m2),
        # not 2^(2f + 16); the rounding added, a/m2 * 2^(-3f/2), is far below w's resolution needs
        h = rt.frac_bits // 2
        w2 = w + P.truncate(rt, P.truncate(rt, e2 - w, h) * round(a / m2 * rt.scale), rt.frac_bits - h)
    _write(x, _mul_public(rt, P.truncate(rt, w2), m2))
    x._hp = (m2, w2)
    return x


_lerp_generic = _lerp


@_reg(aten.lerp_.Scalar)
def _lerp_hp(rt, func, x, end, weight):
    a = _scalar(weight)
    if not (_isM(x) and _isM(end) and _public_value(end) is None and a is not None and 0 < a <= 1):
        return _lerp_generic(rt, func, x, end, weight)
    return _ema(rt, x, _sh(end) * rt.scale, a, 1.0 - a)


_sqrt_generic = HANDLERS[aten.sqrt]


@_reg(aten.sqrt)
def _sqrt_hp(rt, func, x):
    if x._hp is None:
        return _sqrt_generic(rt, func, x)
    m, w = x._hp
    inv, root = approx.inv_sqrt_wide(rt, w)
    k = math.sqrt(m)
    out = _W(_mul_public(rt, root, k))
    out._den = (inv, k, 0.0)
    return out


def _div_hp(rt, func, a, b):
    out = _div(rt, func, a, b)
    c = _scalar(b)
    if _isM(a) and a._den is not None and c is not None and c > 0:
        inv, k, add = a._den
        out._den = (inv, k / c, add / c)
    return out


HANDLERS[aten.div.Tensor] = _div_hp
HANDLERS[aten.div.Scalar] = _div_hp
_add_generic = {op: HANDLERS[op] for op in (aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar)}


def _add_hp(rt, func, a, b, alpha=1):
    den = a._den if _isM(a) else None
    out = _add_generic[func](rt, func, a, b, alpha)
    e = _scalar(b)
    if den is not None and e is not None and _scalar(alpha) is not None:
        inv, k, add = den
        out._den = (inv, k, add + e * float(alpha))
    return out


for _op in _add_generic:
    HANDLERS[_op] = _add_hp
_addcdiv_generic = _addcdiv
EPS_IGNORED = 2.0**-10  # relative change of the denominator below which a public addend is dropped


@_reg(aten.addcdiv_, aten.addcdiv)
def _addcdiv_hp(rt, func, x, t1, t2, value=1):
    den = t2._den if _isM(t2) else None
    v = _scalar(value)
    if den is None or v is None or not _isM(t1) or _public_value(t1) is not None:
        return _addcdiv_generic(rt, func, x, t1, t2, value)
    inv, k, add = den  # t2 = k sqrt(w) + add, inv = 1/sqrt(w) <= 2^frac_bits
    if k <= 0:
        return _addcdiv_generic(rt, func, x, t1, t2, value)
    num, scale = _sh(t1), 1.0
    if t1._hp is not None:  # Adam's first moment: M1 * w1, w1 (= bias-corrected m) more precise
        scale, w1 = t1._hp
        num = P.truncate(rt, w1)
    q = P.mul(rt, num, inv)  # t1 / sqrt(w) / scale
    r = add / k * rt.scale  # largest add / (k sqrt(w))
    if r < -0.4:
        raise ProtocolError("addcdiv: denominator may be close to zero")
    if abs(r) > EPS_IGNORED:  # t1 / (k sqrt(w) + add) = t1 / (k sqrt(w)) * 1 / (1 + add inv / k)
        if r > 99:
            raise ProtocolError("Adam eps too large for the fixed-point range (eps <= 0.0015)")
        c = round(add / k * rt.scale * rt.scale)  # 2*frac_bits: add / k may be far below 2^-frac_bits
        z = P.public(rt, torch.full_like(inv, rt.scale)) + P.truncate(rt, P.truncate(rt, inv * c))
        q = P.mul(rt, q, approx.reciprocal(rt, z))
    out = _to_share(rt, x) + _mul_public(rt, q, v * scale / k)
    if func is aten.addcdiv_.default:
        return _write(x, out)
    return _W(out)
