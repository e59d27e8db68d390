"""The program layer: a small IR of encrypted operations, its planner, backends and artefacts.

`ml/` compiles models into programs (`ir.Program`, or `products.ProductSum` for sums of products of
0/1 literals such as tree ensembles); the planner (`planner.plan`) chooses
parameters, levels and scales per layout; `affine.LinearCircuit` (depth 0, no rescale) and
`leveled.LeveledCircuit` (networks) run them under SEAL, in simulation or in plaintext. Servers and
clients load any compiled artefact through `load_server` and `load_client` without knowing
which model it came from.
"""

from __future__ import annotations

from typing import Any

from veil.errors import WireFormatError
from veil.he import CKKSParameters
from veil.program.affine import CircuitClient, LinearCircuit
from veil.program.encoding import ThermometerEncoding
from veil.program.ir import Linear, Poly, Program, normalise
from veil.program.leveled import LeveledCircuit, ProgramClient
from veil.program.packing import RowLayout
from veil.program.planner import LayoutPlan, plan
from veil.program.products import ProductSum, ProductSumCircuit, ProductSumClient, compile_product_sum

Circuit = LinearCircuit | LeveledCircuit
Client = CircuitClient | ProgramClient


def compile_program(program: Program, X: Any, input_bounds: Any = None, headroom: float | None = None,
                    presets: dict[str, str] | None = None) -> Circuit:
    """Plan and build the circuit of any program. A program that normalises to one affine map (a
    linear model, or a network whose activations are all affine) runs on the depth-0 affine
    backend: no rescale, one 60-bit prime, no evaluation keys in batch layout; anything with a
    square runs on the leveled backend. (Programs over a public input encoding, tree ensembles, are
    product sums: `compile_product_sum`.)"""
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
    if data.get("kind") == ProductSumCircuit.kind:
        return ProductSumCircuit.from_dict(data)
    if data.get("kind", "affine") != "affine":
        raise WireFormatError(f"unknown circuit kind {data.get('kind')!r}")
    return LinearCircuit.from_dict(data)


def load_client(spec: Any) -> Client:
    """The client of any artefact (`client_spec` output)."""
    if not isinstance(spec, dict):
        raise WireFormatError(f"a client specification must be an object, got {type(spec).__name__}")
    if spec.get("kind") == LeveledCircuit.kind:
        return ProgramClient(spec)
    if spec.get("kind") == ProductSumClient.kind:
        return ProductSumClient(spec)
    if spec.get("kind", "affine") != "affine":
        raise WireFormatError(f"unknown circuit kind {spec.get('kind')!r}")
    return CircuitClient(spec)


def _layout_params(side: Circuit | Client) -> dict[str, CKKSParameters]:
    if isinstance(side, LinearCircuit):
        return {name: s.params for name, s in side.scales.items()}
    if isinstance(side, LeveledCircuit | ProgramClient):
        return {name: p.params for name, p in side.plans.items()}
    return dict(side.params)


def key_needs(side: Circuit | Client) -> dict[str, dict[str, Any]]:
    """Per layout, what a client's public bundle must hold for this program: the parameter
    fingerprint, whether relinearization keys are needed and the Galois rotation steps. Servers and
    clients of the same artefact answer alike, so a deploy can check the two halves agree and a
    model's description can tell a client which keys it will be asked for."""
    needs: dict[str, dict[str, Any]] = {}
    for name, params in sorted(_layout_params(side).items()):
        if isinstance(side, LeveledCircuit | ProgramClient):
            plan = side.plans[name]
            relin, steps = plan.relin, sorted(plan.rotation_steps)
        else:
            packing = side.layout(name)
            relin = False
            steps = sorted(packing.rotation_steps) if isinstance(packing, RowLayout) else []
        needs[name] = {"params": params.fingerprint, "relin": relin, "rotation_steps": steps}
    return needs


def depth(side: Circuit | Client) -> int:
    """Multiplicative depth (rescales, the primes of the modulus chain between the first and the
    special one) of the program in its deepest layout: 0 for an affine model."""
    if isinstance(side, LeveledCircuit | ProgramClient):
        return max(len(p.params.coeff_modulus_bits) - 2 for p in side.plans.values())
    return 0


def ciphertext_bytes(params: CKKSParameters) -> int:
    """An upper bound on one fresh serialized ciphertext: two polynomials of N coefficients per
    data prime, 8 bytes each (SEAL's compression only makes it smaller). Used to size requests."""
    primes = max(1, len(params.coeff_modulus_bits) - 1)
    return 2 * params.poly_modulus_degree * primes * 8 + 128


def request_bytes(side: Client, layout: str, n_samples: int) -> int:
    """An upper bound on the body of an encrypted request of `n_samples` rows in `layout`."""
    return side.layout(layout).n_input_cts(n_samples) * ciphertext_bytes(_layout_params(side)[layout]) + 4096


def rows_per_request(side: Client, layout: str, max_bytes: int, cap: int) -> int:
    """The most rows (at most `cap`) whose encrypted request in `layout` stays within `max_bytes`,
    but never fewer than fill the first ciphertext group (one request must carry something)."""
    def fits(n: int) -> bool:
        return request_bytes(side, layout, n) <= max_bytes

    packing = side.layout(layout)
    lo, hi = 1, max(1, cap)
    if not fits(1):  # one group is over budget: send exactly one full group
        first = packing.n_input_cts(1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if packing.n_input_cts(mid) == first else (lo, mid - 1)
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


__all__ = [
    "Circuit",
    "CircuitClient",
    "Client",
    "LayoutPlan",
    "LeveledCircuit",
    "Linear",
    "LinearCircuit",
    "Poly",
    "ProductSum",
    "ProductSumCircuit",
    "ProductSumClient",
    "Program",
    "ProgramClient",
    "ThermometerEncoding",
    "ciphertext_bytes",
    "compile_product_sum",
    "compile_program",
    "depth",
    "key_needs",
    "load_client",
    "load_server",
    "plan",
    "request_bytes",
    "rows_per_request",
]
