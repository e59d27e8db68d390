"""The planner: from a `Program` and calibration data to encryption parameters per layout.

Steps:
1. `ir.normalise` rewrites the program as alternating stages Linear, Poly, Linear, ... where
   each stage costs exactly one rescale, so the multiplicative depth D is the number of stages,
   except that in the batch layout a Linear with small integer weights (`ir.is_exact`) is sums
   of ciphertexts and costs none (`stage_levels`).
2. Bounds, one of BOUNDS (`bounds=`):
   * "sound" (the default): interval arithmetic propagates the accepted input box (per feature,
     INPUT_HEADROOM times the largest calibration magnitude, or the caller's `input_bounds`)
     through every stage, giving a bound on every intermediate and output value for ANY accepted
     input; the client refuses inputs outside the box, so no output can wrap around the modulus.
   * "calibrated": each stage's bound is the largest magnitude it reaches on the calibration data
     times `headroom`, and the output level holds 2^DETECTION_BITS times the output's: values
     stay in range for inputs like the calibration data, and an output that leaves its range is
     refused by the client (`LayoutPlan.check_output`), so it raises `PrecisionError`, not a silent
     wrong answer (see `check_output` for what is and is not detected).
   Only the outputs must fit their modulus: CKKS evaluates a polynomial circuit modulo the
   modulus of each level, and a rescale divides an exact multiple, so an intermediate value
   larger than its level's modulus still gives the right output modulo the output level's
   (the intermediate check below is kept as a margin, not needed for correctness).
3. Parameters: the fixed-point scale 2^s (s in [MIN_SCALE_BITS, MAX_SCALE_BITS]), the output
   level's primes holding s + bits(output bound) + 2 bits (one first prime when that fits
   MAX_PRIME_BITS, else a first prime and s-bit levels that are never rescaled away,
   `output_primes`), D primes of s bits consumed by the rescales, and a special prime for key
   switching. Key-switching noise scales with the ratio of the largest data prime to the special
   prime and is divided by the scale the ciphertext holds when it is switched: rotations (row
   layout) switch at scale 2^s, so their special prime is as large as the largest data prime; the
   batch layout only relinearizes products, at a scale of 2^(2s) or more, where a special prime of
   max(s, q_max - s + KEYSWITCH_MARGIN_BITS) bits keeps that noise below one rescale's.
   Candidates are tried from the smallest ring (on each ring a single output prime first, as it
   costs no extra prime, then from the largest scale that fits SEAL's 128-bit bound) and the first
   whose estimated output error (`output_noise`) is at most 2^-PRECISION_BITS of the largest
   calibration output is chosen; if none is, the one with the smallest estimated error; beyond
   N=32768, a `PrecisionError` says what to change.
4. Layouts: both, except that a program with a per-element polynomial (a skip connection carried
   as the identity past a layer of squares, see `ir.Poly`) is planned for the batch layout only:
   there each element is its own ciphertext, while the row layout would need per-slot
   coefficient plaintexts, one more level per polynomial. The row layout is left out when a
   sample's values do not fit the slots or its plaintexts MAX_ROW_WORDS; a batch plan whose two
   widest layers of ciphertexts exceed MAX_BATCH_WORKING_BYTES (`check_batch_memory`: LeNet-5's
   4,704 first-layer values at N=16384) is returned, but no circuit accepts it
   (`veil.program.compile_program` leaves it out when another layout holds the program).
5. Per layout, the evaluation keys the program needs: the batch layout relinearizes only squares
   followed by another square (so a one-hidden-layer network needs no keys at all); the row layout
   needs the rotations of its geometry (`veil.program.tiled`: the first stage by client-side windows
   or by the diagonal method, whichever the cost model finds cheaper, then the diagonal method) and
   relinearization keys when a square precedes another stage.

Error bound: every rescale adds CKKS noise of about NOISE_SLOTS * N / 2^s per slot (rescale
rounding dominates fresh-encryption noise and, with the special primes above, key switching),
amplified by later weights (their L2 norm per row) and by the derivative of later squares (2|z|
with |z| the interval bound of each unit, so the amplification holds for every accepted input);
weight rounding adds 2^-s / sqrt(12) per weight times the value it multiplies. `output_noise`
propagates these standard deviations to the outputs. `simulate` adds noise of this size after
every stage; the tests check both against the plaintext program and the SEAL backend.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import seal

from veil.errors import PrecisionError, ShapeError, WireFormatError
from veil.he.params import MAX_DEGREE, CKKSParameters
from veil.he.wire import strict_int
from veil.program.ir import Linear, Op, Poly, Program, is_exact, normalise
from veil.program.packing import PROGRAM_LAYOUTS
from veil.program.tiled import MAX_ROW_WORDS, TiledGeometry, build, plaintext_words

INPUT_HEADROOM = 2.0
"""Inputs may be up to this many times the largest calibration magnitude (`input_box`, the one
rule of every kind); beyond it the client refuses them, because an output could then wrap around
the modulus (a silent wrong answer)."""
DEFAULT_HEADROOM = 4.0
MIN_SCALE_BITS = 26
PREFERRED_SCALE_BITS = 32
PRECISION_BITS = 10
"""The chosen parameters keep the estimated output noise (one standard deviation, `output_noise`) at
most 2^-PRECISION_BITS of the largest output seen at calibration."""
KEYSWITCH_MARGIN_BITS = 5
"""Relinearization at scale 2^(2s) with a special prime P adds about 3.2 sqrt(L/12) N q_max / (P 2^(2s))
per slot (L <= 64 primes: at most 7.4 N q_max / (P 2^(2s))); P >= q_max 2^(5-s) keeps it below the
NOISE_SLOTS N / 2^s of a rescale."""
KEYSWITCH_SIGMA = 3.2
"""Standard deviation of the errors of SEAL's key-switching keys (its noise_standard_deviation)."""
MAX_SCALE_BITS = 40
MAX_PRIME_BITS = 60
DEGREES = (8192, 16384, 32768)
NOISE_SLOTS = 0.25
"""Per-slot CKKS noise after a rescale is about NOISE_SLOTS * N / 2^s: the rounding of a rescale
times the ternary secret (about N/4 per slot after decoding), which dominates fresh-encryption noise
(3.2 sqrt(N)) and key switching with a special prime as large as the data primes."""
BOUNDS = ("sound", "calibrated")
DETECTION_BITS = 20
"""A calibrated plan's output level holds 2^DETECTION_BITS times the planned output range: an
output that wraps around that modulus lands back inside the range with a chance of about
2^-DETECTION_BITS per value (and a wrap moves every slot of its ciphertext), so the client's
range check refuses it (`LayoutPlan.check_output`)."""
OUTPUT_TOLERANCE = 1e-2
"""Relative slack of the client's output range check for CKKS noise on values at the bound."""
MAX_UNRELINEARIZED_NOISE = 1e-6
"""Largest per-slot noise accepted for skipping the last relinearization (see `relinearize_at`)."""
MAX_BATCH_WORKING_BYTES = 4 << 30
"""Largest working set of one batch-layout evaluation (two layers of ciphertexts live at once):
a forged or oversized program is refused at load, not by exhausting the server's memory, and
the planner gives such a program no batch plan."""
COST_MS_PER_PRIME = {"encrypt": 1.0, "mul_add": 0.13, "add": 0.02, "rescale": 0.35, "square": 0.16, "rotate": 0.8,
                     "weighted_sum": 0.011, "weighted_sum_sparse": 0.07}
"""Single-core costs per prime of the current level at N=8192 (two components), measured on the
project machine: SEAL's operations, and `veil.he.linear.WeightedSum` per non-zero weight (BLAS for
dense weights, about 12 times below a multiply_plain and add_inplace; CSR for sparse ones, about
2 times)."""


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
    geometry: TiledGeometry | None = None
    """Where values sit in the row layout of a leveled program (`veil.program.tiled`)."""
    bounds: str = "sound"
    output_bound: float = 0.0
    """Planned bound on |output| (0: not recorded, as in plans written before it was; no check)."""
    non_negative: bool = False
    """The input box's lower bound is 0 (inputs in [0, bound], e.g. pixels in [0, 1]) rather than
    -bound: the interval bounds, hence the output level and the noise estimate, are taken over that
    box, and the client refuses negative inputs (`check_input`)."""

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
        out = {"layout": self.layout, "params": self.params.to_dict(), "scale_bits": self.scale_bits,
               "input_bounds": list(self.input_bounds), "relin": self.relin,
               "rotation_steps": list(self.rotation_steps), "half": self.half, "relin_last": self.relin_last,
               "bounds": self.bounds, "output_bound": self.output_bound, "non_negative": self.non_negative}
        if self.geometry is not None:
            out["geometry"] = self.geometry.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: object) -> LayoutPlan:
        """Parse untrusted JSON strictly (a server and a client both load these)."""
        if not isinstance(d, dict):
            raise WireFormatError("a layout plan must be an object")
        layout = d.get("layout")
        if layout not in PROGRAM_LAYOUTS:
            raise WireFormatError(f"unknown layout {layout!r}; known: {PROGRAM_LAYOUTS}")
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
        non_negative = d.get("non_negative", False)
        if not isinstance(non_negative, bool):
            raise WireFormatError("non_negative must be true or false")
        mode, output_bound = d.get("bounds", "sound"), d.get("output_bound", 0.0)
        if mode not in BOUNDS:
            raise WireFormatError(f"unknown bounds {mode!r}; known: {BOUNDS}")
        if (not isinstance(output_bound, int | float) or isinstance(output_bound, bool)
                or not 0 <= output_bound < 2 ** 1023 or not math.isfinite(output_bound)):
            raise WireFormatError("output_bound must be a finite non-negative number")
        slots = params.slot_count
        if len(steps) > slots:
            raise WireFormatError("rotation_steps lists more steps than there are slots")
        geometry = None if d.get("geometry") is None else TiledGeometry.from_dict(d["geometry"], slots)
        return cls(layout, params, strict_int(d.get("scale_bits"), "scale_bits", MIN_SCALE_BITS, MAX_PRIME_BITS),
                   tuple(float(b) for b in bounds), relin,
                   tuple(strict_int(s, "rotation step", 1, slots - 1) for s in steps),
                   strict_int(d.get("half"), "half", 0, slots), relin_last, geometry, mode, float(output_bound),
                   non_negative)

    def check_input(self, X: np.ndarray) -> None:
        """Refuse (PrecisionError) any sample outside the box the parameters were planned for."""
        check_box(X, np.asarray(self.input_bounds), non_negative=self.non_negative)

    def check_output(self, Y: np.ndarray) -> np.ndarray:
        """Refuse (PrecisionError) decrypted outputs beyond the planned range, and return them.

        What this detects: an output that wrapped around the output level's modulus q. CKKS
        computes the program modulo q, so a coefficient of the output plaintext beyond q/2
        decrypts less a multiple of q, which moves every slot of that ciphertext by about
        q/scale in a direction set by the coefficient's index; in a calibrated plan q/scale is
        2^DETECTION_BITS times the range, so a wrapped value lands back inside the range with a
        chance of about 2^-DETECTION_BITS, for each value of the ciphertext checked. (One slot
        beyond q/(2 scale) need not wrap: the coefficients spread the slots' values.) Outputs
        beyond the range that did not wrap are refused too: they are right, but the plan's error
        bound is not stated for them. What it does not detect: the precision lost by an input
        that drives intermediate values far beyond the calibration data without pushing the
        output out of range (the noise of a square grows with its argument), and a server that
        returns wrong values inside the range (the server is semi-honest). In a sound plan no
        accepted input reaches beyond the range, so this refuses only a faulty answer."""
        if self.output_bound > 0 and (at := first_beyond(Y, self.output_bound)) is not None:
            i, j = at
            hint = ("the inputs are unlike the calibration data: recompile with calibration data like them or a "
                    "larger headroom, or with bounds=\"sound\"" if self.bounds == "calibrated" else
                    "the server's answer is not what this model computes")
            raise PrecisionError(
                f"decrypted output {Y[i, j]:.4g} (sample {i}, output {j}) is outside the range the model was "
                f"compiled for (|y| <= {self.output_bound:.4g}, {self.bounds} bounds): {hint}")
        return Y


def first_beyond(Y: np.ndarray, bound: float) -> tuple[int, int] | None:
    """The first (sample, output) of decrypted outputs Y beyond `bound` with `OUTPUT_TOLERANCE`
    for CKKS noise on values at the bound, or None: the client's range check of every kind that
    bounds its outputs (`LayoutPlan.check_output`, the affine client)."""
    over = np.abs(Y) > bound * (1 + OUTPUT_TOLERANCE)
    if not over.any():
        return None
    i, j = map(int, np.argwhere(over)[0])
    return i, j


def check_box(X: np.ndarray, bounds: np.ndarray, where: str = "", non_negative: bool = False) -> None:
    """Refuse (PrecisionError) any sample of X with a feature beyond its bound (or, with
    `non_negative`, below 0); `where` names the values checked in the message (e.g. a stage's
    inputs). Value and bound are printed exactly, so a value just past its bound does not read as
    equal to it."""
    over = (np.abs(X) > bounds) | ((X < 0) if non_negative else False)
    if over.any():
        i, f = map(int, np.argwhere(over)[0])
        box = f"0 <= x <= {float(bounds[f])!r}" if non_negative else f"|x| <= {float(bounds[f])!r}"
        raise PrecisionError(
            f"sample {i}, {where}feature {f} = {float(X[i, f])!r} is outside the range the model was compiled "
            f"for ({box}); recompile with calibration data or input_bounds covering it")


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
    return peaks(unit_bounds(stages, bounds, non_negative))


def peaks(units: list[np.ndarray]) -> list[float]:
    """The largest of each stage's unit bounds (inf when any is unbounded)."""
    return [float(np.max(u)) if np.all(np.isfinite(u)) else math.inf for u in units]


def keyswitch_variance(params: CKKSParameters, primes: int) -> tuple[float, np.ndarray]:
    """Per-slot variance of the error one key switch (a rotation or a relinearization) adds to the
    real part of every slot of a ciphertext holding the first `primes` data primes, in squared
    units of the ciphertext's modulus (divide by the square of the scale it is switched at): a
    spread part the same in every slot, and a per-slot profile.

    SEAL switches keys with one special prime P: the error is (1/P) sum_j d_j e_j, over the
    digits d_j = [c]_{q_j} of the primes q_j at that level and the key's errors e_j (standard
    deviation KEYSWITCH_SIGMA), plus the rounding of the division by P (as a rescale's). Centered
    digits (variance q_j^2 / 12) give the average-case estimate of Kim, Polyakov and Zucca
    ("Approximate homomorphic encryption with reduced approximation error", CT-RSA 2022, section
    on key switching): about KEYSWITCH_SIGMA sqrt(L / 12) N q / P per slot for L primes of q
    bits. SEAL's digits are not centered (they lie in [0, q_j)): their mean q_j / 2 adds the
    polynomial (q_j / 2P)(1 + X + ... + X^(N-1)) e_j, fixed by the key (every switch with the
    same key adds the same values), whose value at slot i, the root zeta_i = exp(i theta_i)
    of X^N + 1 (SEAL orders slots by powers of 3: theta_i = pi (3^i mod 2N) / N), has variance
    (q_j / 2P)^2 (N sigma^2 / 2) / sin^2(theta_i / 2): about 0.64 N times the spread part at slot
    0, falling as 1/d^2 at the slots of the roots exp(i pi d / N). Measured on SEAL 4.4 at N=8192
    (rotations at every level of the chains [39, 34 x 4, 39], [39, 34 x 3, 43] and [50, 30, 30,
    50], 8 to 16 keys each): the measured squared error over this variance averages 0.96 to 1.07
    per key, and the error at slot 0 is a standard normal multiple of its predicted deviation."""
    n = params.poly_modulus_degree
    bits = params.coeff_modulus_bits
    ratio = sum(4.0 ** (b - bits[-1]) for b in bits[:primes])  # sum_j q_j^2 / P^2
    rounding = (NOISE_SLOTS * n) ** 2
    spread = (n / 2) * n * KEYSWITCH_SIGMA**2 * ratio / 12 + rounding
    return spread, (ratio / 4) * (n * KEYSWITCH_SIGMA**2 / 2) * _root_profile(n)


def keyswitch_error(params: CKKSParameters, scale_bits: int, primes: int,
                    products: bool = False) -> tuple[float, np.ndarray]:
    """`keyswitch_variance` in squared units of slot values: for a key switch of a ciphertext at
    scale 2^s holding `primes` data primes (a rotation before a product), or at about 2^(2s) with
    `products` (a relinearization, or a rotation of products before their rescale)."""
    spread, profile = keyswitch_variance(params, primes)
    div = 4.0 ** (scale_bits * (2 if products else 1))
    return spread / div, profile / div


@functools.cache
def _root_profile(n: int) -> np.ndarray:
    """1 / sin^2(theta_i / 2) at SEAL's slot roots (`keyswitch_variance`)."""
    roots = np.asarray([pow(3, i, 2 * n) for i in range(n // 2)], dtype=np.float64)
    profile = 1.0 / np.sin(np.pi * roots / (2 * n)) ** 2
    profile.flags.writeable = False
    return profile


def unit_bounds(stages: list[Op], bounds: np.ndarray, non_negative: bool = False) -> list[np.ndarray]:
    """Per unit, the largest |value| after each stage for any input in the box (as `interval_bounds`)."""
    lo, hi = (np.zeros_like(bounds) if non_negative else -bounds), bounds.copy()
    out = []
    with np.errstate(over="ignore", invalid="ignore"):  # an unbounded program gives inf: refused by plan
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
            out.append(np.where(np.isnan(lo) | np.isnan(hi), np.inf, np.maximum(np.abs(lo), np.abs(hi))))
    return out


def output_noise(stages: list[Op], box: np.ndarray, units: list[np.ndarray], params: CKKSParameters,
                 scale_bits: int, relin_last: bool = True, layout: str = "batch",
                 geometry: TiledGeometry | None = None) -> float:
    """Estimated standard deviation of the error of the outputs (the largest over outputs): CKKS
    noise of NOISE_SLOTS * N / 2^s from the encryption and from each stage's rescale, weight
    rounding (2^-s / sqrt(12) per weight times the interval bound of its input), amplified by the
    L2 norm of later weight rows and by the derivative |c1 + 2 c2 z| of later polynomials at the
    interval bound of z; a last square left unrelinearized multiplies its rescale noise by sqrt(N).
    Every key switch adds `keyswitch_error` at its level (the largest slot's, as an output may
    sit there): each relinearization (at 2^(2s)); in the row layout (`geometry`) a Linear's
    rotations of products (giant steps, folds; at 2^(2s)) and its baby steps, at 2^s on a fresh
    input and at 2^(2s) with one more prime where the stage before leaves its rescale to them
    (`TiledGeometry.deferred`; each baby's rescale then adds the rescale error its input had),
    which its weights then multiply like their inputs' errors: baby b carries the errors of b < B rotations
    by one key, whose parts the key fixes reach an output slot coherently from at most B - 1
    babies (so, by Cauchy-Schwarz, B - 1 times the sum of the B largest slot variances per input
    bounds them, amplified by the row's L2 norm, when no fold adds partial sums whose windows
    overlap: an estimate otherwise)."""
    n = params.poly_modulus_degree
    top = len(params.coeff_modulus_bits) - 1
    eps = NOISE_SLOTS * n / 2.0**scale_bits
    sigma, mag = np.full(len(box), eps), np.asarray(box, dtype=np.float64)
    rounding = 2.0 ** (-2 * scale_bits) / 12
    squares = [i for i, op in enumerate(stages) if isinstance(op, Poly)]
    levels = np.cumsum([0, *stage_levels(stages, layout)])
    diagonals = iter(geometry.diagonals) if geometry is not None else iter(())
    deferred = geometry.deferred(stages) if geometry is not None else [False] * len(stages)

    def product_switches(count: int, primes: int) -> float:
        spread, profile = keyswitch_error(params, scale_bits, primes, products=True)
        return count * (spread + float(profile.max()))

    with np.errstate(over="ignore", invalid="ignore"):
        for i, (op, after) in enumerate(zip(stages, units, strict=True)):
            primes = top - int(levels[i])
            if isinstance(op, Linear):
                late = 0.0
                if geometry is not None and not (i == 0 and geometry.windows is not None):
                    d = next(diagonals)
                    late_rescale = i > 0 and deferred[i - 1]
                    spread, profile = keyswitch_error(params, scale_bits, primes + late_rescale, late_rescale)
                    top_slots = float(np.sum(np.sort(profile)[::-1][:d.baby]))
                    sigma = np.sqrt(sigma**2 + (d.baby - 1) * (spread + top_slots))
                    late = product_switches(d.giant - 1 + len(d.fold), primes)
                elif geometry is not None:
                    late = product_switches(len(geometry.windows.fold), primes)
                if is_exact(op) and layout == "batch":
                    sigma = np.sqrt(op.weight**2 @ sigma**2)
                else:
                    sigma = np.sqrt(op.weight**2 @ sigma**2 + rounding * ((op.weight != 0) @ mag**2) + late) + eps
            else:
                _, c1, c2 = op.coeffs
                last = bool(squares) and i == squares[-1]
                amp = math.sqrt(n) if (not relin_last and last) else 1.0
                relin = relin_last or (any(isinstance(o, Poly) for o in stages[i + 1:]) if layout == "batch"
                                       else i < len(stages) - 1)
                switch = math.sqrt(product_switches(1, primes)) * (np.asarray(c2) != 0) if relin else 0.0
                sigma = np.abs(c1) * sigma + 2 * abs(c2) * mag * sigma + abs(c2) * sigma**2 + eps * amp + switch
            mag = after
    peak = float(np.max(sigma))
    return peak if math.isfinite(peak) else math.inf


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
                                 "level: use bounds=\"calibrated\", tighter input_bounds, smaller weights or fewer "
                                 "squares")


def check_batch_memory(stages: list[Op], n_inputs: int, params: CKKSParameters) -> None:
    """Refuse (ShapeError) a batch plan whose two widest live layers of ciphertexts exceed
    MAX_BATCH_WORKING_BYTES."""
    widest = max([n_inputs] + [op.n_out for op in stages if isinstance(op, Linear)])
    ct_bytes = 2 * params.poly_modulus_degree * (len(params.coeff_modulus_bits) - 1) * 8
    if 2 * widest * ct_bytes > MAX_BATCH_WORKING_BYTES:
        raise ShapeError(
            f"a layer of {widest} values holds {2 * widest * ct_bytes / 2**30:.1f} GiB of ciphertexts "
            f"per batch of samples (limit {MAX_BATCH_WORKING_BYTES / 2**30:.0f} GiB): use narrower "
            "layers (fewer channels, pooling earlier), or the row layout")


def max_coeff_bits(n: int) -> int:
    """Largest total coefficient-modulus bits SEAL allows at degree n for 128-bit security."""
    return seal.CoeffModulus.MaxBitCount(n, seal.sec_level_type.tc128)


def output_value_bits(output_bound: float, bounds: str) -> int:
    """Bits the output level must hold above the scale: those of the planned output bound, plus
    DETECTION_BITS in a calibrated plan."""
    bits = max(1, math.ceil(math.log2(max(output_bound, 1.0))))
    return bits + (DETECTION_BITS if bounds == "calibrated" else 0)


def output_primes(scale_bits: int, value_bits: int) -> tuple[int, ...]:
    """The primes left at the output level, holding values up to 2^value_bits at scale
    2^scale_bits with 2 bits to spare: one first prime when that fits MAX_PRIME_BITS, else a first
    prime (at least scale_bits + 3 bits) and as many s-bit primes as the rest needs, levels that
    the program never rescales away."""
    need = scale_bits + value_bits + 2
    if need <= MAX_PRIME_BITS:
        return (need,)
    extra = math.ceil((need - MAX_PRIME_BITS) / scale_bits)
    return (max(scale_bits + 3, need - extra * scale_bits), *([scale_bits] * extra))


def _special_bits(q_max: int, s: int, keyswitch: bool, relin_only: bool) -> int:
    """The special prime: a 20-30 bit placeholder without key switching; as large as the largest
    data prime q_max for rotations; max(s, q_max - s + KEYSWITCH_MARGIN_BITS) when key switching
    only relinearizes products (at scale 2^(2s) or more, see KEYSWITCH_MARGIN_BITS)."""
    if not keyswitch:
        return max(20, min(s, 30))
    if relin_only:
        return min(MAX_PRIME_BITS, max(s, q_max - s + KEYSWITCH_MARGIN_BITS))
    return max(q_max, s)


def parameter_candidates(depth: int, value_bits: int, keyswitch: bool, relin_only: bool = False,
                         low: int = MIN_SCALE_BITS, split_output: bool = False) -> list[tuple[CKKSParameters, int]]:
    """Every (parameters, s) with s in [low, MAX_SCALE_BITS] whose chain [output primes, s x depth,
    special] fits SEAL's 128-bit bound, from the smallest ring and, per ring, with a single output
    prime first (then, with `split_output`, the chains whose output level needs several), each from
    the largest scale."""
    out = []
    for n in DEGREES:
        for split in (False, True) if split_output else (False,):
            for s in range(MAX_SCALE_BITS, low - 1, -1):
                bottom = output_primes(s, value_bits)
                if (len(bottom) > 1) != split:
                    continue
                bits = (*bottom, *([s] * depth), _special_bits(max(bottom), s, keyswitch, relin_only))
                if sum(bits) <= max_coeff_bits(n) and n <= MAX_DEGREE:
                    out.append((CKKSParameters(n, bits), s))
    return out


def choose_parameters(depth: int, value_bits: int, keyswitch: bool, preferred: int = PREFERRED_SCALE_BITS,
                      split_output: bool = False, relin_only: bool = False) -> tuple[CKKSParameters, int]:
    """Smallest ring that holds the chain [first, s x depth, special] at 128-bit security with a
    scale of at least `preferred` bits (the largest such scale), else the smallest ring with any
    scale down to MIN_SCALE_BITS: precision first, then speed. With `split_output`, when no chain
    with a single output prime fits at such a scale, the output level may keep several primes
    (`output_primes`)."""
    for low in (preferred, MIN_SCALE_BITS):
        found = parameter_candidates(depth, value_bits, keyswitch, relin_only, low, split_output)
        if found:
            return found[0]
    raise PrecisionError(
        f"a program of depth {depth} with values up to 2^{value_bits} needs more than the largest "
        f"128-bit ring (N={DEGREES[-1]}): use fewer layers or polynomial activations, or tighter "
        "input_bounds")


def _unrelinearized_noise(params: CKKSParameters, scale_bits: int) -> float:
    n = params.poly_modulus_degree
    return NOISE_SLOTS * n * math.sqrt(n) / 2.0**scale_bits


def _relin_last(stages: list[Op], params: CKKSParameters, s: int) -> bool:
    return any(isinstance(op, Poly) for op in stages) and _unrelinearized_noise(params, s) > MAX_UNRELINEARIZED_NOISE


def _precise_parameters(stages: list[Op], box: np.ndarray, units: list[np.ndarray], levels: int, value_bits: int,
                        layout: str, target: float, bounds: list[float]) -> tuple[CKKSParameters, int, bool]:
    """(parameters, s, relin_last) of `layout`: the first candidate (smallest ring, largest scale)
    that holds every intermediate value and whose estimated output noise is at most `target`; if
    none is that precise, the most precise one (precision first, then speed). The last square is
    relinearized (`relin_last`) when skipping it would cost more than MAX_UNRELINEARIZED_NOISE,
    which needs key switching."""
    needs = required_keys(stages, layout)[0] or layout == "row"
    relin_only = layout == "batch"
    candidates = [(params, s, keyswitch) for keyswitch in dict.fromkeys((needs, True))
                  for params, s in parameter_candidates(levels, value_bits, keyswitch, relin_only, split_output=True)]
    # smallest ring first; on a ring a single output prime, then the largest scale
    candidates.sort(key=lambda c: (c[0].poly_modulus_degree, len(c[0].coeff_modulus_bits), -c[1], c[2]))
    best: tuple[float, CKKSParameters, int, bool] | None = None
    geometries: dict[tuple[int, int], TiledGeometry | None] = {}
    for params, s, keyswitch in candidates:
        relin_last = _relin_last(stages, params, s)
        if relin_last and not keyswitch:
            continue
        try:
            check_intermediate(stages, bounds, params, s, layout)
        except PrecisionError:
            continue
        geometry = None
        if layout == "row":
            shape = (params.poly_modulus_degree, len(params.coeff_modulus_bits))
            if shape not in geometries:
                try:
                    geometries[shape] = row_geometry(stages, len(box), params)
                except ShapeError:
                    geometries[shape] = None
            geometry = geometries[shape]
            if geometry is None:
                continue
        noise = output_noise(stages, box, units, params, s, relin_last, layout, geometry)
        if noise <= target:
            return params, s, relin_last
        if best is None or noise < best[0]:
            best = (noise, params, s, relin_last)
    if best is None:
        params, s = choose_parameters(levels, value_bits, True, split_output=True, relin_only=relin_only)
        check_intermediate(stages, bounds, params, s, layout)
        return params, s, _relin_last(stages, params, s)
    return best[1], best[2], best[3]


def required_keys(stages: list[Op], layout: str, relin_last: bool = False,
                  geometry: TiledGeometry | None = None) -> tuple[bool, tuple[int, ...], int]:
    """(relin, rotation steps, half) that evaluating `stages` in `layout` needs: relinearization
    wherever a squared ciphertext is multiplied again or rotated (and for the last square too when
    `relin_last`), and in the row layout the Galois steps of its `geometry`. A plan must declare
    exactly these, so a forged plan is refused when loaded rather than failing per request."""
    squares = [i for i, op in enumerate(stages) if isinstance(op, Poly)]
    if layout == "batch":
        return (bool(squares) and (relin_last or squares[0] < squares[-1])), (), 0
    relin = bool(squares) and (relin_last or squares[0] < len(stages) - 1)
    return relin, geometry.rotation_steps if geometry is not None else (), 0


def row_cost_ms(stages: list[Op], geometry: TiledGeometry, params: CKKSParameters,
                relinearized: list[bool] | None = None) -> float:
    """Estimated single-core milliseconds of one group of samples in the row layout: its
    encryptions, then per stage its products, rotations, squares and rescales at the primes left
    there (`relinearized[i]`: whether the square of stage i is relinearized, a key switch)."""
    c = COST_MS_PER_PRIME
    top = len(params.coeff_modulus_bits) - 1
    counts = iter(geometry.op_counts(stages))
    babies, deferred = geometry.babies(stages), geometry.deferred(stages)
    cost = 0.0
    for i, op in enumerate(stages):
        if isinstance(op, Linear):
            ops = next(counts)
            one = ops["input_cts"] * c["encrypt"] + ops["mul_plain"] * c["mul_add"]
            one += ops["rotations"] * c["rotate"] + c["rescale"]
            if i > 0 and deferred[i - 1]:  # baby steps at one more prime, each rescaled
                cost += (babies[i] - 1) * (c["rotate"] + c["rescale"] * (top - i + 1))
        else:
            one = c["square"] + c["rescale"] + (c["rotate"] if relinearized and relinearized[i] else 0.0)
        cost += one * (top - i)
    return cost * params.poly_modulus_degree / 8192


def row_geometry(stages: list[Op], n_inputs: int, params: CKKSParameters) -> TiledGeometry:
    """The cheaper row geometry (`row_cost_ms`) of the first stage by client-side windows or by the
    diagonal method, among those whose plaintexts fit MAX_ROW_WORDS; ShapeError if none does."""
    top = len(params.coeff_modulus_bits) - 1
    found = []
    for first in ("windows", "diagonal"):
        try:
            geometry = build(stages, n_inputs, params.slot_count, first)
        except ShapeError:
            continue
        if plaintext_words(geometry, top, params.poly_modulus_degree, stages) <= MAX_ROW_WORDS:
            found.append(geometry)
    if not found:
        raise ShapeError(f"no row layout of this program fits N={params.poly_modulus_degree}: use the batch layout")
    return min(found, key=lambda g: row_cost_ms(stages, g, params))


def observed_bounds(stages: list[Op], X: np.ndarray) -> list[float]:
    """Largest |value| after each stage on the data X."""
    out, peaks = X, []
    for op in stages:
        out = op(out)
        peaks.append(float(np.max(np.abs(out))))
    return peaks


def observed_units(stages: list[Op], X: np.ndarray, headroom: float) -> list[np.ndarray]:
    """Per unit, `headroom` times the largest |value| after each stage on the data X: the
    calibrated counterpart of `unit_bounds` (for the noise estimate's amplification)."""
    out, units = X, []
    for op in stages:
        out = op(out)
        units.append(np.max(np.abs(out), axis=0) * headroom)
    return units


def stage_bounds(stages: list[Op], X: np.ndarray, box: np.ndarray, bounds: str, headroom: float,
                 non_negative: bool = False) -> list[float]:
    """The bound each stage's values are planned for: in "sound" mode the interval bounds over the
    input box (the output's at least `headroom` times its largest calibration value, and 1), in
    "calibrated" mode `headroom` times the largest value each stage reaches on X (at least 1)."""
    if bounds not in BOUNDS:
        raise ShapeError(f"unknown bounds {bounds!r}; choose from {BOUNDS}")
    if not headroom >= 1.0 or not math.isfinite(headroom):
        raise ShapeError(f"headroom must be a finite number of at least 1, got {headroom!r}")
    observed = observed_bounds(stages, X)
    if bounds == "calibrated":
        return [max(v * headroom, 1.0) for v in observed]
    sound = interval_bounds(stages, box, non_negative)
    return [*sound[:-1], max(sound[-1], observed[-1] * headroom, 1.0)]


def plan(program: Program, X: np.ndarray, input_bounds: float | np.ndarray | None = None,
         headroom: float = DEFAULT_HEADROOM, layouts: tuple[str, ...] = PROGRAM_LAYOUTS,
         non_negative: bool = False, bounds: str = "sound") -> tuple[list[Op], dict[str, LayoutPlan]]:
    """Normalised stages and one `LayoutPlan` per layout that can hold the program. The output
    level holds the outputs' bound (`bounds`: "sound" or "calibrated", see the module docstring);
    intermediate values live at higher levels and must only fit the primes left there
    (`non_negative`: inputs are in [0, bound], as encoded bits are)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != program.n_inputs or len(X) == 0:
        raise ShapeError(f"calibration data must be (n>0, {program.n_inputs}), got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ShapeError("calibration data contain NaN or infinite values")
    if non_negative and np.any(X < 0):
        raise PrecisionError("calibration data hold negative values, outside the non-negative input box")
    stages = normalise(program)
    box = input_box(X, input_bounds)
    planned = stage_bounds(stages, X, box, bounds, headroom, non_negative)
    peak = planned[-1]
    hint = ("use bounds=\"calibrated\" (the ring holds the values seen on the calibration data times headroom, "
            "and the client refuses outputs beyond them), tighter input_bounds, smaller weights or fewer squares"
            if bounds == "sound" else "use a smaller headroom, smaller weights or fewer squares")
    if not math.isfinite(peak) or peak >= 2.0 ** 1000:
        raise PrecisionError(f"values of this program reach {peak:.3g} on accepted inputs ({bounds} bounds), more "
                             f"than even the largest 128-bit ring can hold: {hint}")
    value_bits = output_value_bits(peak, bounds)
    units = (unit_bounds(stages, box, non_negative) if bounds == "sound"
             else observed_units(stages, X, headroom))
    largest = observed_bounds(stages, X)[-1]
    target = 2.0**-PRECISION_BITS * max(largest, 2.0**-PRECISION_BITS)
    plans: dict[str, LayoutPlan] = {}
    for name in layouts:
        if name not in PROGRAM_LAYOUTS:
            raise ShapeError(f"unknown layout {name!r}; choose from {PROGRAM_LAYOUTS}")
        row = name == "row"
        if row and not row_capable(stages):
            continue
        levels = sum(stage_levels(stages, name))
        try:
            params, s, relin_last = _precise_parameters(stages, box, units, levels, value_bits, name, target, planned)
        except PrecisionError as exc:
            raise PrecisionError(f"values of this program reach {peak:.3g} on accepted inputs ({bounds} bounds): "
                                 f"{exc}; or {hint}") from None
        check_intermediate(stages, planned, params, s, name)
        geometry = None
        if row:
            try:
                geometry = row_geometry(stages, program.n_inputs, params)
            except ShapeError:
                continue
        relin, steps, half = required_keys(stages, name, relin_last, geometry)
        plans[name] = LayoutPlan(name, params, s, tuple(box), relin, steps, half, relin_last, geometry, bounds, peak,
                                 non_negative)
    return stages, plans
