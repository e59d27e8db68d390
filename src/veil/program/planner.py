"""The planner: from a `Program` and calibration data to encryption parameters per layout.

Steps:
1. `ir.normalise` rewrites the program as alternating stages Linear, Poly, Linear, ... where
   each stage costs exactly one rescale, so the multiplicative depth D is the number of stages,
   except that in the batch layout a Linear with small integer weights (`ir.is_exact`) is sums
   of ciphertexts and costs none (`stage_levels`).
2. Interval arithmetic propagates the accepted input box (per feature, INPUT_HEADROOM times the
   largest calibration magnitude, or the caller's `input_bounds`) through every stage, giving a
   bound on every intermediate and output value for ANY accepted input; the client refuses
   inputs outside the box, so no value can wrap around the modulus (a silent wrong answer).
3. Parameters: the fixed-point scale 2^s (s in [MIN_SCALE_BITS, MAX_SCALE_BITS]), a first prime
   of s + bits(bound) + 2 bits that holds the output, D primes of s bits consumed by the
   rescales, and a special prime for key switching (as large as the largest data prime when
   rotations or relinearization are used: key-switching noise scales with their ratio). The
   smallest ring degree whose 128-bit bound (SEAL's table) holds the chain is chosen, with the
   largest scale that fits; beyond N=32768, a `PrecisionError` says what to change.
4. Layouts: both, except that a program with a per-element polynomial (a skip connection carried
   as the identity past a layer of squares, see `ir.Poly`) is planned for the batch layout only:
   there each element is its own ciphertext, while the row layout would need per-slot
   coefficient plaintexts, one more level per polynomial.
5. Per layout, the evaluation keys the program needs: the batch layout relinearizes only squares
   followed by another square (so a one-hidden-layer network needs no keys at all); the row layout
   needs the baby-step and giant-step rotations of the diagonal method, the block duplication
   rotation, and relinearization keys when a square precedes another stage.

Error bound: every stage adds CKKS noise of about NOISE_SLOTS * N / 2^s per slot (rescale
rounding dominates fresh-encryption and key-switching noise), amplified by later weights and by
the derivative of later squares; the planner prefers scales of at least 2^32 (about 5e-7 per
stage at N=8192) and moves to a larger ring before going below. `simulate` adds noise of this
size after every stage; the tests check both against the plaintext program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import seal

from veil.errors import PrecisionError, ShapeError, WireFormatError
from veil.he.params import MAX_DEGREE, CKKSParameters
from veil.he.wire import strict_int
from veil.program.ir import Linear, Op, Poly, Program, is_exact, normalise
from veil.program.packing import next_pow2

INPUT_HEADROOM = 2.0
DEFAULT_HEADROOM = 4.0
MIN_SCALE_BITS = 26
PREFERRED_SCALE_BITS = 32
MAX_SCALE_BITS = 40
MAX_PRIME_BITS = 60
DEGREES = (8192, 16384, 32768)
NOISE_SLOTS = 0.25
"""Per-slot CKKS noise after a rescale is about NOISE_SLOTS * N / 2^s: the rounding of a rescale
times the ternary secret (about N/4 per slot after decoding), which dominates fresh-encryption noise
(3.2 sqrt(N)) and key switching with a special prime as large as the data primes."""
LAYOUTS = ("batch", "row")
MAX_UNRELINEARIZED_NOISE = 1e-6
"""Largest per-slot noise accepted for skipping the last relinearization (see `relinearize_at`)."""


@dataclass(frozen=True)
class LayoutPlan:
    """Everything both sides must agree on to run a program in one layout."""

    layout: str
    params: CKKSParameters
    scale_bits: int
    input_bounds: tuple[float, ...]
    relin: bool
    rotation_steps: tuple[int, ...]
    half: int
    relin_last: bool = False

    def relinearize_at(self, stage: int, stages: list[Op]) -> bool:
        """Whether the square of `stage` is relinearized: always when another stage rotates (row
        layout) or squares it again; the last one only if `relin_last` (skipping it saves the key
        switch and the relinearization key, and costs sqrt(N) more noise in one rescale)."""
        later = stages[stage + 1:]
        if self.relin_last:
            return True
        if self.layout == "row":
            return bool(later)
        return any(isinstance(op, Poly) for op in later)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "params": self.params.to_dict(), "scale_bits": self.scale_bits,
                "input_bounds": list(self.input_bounds), "relin": self.relin,
                "rotation_steps": list(self.rotation_steps), "half": self.half, "relin_last": self.relin_last}

    @classmethod
    def from_dict(cls, d: object) -> LayoutPlan:
        """Parse untrusted JSON strictly (a server and a client both load these)."""
        if not isinstance(d, dict):
            raise WireFormatError("a layout plan must be an object")
        layout = d.get("layout")
        if layout not in LAYOUTS:
            raise WireFormatError(f"unknown layout {layout!r}; known: {LAYOUTS}")
        params = CKKSParameters.from_dict(d.get("params"))
        bounds = d.get("input_bounds")
        if not isinstance(bounds, list) or not all(
                isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 2 ** 1023 and math.isfinite(b)
                for b in bounds):
            raise WireFormatError("input_bounds must be a list of finite non-negative numbers")
        steps = d.get("rotation_steps")
        if not isinstance(steps, list):
            raise WireFormatError("rotation_steps must be a list")
        relin, relin_last = d.get("relin"), d.get("relin_last", False)
        if not isinstance(relin, bool) or not isinstance(relin_last, bool) or (relin_last and not relin):
            raise WireFormatError("relin and relin_last must be true or false (relin_last implies relin)")
        slots = params.slot_count
        return cls(layout, params, strict_int(d.get("scale_bits"), "scale_bits", MIN_SCALE_BITS, MAX_PRIME_BITS),
                   tuple(float(b) for b in bounds), relin,
                   tuple(strict_int(s, "rotation step", 1, slots - 1) for s in steps),
                   strict_int(d.get("half"), "half", 0, slots), relin_last)

    def check_input(self, X: np.ndarray) -> None:
        """Refuse (PrecisionError) any sample outside the box the parameters were planned for."""
        check_box(X, np.asarray(self.input_bounds))


def check_box(X: np.ndarray, bounds: np.ndarray, where: str = "") -> None:
    """Refuse (PrecisionError) any sample of X with a feature beyond its bound; `where` names the
    values checked in the message (e.g. a stage's inputs)."""
    over = np.abs(X) > bounds
    if over.any():
        i, f = map(int, np.argwhere(over)[0])
        raise PrecisionError(
            f"sample {i}, {where}feature {f} = {X[i, f]:.4g} is outside the range the model was compiled "
            f"for (|x| <= {bounds[f]:.4g}); recompile with calibration data or input_bounds covering it")


def input_box(X: np.ndarray, input_bounds: float | np.ndarray | None) -> np.ndarray:
    """Per-feature bounds: INPUT_HEADROOM x the largest calibration magnitude (features that are
    always zero in the calibration data get the median bound), or the caller's bounds."""
    if input_bounds is not None:
        bounds = np.broadcast_to(np.abs(np.asarray(input_bounds, dtype=np.float64)), (X.shape[1],)).copy()
        if np.any(np.abs(X) > bounds):
            raise PrecisionError("calibration data exceed the given input_bounds")
        return bounds
    peak = np.max(np.abs(X), axis=0) * INPUT_HEADROOM
    floor = float(np.median(peak)) if np.any(peak > 0) else 1.0
    return np.where(peak > 0, peak, max(floor, 1e-6))


def row_capable(stages: list[Op]) -> bool:
    """Whether the row layout can run these stages: only uniform polynomials (see step 4)."""
    return all(op.is_uniform for op in stages if isinstance(op, Poly))


def stage_levels(stages: list[Op], layout: str) -> list[bool]:
    """Whether each stage costs a level (a rescale) in `layout`: all of them in the row layout
    (its diagonals are real-valued plaintexts), all but the exact Linears in the batch layout."""
    return [layout != "batch" or not is_exact(op) for op in stages]


def interval_bounds(stages: list[Op], bounds: np.ndarray, non_negative: bool = False) -> list[float]:
    """Largest |value| after each stage for any input in the box |x| <= bounds, or 0 <= x <= bounds
    with `non_negative` (encoded bits) (centre-radius arithmetic)."""
    lo, hi = (np.zeros_like(bounds) if non_negative else -bounds), bounds.copy()
    out = []
    with np.errstate(over="ignore", invalid="ignore"):  # an unbounded program gives inf: refused by plan
        return _propagate(stages, lo, hi, out)


def _propagate(stages: list[Op], lo: np.ndarray, hi: np.ndarray, out: list[float]) -> list[float]:
    for op in stages:
        if isinstance(op, Linear):
            c, r = (lo + hi) / 2, (hi - lo) / 2
            c, r = op.weight @ c + op.bias, np.abs(op.weight) @ r
            lo, hi = c - r, c + r
        else:
            c0, c1, c2 = op.coeffs
            sq_hi = np.maximum(lo**2, hi**2)
            sq_lo = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(lo**2, hi**2))
            lin = np.stack([c1 * lo, c1 * hi])
            sq = np.stack([c2 * sq_lo, c2 * sq_hi])
            lo, hi = c0 + lin.min(0) + sq.min(0), c0 + lin.max(0) + sq.max(0)
        peak = float(np.max(np.maximum(np.abs(lo), np.abs(hi))))
        out.append(peak if math.isfinite(peak) else math.inf)  # nan from inf * 0 is unbounded too
    return out


def check_intermediate(stages: list[Op], bounds: list[float], params: CKKSParameters, scale_bits: int,
                       layout: str) -> None:
    """Every intermediate value, at the scale it is held at, must fit the primes left at its level
    (a value that wraps around the modulus is a silent wrong answer)."""
    bits = params.coeff_modulus_bits
    used = 0
    for bound, costs in zip(bounds[:-1], stage_levels(stages, layout)[:-1], strict=True):
        used += int(costs)
        room = sum(bits[:len(bits) - 1 - used]) - scale_bits - 2
        if not math.isfinite(bound) or math.log2(max(bound, 1.0)) >= room:
            raise PrecisionError(f"intermediate values reach {bound:.3g}, more than the {room} bits left at their "
                                 "level: use tighter input_bounds, smaller weights or fewer squares")


def _max_bits(n: int) -> int:
    return seal.CoeffModulus.MaxBitCount(n, seal.sec_level_type.tc128)


def choose_parameters(depth: int, value_bits: int, keyswitch: bool,
                      preferred: int = PREFERRED_SCALE_BITS) -> tuple[CKKSParameters, int]:
    """Smallest ring that holds the chain [first, s x depth, special] at 128-bit security with a
    scale of at least `preferred` bits (the largest such scale), else the smallest ring with any
    scale down to MIN_SCALE_BITS: precision first, then speed."""
    for low in (preferred, MIN_SCALE_BITS):
        for n in DEGREES:
            for s in range(MAX_SCALE_BITS, low - 1, -1):
                first = s + value_bits + 2
                if first > MAX_PRIME_BITS:
                    continue
                special = max(first, s) if keyswitch else max(20, min(s, 30))
                bits = (first, *([s] * depth), special)
                if sum(bits) <= _max_bits(n) and n <= MAX_DEGREE:
                    return CKKSParameters(n, bits), s
    raise PrecisionError(
        f"a program of depth {depth} with values up to 2^{value_bits} needs more than the largest "
        f"128-bit ring (N={DEGREES[-1]}): use fewer layers or polynomial activations, or tighter "
        "input_bounds")


def _unrelinearized_noise(params: CKKSParameters, scale_bits: int) -> float:
    n = params.poly_modulus_degree
    return NOISE_SLOTS * n * math.sqrt(n) / 2.0**scale_bits


def diagonal_steps(half: int) -> tuple[int, int, tuple[int, ...]]:
    """Baby-step count B, giant-step count G and the rotation steps of a half x half product."""
    baby = 1 << math.ceil(math.log2(half) / 2) if half > 1 else 1
    giant = half // baby
    return baby, giant, tuple(range(1, baby)) + tuple(g * baby for g in range(1, giant))


def required_keys(stages: list[Op], n_inputs: int, layout: str, slot_count: int,
                  relin_last: bool = False) -> tuple[bool, tuple[int, ...], int]:
    """(relin, rotation steps, half) that evaluating `stages` in `layout` needs: relinearization
    wherever a squared ciphertext is multiplied again or rotated (and for the last square too when
    `relin_last`), the Galois steps of the diagonal method (plus the block re-duplication between
    Linear stages) and the row block width. A plan must declare exactly these, so a forged plan is
    refused when loaded rather than failing per request."""
    squares = [i for i, op in enumerate(stages) if isinstance(op, Poly)]
    if layout == "batch":
        return (bool(squares) and (relin_last or squares[0] < squares[-1])), (), 0
    widths = [n_inputs] + [op.n_out for op in stages if isinstance(op, Linear)]
    half = next_pow2(max(widths))
    relin = bool(squares) and (relin_last or squares[0] < len(stages) - 1)
    _, _, steps = diagonal_steps(half)
    n_linear = sum(1 for op in stages if isinstance(op, Linear))
    dup = (slot_count - half,) if n_linear > 1 else ()
    return relin, tuple(sorted(set(steps + dup))), half


def plan(program: Program, X: np.ndarray, input_bounds: float | np.ndarray | None = None,
         headroom: float = DEFAULT_HEADROOM, layouts: tuple[str, ...] = LAYOUTS,
         non_negative: bool = False) -> tuple[list[Op], dict[str, LayoutPlan]]:
    """Normalised stages and one `LayoutPlan` per layout that can hold the program. The first
    prime holds the outputs' bound; intermediate values live at higher levels and must only fit
    the primes left there (`non_negative`: inputs are in [0, bound], as encoded bits are)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != program.n_inputs or len(X) == 0:
        raise ShapeError(f"calibration data must be (n>0, {program.n_inputs}), got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ShapeError("calibration data contain NaN or infinite values")
    stages = normalise(program)
    box = input_box(X, input_bounds)
    bounds = interval_bounds(stages, box, non_negative)
    bound = bounds[-1]
    observed = float(np.max(np.abs(Program(program.n_inputs, stages).evaluate(X)))) * headroom
    peak = max(bound, observed, 1.0)
    if not math.isfinite(peak) or peak >= 2.0 ** (MAX_PRIME_BITS - MIN_SCALE_BITS):
        raise PrecisionError(
            f"values of this program reach {peak:.3g} on accepted inputs, more than even the largest "
            "128-bit ring can hold next to a useful scale: use tighter input_bounds, smaller weights "
            "or fewer squares")
    value_bits = max(1, math.ceil(math.log2(peak)))
    plans: dict[str, LayoutPlan] = {}
    for name in layouts:
        if name not in LAYOUTS:
            raise ShapeError(f"unknown layout {name!r}; choose from {LAYOUTS}")
        row = name == "row"
        if row and not row_capable(stages):
            continue
        needs = required_keys(stages, program.n_inputs, name, 0)[0]
        levels = sum(stage_levels(stages, name))
        params, s = choose_parameters(levels, value_bits, needs or row)
        relin_last = False
        if any(isinstance(op, Poly) for op in stages) and _unrelinearized_noise(params, s) > MAX_UNRELINEARIZED_NOISE:
            relin_last = True
            params, s = choose_parameters(levels, value_bits, True)
        check_intermediate(stages, bounds, params, s, name)
        relin, steps, half = required_keys(stages, program.n_inputs, name, params.slot_count, relin_last)
        if row and 2 * half > params.slot_count:
            continue
        plans[name] = LayoutPlan(name, params, s, tuple(box), relin, steps, half, relin_last)
    return stages, plans
