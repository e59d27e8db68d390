"""`MPCTensor`: a secret-shared tensor that ordinary torch.nn modules, losses, autograd and
optimizers run on, through ``__torch_dispatch__``.

Each party holds an MPCTensor whose ``_share`` is its additive share (int64, fixed point with
the runtime's ``frac_bits``). To PyTorch it looks like a float32 CPU tensor; every aten op that
reaches it is implemented by a protocol (or locally, when linear). Values are never revealed
implicitly: ``.item()``, printing values or boolean tests raise; use `MPCTensor.reveal`.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from veil.mpc import checks, ring
from veil.mpc import primitives as P
from veil.mpc._ops.registry import lookup
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
    is public; for torch.optim.Adam (`veil.mpc._ops.adam_ops`) ``_moment = (M, w)``, meaning the
    value is the public M times w, w shared with 2*frac_bits fractional bits, and
    ``_sqrt_view = (inv, mult, add)``, meaning the value is mult * sqrt(w) + add with inv the shares
    of 1/sqrt(w); ``_mask`` and ``_softmax``, what a ReLU or log-softmax backward needs; ``_aux``,
    values an activation's backward reuses from its forward (sign masks, sigmoids).

    Every aten op reaching the tensor runs the rule registered for it in `veil.mpc._ops`, one
    module per op family; an op without a rule raises `ProtocolError` naming it.
    """

    _ring: torch.Tensor
    _store: _Store
    _pub = _Derived()
    _moment = _Derived()
    _sqrt_view = _Derived()
    _mask = _Derived()
    _softmax = _Derived()
    _aux = _Derived()

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
        """Plaintext value for party ``to`` (None for every other party), or for all if to is None.

        In the range-check mode this is a check point first (`checks.flush`): a value computed
        from one that left its range raises `RangeError` instead of being revealed."""
        rt = P.current()
        checks.flush(rt)
        v = P.reveal_ring(rt, self._share.detach(), to)
        return None if v is None else ring.decode(v, rt.frac_bits)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = lookup(func, args, kwargs)
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


def argmax_onehot(x: MPCTensor, dim: int = -1) -> MPCTensor:
    """Secret one-hot (integer 0/1 entries, not fixed point) of an argmax along ``dim``."""
    rt = P.current()
    _, onehot = P.max_last(rt, x._share.movedim(dim, -1))
    return MPCTensor(onehot.movedim(-1, dim), dtype=torch.int64)


# the op families register their rules; they import MPCTensor from here, so they come last
from veil.mpc._ops import (  # noqa: E402, F401
    activation_ops,
    adam_ops,
    compare_ops,
    loss_ops,
    matrix_ops,
    norm_ops,
    pointwise_ops,
    pool_ops,
    reduction_ops,
    view_ops,
)
