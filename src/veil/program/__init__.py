"""The program layer: a small IR of encrypted operations, its planner, backends and artefacts.

`ml/` compiles models into programs (`ir.Program`, or `products.ProductSum` for sums of products of
0/1 literals such as tree ensembles); the planner (`planner.plan`) chooses
parameters, levels and scales per layout; `affine.LinearCircuit` (depth 0, no rescale) and
`leveled.LeveledCircuit` (networks) run them under SEAL, in simulation or in plaintext;
`staged.StagedCircuit` runs a network interactively, its linear stages on the server and its other
layers on the client (`glue.StagedGraph` describes them). Each kind of
circuit is one registered object (`kinds.CircuitKind`), so servers and clients load any compiled
artefact through `load_server` and `load_client` without knowing which model it came from.
"""

from __future__ import annotations

from typing import Any

from veil.errors import ShapeError
from veil.he import CKKSParameters
from veil.program.affine import LinearCircuit, LinearClient
from veil.program.encoding import ThermometerEncoding
from veil.program.ir import Linear, Poly, Program, normalise
from veil.program.kinds import CircuitKind, depth, describe, key_needs, kinds, load_client, load_server, register
from veil.program.leveled import LeveledCircuit, LeveledClient
from veil.program.planner import BOUNDS, LayoutPlan, check_batch_memory, plan
from veil.program.products import ProductSum, ProductSumCircuit, ProductSumClient, compile_product_sum
from veil.program.staged import StagedCircuit, StagedClient, compile_staged

Circuit = LinearCircuit | LeveledCircuit | StagedCircuit
AnyClient = LinearClient | LeveledClient | StagedClient


def compile_program(program: Program, X: Any, input_bounds: Any = None, headroom: float | None = None,
                    presets: dict[str, str] | None = None, bounds: str = "sound",
                    non_negative: bool = False) -> Circuit:
    """Plan and build the circuit of any program. A program that normalises to one affine map (a
    linear model, or a network whose activations are all affine) runs on the depth-0 affine
    backend: no rescale, one 60-bit prime, no evaluation keys in batch layout; anything with a
    square runs on the leveled backend, its ring sized by `bounds` (`planner.BOUNDS`): "sound"
    holds the outputs of every input the client accepts, "calibrated" those of inputs like X
    (times `headroom`), the client refusing outputs beyond them. With `non_negative` the input box
    is [0, bound] (pixels in [0, 1]) rather than [-bound, bound]: tighter sound bounds, hence a
    smaller output level and noise estimate, and the client refuses negative inputs (an affine
    program keeps its symmetric box, which contains that one). A batch plan beyond the batch
    layout's memory bound (`planner.check_batch_memory`) is left out when a row plan exists.
    (Programs over a public input encoding, tree ensembles, are product sums:
    `compile_product_sum`.)"""
    if bounds not in BOUNDS:
        raise ShapeError(f"unknown bounds {bounds!r}; choose from {BOUNDS}")
    stages = normalise(program)
    kwargs = {} if headroom is None else {"headroom": headroom}
    if len(stages) == 1:
        only = stages[0]
        assert isinstance(only, Linear)
        return LinearCircuit.calibrate(only.weight, only.bias, X, presets=presets, input_bounds=input_bounds,
                                       **kwargs)
    stages, plans = plan(program, X, input_bounds=input_bounds, bounds=bounds, non_negative=non_negative, **kwargs)
    if "batch" in plans:
        try:
            check_batch_memory(stages, program.n_inputs, plans["batch"].params)
        except ShapeError as exc:
            if len(plans) == 1:
                hint = "; with bounds=\"calibrated\" a smaller ring may hold it" if bounds == "sound" else ""
                raise ShapeError(f"{exc} (no row plan holds this program{hint})") from None
            del plans["batch"]  # too wide for the batch layout's memory bound: the row layout holds it
    return LeveledCircuit(stages, program.n_inputs, plans)


def ciphertext_bytes(params: CKKSParameters) -> int:
    """An upper bound on one fresh serialized ciphertext: two polynomials of N coefficients per
    data prime, 8 bytes each (SEAL's compression only makes it smaller). Used to size requests."""
    primes = max(1, len(params.coeff_modulus_bits) - 1)
    return 2 * params.poly_modulus_degree * primes * 8 + 128


def request_bytes(side: AnyClient, layout: str, n_samples: int) -> int:
    """An upper bound on the body of an encrypted request of `n_samples` rows in `layout`."""
    return side.layout(layout).n_input_cts(n_samples) * ciphertext_bytes(side.layout_params()[layout]) + 4096


def rows_per_request(side: AnyClient, layout: str, max_bytes: int, cap: int) -> int:
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
    "AnyClient",
    "Circuit",
    "CircuitKind",
    "LayoutPlan",
    "LeveledCircuit",
    "LeveledClient",
    "Linear",
    "LinearCircuit",
    "LinearClient",
    "Poly",
    "ProductSum",
    "ProductSumCircuit",
    "ProductSumClient",
    "Program",
    "StagedCircuit",
    "StagedClient",
    "ThermometerEncoding",
    "ciphertext_bytes",
    "compile_product_sum",
    "compile_program",
    "compile_staged",
    "depth",
    "describe",
    "key_needs",
    "kinds",
    "load_client",
    "load_server",
    "plan",
    "register",
    "request_bytes",
    "rows_per_request",
]
