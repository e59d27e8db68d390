"""A user's torch module as a graph of affine maps, polynomial activations and other layers.

`trace(module, X)` runs torch.fx on the module and records, per operation, what it is to the
encrypted compilers of `veil.ml.torch_compile`:

* affine (`AFFINE`): Linear, Conv, BatchNorm in eval mode (folded), average pooling, flatten and
  reshapes, sums, differences, concatenations, products by constants, padding, means, permutes:
  everything whose matrix `Graph.affine_map` can read off exactly by evaluating it on unit vectors
  in float64. Parameter-free affine steps (reshapes, sums and differences of two values,
  concatenations) also carry a public client step (`Node.step`), so a client may compute them on
  values it holds rather than ask the server;
* polynomial activations (`POLY`): `Square`, `Polynomial`, `x * x`, `x ** 2`, `torch.square`;
* other layers (`GLUE`): ReLU, MaxPool, GELU, Sigmoid, Softmax, Tanh, SiLU, ... (`veil.program.glue`
  lists them): only a client can evaluate them exactly. PReLU and LayerNorm are split into a
  parameter-free client step and an affine map holding their weights (PReLU(u) = relu(u) +
  a * min(u, 0); LayerNorm(u) = w * normalize(u) + b), so their weights stay on the server.

The module is run once on the calibration data: every operation's value must keep the batch as
its first dimension, and operations on shapes (`x.view(x.size(0), -1)`) become reshapes to the
traced per-sample shape. Anything else raises `UnsupportedLayerError` naming the layer.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from veil.errors import ShapeError, VeilError, WireFormatError
from veil.program.glue import OPS
from veil.program.ir import Linear

INPUT, AFFINE, POLY, GLUE = "input", "affine", "poly", "glue"
PROBE_COLUMNS = 256
"""Unit vectors evaluated at once when reading off an affine map (bounds the probe's memory)."""
AFFINE_TOLERANCE = 1e-7
"""Relative error above which a map read off by probing is refused: the operation was not affine
in its inputs, or it mixed the samples of a batch."""


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


AFFINE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.AvgPool1d,
                  nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten,
                  nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                  nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "view", "reshape", "flatten",
            "unflatten", "squeeze", "unsqueeze", "contiguous", "clone", "detach", "float", "double", "view_as",
            "reshape_as", F.dropout}
ADDS = {operator.add, operator.iadd, torch.add, "add"}
SUBS = {operator.sub, operator.isub, torch.sub, "sub"}
MULS = {operator.mul, operator.imul, torch.mul, "mul"}
DIVS = {operator.truediv, operator.itruediv, torch.div, "div"}
NEGS = {operator.neg, torch.neg, "neg"}
CATS = {torch.cat, torch.concat, torch.concatenate}
POWS = {operator.pow, torch.pow, "pow"}
AFFINE_CALLS = {F.linear, F.conv1d, F.conv2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                F.adaptive_avg_pool2d, F.pad, F.batch_norm, torch.mean, "mean", torch.sum, "sum", "permute",
                "transpose", torch.permute, torch.transpose, torch.stack, torch.flip, "flip", operator.getitem}

_NO_PARAMS: tuple[str, ...] = ()
_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
GLUE_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    **{f: ("relu", _NO_PARAMS) for f in (F.relu, torch.relu, "relu")},
    **{f: ("sigmoid", _NO_PARAMS) for f in (torch.sigmoid, F.sigmoid, "sigmoid")},
    **{f: ("tanh", _NO_PARAMS) for f in (torch.tanh, F.tanh, "tanh")},
    **{f: ("abs", _NO_PARAMS) for f in (torch.abs, "abs")},
    **{getattr(F, name): (name, _NO_PARAMS) for name in (
        "relu6", "silu", "mish", "hardswish", "hardsigmoid", "softsign", "logsigmoid", "selu")},
    F.gelu: ("gelu", ("approximate",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope",)),
    F.elu: ("elu", ("alpha",)),
    F.celu: ("celu", ("alpha",)),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.hardtanh: ("hardtanh", ("min_val", "max_val")),
    **{f: ("clamp", ("min", "max")) for f in (torch.clamp, torch.clip, "clamp", "clip")},
    **{f: ("softmax", ("dim",)) for f in (F.softmax, torch.softmax, "softmax")},
    **{f: ("log_softmax", ("dim",)) for f in (F.log_softmax, torch.log_softmax, "log_softmax")},
    **{f: ("max_pool1d", _POOL) for f in (F.max_pool1d, torch.max_pool1d)},
    **{f: ("max_pool2d", _POOL) for f in (F.max_pool2d, torch.max_pool2d)},
    F.adaptive_max_pool1d: ("adaptive_max_pool1d", ("output_size", "return_indices")),
    F.adaptive_max_pool2d: ("adaptive_max_pool2d", ("output_size", "return_indices")),
}
"""Functional forms of client steps: the op and its positional parameters after the input."""
IGNORED_PARAMS = {"inplace": False, "return_indices": False, "_stacklevel": None, "dtype": None}
"""Arguments that change nothing in eval mode, with the only value accepted for each."""


def _pool(name: str) -> Callable[[nn.Module], tuple[str, dict]]:
    return lambda m: (name, {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                             "dilation": m.dilation, "ceil_mode": m.ceil_mode, "return_indices": m.return_indices})


GLUE_MODULES: dict[type, Callable[[nn.Module], tuple[str, dict]]] = {
    **{cls: (lambda m, name=name: (name, {})) for cls, name in (
        (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.SiLU, "silu"),
        (nn.Mish, "mish"), (nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid"),
        (nn.Softsign, "softsign"), (nn.LogSigmoid, "logsigmoid"), (nn.SELU, "selu"))},
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.ELU: lambda m: ("elu", {"alpha": m.alpha}),
    nn.CELU: lambda m: ("celu", {"alpha": m.alpha}),
    nn.Softplus: lambda m: ("softplus", {"beta": m.beta, "threshold": m.threshold}),
    nn.Hardtanh: lambda m: ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val}),
    nn.Softmax: lambda m: ("softmax", {"dim": m.dim}),
    nn.LogSoftmax: lambda m: ("log_softmax", {"dim": m.dim}),
    nn.Softmax2d: lambda m: ("softmax", {"dim": -3}),
    nn.MaxPool1d: _pool("max_pool1d"),
    nn.MaxPool2d: _pool("max_pool2d"),
    nn.AdaptiveMaxPool1d: lambda m: ("adaptive_max_pool1d", {"output_size": m.output_size,
                                                             "return_indices": m.return_indices}),
    nn.AdaptiveMaxPool2d: lambda m: ("adaptive_max_pool2d", {"output_size": m.output_size,
                                                             "return_indices": m.return_indices}),
}
"""Layers only a client can evaluate, and their public parameters."""

INSTEAD = {
    nn.ReLU: "veil.ml.Polynomial (a quadratic), or veil.ml.replace_relu(module, X, y) to swap and fine-tune",
    nn.GELU: "veil.ml.Polynomial or veil.ml.Square", nn.SiLU: "veil.ml.Polynomial or veil.ml.Square",
    nn.Sigmoid: "veil.ml.Polynomial (e.g. 0.5 + 0.197 x on a small range), or apply it after decryption",
    nn.Tanh: "veil.ml.Polynomial", nn.Softmax: "nothing: veil applies softmax on the client after decryption",
    nn.MaxPool2d: "nn.AvgPool2d", nn.MaxPool1d: "nn.AvgPool1d", nn.LeakyReLU: "veil.ml.Polynomial",
}
CLIENT_HINT = "compile_torch_model(..., nonlinear='client') to evaluate it on the client"


@dataclass(eq=False)
class Node:
    """One operation: its kind, the nodes whose values it reads, how to compute it in float64,
    its per-sample shape, and (for the client) its public step `(op, params)`."""

    name: str
    kind: str
    args: tuple[int, ...]
    fn: Callable[..., torch.Tensor] | None
    shape: tuple[int, ...]
    step: tuple[str, dict] | None = None
    coeffs: tuple[float, float, float] | None = None
    hint: str = "a supported layer"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps veil's activation modules as single steps."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Square | Polynomial) or super().is_leaf_module(m, qualname)


class Graph:
    """Nodes in topological order (node 0 is the input) and the output node; `values` holds
    every node's value on the data it was traced with, as (n, size) float64 arrays."""

    def __init__(self, nodes: list[Node], output: int, values: dict[int, np.ndarray]) -> None:
        self.nodes, self.output, self.values = nodes, output, values

    def run(self, given: dict[int, torch.Tensor], targets: list[int]) -> dict[int, torch.Tensor]:
        """Values of `targets` computed from the `given` values (every node in between must be
        computable from them)."""
        needed, stack = set(), list(targets)
        while stack:
            i = stack.pop()
            if i in needed or i in given:
                continue
            needed.add(i)
            stack.extend(self.nodes[i].args)
        env = dict(given)
        with torch.no_grad():
            for i in sorted(needed):
                node = self.nodes[i]
                if node.fn is None:
                    raise AssertionError(f"{node.name} cannot be computed from the given values")
                env[i] = node.fn(*(env[a] for a in node.args))
        return env

    def affine_map(self, inputs: list[int], outputs: list[int]) -> Linear:
        """The affine map from the `inputs` values laid end to end (flattened per sample) to the
        `outputs` values laid end to end, read off on unit vectors in float64, and checked on the
        traced values: a map that does not reproduce them is refused (`UnsupportedLayerError`)."""
        sizes = [self.nodes[i].size for i in inputs]
        n_in = sum(sizes)
        bounds = np.cumsum([0, *sizes])

        def evaluate(block: torch.Tensor) -> np.ndarray:
            given = {i: block[:, bounds[k]:bounds[k + 1]].reshape(-1, *self.nodes[i].shape)
                     for k, i in enumerate(inputs)}
            env = self.run(given, outputs)
            return torch.cat([env[o].reshape(len(block), -1) for o in outputs], dim=1).numpy()

        zero = evaluate(torch.zeros(1, n_in, dtype=torch.float64))[0]
        columns = []
        for lo in range(0, n_in, PROBE_COLUMNS):
            hi = min(n_in, lo + PROBE_COLUMNS)
            probe = torch.zeros(hi - lo, n_in, dtype=torch.float64)
            probe[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
            columns.append(evaluate(probe) - zero)
        op = Linear(np.concatenate(columns).T, zero)
        X = np.concatenate([self.values[i] for i in inputs], axis=1)
        ref = np.concatenate([self.values[o] for o in outputs], axis=1)
        err = float(np.max(np.abs(op(X) - ref)))
        if not err <= AFFINE_TOLERANCE * (1.0 + float(np.max(np.abs(ref)))):
            names = ", ".join(self.nodes[o].name for o in outputs)
            raise UnsupportedLayerError(f"the operations leading to {names} are not affine in their inputs, or "
                                        f"they mix the samples of a batch (error {err:.3g}): keep the batch "
                                        "dimension first and use the supported layers")
        return op

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        """The module's outputs on X (n, n_inputs), flattened per sample (the plaintext reference)."""
        given = {0: torch.as_tensor(np.asarray(X, dtype=np.float64)).reshape(-1, *self.nodes[0].shape)}
        out = self.run(given, [self.output])[self.output]
        return out.reshape(len(out), -1).numpy()


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list | torch.Size):
        return [_jsonable(x) for x in v]
    return v


def _checked_step(name: str, op: str, params: dict) -> tuple[str, dict]:
    """(op, params) validated against the client op's schema, with ignorable arguments dropped."""
    clean = {}
    for key, value in params.items():
        if key in IGNORED_PARAMS:
            if value != IGNORED_PARAMS[key] and not (key == "return_indices" and value is False):
                raise UnsupportedLayerError(f"{name}: {key}={value!r} is not supported (only "
                                            f"{IGNORED_PARAMS[key]!r})")
            continue
        if isinstance(value, fx.Node):
            raise UnsupportedLayerError(f"{name}: parameter {key} is computed at run time; give it as a constant")
        clean[key] = _jsonable(value)
    spec = OPS[op]
    unknown = set(clean) - set(spec.params)
    if unknown:
        raise UnsupportedLayerError(f"{name}: parameters {sorted(unknown)} of {op} are not supported")
    try:
        return op, {k: spec.params[k](v) for k, v in clean.items()}
    except WireFormatError as exc:
        raise UnsupportedLayerError(f"{name}: {exc}") from None


def _positional(node: fx.Node, names: tuple[str, ...]) -> dict:
    params = dict(zip(names, node.args[1:], strict=False))
    params.update(node.kwargs)
    return params


def trace(module: nn.Module, X: np.ndarray | torch.Tensor) -> Graph:
    """The graph of `module` (in eval mode) traced on X (n, *input_shape) (module docstring)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            raise UnsupportedLayerError(f"layer {name or type(sub).__name__} (BatchNorm) is in training mode: "
                                        "call module.eval() first, so its running statistics are folded")
    module = copy.deepcopy(module).double().eval()
    if not list(module.children()) and not isinstance(module, nn.Sequential):
        module = nn.Sequential(module)  # a bare layer: trace it as a one-layer chain
    try:
        gm = fx.GraphModule(module, _Tracer().trace(module))
    except Exception as exc:  # fx raises many types on untraceable control flow
        raise UnsupportedLayerError(f"cannot trace {type(module).__name__} with torch.fx: {exc}") from None
    known = (*AFFINE_MODULES, Square, Polynomial, nn.PReLU, nn.LayerNorm, *GLUE_MODULES)
    for node in gm.graph.nodes:
        sub = gm.get_submodule(node.target) if node.op == "call_module" else None
        if sub is not None and not isinstance(sub, known):
            hint = next((v for k, v in INSTEAD.items() if isinstance(sub, k)), "a supported layer")
            raise UnsupportedLayerError(f"layer {node.target} ({type(sub).__name__}) has no encrypted equivalent; "
                                        f"use {hint}")
    xt = torch.as_tensor(np.asarray(X.detach().cpu() if isinstance(X, torch.Tensor) else X), dtype=torch.float64)
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            interp.run(xt)
    except Exception as exc:  # the module's own error, most often calibration data of the wrong shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShapeError(f"the module fails on samples of shape {tuple(xt.shape[1:])}: {first}; "
                         "X_calibration must be samples of the shape the module takes, (n, *input_shape)") from None
    return _Builder(gm, interp.env, len(xt)).build()


class _Builder:
    """Turns an fx graph and its traced values into `Node`s (see `trace`)."""

    def __init__(self, gm: fx.GraphModule, env: dict[fx.Node, Any], n: int) -> None:
        self.gm, self.env, self.n = gm, env, n
        self.mods = dict(gm.named_modules())
        self.ids: dict[fx.Node, int] = {}
        self.meta: set[fx.Node] = set()
        self.nodes: list[Node] = []
        self.values: dict[int, np.ndarray] = {}

    def add(self, node: Node, value: torch.Tensor) -> int:
        self.nodes.append(node)
        i = len(self.nodes) - 1
        self.values[i] = value.detach().reshape(self.n, -1).numpy().astype(np.float64, copy=False)
        return i

    def build(self) -> Graph:
        output: int | None = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.nodes:
                    raise UnsupportedLayerError("modules with more than one input are not supported")
                value = self.env[node]
                self.ids[node] = self.add(Node("input", INPUT, (), None, tuple(value.shape[1:])), value)
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or out not in self.ids:
                    raise UnsupportedLayerError("the module must return one tensor computed from its input")
                output = self.ids[out]
            else:
                self.visit(node)
        assert output is not None
        return Graph(self.nodes, output, self.values)

    def visit(self, node: fx.Node) -> None:
        value = self.env[node]
        tensors = list(dict.fromkeys(a for a in node.all_input_nodes if a in self.ids))
        uses_meta = any(a in self.meta for a in node.all_input_nodes)
        if not tensors and not uses_meta:
            return  # a constant (a parameter, or computed from constants only)
        if not isinstance(value, torch.Tensor):
            self.meta.add(node)  # shape arithmetic such as x.size(0): no computation
            return
        if not tensors:
            raise UnsupportedLayerError(f"operation {node.name} builds a tensor from the input's shape only")
        if value.dim() == 0 or value.shape[0] != self.n or not value.is_floating_point():
            raise UnsupportedLayerError(f"operation {node.name} ({node.target}) does not keep the batch as its first "
                                        "dimension: it would mix the samples of a request")
        label = self.label(node)
        shape = tuple(value.shape[1:])
        args = tuple(self.ids[a] for a in tensors)
        target = self.mods[node.target] if node.op == "call_module" else node.target
        if target in RESHAPES or (node.op == "call_module" and isinstance(target, RESHAPE_MODULES)):
            node_ = Node(label, AFFINE, args[:1], lambda x, s=shape: x.reshape(x.shape[0], *s), shape,
                         step=("reshape", {}))
            self.ids[node] = self.add(node_, value)
            return
        if uses_meta:
            raise UnsupportedLayerError(f"operation {label} uses a tensor's shape; only reshapes may")
        fn = self.generic(node, tensors)
        if node.op == "call_module":
            self.module(node, target, label, args, fn, shape, value)
        else:
            self.function(node, target, label, args, fn, shape, value)

    def label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"layer {node.target} ({type(self.mods[node.target]).__name__})"
        return f"operation {node.name} ({getattr(node.target, '__name__', node.target)})"

    def generic(self, node: fx.Node, tensors: list[fx.Node]) -> Callable[..., torch.Tensor]:
        """The node's own computation on its tensor arguments (constants captured from the trace)."""
        pos = {a: i for i, a in enumerate(tensors)}
        env, mods = self.env, self.mods

        def fn(*xs: torch.Tensor) -> torch.Tensor:
            def arg(a: fx.Node) -> Any:
                return xs[pos[a]] if a in pos else env[a]
            args = fx.node.map_arg(node.args, arg)
            kwargs = fx.node.map_arg(node.kwargs, arg)
            if node.op == "call_module":
                return mods[node.target](*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
        return fn

    def module(self, node: fx.Node, sub: nn.Module, label: str, args: tuple[int, ...], fn: Callable,
               shape: tuple[int, ...], value: torch.Tensor) -> None:
        if isinstance(sub, Square):
            self.ids[node] = self.add(Node(label, POLY, args, fn, shape, ("poly", {"coeffs": [0.0, 0.0, 1.0]}),
                                           (0.0, 0.0, 1.0)), value)
        elif isinstance(sub, Polynomial):
            c = tuple(float(v) for v in sub.coeffs)
            self.ids[node] = self.add(Node(label, POLY, args, fn, shape, ("poly", {"coeffs": list(c)}), c), value)
        elif type(sub) in GLUE_MODULES:
            op, params = GLUE_MODULES[type(sub)](sub)
            if op in ("softmax", "log_softmax") and params["dim"] is None:
                raise UnsupportedLayerError(f"{label}: give the softmax dimension (dim=...)")
            self.ids[node] = self.add(Node(label, GLUE, args, fn, shape, _checked_step(label, op, params),
                                           hint=INSTEAD.get(type(sub), "a supported layer")), value)
        elif isinstance(sub, nn.PReLU):
            self.prelu(node, sub, label, args[0], shape, value)
        elif isinstance(sub, nn.LayerNorm):
            self.layer_norm(node, sub, label, args[0], shape, value)
        elif isinstance(sub, AFFINE_MODULES):
            self.ids[node] = self.add(Node(label, AFFINE, args, fn, shape), value)
        else:
            hint = next((v for k, v in INSTEAD.items() if isinstance(sub, k)), "a supported layer")
            raise UnsupportedLayerError(f"{label} has no encrypted equivalent; use {hint}")

    def prelu(self, node: fx.Node, sub: nn.PReLU, label: str, u: int, shape: tuple[int, ...],
              value: torch.Tensor) -> None:
        """PReLU(u) = relu(u) + a * min(u, 0): two client steps, the slopes a on the server."""
        x = torch.as_tensor(self.values[u]).reshape(self.n, *shape)
        pos = self.add(Node(f"{label} positive part", GLUE, (u,), F.relu, shape, ("relu", {})), F.relu(x))
        neg = self.add(Node(f"{label} negative part", GLUE, (u,), lambda t: torch.clamp(t, max=0.0), shape,
                            ("clamp", {"max": 0.0})), torch.clamp(x, max=0.0))
        weight = sub.weight.detach()
        view = (1, -1, *([1] * (len(shape) - 1))) if weight.numel() > 1 else (1,)

        def combine(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return p + weight.reshape(view) * m
        self.ids[node] = self.add(Node(label, AFFINE, (pos, neg), combine, shape), value)

    def layer_norm(self, node: fx.Node, sub: nn.LayerNorm, label: str, u: int, shape: tuple[int, ...],
                   value: torch.Tensor) -> None:
        """LayerNorm(u) = w * normalize(u) + b: the normalisation on the client, w and b on the server."""
        dims, eps = list(sub.normalized_shape), float(sub.eps)
        x = torch.as_tensor(self.values[u]).reshape(self.n, *shape)
        step = _checked_step(label, "layer_norm", {"normalized_shape": dims, "eps": eps})

        def normalize(t: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(t, dims, eps=eps)
        normed = self.add(Node(f"{label} normalisation", GLUE, (u,), normalize, shape, step), normalize(x))
        if sub.weight is None and sub.bias is None:
            self.ids[node] = normed
            return
        weight, bias = sub.weight, sub.bias

        def affine(t: torch.Tensor) -> torch.Tensor:
            t = t * weight.detach() if weight is not None else t
            return t + bias.detach() if bias is not None else t
        self.ids[node] = self.add(Node(label, AFFINE, (normed,), affine, shape), value)

    def function(self, node: fx.Node, target: Any, label: str, args: tuple[int, ...], fn: Callable,
                 shape: tuple[int, ...], value: torch.Tensor) -> None:
        """Functions and methods: squares, products of two values, client steps, affine maps."""
        square = (POLY, ("poly", {"coeffs": [0.0, 0.0, 1.0]}), (0.0, 0.0, 1.0))
        two = len(node.args) == 2 and not node.kwargs and all(a in self.ids for a in node.args)
        kind, step, coeffs, hint = AFFINE, None, None, "a supported layer"
        if (target in MULS and len(node.args) == 2 and node.args[0] is node.args[1]) \
                or (target in POWS and node.args[1:] == (2,)) or target in (torch.square, "square"):
            kind, step, coeffs = square
        elif target in POWS and len(node.args) == 2 and not isinstance(node.args[1], fx.Node):
            kind, step = GLUE, _checked_step(label, "pow", {"exponent": node.args[1]})
        elif target in MULS and len(args) == 2:
            kind, step = GLUE, ("mul", {})
        elif target in ADDS | SUBS and two:
            step = ("add" if target in ADDS else "sub", {})
        elif target in CATS:
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if isinstance(parts, list | tuple) and all(p in self.ids for p in parts) and isinstance(dim, int):
                args = tuple(self.ids[p] for p in parts)  # in order, repeats kept

                def fn(*xs: torch.Tensor, d: int = dim) -> torch.Tensor:
                    return torch.cat(xs, dim=d)
                step = _checked_step(label, "cat", {"dim": dim})
        elif target in GLUE_FUNCTIONS:
            op, names = GLUE_FUNCTIONS[target]
            kind, step = GLUE, _checked_step(label, op, _positional(node, names))
            hint = "veil.ml.Polynomial, or apply it after decryption"
        elif (target in MULS | ADDS | SUBS and len(args) == 1) or (target in DIVS and len(args) == 1
                                                                   and node.args[0] in self.ids):
            pass  # a sum with, a product by or a quotient by a constant
        elif not (target in NEGS or target in AFFINE_CALLS):
            raise UnsupportedLayerError(f"{label} has no encrypted equivalent; use Linear, Conv, AvgPool, Flatten, "
                                        "BatchNorm, sums and concatenations, polynomial activations, or the "
                                        "layers veil.program.glue lists with nonlinear='client'")
        self.ids[node] = self.add(Node(label, kind, args, fn, shape, step, coeffs, hint), value)
