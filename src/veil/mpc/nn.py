"""Sharing models and datasets: the model owner shares weights, data owners share rows/columns.

A shared model is the user's own ``torch.nn.Module`` whose parameters (and floating buffers,
e.g. BatchNorm running statistics) were replaced by `MPCTensor` shares, so the user's forward,
loss and ``torch.optim`` optimizer run unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from veil.mpc import primitives as P
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor, share


def share_module(model: nn.Module, src: int) -> nn.Module:
    """Replace every parameter and floating buffer of ``model`` by shares of party ``src``'s values.

    Every party must pass a module of the same architecture; only ``src``'s values are used
    (the others' are ignored and never leave their process).
    """
    rt = P.current()
    done: dict[int, torch.Tensor] = {}  # tied parameters (one tensor in several modules) stay one
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in done:
                t = share(p.data if rt.rank == src else None, src, shape=tuple(p.shape))
                done[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            setattr(mod, name, done[id(p)])
        for name, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                if id(b) not in done:
                    done[id(b)] = share(b if rt.rank == src else None, src, shape=tuple(b.shape))
                mod._buffers[name] = done[id(b)]
    return model


def reveal_module(model: nn.Module, to: int | None) -> dict[str, torch.Tensor] | None:
    """Plaintext state dict of a shared model for party ``to`` only (None for the others)."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, MPCTensor):
            out[name] = t.reveal(to)
        else:
            out[name] = t
    return out if to is None or P.current().rank == to else None


def share_rows(x: torch.Tensor | None, owners: list[int], rows: list[int], cols: int) -> MPCTensor:
    """Horizontal split: data owner ``owners[k]`` holds ``rows[k]`` rows; returns shares of them stacked."""
    rt = P.current()
    parts = []
    for owner, n in zip(owners, rows, strict=True):
        parts.append(share(x if rt.rank == owner else None, owner, shape=(n, cols))._share)
    return MPCTensor(torch.cat(parts, 0))


def share_columns(x: torch.Tensor | None, owners: list[int], n_rows: int, widths: list[int]) -> MPCTensor:
    """Vertical split: owner ``owners[k]`` holds ``widths[k]`` feature columns of the same rows."""
    rt = P.current()
    parts = []
    for owner, w in zip(owners, widths, strict=True):
        parts.append(share(x if rt.rank == owner else None, owner, shape=(n_rows, w))._share)
    return MPCTensor(torch.cat(parts, 1))


def save_shares(obj: nn.Module | dict[str, MPCTensor] | MPCTensor, path: str | Path) -> None:
    """Write this party's shares (a shared model, a dict of shared tensors or one tensor) to disk.

    Each party writes its own file; a single file reveals nothing (its shares are uniform).
    """
    rt = P.current()
    if isinstance(obj, nn.Module):
        items = {k: v for k, v in obj.state_dict(keep_vars=True).items() if isinstance(v, MPCTensor)}
        kind = "module"
    elif isinstance(obj, MPCTensor):
        items, kind = {"": obj}, "tensor"
    else:
        items, kind = dict(obj), "dict"
    payload = {
        "format": "veil.mpc.shares/1",
        "kind": kind,
        "rank": rt.rank,
        "n_parties": rt.n,
        "frac_bits": rt.frac_bits,
        "shares": {k: v._share.clone() for k, v in items.items()},
    }
    torch.save(payload, Path(path))


def load_shares(path: str | Path, into: nn.Module | None = None):
    """Load shares written by `save_shares` of this party; into a module of the same architecture if given."""
    rt = P.current()
    payload = torch.load(Path(path), weights_only=True)
    if payload.get("format") != "veil.mpc.shares/1":
        raise ProtocolError(f"{path} is not a veil.mpc share file")
    if payload["rank"] != rt.rank or payload["n_parties"] != rt.n or payload["frac_bits"] != rt.frac_bits:
        raise ProtocolError(f"{path} holds shares of party {payload['rank']} of another setup")
    tensors = {k: MPCTensor(v) for k, v in payload["shares"].items()}
    if payload["kind"] == "tensor":
        return tensors[""]
    if into is None:
        return tensors
    return assign_shares(into, tensors)


def assign_shares(module: nn.Module, tensors: dict[str, MPCTensor]) -> nn.Module:
    """Replace the parameters and buffers of ``module`` named in ``tensors`` (state-dict keys) by
    those shares; parameters keep their ``requires_grad``."""
    for name, t in tensors.items():
        mod_name, _, attr = name.rpartition(".")
        mod = module.get_submodule(mod_name) if mod_name else module
        if attr in mod._parameters:
            setattr(mod, attr, nn.Parameter(t, requires_grad=mod._parameters[attr].requires_grad))
        else:
            mod._buffers[attr] = t
    return module

