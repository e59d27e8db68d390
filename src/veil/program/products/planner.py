"""Plans of a product sum: the batch layout through the leveled planner, the row layout's
levels, ring, rotation steps and cost, and the checks a loaded row plan must pass."""

from __future__ import annotations

import math

import numpy as np

from veil.errors import ShapeError, WireFormatError
from veil.he import CKKSParameters
from veil.he.params import MAX_DEGREE
from veil.program.packing import PROGRAM_LAYOUTS, next_pow2
from veil.program.planner import (
    DEFAULT_HEADROOM,
    DEGREES,
    MAX_PRIME_BITS,
    MAX_SCALE_BITS,
    MIN_SCALE_BITS,
    NOISE_SLOTS,
    PRECISION_BITS,
    LayoutPlan,
    keyswitch_error,
    max_coeff_bits,
    plan,
)
from veil.program.products.ir import ProductSum
from veil.program.products.packing import SlotGeometry

ERROR_SIGMAS = 6.0
"""A row plan's error bound (`row_error_bound`) is ERROR_SIGMAS standard deviations of its estimated
output error (`row_noise`): that error is a sum of many independent rounding and key errors, close
to normal, so an output exceeds the bound with a chance of about 2e-9."""


def slot_row_levels(ps: ProductSum) -> int:
    """Levels of the row layout: selection, one per round, the values."""
    return ps.rounds + 2


def slot_cost_ms(ps: ProductSum, geometry: SlotGeometry, per_prime: dict[str, float], primes: int) -> float:
    """Estimated single-core milliseconds per sample (rotations, diagonal products, squares)."""
    diag = min(geometry.period, sum(len(t) for _, t in ps.literals) * geometry.pairs * 2)
    ops = geometry.n_rotations * per_prime["rotate"] + diag * per_prime["mul_add"]
    ops += ps.rounds * (per_prime["square"] + per_prime["rotate"] + per_prime["rescale"]) + 2 * per_prime["rescale"]
    return ops * primes


def _selection_exposure(ps: ProductSum, geometry: SlotGeometry) -> tuple[np.ndarray, np.ndarray, list]:
    """What the selection (step 2) does to the noise of its inputs and of its baby-step rotations,
    per slot e of its result: sum_k diag_k[e]^2, sum_k diag_k[e]^2 b_k (baby b_k = k mod B carries
    the errors of b_k rotations by 1) and, for the errors every rotation with the key of step 1
    adds identically (`keyswitch_variance`'s profile), the pairs (o, A_o) with A_o[e] =
    sum over k = gB + b with gB <= o < gB + b of diag_k[e]: slot e + o of that profile reaches
    slot e of the result with the coefficient A_o[e]."""
    from veil.program.products.backend import SlotCircuit  # the backend imports this module

    g = geometry
    diags = SlotCircuit(ps, g)._diag_vectors
    squares, babies = np.zeros(g.slots), np.zeros(g.slots)
    exposure = []
    for gi in range(g.giant):
        group = np.zeros((g.baby + 1, g.slots))
        for b in range(g.baby):
            d = diags.get(gi * g.baby + b)
            if d is not None:
                group[b] = d
                squares += d**2
                babies += b * d**2
        tail = np.cumsum(group[::-1], axis=0)[::-1]  # tail[x] = sum over b >= x
        exposure += [(gi * g.baby + x, tail[x + 1]) for x in range(g.baby - 1) if tail[x + 1].any()]
    return squares, babies, exposure


def row_noise(ps: ProductSum, geometry: SlotGeometry, params: CKKSParameters, scale_bits: int,
              exposure: tuple[np.ndarray, np.ndarray, list] | None = None) -> float:
    """Estimated standard deviation of the error of the row layout's outputs (the largest over
    outputs), following its steps (`veil.program.products`) and counting every key switch:

    * fresh encryption and every rescale: NOISE_SLOTS N / 2^s per slot (`planner.output_noise`);
    * every key switch: `keyswitch_variance` at the level it happens, divided by the scale the
      ciphertext holds then: the B - 1 baby-step rotations and the R - 1 partner rotations at 2^s,
      the log2(slots / K) rotations of the final sum at 2^s with one data prime left (the largest
      term on a chain whose special prime is no larger than its first prime), the giant steps
      (rotations of products) and the R relinearizations at about 2^(2s);
    * the selection weighs its inputs' and rotations' errors by the diagonals (the errors a key
      adds identically to every rotation made with it are added coherently,
      `_selection_exposure`); a round p_r(s) = s^2 - c_r s on s in {0, c_r, 2 c_r} multiplies an
      error by at most |2 s - c_r| = 3 c_r, plus its square; a partner's error is added to its own
      (the two may share inputs: their deviations add);
    * the values: weight rounding (2^-s / sqrt(12) of c_R) and the weights |v_t| / c_R times the
      term's error, summed over the terms of an output (deviations add: terms share inputs); the
      rescale errors of all slots and the final sum's rotations add up through the final sum at
      slot c of output c, slot by slot (independent slots).

    In units of the product sum's outputs (the circuit's evaluated, shifted product sum)."""
    g = geometry
    n, bits = params.poly_modulus_degree, params.coeff_modulus_bits
    top = len(bits) - 1
    delta2 = 4.0**scale_bits
    eps2 = (NOISE_SLOTS * n) ** 2 / delta2
    rounding = 4.0**-scale_bits / 12

    def switch(used: int, products: bool = False) -> tuple[float, np.ndarray]:
        """A key switch after `used` rescales (`keyswitch_error`)."""
        return keyswitch_error(params, scale_bits, top - used, products)

    squares, babies, pairs = exposure if exposure is not None else _selection_exposure(ps, g)
    spread, profile = switch(0)
    var = squares * (eps2 + rounding) + babies * spread
    for o, coeff in pairs:
        var += coeff**2 * np.roll(profile, -o)
    giant_spread, giant_profile = switch(0, products=True)
    var += (g.giant - 1) * (giant_spread + float(giant_profile.max())) + eps2
    sd = np.sqrt(var)
    unit = 1.0
    for r in range(ps.rounds):
        if r:
            spread, profile = switch(1 + r)
            sd = np.sqrt((sd + np.roll(sd, -g.offsets[r - 1])) ** 2 + spread + profile)
        relin_spread, relin_profile = switch(1 + r, products=True)
        sd = np.sqrt((3 * unit * sd + sd**2) ** 2 + relin_spread + relin_profile + eps2)
        unit = 2.0 * unit * unit
    terms = np.zeros(ps.n_outputs)
    np.add.at(terms, ps.outputs, np.abs(ps.values) / unit * sd[g.term_slot] + unit * math.sqrt(rounding))
    rest = np.full(g.slots, eps2)
    spread, profile = switch(top - 1)
    for step in g.sum_steps:
        rest = rest + np.roll(rest, -step) + spread + profile
    peak = float(np.max(np.sqrt(terms**2 + rest[:ps.n_outputs])))
    return peak if math.isfinite(peak) else math.inf


def row_error_bound(ps: ProductSum, plan: LayoutPlan) -> float:
    """The error bound a row plan of the (evaluated) product sum `ps` is chosen by: ERROR_SIGMAS
    times `row_noise`, in units of its outputs."""
    return ERROR_SIGMAS * row_noise(ps, SlotGeometry(ps, plan.params.slot_count), plan.params, plan.scale_bits)


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


def row_candidates(ps: ProductSum, value_bits: int) -> list[list[tuple[CKKSParameters, int]]]:
    """Per ring (smallest first) whose slots hold the row geometry and whose selection fits
    MAX_ROW_WORDS, the chains [first, s x (R + 2), special] at 128-bit security for each scale s
    in [MIN_SCALE_BITS, MAX_SCALE_BITS] (largest first): one first prime of s + value_bits + 2
    bits, and the largest special prime that fits (at least the first prime), since a larger
    special prime lowers the key-switching error (`keyswitch_variance`) at no cost in time."""
    levels = slot_row_levels(ps)
    rings = []
    for n in DEGREES:
        found = []
        for s in range(MAX_SCALE_BITS, MIN_SCALE_BITS - 1, -1):
            first = s + value_bits + 2
            special = min(MAX_PRIME_BITS, max_coeff_bits(n) - first - levels * s)
            if first <= MAX_PRIME_BITS and special >= first and n <= MAX_DEGREE:
                found.append((CKKSParameters(n, (first, *([s] * levels), special)), s))
        if not found:
            continue
        try:
            geometry = SlotGeometry(ps, found[0][0].slot_count)
            geometry.check_size(ps, found[0][0])
        except ShapeError:
            continue
        rings.append(found)
    return rings


def plan_product_sum(ps: ProductSum, X: np.ndarray, headroom: float = DEFAULT_HEADROOM,
                     layouts: tuple[str, ...] = PROGRAM_LAYOUTS) -> dict[str, LayoutPlan]:
    """Plans for inputs X (the encoded 0/1 inputs): the batch layout through the leveled planner
    (inputs in [0, 1]); the row layout with R + 2 levels, relinearization and its rotation steps,
    on the smallest ring (`row_candidates`) whose most precise chain keeps the error bound
    (`row_error_bound`) at most 2^-PRECISION_BITS of the largest calibration output, else the
    most precise chain of all (precision first, then speed): its rotations cost N * primes^2, so
    the ring is most of its latency, and on one ring the chains cost the same."""
    plans: dict[str, LayoutPlan] = {}
    if "batch" in layouts:
        _, batch = plan(ps.lower(), X, input_bounds=1.0, headroom=headroom, layouts=("batch",), non_negative=True)
        plans.update(batch)
    if "row" in layouts:
        largest = float(np.max(np.abs(ps.evaluate(X))))
        # (a bound of exactly 2^k, as 1.0000000000000009 probabilities times the headroom give, is k bits)
        value_bits = max(1, math.ceil(math.log2(max(ps.output_bound(), largest * headroom, 1.0)) - 1e-9))
        target = 2.0**-PRECISION_BITS * max(largest, 2.0**-PRECISION_BITS)
        best: tuple[float, CKKSParameters, int] | None = None
        for ring in row_candidates(ps, value_bits):
            geometry = SlotGeometry(ps, ring[0][0].slot_count)
            exposure = _selection_exposure(ps, geometry)
            bound, params, s = min((ERROR_SIGMAS * row_noise(ps, geometry, p, s, exposure), p, s) for p, s in ring)
            if best is None or bound < best[0]:
                best = (bound, params, s)
            if bound <= target:
                break
        if best is not None:
            _, params, s = best
            geometry = SlotGeometry(ps, params.slot_count)
            plans["row"] = LayoutPlan("row", params, s, (1.0,) * ps.n_inputs, True, geometry.rotation_steps,
                                      next_pow2(ps.n_inputs), False)
    return plans
