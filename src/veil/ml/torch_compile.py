"""Compile a user's `torch.nn.Module` into a program: `compile_torch_model(module, X_calibration)`.

The module is traced with `torch.fx` into a chain of operations. Every run of affine operations
(Linear, Conv1d/Conv2d, AvgPool, AdaptiveAvgPool, Flatten/view/reshape, BatchNorm in eval mode,
Dropout in eval mode, Identity) is one affine map, whose matrix is read off exactly by applying
it to the unit vectors in float64 (so convolutions, pooling and folded batch norms need no
special code). Activations must be polynomials of degree <= 2: `Square`, `x * x`, `x ** 2`,
`torch.square`, or `Polynomial(c0, c1, c2)`; `replace_relu` swaps ReLU for a quadratic fitted
on the calibration range and fine-tunes. Anything else raises `UnsupportedLayerError` naming the
layer and what to use instead.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from veil.errors import ShapeError, VeilError
from veil.program.ir import Linear, Op, Poly, Program

AFFINE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                  nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.BatchNorm1d, nn.BatchNorm2d,
                  nn.Dropout, nn.Identity, nn.ZeroPad2d)
AFFINE_FUNCTIONS = (torch.flatten, torch.reshape)
AFFINE_METHODS = ("view", "reshape", "flatten")
INSTEAD = {
    nn.ReLU: "veil.ml.Polynomial (a quadratic), or veil.ml.replace_relu(module, X, y) to swap and fine-tune",
    nn.GELU: "veil.ml.Polynomial or veil.ml.Square", nn.SiLU: "veil.ml.Polynomial or veil.ml.Square",
    nn.Sigmoid: "veil.ml.Polynomial (e.g. 0.5 + 0.197 x on a small range), or apply it after decryption",
    nn.Tanh: "veil.ml.Polynomial", nn.Softmax: "nothing: veil applies softmax on the client after decryption",
    nn.MaxPool2d: "nn.AvgPool2d", nn.MaxPool1d: "nn.AvgPool1d", nn.LeakyReLU: "veil.ml.Polynomial",
}


class UnsupportedLayerError(VeilError, TypeError):
    """A layer with no encrypted equivalent; the message says what to use instead."""


class Square(nn.Module):
    """x -> x^2, the cheapest activation under CKKS (one multiplicative level)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Polynomial(nn.Module):
    """x -> c0 + c1 x + c2 x^2 (fixed coefficients; one multiplicative level)."""

    def __init__(self, c0: float = 0.0, c1: float = 0.0, c2: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("coeffs", torch.tensor([c0, c1, c2], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coeffs.to(x.dtype)
        return c[0] + x * (c[1] + c[2] * x)

    def extra_repr(self) -> str:
        return "c0={:.4g}, c1={:.4g}, c2={:.4g}".format(*self.coeffs.tolist())


def relu_polynomial(bound: float = 4.0) -> Polynomial:
    """Least-squares quadratic fit of ReLU on [-bound, bound]."""
    grid = np.linspace(-bound, bound, 2001)
    c2, c1, c0 = np.polyfit(grid, np.maximum(grid, 0.0), 2)
    return Polynomial(float(c0), float(c1), float(c2))


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps veil's activation modules as single steps."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Square | Polynomial) or super().is_leaf_module(m, qualname)


def _chain(module: nn.Module) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor], Any]]:
    """The module as a list of (name, function, kind-or-module) steps, from a torch.fx trace."""
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # fx raises many types on untraceable control flow
        raise UnsupportedLayerError(f"cannot trace {type(module).__name__} with torch.fx: {exc}") from None
    mods = dict(module.named_modules())
    steps: list[tuple[str, Callable, Any]] = []
    prev: fx.Node | None = None
    meta: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            prev = node
            continue
        if node.op == "output":
            break
        if (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") \
                or (node.op == "call_method" and node.target == "size") \
                or (node.op == "call_function" and node.target is operator.getitem and node.args[0] in meta):
            meta.add(node)  # shape arithmetic such as x.view(x.shape[0], -1): no computation
            continue
        shaped = any(a in meta for a in node.args if isinstance(a, fx.Node))
        tensors = list(dict.fromkeys(a for a in node.args if isinstance(a, fx.Node) and a not in meta))
        if node.op == "call_module":
            sub = mods[node.target]
            steps.append((str(node.target), sub, sub))
        elif node.op == "call_function" and node.target in AFFINE_FUNCTIONS:
            args, kwargs = node.args[1:], dict(node.kwargs)
            steps.append((node.name, lambda x, f=node.target, a=args, k=kwargs: f(x, *a, **k), "affine"))
        elif node.op == "call_method" and node.target in AFFINE_METHODS and shaped:
            steps.append((node.name, lambda x: x.reshape(x.shape[0], -1), "affine"))
        elif node.op == "call_method" and node.target in AFFINE_METHODS:
            args = node.args[1:]
            steps.append((node.name, lambda x, m=node.target, a=args: getattr(x, m)(*a), "affine"))
        elif (node.target in (operator.mul, torch.mul) and len(node.args) == 2 and node.args[0] is node.args[1]) \
                or (node.target in (operator.pow, torch.pow) and node.args[1] == 2) \
                or node.target in (torch.square, "square"):
            steps.append((node.name, lambda x: x * x, "square"))
        else:
            raise UnsupportedLayerError(f"operation {node.name} ({node.target}) has no encrypted equivalent; "
                                        "use Linear, Conv, AvgPool, Flatten, BatchNorm and polynomial activations")
        if len(tensors) != 1 or tensors[0] is not prev:
            raise UnsupportedLayerError(f"operation {node.name} does not take the previous one's output alone: "
                                        "only chains of layers (as nn.Sequential) can be compiled")
        prev = node
    return steps


def _classify(name: str, kind: Any) -> str:
    if isinstance(kind, str):
        return kind
    if isinstance(kind, AFFINE_MODULES):
        return "affine"
    if isinstance(kind, Square):
        return "square"
    if isinstance(kind, Polynomial):
        return "poly"
    hint = next((v for k, v in INSTEAD.items() if isinstance(kind, k)), "a supported layer")
    raise UnsupportedLayerError(f"layer {name} ({type(kind).__name__}) has no encrypted equivalent; use {hint}")


def module_to_program(module: nn.Module, input_shape: tuple[int, ...]) -> Program:
    """Lower a traced chain to a `Program` on the flattened input of shape `input_shape`."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            raise UnsupportedLayerError(f"layer {name or type(sub).__name__} (BatchNorm) is in training mode: "
                                        "call module.eval() first, so its running statistics are folded")
    module = copy.deepcopy(module).double().eval()
    if isinstance(module, (*AFFINE_MODULES, Square, Polynomial)):
        module = nn.Sequential(module)  # a bare layer: trace it as a one-layer chain
    steps = _chain(module)
    n_in = int(np.prod(input_shape))
    ops: list[Op] = []
    group: list[Callable] = []
    shape = tuple(input_shape)

    def flush() -> None:
        nonlocal shape
        if not group:
            return
        with torch.no_grad():
            basis = torch.cat([torch.zeros(1, n_cur), torch.eye(n_cur)]).double().reshape(-1, *shape)
            out = basis
            for f in group:
                out = f(out)
        if out.shape[0] != n_cur + 1:
            raise UnsupportedLayerError("a reshape mixes samples of a batch: keep the batch dimension first")
        shape = tuple(out.shape[1:])
        flat = out.reshape(n_cur + 1, -1).numpy()
        ops.append(Linear((flat[1:] - flat[0]).T, flat[0]))
        group.clear()

    n_cur = n_in
    for name, fn, kind in steps:
        what = _classify(name, kind)
        if what == "affine":
            group.append(fn)
            continue
        flush()
        n_cur = int(np.prod(shape))
        if what == "square":
            ops.append(Poly((0.0, 0.0, 1.0)))
        else:
            ops.append(Poly(tuple(float(c) for c in kind.coeffs)))
    flush()
    if not ops:
        raise ShapeError("the module computes nothing")
    return Program(n_in, ops)


def replace_relu(module: nn.Module, X: Any, y: Any = None, bound: float | None = None, epochs: int = 20,
                 lr: float = 1e-3, classification: bool = True, seed: int = 0) -> nn.Module:
    """A copy of `module` with every nn.ReLU replaced by a quadratic fitted on [-bound, bound]
    (by default the largest pre-activation magnitude seen on X), fine-tuned on (X, y) when y is
    given (cross-entropy for classification, else MSE) so accuracy recovers."""
    out = copy.deepcopy(module).float()
    X_t = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    if bound is None:
        peaks: list[float] = []
        hooks = [m.register_forward_hook(lambda m, i, o: peaks.append(float(i[0].abs().max())))
                 for m in out.modules() if isinstance(m, nn.ReLU)]
        with torch.no_grad():
            out.eval()(X_t)
        for h in hooks:
            h.remove()
        bound = max(peaks) if peaks else 4.0
    for parent in list(out.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, relu_polynomial(bound).float())
    if y is not None and epochs > 0:
        torch.manual_seed(seed)
        y_t = torch.as_tensor(np.asarray(y), dtype=torch.long if classification else torch.float32)
        loss_fn = nn.CrossEntropyLoss() if classification else nn.MSELoss()
        opt = torch.optim.Adam(out.parameters(), lr=lr)
        out.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(X_t)).split(64):
                opt.zero_grad()
                pred = out(X_t[idx])
                loss = loss_fn(pred, y_t[idx] if classification else y_t[idx].reshape(pred.shape))
                loss.backward()
                opt.step()
    return out.eval()
