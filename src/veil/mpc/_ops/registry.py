"""The table from aten ops to the rules that run them on secret-shared tensors.

One file per op family registers its rules here (as DTensor's ``_ops/``). A rule may carry a
``when`` predicate over the op's arguments: predicated rules of an op are tried first (in the
order registered), then its single unconditional rule, so a specialised rule (the
extended-precision Adam moments of `adam_ops`) never depends on which module was imported first.
Rules registered for an overload (``aten.mul_.Tensor``) and for its packet (``aten.mul_``) are
both considered, the overload's first.
"""

from __future__ import annotations

from collections.abc import Callable

from veil.mpc.errors import ProtocolError

Rule = tuple[Callable[..., bool] | None, Callable]
HANDLERS: dict[object, list[Rule]] = {}


def register(*ops, when: Callable[..., bool] | None = None) -> Callable:
    """Decorator: ``fn(rt, func, *args, **kwargs)`` runs ``ops`` (when ``when(*args, **kwargs)`` holds)."""

    def deco(fn: Callable) -> Callable:
        for op in ops:
            rules = HANDLERS.setdefault(op, [])
            if when is None and any(w is None for w, _ in rules):
                raise ProtocolError(f"two unconditional rules for {op}")
            rules.append((when, fn))
        return fn

    return deco


def lookup(func, args: tuple, kwargs: dict) -> Callable | None:
    """The rule that runs ``func`` on these arguments, or None if veil.mpc does not implement it."""
    rules = HANDLERS.get(func, []) + HANDLERS.get(func.overloadpacket, [])
    for when, fn in rules:
        if when is not None and when(*args, **kwargs):
            return fn
    return next((fn for when, fn in rules if when is None), None)
