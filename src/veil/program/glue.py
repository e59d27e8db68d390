"""The public description of a staged (interactive) program and the client's exact plaintext steps.

A staged program alternates encrypted linear stages, which the server evaluates, with steps the
client computes itself on the decrypted values: the non-linear layers of a network (ReLU,
MaxPool, GELU, Softmax, ...), and shape-only or parameter-free steps between them (reshapes,
sums and concatenations of values the client already holds, so that ReLU followed by MaxPool is
one round trip, not two). `StagedGraph` is what both halves hold: the per-sample shape of every
value, the client's steps in order (each an op name from `OPS` with JSON parameters checked
against the op's schema, the values it reads and the value it defines, and the round after which
it runs) and, per stage, which values the client sends and which it receives. No weight of a
linear layer is in it; the parameters of a step are those of a parameter-free layer (a pooling's
kernel, a softmax's dimension, a fixed activation polynomial).

Evaluation is torch in float64 on arrays (n, *shape), so a step is exactly the plaintext layer;
torch is imported only when a staged program is loaded or run. Every step is checked once at load
by running it on one zero sample: the shape it gives must be the declared one, and no step may
act along the batch dimension (a softmax or concatenation over samples would mix requests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.errors import ShapeError, WireFormatError
from veil.he.wire import strict_int

MAX_VALUES = 4096
MAX_STEPS = 2048
MAX_STAGES = 64
MAX_RANK = 4
MAX_VALUE_SIZE = 1 << 16
"""Largest value (elements per sample) a description may declare, as `ir.MAX_DIM` for a layer."""


def _number(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or abs(v) > 2.0**60:
        raise WireFormatError(f"expected a finite number, got {v!r}"[:80])
    return float(v)


def _int(v: object) -> int:
    return strict_int(v, "an integer parameter", -MAX_VALUE_SIZE, MAX_VALUE_SIZE)


def _size(v: object) -> int | list[int]:
    """An int or a list of 1 to 3 non-negative ints (kernel sizes, strides, paddings)."""
    if isinstance(v, list):
        if not 1 <= len(v) <= 3:
            raise WireFormatError("a size is an integer or a list of 1 to 3 integers")
        return [strict_int(x, "a size", 0, MAX_VALUE_SIZE) for x in v]
    return strict_int(v, "a size", 0, MAX_VALUE_SIZE)


def _output_size(v: object) -> int | list[int | None]:
    """Adaptive pooling's output size: an int or a list whose entries may be null (keep that size)."""
    if isinstance(v, list):
        if not 1 <= len(v) <= 3:
            raise WireFormatError("an output size is an integer or a list of 1 to 3 entries")
        return [None if x is None else strict_int(x, "an output size", 1, MAX_VALUE_SIZE) for x in v]
    return strict_int(v, "an output size", 1, MAX_VALUE_SIZE)


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise WireFormatError(f"expected true or false, got {v!r}"[:80])
    return v


def _optional(check: Callable[[object], Any]) -> Callable[[object], Any]:
    return lambda v: None if v is None else check(v)


def _choice(*options: str) -> Callable[[object], str]:
    def check(v: object) -> str:
        if v not in options:
            raise WireFormatError(f"expected one of {options}, got {v!r}"[:80])
        return str(v)
    return check


def _coeffs(v: object) -> list[float]:
    if not isinstance(v, list) or not 1 <= len(v) <= 3:
        raise WireFormatError("polynomial coefficients are a list of 1 to 3 numbers")
    return [_number(c) for c in v]


@dataclass(frozen=True)
class Op:
    """One kind of client step: how many values it reads (None: one or more), its parameters
    (name -> validator) and its torch evaluation `fn(inputs, shape, **params)`, `shape` being the
    declared per-sample shape of its result."""

    arity: int | None
    params: dict[str, Callable[[object], Any]]
    fn: Callable[..., Any]
    along_dim: bool = False
    """Whether its `dim` parameter names a tensor dimension (refused if it is the batch's)."""


def _functional(name: str) -> Callable[..., Any]:
    def fn(xs: list, shape: tuple[int, ...], **params: Any) -> Any:
        import torch.nn.functional as F

        return getattr(F, name)(xs[0], **params)
    return fn


def _torch(name: str) -> Callable[..., Any]:
    def fn(xs: list, shape: tuple[int, ...], **params: Any) -> Any:
        import torch

        return getattr(torch, name)(xs[0], **params)
    return fn


def _poly(xs: list, shape: tuple[int, ...], coeffs: list[float]) -> Any:
    c0, c1, c2 = [*coeffs, 0.0, 0.0][:3]
    return c0 + xs[0] * (c1 + c2 * xs[0])


def _cat(xs: list, shape: tuple[int, ...], dim: int) -> Any:
    import torch

    return torch.cat(xs, dim=dim)


def _sum(xs: list, shape: tuple[int, ...]) -> Any:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


_POOL = {"kernel_size": _size, "stride": _optional(_size), "padding": _size, "dilation": _size, "ceil_mode": _bool}
OPS: dict[str, Op] = {
    **{name: Op(1, {}, _functional(name)) for name in (
        "relu", "relu6", "silu", "mish", "hardswish", "hardsigmoid", "softsign", "logsigmoid", "selu")},
    **{name: Op(1, {}, _torch(name)) for name in ("sigmoid", "tanh", "abs")},
    "gelu": Op(1, {"approximate": _choice("none", "tanh")}, _functional("gelu")),
    "leaky_relu": Op(1, {"negative_slope": _number}, _functional("leaky_relu")),
    "elu": Op(1, {"alpha": _number}, _functional("elu")),
    "celu": Op(1, {"alpha": _number}, _functional("celu")),
    "softplus": Op(1, {"beta": _number, "threshold": _number}, _functional("softplus")),
    "hardtanh": Op(1, {"min_val": _number, "max_val": _number}, _functional("hardtanh")),
    "clamp": Op(1, {"min": _optional(_number), "max": _optional(_number)}, _torch("clamp")),
    "softmax": Op(1, {"dim": _int}, _functional("softmax"), along_dim=True),
    "log_softmax": Op(1, {"dim": _int}, _functional("log_softmax"), along_dim=True),
    "max_pool1d": Op(1, _POOL, _functional("max_pool1d")),
    "max_pool2d": Op(1, _POOL, _functional("max_pool2d")),
    "adaptive_max_pool1d": Op(1, {"output_size": _output_size}, _functional("adaptive_max_pool1d")),
    "adaptive_max_pool2d": Op(1, {"output_size": _output_size}, _functional("adaptive_max_pool2d")),
    "layer_norm": Op(1, {"normalized_shape": lambda v: [*np.atleast_1d(_size(v)).tolist()], "eps": _number},
                     _functional("layer_norm")),
    "poly": Op(1, {"coeffs": _coeffs}, _poly),
    "pow": Op(1, {"exponent": _number}, lambda xs, shape, exponent: xs[0] ** exponent),
    "mul": Op(2, {}, lambda xs, shape: xs[0] * xs[1]),
    "add": Op(None, {}, _sum),
    "sub": Op(2, {}, lambda xs, shape: xs[0] - xs[1]),
    "cat": Op(None, {"dim": _int}, _cat, along_dim=True),
    "reshape": Op(1, {}, lambda xs, shape: xs[0].reshape(xs[0].shape[0], *shape)),
}
"""Every op a client step may name. Layer parameters (weights) are never among an op's parameters:
a layer with weights runs on the server (PReLU and LayerNorm are split by the compiler into a
parameter-free client step and a linear part on the server)."""


def _ids(v: object, n_values: int, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_VALUES:
        raise WireFormatError(f"{what} must be a non-empty list of value ids")
    return tuple(strict_int(i, what, 0, n_values - 1) for i in v)


@dataclass(frozen=True)
class Step:
    """A client step: op, its parameters, the values it reads, the value it defines, and its round
    (0: before the first stage; r: after the answer of stage r - 1 is decrypted)."""

    op: str
    params: dict[str, Any]
    inputs: tuple[int, ...]
    output: int
    round: int

    def to_dict(self) -> dict:
        return {"op": self.op, "params": dict(self.params), "inputs": list(self.inputs), "output": self.output,
                "round": self.round}


@dataclass(frozen=True)
class StageIO:
    """The values a stage reads (what the client encrypts, concatenated) and defines (what it decrypts)."""

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"inputs": list(self.inputs), "outputs": list(self.outputs)}


class StagedGraph:
    """Values (value 0 is the model input), client steps and stages of a staged program, checked:
    every value is defined once, before it is read, and every step gives its declared shape."""

    def __init__(self, shapes: list[tuple[int, ...]], steps: list[Step], stages: list[StageIO], output: int) -> None:
        if not 1 <= len(shapes) <= MAX_VALUES or len(steps) > MAX_STEPS or not 1 <= len(stages) <= MAX_STAGES:
            raise ShapeError(f"a staged program holds 1 to {MAX_VALUES} values, at most {MAX_STEPS} steps and "
                             f"1 to {MAX_STAGES} stages")
        self.shapes = [tuple(s) for s in shapes]
        for s in self.shapes:
            if len(s) > MAX_RANK or any(d < 1 for d in s) or math.prod(s) > MAX_VALUE_SIZE:
                raise ShapeError(f"a value has at most {MAX_RANK} positive dimensions and {MAX_VALUE_SIZE} "
                                 f"elements per sample, got {s}")
        self.steps, self.stages, self.output = list(steps), list(stages), output
        self._check_order()
        for step in self.steps:
            self._check_step(step)

    def size(self, value: int) -> int:
        return math.prod(self.shapes[value])

    def width(self, values: tuple[int, ...]) -> int:
        """Elements per sample of values laid end to end (a stage's inputs or outputs)."""
        return sum(self.size(v) for v in values)

    @property
    def n_features(self) -> int:
        return self.size(0)

    @property
    def n_outputs(self) -> int:
        return self.size(self.output)

    def _check_order(self) -> None:
        """Replay the protocol: round r's steps, then stage r (reads known values, defines new ones)."""
        known = {0}

        def define(v: int) -> None:
            if v in known:
                raise ShapeError(f"value {v} is defined twice")
            known.add(v)

        rounds = [s.round for s in self.steps]
        if rounds != sorted(rounds) or any(not 0 <= r <= len(self.stages) for r in rounds):
            raise ShapeError("client steps must be in order of their rounds, each between 0 and the number of stages")
        for r in range(len(self.stages) + 1):
            for step in (s for s in self.steps if s.round == r):
                if not set(step.inputs) <= known:
                    raise ShapeError(f"step {step.op} reads a value not yet known to the client")
                define(step.output)
            if r < len(self.stages):
                io = self.stages[r]
                if not set(io.inputs) <= known:
                    raise ShapeError(f"stage {r} reads a value not yet known to the client")
                for v in io.outputs:
                    define(v)
        if self.output not in known or len(known) != len(self.shapes):
            raise ShapeError("every value must be defined, the output included")

    def _check_step(self, step: Step) -> None:
        """The op's schema, and one zero sample through it gives the declared shape."""
        import torch

        spec = OPS[step.op]
        if spec.arity is not None and len(step.inputs) != spec.arity:
            raise ShapeError(f"{step.op} reads {spec.arity} values, the step gives it {len(step.inputs)}")
        if spec.along_dim:
            rank = len(self.shapes[step.inputs[0]]) + 1
            dim = step.params.get("dim", 0)
            if not -rank <= dim < rank or dim % rank == 0:
                raise ShapeError(f"{step.op} along dimension {dim} of a {rank}-dimensional batch: only "
                                 "dimensions within a sample are allowed")
        zeros = [torch.zeros((1, *self.shapes[v]), dtype=torch.float64) for v in step.inputs]
        try:
            with torch.no_grad():
                out = spec.fn(zeros, self.shapes[step.output], **step.params)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ShapeError(f"step {step.op} cannot run on its inputs: {exc}"[:300]) from None
        if tuple(out.shape) != (1, *self.shapes[step.output]):
            raise ShapeError(f"step {step.op} gives shape {tuple(out.shape[1:])}, declared "
                             f"{self.shapes[step.output]}")

    def run_round(self, values: dict[int, np.ndarray], r: int) -> None:
        """Compute round r's steps in place on `values` (arrays (n, size) per value id)."""
        import torch

        for step in self.steps:
            if step.round != r:
                continue
            xs = [torch.from_numpy(np.ascontiguousarray(values[v], dtype=np.float64)).reshape(-1, *self.shapes[v])
                  for v in step.inputs]
            with torch.no_grad():
                out = OPS[step.op].fn(xs, self.shapes[step.output], **step.params)
            values[step.output] = out.reshape(out.shape[0], -1).numpy()

    def last_rounds(self) -> dict[int, int]:
        """Per value, the last round in which it is still read (by a step of that round, or as an
        input of the stage that follows it); the output is read at the end."""
        last = dict.fromkeys(range(len(self.shapes)), -1)
        for step in self.steps:
            for v in step.inputs:
                last[v] = max(last[v], step.round)
        for r, io in enumerate(self.stages):
            for v in io.inputs:
                last[v] = max(last[v], r)
        last[self.output] = len(self.stages)
        return last

    def to_dict(self) -> dict:
        return {"shapes": [list(s) for s in self.shapes], "steps": [s.to_dict() for s in self.steps],
                "stages": [io.to_dict() for io in self.stages], "output": self.output}

    @classmethod
    def from_dict(cls, d: object) -> StagedGraph:
        """Parse untrusted JSON strictly: unknown ops or parameters are refused, not ignored."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("shapes", "steps", "stages")):
            raise WireFormatError("a staged graph is an object with shapes, steps and stages")
        raw_shapes, raw_steps, raw_stages = d["shapes"], d["steps"], d["stages"]
        if len(raw_shapes) > MAX_VALUES or len(raw_steps) > MAX_STEPS or len(raw_stages) > MAX_STAGES:
            raise ShapeError("the staged graph is too large")
        shapes = []
        for s in raw_shapes:
            if not isinstance(s, list) or len(s) > MAX_RANK:
                raise WireFormatError(f"a value shape is a list of at most {MAX_RANK} sizes")
            shapes.append(tuple(strict_int(x, "a dimension", 1, MAX_VALUE_SIZE, ShapeError) for x in s))
        n = len(shapes)
        steps = []
        for raw in raw_steps:
            if (not isinstance(raw, dict) or not isinstance(raw.get("op"), str) or raw["op"] not in OPS
                    or not isinstance(raw.get("params"), dict)):
                raise WireFormatError(f"unknown client step {raw.get('op') if isinstance(raw, dict) else raw!r}"[:120]
                                      + f"; known: {sorted(OPS)}")
            spec = OPS[raw["op"]]
            unknown = set(raw["params"]) - set(spec.params)
            if unknown:
                raise WireFormatError(f"{raw['op']} has no parameters {sorted(map(str, unknown))}")
            params = {k: spec.params[k](v) for k, v in raw["params"].items()}
            steps.append(Step(raw["op"], params, _ids(raw.get("inputs"), n, "step inputs"),
                              strict_int(raw.get("output"), "step output", 1, n - 1),
                              strict_int(raw.get("round"), "step round", 0, MAX_STAGES)))
        stages = []
        for raw in raw_stages:
            if not isinstance(raw, dict):
                raise WireFormatError("a stage is an object with inputs and outputs")
            stages.append(StageIO(_ids(raw.get("inputs"), n, "stage inputs"), _ids(raw.get("outputs"), n,
                                                                                    "stage outputs")))
        return cls(shapes, steps, stages, strict_int(d.get("output"), "output", 0, n - 1))
