"""Compile a user's `torch.nn.Module` for encrypted inference (`veil.ml.compile_torch_model`).

The module is traced with torch.fx into a graph of affine maps, polynomial activations and other
layers (`veil.ml.torch_graph`), which is lowered one of two ways:

* `module_to_program` (`nonlinear="server"`, non-interactive): every non-affine operation must be a
  polynomial of degree <= 2 (`Square`, `x * x`, `x ** 2`, `torch.square`, `Polynomial(c0, c1,
  c2)`), evaluated by the server under CKKS. The graph becomes a chain of the IR: for depth
  d = 1, 2, ... (a polynomial's depth is the number of polynomials on its longest path from the
  input), a Linear computing the inputs of every polynomial of depth d from the values live
  after depth d - 1, then one Poly over them all; a value read later (the input of a skip
  connection, one side of a concatenation) rides past that Poly as the identity element of a
  per-element polynomial. Residual adds and concatenations thus cost no extra level; they are
  planned for the batch layout (`veil.program.planner`). Other layers raise
  `UnsupportedLayerError` naming the layer and what to use instead (`replace_relu` swaps ReLU for
  a fitted quadratic and fine-tunes).
* `module_to_staged` (`nonlinear="client"`, interactive): the client computes every non-affine
  layer exactly, the server every run of affine layers between them, one round trip per
  non-linear stage (`veil.program.staged`: protocol, checks and what each side learns).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.errors import ShapeError
from veil.ml.torch_graph import (
    AFFINE_MODULES,
    CLIENT_HINT,
    GLUE,
    INSTEAD,
    POLY,
    Graph,
    Polynomial,
    Square,
    UnsupportedLayerError,
    trace,
)
from veil.program.affine import DEFAULT_HEADROOM as AFFINE_HEADROOM
from veil.program.glue import StagedGraph, StageIO, Step
from veil.program.ir import Poly, Program
from veil.program.planner import COST_MS_PER_PRIME
from veil.program.staged import StagedCircuit, compile_staged
from veil.program.tiled import grid_candidates, place

__all__ = ["AFFINE_MODULES", "INSTEAD", "Polynomial", "Square", "UnsupportedLayerError", "module_to_program",
           "module_to_staged", "relu_polynomial", "replace_relu", "staged_graph"]


def relu_polynomial(bound: float = 4.0) -> Polynomial:
    """Least-squares quadratic fit of ReLU on [-bound, bound]."""
    grid = np.linspace(-bound, bound, 2001)
    c2, c1, c0 = np.polyfit(grid, np.maximum(grid, 0.0), 2)
    return Polynomial(float(c0), float(c1), float(c2))


def _sources(graph: Graph, bases: set[int]) -> dict[int, set[int]]:
    """Per node, the base values (those not computed by the server's affine maps) it is an affine
    function of: itself for a base value."""
    src: dict[int, set[int]] = {}
    for i, node in enumerate(graph.nodes):
        src[i] = {i} if i in bases else set().union(*(src[a] for a in node.args))
    return src


def lower_program(graph: Graph) -> Program:
    """The graph as a chain of Linear and (per-element) Poly stages (module docstring)."""
    for node in graph.nodes:
        if node.kind == GLUE:
            raise UnsupportedLayerError(f"{node.name} has no encrypted equivalent; use {node.hint}, or {CLIENT_HINT}")
    if graph.output == 0:
        raise ShapeError("the module computes nothing")
    polys = [i for i, node in enumerate(graph.nodes) if node.kind == POLY]
    src = _sources(graph, {0, *polys})
    depth = {0: 0}
    for p in polys:
        depth[p] = 1 + max(depth[b] for b in src[graph.nodes[p].args[0]])
    top = max(depth.values())
    last = dict.fromkeys(depth, 0)  # the last Linear stage (1 .. top + 1) reading each base value
    for p in polys:
        for b in src[graph.nodes[p].args[0]]:
            last[b] = max(last[b], depth[p])
    for b in src[graph.output]:
        last[b] = top + 1
    state, ops, shapes = [0], [], []
    for d in range(1, top + 2):
        layer = [p for p in polys if depth[p] == d and last[p] > d] if d <= top else []
        carried = [b for b in state if last[b] > d]
        targets = [graph.nodes[p].args[0] for p in layer] + carried if d <= top else [graph.output]
        ops.append(graph.affine_map(state, targets))
        if d > top:
            break
        coeffs = [np.repeat([graph.nodes[p].coeffs], graph.nodes[p].size, axis=0) for p in layer]
        coeffs += [np.repeat([(0.0, 1.0, 0.0)], graph.nodes[b].size, axis=0) for b in carried]
        c = np.concatenate(coeffs)
        ops.append(Poly.per_element(c[:, 0], c[:, 1], c[:, 2]))
        state = layer + carried
        shapes.append(graph.nodes[layer[0]].shape if len(state) == 1 and ops[-1].is_uniform else None)
    return Program(graph.nodes[0].size, _placed(ops, shapes))


def _placed(ops: list, shapes: list[tuple[int, ...] | None]) -> list:
    """`ops` with the values between its Linears placed for the row layout's diagonal method
    (`veil.program.tiled.place`) when that at least halves the estimated cost of its diagonal
    stages; else unchanged. `shapes[k]`: the shape of the value Linear k computes (None: a value
    made of several nodes or carried past a square, or under a per-element polynomial, which stay
    in order). For a convolution reading a pooled convolution the channel-blocked grids turn the
    hybrid diagonal method's dense diagonals (every output reads 600 inputs spread over the
    image in LeNet-5) into a few hundred (a diagonal per kernel offset and channel difference).
    The price: the batch layout carries the gaps as ciphertexts of zeros."""
    if not any(s is not None and len(s) == 3 for s in shapes):
        return ops
    strides = {s[2] // f for s in shapes if s is not None and len(s) == 3 for f in (1, 2, 3, 4) if s[2] % f == 0}
    c = COST_MS_PER_PRIME

    def cost(counts: dict[str, int]) -> float:
        return counts["mul_plain"] * c["mul_add"] + counts["rotations"] * c["rotate"]

    placed, new, old = place(ops, [grid_candidates(s, strides) for s in shapes], cost)
    return placed if new <= old / 2 else ops


def module_to_program(module: nn.Module, input_shape: tuple[int, ...]) -> Program:
    """Lower `module` to a `Program` on the flattened input of shape `input_shape` (traced on a
    few random samples: the lowering does not depend on the data)."""
    sample = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return lower_program(trace(module, sample))


def staged_graph(graph: Graph) -> tuple[StagedGraph, list[tuple[list[int], list[int]]], dict[int, int]]:
    """The public description of the graph's interactive evaluation, the (inputs, outputs) nodes
    of each server stage, and the node of every value the client sends.

    Placement: the input, every non-affine node and every parameter-free step (reshape, sum,
    difference, concatenation) of values the client holds run on the client; every other node is
    an affine function, computed by the server, of the client values it depends on. A client node
    runs in round r = max over its arguments of the argument's round (a client value) or 1 + the
    latest round of the client values it depends on (a server value); stage r - 1 computes the
    server values that round r reads, from the client values they depend on (the client sends
    those again in each stage that reads them), and a last stage computes the output if the
    server does."""
    rounds: dict[int, int] = {0: 0}
    src: dict[int, set[int]] = {0: {0}}
    for i, node in enumerate(graph.nodes[1:], start=1):
        if node.kind in (GLUE, POLY) or (node.step is not None and all(a in rounds for a in node.args)):
            rounds[i] = max(rounds[a] if a in rounds else 1 + max(rounds[b] for b in src[a]) for a in node.args)
            src[i] = {i}
        else:
            src[i] = set().union(*(src[a] for a in node.args))
    stages = []
    for r in range(1, max(rounds.values()) + 1):
        wanted = [a for i in sorted(rounds) if rounds[i] == r for a in graph.nodes[i].args if a not in rounds]
        outputs = list(dict.fromkeys(wanted))
        stages.append((sorted(set().union(*(src[u] for u in outputs))), outputs))
    if graph.output not in rounds:
        stages.append((sorted(src[graph.output]), [graph.output]))
    if not stages:
        raise ShapeError("the module computes nothing on the server: nothing would be encrypted")
    shapes = [graph.nodes[0].shape]
    value = {0: 0}
    for i in sorted(rounds)[1:]:
        value[i] = len(shapes)
        shapes.append(graph.nodes[i].shape)
    answer: dict[tuple[int, int], int] = {}
    for s, (_, outputs) in enumerate(stages):
        for u in outputs:
            answer[(u, s)] = len(shapes)
            shapes.append(graph.nodes[u].shape)
    steps = []
    for i in sorted(sorted(rounds)[1:], key=lambda i: rounds[i]):
        node, r = graph.nodes[i], rounds[i]
        assert node.step is not None
        reads = tuple(value[a] if a in rounds else answer[(a, r - 1)] for a in node.args)
        steps.append(Step(node.step[0], node.step[1], reads, value[i], r))
    io = [StageIO(tuple(value[b] for b in inputs), tuple(answer[(u, s)] for u in outputs))
          for s, (inputs, outputs) in enumerate(stages)]
    output = value[graph.output] if graph.output in rounds else answer[(graph.output, len(stages) - 1)]
    sent = {value[b]: b for inputs, _ in stages for b in inputs}
    return StagedGraph(shapes, steps, io, output), stages, sent


def _positive(module: nn.Module) -> nn.Module:
    """A copy whose parameters and floating buffers are all |p| + 1: its affine maps have no
    cancellations, so their non-zero pattern is the architecture's (which weights may be non-zero)."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for t in [*out.parameters(), *(b for b in out.buffers() if b.is_floating_point())]:
            t.copy_(t.abs() + 1.0)
    return out


def module_to_staged(module: nn.Module, X: np.ndarray, input_bounds: Any = None,
                     headroom: float = AFFINE_HEADROOM) -> tuple[Graph, StagedCircuit]:
    """The traced graph of `module` and its staged circuit, calibrated on X (n, *input_shape)."""
    graph = trace(module, X)
    description, stages, sent = staged_graph(graph)
    maps = [graph.affine_map(inputs, outputs) for inputs, outputs in stages]
    structure = trace(_positive(module), np.asarray(X)[:2])
    same = [n.name for n in structure.nodes] == [n.name for n in graph.nodes]
    supports = [structure.affine_map(inputs, outputs).weight != 0 if same else None for inputs, outputs in stages]
    calibration = {v: graph.values[node] for v, node in sent.items()}
    return graph, compile_staged(description, maps, calibration, supports, input_bounds, headroom)


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
