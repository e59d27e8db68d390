"""Plans of a product sum: the batch layout through the leveled planner, the row layout's
levels, ring, rotation steps and cost, and the checks a loaded row plan must pass."""

from __future__ import annotations

import math

import numpy as np

from veil.errors import ShapeError, WireFormatError
from veil.he import CKKSParameters
from veil.program.packing import next_pow2
from veil.program.planner import DEFAULT_HEADROOM, DEGREES, LAYOUTS, LayoutPlan, choose_parameters, plan
from veil.program.products.ir import ProductSum
from veil.program.products.packing import SlotGeometry

ROW_SCALE_BITS = 30
"""The row layout prefers the smaller ring at a scale of 2^30 (about 2e-6 of noise per level at
N=8192, far below what 0/1 products and tree outputs need) over a larger ring at 2^32: its
rotations cost N * primes^2, so the ring is most of its latency."""


def slot_row_levels(ps: ProductSum) -> int:
    """Levels of the row layout: selection, one per round, the values."""
    return ps.rounds + 2


def slot_cost_ms(ps: ProductSum, geometry: SlotGeometry, per_prime: dict[str, float], primes: int) -> float:
    """Estimated single-core milliseconds per sample (rotations, diagonal products, squares)."""
    diag = min(geometry.period, sum(len(t) for _, t in ps.literals) * geometry.pairs * 2)
    ops = geometry.n_rotations * per_prime["rotate"] + diag * per_prime["mul_add"]
    ops += ps.rounds * (per_prime["square"] + per_prime["rotate"] + per_prime["rescale"]) + 2 * per_prime["rescale"]
    return ops * primes


def check_row_plan(p: LayoutPlan, n_inputs: int, levels: int | None, geometry: SlotGeometry | None) -> None:
    bits = p.params.coeff_modulus_bits
    if not p.relin or p.relin_last or p.half != next_pow2(n_inputs) or p.half > p.params.slot_count \
            or p.geometry is not None:
        raise WireFormatError("the row plan of a product sum relinearizes every square and repeats the inputs "
                              "with the period next_pow2(n_inputs)")
    if len(p.input_bounds) != n_inputs:
        raise ShapeError("input bounds do not match the number of inputs")
    if (levels is not None and len(bits) != levels + 2) or len(bits) < 5:
        raise WireFormatError("the row plan's modulus chain does not match the program's depth")
    if any(b != p.scale_bits for b in bits[1:-1]) or bits[0] < p.scale_bits + 3:
        raise WireFormatError("the row plan's scale does not match its modulus chain")
    if geometry is not None and tuple(sorted(p.rotation_steps)) != geometry.rotation_steps:
        raise WireFormatError("the row plan's rotation steps are not the ones its program needs")


def plan_product_sum(ps: ProductSum, X: np.ndarray, headroom: float = DEFAULT_HEADROOM,
                     layouts: tuple[str, ...] = LAYOUTS) -> dict[str, LayoutPlan]:
    """Plans for inputs X (the encoded 0/1 inputs): the batch layout through the leveled planner
    (inputs in [0, 1]); the row layout with R + 2 levels, relinearization and its rotation steps,
    in the smallest ring whose slots hold its geometry."""
    plans: dict[str, LayoutPlan] = {}
    if "batch" in layouts:
        _, batch = plan(ps.lower(), X, input_bounds=1.0, headroom=headroom, layouts=("batch",), non_negative=True)
        plans.update(batch)
    if "row" in layouts:
        observed = float(np.max(np.abs(ps.evaluate(X)))) * headroom
        # (a bound of exactly 2^k, as 1.0000000000000009 probabilities times the headroom give, is k bits)
        value_bits = max(1, math.ceil(math.log2(max(ps.output_bound(), observed, 1.0)) - 1e-9))
        params, s = choose_parameters(slot_row_levels(ps), value_bits, True, preferred=ROW_SCALE_BITS)
        while True:
            try:
                geometry = SlotGeometry(ps, params.slot_count)
                break
            except ShapeError:
                larger = [n for n in DEGREES if n > params.poly_modulus_degree]
                if not larger:
                    geometry = None
                    break
                params = CKKSParameters(larger[0], params.coeff_modulus_bits)
        if geometry is not None:
            try:
                geometry.check_size(ps, params)
            except ShapeError:
                geometry = None
        if geometry is not None:
            plans["row"] = LayoutPlan("row", params, s, (1.0,) * ps.n_inputs, True, geometry.rotation_steps,
                                      next_pow2(ps.n_inputs), False)
    return plans
