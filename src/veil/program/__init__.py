"""The program layer: a small IR of encrypted operations, its planner, backends and artefacts.

`ml/` compiles models into programs (`ir.Program`); the planner (`planner.plan`) chooses
parameters, levels and scales per layout; `affine.LinearCircuit` (depth 0, no rescale) and
`leveled.LeveledCircuit` (networks) run them under SEAL, in simulation or in plaintext. Servers and
clients load any compiled artefact through `load_server` and `load_client` without knowing
which model it came from.
"""

from __future__ import annotations

from typing import Any

from veil.errors import WireFormatError
from veil.program.affine import CircuitClient, LinearCircuit
from veil.program.ir import Linear, Poly, Program, normalise
from veil.program.leveled import LeveledCircuit, ProgramClient
from veil.program.planner import LayoutPlan, plan

Circuit = LinearCircuit | LeveledCircuit
Client = CircuitClient | ProgramClient


def compile_program(program: Program, X: Any, input_bounds: Any = None, headroom: float | None = None,
                    presets: dict[str, str] | None = None) -> Circuit:
    """Plan and build the circuit of any program. A program that normalises to one affine map (a
    linear model, or a network whose activations are all affine) runs on the depth-0 affine
    backend: no rescale, one 60-bit prime, no evaluation keys in batch layout; anything with a
    square runs on the leveled backend."""
    stages = normalise(program)
    if len(stages) == 1:
        only = stages[0]
        assert isinstance(only, Linear)
        kwargs = {} if headroom is None else {"headroom": headroom}
        return LinearCircuit.calibrate(only.weight, only.bias, X, presets=presets, input_bounds=input_bounds,
                                       **kwargs)
    kwargs = {} if headroom is None else {"headroom": headroom}
    stages, plans = plan(program, X, input_bounds=input_bounds, **kwargs)
    return LeveledCircuit(stages, program.n_inputs, plans)


def load_server(data: Any) -> Circuit:
    """The server circuit of any artefact (`to_dict` output): affine or leveled."""
    if not isinstance(data, dict):
        raise WireFormatError(f"a circuit must be an object, got {type(data).__name__}")
    if data.get("kind") == LeveledCircuit.kind:
        return LeveledCircuit.from_dict(data)
    if data.get("kind", "affine") != "affine":
        raise WireFormatError(f"unknown circuit kind {data.get('kind')!r}")
    return LinearCircuit.from_dict(data)


def load_client(spec: Any) -> Client:
    """The client of any artefact (`client_spec` output)."""
    if not isinstance(spec, dict):
        raise WireFormatError(f"a client specification must be an object, got {type(spec).__name__}")
    if spec.get("kind") == LeveledCircuit.kind:
        return ProgramClient(spec)
    if spec.get("kind", "affine") != "affine":
        raise WireFormatError(f"unknown circuit kind {spec.get('kind')!r}")
    return CircuitClient(spec)


__all__ = ["Circuit", "CircuitClient", "Client", "LayoutPlan", "LeveledCircuit", "Linear", "LinearCircuit",
           "Poly", "Program", "ProgramClient", "compile_program", "load_client", "load_server", "plan"]
