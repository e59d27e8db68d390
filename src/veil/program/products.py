"""Sums of products of 0/1 literals, and their single-sample layout (tree ensembles compile here).

A `ProductSum` computes, per output c,

    f_c(x) = base_c + sum over terms t of output c of  v_t * prod_{j < 2^R} lambda_{t,j}(x)

where every literal lambda(x) = const + sum_i w_i x_i is affine in the inputs and takes the values
0 and 1 on the inputs clients send (encoded bits, `veil.program.encoding`), and a missing factor
is the constant 1. A tree ensemble is this form: a term per leaf, a literal per feature interval
on its path, v_t the leaf value. The form is model-agnostic; `ml/` builds it and the backends below
run it without knowing what produced it.

Batch layout (`lower`, run by the leveled backend): R rounds of `Linear` (pair two factors,
s = a + b, weights +-1: exact, no level) then `Poly` p_r(s) = s^2 - c_r s, which on s in
{0, c_r, 2 c_r} gives {0, 0, 2 c_r^2}: the product of two bits times the next unit
c_{r+1} = 2 c_r^2 (c_0 = 1); identical pairs are computed once. A last Linear takes the values and
the base. Levels: R + 1.

Row layout (`SlotCircuit`: one sample per ciphertext, for latency). Protocol, per request:
1. the client encrypts its encoded bits once, repeated with period P = next_pow2(n_inputs)
   through the slots (x[j] = bits[j mod P]);
2. selection (1 level): term t's factor pair p (of 2^(R-1)) is given the slot p*H + l_t, with term
   slots l_t = c + K*m (K = next_pow2(n_outputs), m-th term of output c) and H = next_pow2(max l_t
   + 1); y = sum_k diag_k * rot(x, k) + bias computes every pair sum a + b at its slot, as a
   baby-step giant-step diagonal method whose baby steps are successive rotations by 1 and whose
   giant steps are a Horner sum of rotations by B (two Galois keys instead of B + P/B); then the
   square p_1 (1 level);
3. rounds r = 2 .. R (1 level each): y + rot(y, 2^(R-r) H) adds each pair to its partner (exact),
   then p_r; slot l_t now holds c_R times term t's product;
4. output (1 level): times the plaintext of v_t / c_R at slot l_t (zero elsewhere), rescale, then
   rotate-and-sum by K, 2K, ..., slots/2, and the base: every slot congruent to c mod K holds
   f_c(x), the whole sum and nothing partial, so decryption shows the outputs and no term.
Levels: R + 2. Galois keys: 1, B, the R - 1 partner offsets and log2(slots / K) sum steps.
Rotations per sample: (B - 1) + (P/B - 1) + (R - 1) + log2(slots / K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import seal

from veil.errors import KeyMaterialError, ShapeError, WireFormatError
from veil.he import CKKSParameters, PublicBundle
from veil.he.ciphertext import Ciphertext
from veil.he.wire import strict_int
from veil.program.common import checked_layout
from veil.program.encoding import ThermometerEncoding, load_encoding
from veil.program.ir import MAX_DIM, Linear, Poly, Program, normalise
from veil.program.leveled import COST_MS_PER_PRIME, LeveledCircuit, ProgramClient, check_plans
from veil.program.packing import BatchLayout, DiagonalLayout, next_pow2
from veil.program.planner import (
    DEFAULT_HEADROOM,
    DEGREES,
    LAYOUTS,
    NOISE_SLOTS,
    LayoutPlan,
    choose_parameters,
    plan,
)

KIND = "product-sum"
MAX_OUTPUT_SHIFT = 200
ROW_SCALE_BITS = 30
"""The row layout prefers the smaller ring at a scale of 2^30 (about 2e-6 of noise per level at
N=8192, far below what 0/1 products and tree outputs need) over a larger ring at 2^32: its
rotations cost N * primes^2, so the ring is most of its latency."""

MAX_ROW_WORDS = 1 << 27
"""Largest row-layout selection (nonzero diagonals x N x data primes, 8-byte words: 1 GiB of encoded
plaintexts): beyond it a model has no row plan (the batch layout serves it), and a forged artefact
claiming one is refused at load instead of allocating tens of gigabytes on its first request."""

MAX_FACTORS = 16
MAX_LITERAL_TERMS = 8
MAX_DENSE = 1 << 25
"""Largest first-stage matrix (entries) a product sum may lower to: a forged artefact is refused
at load instead of allocating gigabytes."""

Literal = tuple[float, tuple[tuple[int, float], ...]]


class ProductSum:
    """Literals (affine 0/1 forms of the inputs), terms (literal indices per factor, -1 for the
    constant 1; 2^R factors each), a value and an output per term, and a base per output."""

    def __init__(self, n_inputs: int, literals: list[Literal], factors: np.ndarray, values: np.ndarray,
                 outputs: np.ndarray, base: np.ndarray, groups: np.ndarray | None = None) -> None:
        self.n_inputs = strict_int(n_inputs, "n_inputs", 1, MAX_DIM, ShapeError)
        self.literals = [(float(c), tuple((int(i), float(w)) for i, w in terms)) for c, terms in literals]
        for c, terms in self.literals:
            if not terms or len(terms) > MAX_LITERAL_TERMS or not math.isfinite(c) or any(
                    not 0 <= i < self.n_inputs or not math.isfinite(w) for i, w in terms):
                raise ShapeError(f"a literal holds 1 to {MAX_LITERAL_TERMS} finite weights on the inputs")
        self.factors = np.asarray(factors, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.float64).reshape(-1)
        self.outputs = np.asarray(outputs, dtype=np.int64).reshape(-1)
        self.base = np.asarray(base, dtype=np.float64).reshape(-1)
        n_terms = len(self.values)
        if self.factors.ndim != 2 or self.factors.shape[0] != n_terms or not 0 < n_terms <= MAX_DIM:
            raise ShapeError("factors must be a (terms x 2^R) matrix of literal indices, one row per value")
        width = self.factors.shape[1]
        if width < 2 or width > MAX_FACTORS or width & (width - 1):
            raise ShapeError(f"terms have 2^R factors, 2 <= 2^R <= {MAX_FACTORS}, got {width}")
        if self.factors.min() < -1 or self.factors.max() >= len(self.literals) or np.any(np.all(self.factors < 0, 1)):
            raise ShapeError("factor indices must name literals (or -1), and every term needs a literal")
        if not 0 < len(self.base) <= MAX_DIM or self.outputs.shape != (n_terms,) or self.outputs.min() < 0 \
                or self.outputs.max() >= len(self.base):
            raise ShapeError("every term must name one of the outputs")
        if not (np.all(np.isfinite(self.values)) and np.all(np.isfinite(self.base))):
            raise ShapeError("values and base must be finite")
        self.groups = (np.arange(n_terms) if groups is None else np.asarray(groups, dtype=np.int64).reshape(-1))
        if self.groups.shape != (n_terms,) or self.groups.min() < 0 or self.groups.max() >= n_terms:
            raise ShapeError("groups must give every term a group index below the number of terms")
        self.rounds = int(math.log2(width))

    @property
    def n_outputs(self) -> int:
        return len(self.base)

    def literal_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, c): literal k is W[k] @ x + c[k]."""
        W, c = np.zeros((len(self.literals), self.n_inputs)), np.zeros(len(self.literals))
        for k, (const, terms) in enumerate(self.literals):
            c[k] = const
            for i, w in terms:
                W[k, i] += w
        return W, c

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        """The plaintext reference on inputs X (n, n_inputs)."""
        X = np.asarray(X, dtype=np.float64)
        lit = np.ones((len(X), len(self.literals) + 1))  # the last column is the constant 1 (index -1)
        for k, (const, terms) in enumerate(self.literals):
            lit[:, k] = const + sum(w * X[:, i] for i, w in terms)
        prod = np.prod(lit[:, self.factors], axis=2)  # index -1 is the column of ones
        out = np.tile(self.base, (len(X), 1))
        np.add.at(out.T, self.outputs, (prod * self.values).T)
        return out

    def scaled(self, factor: float) -> ProductSum:
        """The same product sum with every value and the base multiplied by `factor`."""
        return ProductSum(self.n_inputs, self.literals, self.factors, self.values * factor, self.outputs,
                          self.base * factor, self.groups)

    def output_bound(self) -> float:
        """Largest |f_c| on 0/1 literals: |base_c| plus, per group, its largest |v_t|. A group is
        the compiler's statement that at most one of its terms is non-zero on any valid input (the
        leaves of one tree); by default every term is its own group, a bound that always holds."""
        total = np.abs(self.base).copy()
        peak: dict[tuple[int, int], float] = {}
        for g, c, v in zip(self.groups, self.outputs, np.abs(self.values), strict=True):
            peak[(int(g), int(c))] = max(peak.get((int(g), int(c)), 0.0), float(v))
        for (_, c), v in peak.items():
            total[c] += v
        return float(total.max())

    def lower(self) -> Program:
        """The batch-layout program (module docstring): pairing Linears with weights +-1 and the
        products p_r, identical pairs computed once, then values and base."""
        paths = [list(row) for row in self.factors]
        ops: list = []
        unit, prev_width = 1.0, self.n_inputs
        for r in range(self.rounds):
            pair_ids: dict[tuple[int, int], int] = {}
            for i, path in enumerate(paths):
                nxt = []
                for a, b in zip(path[0::2], path[1::2], strict=True):
                    key = (max(a, b), min(a, b))
                    nxt.append(-1 if key == (-1, -1) else pair_ids.setdefault(key, len(pair_ids)))
                paths[i] = nxt
            if len(pair_ids) > MAX_DIM or len(pair_ids) * prev_width > MAX_DENSE:
                raise ShapeError(f"{len(pair_ids)} products in one layer is more than the batch layout holds: "
                                 "use fewer or shallower trees")
            W, b = np.zeros((len(pair_ids), prev_width)), np.zeros(len(pair_ids))
            for (x1, x2), j in pair_ids.items():
                for x in (x1, x2):
                    if x < 0:
                        b[j] += unit
                    elif r == 0:  # the literals are sparse: never a dense (literals x inputs) matrix
                        const, terms = self.literals[x]
                        b[j] += const
                        for i, w in terms:
                            W[j, i] += w
                    else:
                        W[j, x] += 1.0
            ops += [Linear(W, b), Poly((0.0, -unit, 1.0))]
            unit, prev_width = 2.0 * unit * unit, len(pair_ids)
        if self.n_outputs * prev_width > MAX_DENSE:
            raise ShapeError(f"{self.n_outputs} outputs of {prev_width} products is more than the batch layout holds")
        W_out = np.zeros((self.n_outputs, prev_width))
        np.add.at(W_out, (self.outputs, [p[0] for p in paths]), self.values / unit)
        ops.append(Linear(W_out, self.base))
        return Program(self.n_inputs, ops)

    def to_dict(self) -> dict:
        return {"n_inputs": self.n_inputs, "literals": [[c, [list(t) for t in terms]] for c, terms in self.literals],
                "factors": self.factors.tolist(), "values": self.values.tolist(),
                "outputs": self.outputs.tolist(), "base": self.base.tolist(), "groups": self.groups.tolist()}

    @classmethod
    def from_dict(cls, d: object) -> ProductSum:
        """Parse untrusted JSON; anything malformed is a `WireFormatError` or `ShapeError`."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list)
                                              for k in ("literals", "factors", "values", "outputs", "base")):
            raise WireFormatError("a product sum is an object with literals, factors, values, outputs and base")
        literals = []
        for raw in d["literals"][:MAX_DIM + 1]:
            if not (isinstance(raw, list) and len(raw) == 2 and _number(raw[0]) and isinstance(raw[1], list)
                    and all(isinstance(t, list) and len(t) == 2 and _index(t[0]) and _number(t[1])
                            for t in raw[1][:MAX_LITERAL_TERMS + 1])):
                raise WireFormatError("a literal is [constant, [[input index, weight], ...]]")
            literals.append((raw[0], tuple((t[0], t[1]) for t in raw[1])))
        if len(literals) > MAX_DIM:
            raise ShapeError(f"at most {MAX_DIM} literals")
        factors = d["factors"]
        if len(factors) > MAX_DIM or not all(isinstance(r, list) and len(r) <= MAX_FACTORS
                                             and all(_index(v, -1) for v in r) for r in factors):
            raise WireFormatError("factors must be rows of integer literal indices")
        groups = d.get("groups", list(range(len(d["values"]))))
        if not isinstance(groups, list):
            raise WireFormatError("groups must be a list")
        for key, seq in (("values", d["values"]), ("outputs", d["outputs"]), ("base", d["base"]), ("groups", groups)):
            if len(seq) > MAX_DIM:
                raise ShapeError(f"at most {MAX_DIM} {key}")
        if not all(_number(v) for v in d["values"] + d["base"]) or not all(_index(v) for v in d["outputs"] + groups):
            raise WireFormatError("values and base must be numbers, outputs and groups integer indices")
        widths = {len(r) for r in factors}
        if not factors:
            raise ShapeError("a product sum needs at least one term")
        if len(widths) > 1:
            raise ShapeError("every term must have the same number of factors")
        return cls(d.get("n_inputs"), literals, np.asarray(factors, dtype=np.int64).reshape(len(factors), -1),
                   np.asarray(d["values"], dtype=np.float64), np.asarray(d["outputs"], dtype=np.int64),
                   np.asarray(d["base"], dtype=np.float64), np.asarray(groups, dtype=np.int64))


def _number(v: object) -> bool:
    # a JSON integer may be too large for a float (math.isfinite would raise OverflowError)
    return (isinstance(v, float) and math.isfinite(v)) or (isinstance(v, int) and not isinstance(v, bool)
                                                         and abs(v) < 2 ** 1023)


def _index(v: object, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < MAX_DIM


# --- the row (slot) layout ----------------------------------------------------------------------
class SlotGeometry:
    """Where everything sits in the row layout (module docstring, steps 1-4) for `slots` slots."""

    def __init__(self, ps: ProductSum, slots: int) -> None:
        self.slots = slots
        self.period = next_pow2(ps.n_inputs)
        self.stride = next_pow2(ps.n_outputs)
        counts = np.zeros(ps.n_outputs, dtype=np.int64)
        self.term_slot = np.empty(len(ps.values), dtype=np.int64)
        for t, c in enumerate(ps.outputs):
            self.term_slot[t] = c + self.stride * counts[c]
            counts[c] += 1
        self.h = next_pow2(int(self.term_slot.max()) + 1)
        self.pairs = ps.factors.shape[1] // 2
        if self.period > slots or self.pairs * self.h > slots or self.stride > slots // 2:
            raise ShapeError(f"the row layout needs {max(self.period, self.pairs * self.h)} slots, the ring has "
                             f"{slots}: use the batch layout")
        self.baby = 1 << math.ceil(math.log2(self.period) / 2) if self.period > 1 else 1
        self.giant = self.period // self.baby
        self.offsets = tuple(self.h * (self.pairs >> r) for r in range(1, ps.rounds))
        sums = []
        step = self.stride
        while step < slots:
            sums.append(step)
            step *= 2
        self.sum_steps = tuple(sums)

    def n_diagonals(self, ps: ProductSum) -> int:
        """Nonzero diagonals of the selection (`SlotCircuit._selection`), counted without allocating."""
        ks: set[int] = set()
        for t, row in enumerate(ps.factors):
            for p in range(self.pairs):
                e = p * self.h + int(self.term_slot[t])
                for lit in (row[2 * p], row[2 * p + 1]):
                    if lit >= 0:
                        ks.update((i - e) % self.period for i, _ in ps.literals[lit][1])
        return len(ks)

    def check_size(self, ps: ProductSum, params: CKKSParameters) -> None:
        words = self.n_diagonals(ps) * params.poly_modulus_degree * len(params.coeff_modulus_bits)
        if words > MAX_ROW_WORDS:
            raise ShapeError(f"the row layout's selection would encode {words * 8 / 2 ** 30:.1f} GiB of diagonals: "
                             "use the batch layout")

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        steps = set(self.offsets) | set(self.sum_steps)
        if self.baby > 1:
            steps.add(1)
        if self.giant > 1:
            steps.add(self.baby)
        return tuple(sorted(steps))

    @property
    def n_rotations(self) -> int:
        return (self.baby - 1) + (self.giant - 1) + len(self.offsets) + len(self.sum_steps)


class SlotCircuit:
    """The row-layout evaluation of a `ProductSum` (module docstring): diagonals and masks are
    encoded once per level and cached."""

    def __init__(self, ps: ProductSum, geometry: SlotGeometry) -> None:
        self.ps = ps
        self.geometry = geometry
        self._diagonals: list[list[tuple[int, seal.Plaintext]]] | None = None
        self._diag_vectors, self._bias = self._selection()

    def _selection(self) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Nonzero diagonals k -> diag_k (diag_k[e] multiplies x[(e + k) mod P] at slot e), and the
        bias vector: pair p of term t is literal a plus literal b (or the constant 1) at slot p*H + l_t."""
        g, ps = self.geometry, self.ps
        diags: dict[int, np.ndarray] = {}
        bias = np.zeros(g.slots)
        for t, row in enumerate(ps.factors):
            for p in range(g.pairs):
                e = p * g.h + int(g.term_slot[t])
                for lit in (row[2 * p], row[2 * p + 1]):
                    if lit < 0:
                        bias[e] += 1.0
                        continue
                    const, terms = ps.literals[lit]
                    bias[e] += const
                    for i, w in terms:
                        k = (i - e) % g.period
                        diags.setdefault(k, np.zeros(g.slots))[e] += w
        return diags, bias

    def _encoded(self, x: Ciphertext) -> list[list[tuple[int, seal.Plaintext]]]:
        if self._diagonals is None:
            g, ctx = self.geometry, x.context
            q, pid = float(x.next_prime()), x.data.parms_id()
            diags = self._diag_vectors
            groups: list[list[tuple[int, seal.Plaintext]]] = [[] for _ in range(g.giant)]
            for k, d in sorted(diags.items()):
                gi, b = divmod(k, g.baby)
                groups[gi].append((b, ctx.encode_at(np.roll(d, gi * g.baby), q, pid)))
            self._diagonals = groups
        return self._diagonals

    def run(self, x: Ciphertext, bundle: PublicBundle) -> Ciphertext:
        g, ps = self.geometry, self.ps
        gk, rk = bundle.galois_keys, bundle.relin_keys
        if rk is None:
            raise KeyMaterialError("the row layout of this program needs relinearization keys")
        ev = x.context.evaluator
        groups = self._encoded(x)
        babies = [x]
        for _ in range(1, g.baby):
            babies.append(babies[-1].rotate(1, gk))
        acc: Ciphertext | None = None
        for gi in range(g.giant - 1, -1, -1):
            if acc is not None:
                acc = acc.rotate(g.baby, gk)
            if groups[gi]:
                inner = seal.Ciphertext(ev.multiply_plain(babies[groups[gi][0][0]].data, groups[gi][0][1]))
                for b, pt in groups[gi][1:]:
                    ev.add_inplace(inner, ev.multiply_plain(babies[b].data, pt))
                term = Ciphertext(x.context, inner)
                acc = term if acc is None else acc.add_(term)
        if acc is None:
            raise ShapeError("the selection has no weights")
        y = acc.add_(self._bias).rescale_()
        unit = 1.0
        for r in range(ps.rounds):
            if r:
                y = y.add_(y.rotate(g.offsets[r - 1], gk))
            t = y.square().relinearize_(rk)
            t.add_(y.mul_plain_(-unit, y.scale))
            y = t.rescale_()
            unit = 2.0 * unit * unit
        weights = np.zeros(g.slots)
        np.add.at(weights, g.term_slot, ps.values / unit)
        y.mul_plain_(weights).rescale_()
        for step in g.sum_steps:
            y = y.add_(y.rotate(step, gk))
        return y.add_(np.tile(np.r_[ps.base, np.zeros(g.stride - ps.n_outputs)], g.slots // g.stride))


def slot_row_levels(ps: ProductSum) -> int:
    """Levels of the row layout: selection, one per round, the values."""
    return ps.rounds + 2


def slot_cost_ms(ps: ProductSum, geometry: SlotGeometry, per_prime: dict[str, float], primes: int) -> float:
    """Estimated single-core milliseconds per sample (rotations, diagonal products, squares)."""
    diag = min(geometry.period, sum(len(t) for _, t in ps.literals) * geometry.pairs * 2)
    ops = geometry.n_rotations * per_prime["rotate"] + diag * per_prime["mul_add"]
    ops += ps.rounds * (per_prime["square"] + per_prime["rotate"] + per_prime["rescale"]) + 2 * per_prime["rescale"]
    return ops * primes


@dataclass(frozen=True)
class SlotLayout:
    """Packing of the row layout: one sample per ciphertext, its inputs repeated with period P
    (step 1); outputs in the first n_outputs slots of each answer."""

    slots: int
    n_features: int
    n_outputs: int
    name: str = "row"

    def n_input_cts(self, n_samples: int) -> int:
        return n_samples

    def n_output_cts(self, n_samples: int) -> int:
        return n_samples

    def pack(self, X: np.ndarray) -> list[np.ndarray]:
        period = next_pow2(self.n_features)
        padded = np.zeros((len(X), period))
        padded[:, :self.n_features] = X
        return list(np.tile(padded, (1, self.slots // period)))

    def unpack(self, vectors: list[np.ndarray], n_samples: int) -> np.ndarray:
        return np.asarray([np.real(v[:self.n_outputs]) for v in vectors[:n_samples]])


def _check_row_plan(p: LayoutPlan, n_inputs: int, levels: int | None, geometry: SlotGeometry | None) -> None:
    bits = p.params.coeff_modulus_bits
    if not p.relin or p.relin_last or p.half != next_pow2(n_inputs) or p.half > p.params.slot_count:
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


def output_shift(ps: ProductSum) -> int:
    """k such that the output bound times 2^k is in [1, 2): CKKS noise is absolute (about 1e-6
    per level, 1e-4 after the row layout's rotate-and-sum), so outputs are computed at unit
    magnitude and the client divides by 2^k; tiny regression targets keep their relative precision,
    large ones a small first prime."""
    bound = ps.output_bound()
    if bound <= 0.0:
        return 0
    return int(np.clip(-math.floor(math.log2(bound)), -MAX_OUTPUT_SHIFT, MAX_OUTPUT_SHIFT))


class ProductSumCircuit(LeveledCircuit):
    """Server side of a product sum: the batch layout runs its lowered program on the leveled
    backend, the row layout runs `SlotCircuit`, both on the product sum scaled by 2^output_shift
    (`output_shift`); the client divides. Only the product sum (weights included) and the shift
    are stored."""

    kind = KIND

    def __init__(self, ps: ProductSum, plans: dict[str, LayoutPlan], encoding: ThermometerEncoding | None = None,
                 shift: int = 0) -> None:
        if isinstance(shift, bool) or not isinstance(shift, int) or abs(shift) > MAX_OUTPUT_SHIFT:
            raise WireFormatError(f"the output shift must be an integer of at most {MAX_OUTPUT_SHIFT} in magnitude")
        self.products, self.shift = ps, shift
        self.evaluated = ps.scaled(2.0**shift)
        self._slots: SlotCircuit | None = None
        self._row_geometry: SlotGeometry | None = None  # set by _check_plans when there is a row plan
        super().__init__(normalise(self.evaluated.lower()), ps.n_inputs, plans, encoding)

    def _check_plans(self, plans: dict[str, LayoutPlan]) -> dict[str, LayoutPlan]:
        batch = {k: v for k, v in plans.items() if k != "row"}
        # the inputs of a product sum are 0/1 (its literals' contract), as the planner assumed
        checked = check_plans(batch, self.n_inputs, len(self.stages), self.stages, non_negative=True) if batch else {}
        if "row" in plans:
            p = plans["row"]
            if p.layout != "row":
                raise WireFormatError(f"plan for {p.layout!r} filed under 'row'")
            geometry = SlotGeometry(self.evaluated, p.params.slot_count)
            geometry.check_size(self.evaluated, p.params)
            _check_row_plan(p, self.evaluated.n_inputs, slot_row_levels(self.evaluated), geometry)
            self._row_geometry = geometry
            if self.evaluated.output_bound() >= 2.0 ** (p.params.coeff_modulus_bits[0] - p.scale_bits - 2):
                raise WireFormatError("the row plan's first prime cannot hold this program's outputs")
            checked["row"] = p
        if not checked:
            raise WireFormatError("a product sum needs a plan for at least one layout")
        return checked

    def slot_circuit(self) -> SlotCircuit:
        if self._slots is None:
            assert self._row_geometry is not None
            self._slots = SlotCircuit(self.evaluated, self._row_geometry)
        return self._slots

    def layout(self, name: object) -> BatchLayout | DiagonalLayout | SlotLayout:
        name = checked_layout(name, self.plans)
        if name == "row":
            return SlotLayout(self.plans["row"].params.slot_count, self.n_inputs, self.n_outputs)
        return super().layout(name)

    def to_dict(self) -> dict:
        return {"kind": KIND, "products": self.products.to_dict(), "output_shift": self.shift,
                "plans": {k: v.to_dict() for k, v in self.plans.items()}, **self._encoding_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ProductSumCircuit:
        if not isinstance(d, dict) or d.get("kind") != KIND or not isinstance(d.get("plans"), dict):
            raise WireFormatError("not a product-sum circuit")
        return cls(ProductSum.from_dict(d.get("products")),
                   {k: LayoutPlan.from_dict(v) for k, v in d["plans"].items()}, load_encoding(d.get("encoding")),
                   d.get("output_shift", 0))

    def client_spec(self) -> dict:
        """The leveled client's specification plus the output shift the client divides by."""
        return {**super().client_spec(), "output_shift": self.shift}

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        return self.products.evaluate(self.encode(X))

    def simulate(self, X: np.ndarray, layout: str = "batch", rng: np.random.Generator | None = None) -> np.ndarray:
        """The leveled simulation of the lowered program, unscaled; for the row layout plus the
        noise its rotate-and-sum gathers from every slot (sqrt(slots) times one level's)."""
        rng = rng if rng is not None else np.random.default_rng()
        out = super().simulate(X, "batch" if layout == "row" and "batch" in self.plans else layout, rng)
        if layout == "row":
            plan = self.plans["row"]
            sigma = NOISE_SLOTS * plan.params.poly_modulus_degree / 2.0**plan.scale_bits
            out = out + rng.normal(size=out.shape) * sigma * math.sqrt(plan.params.slot_count)
        return out / 2.0**self.shift

    def cost_ms(self, layout: str) -> float:
        if layout != "row":
            return super().cost_ms(layout)
        plan = self.plans["row"]
        primes = len(plan.params.coeff_modulus_bits) - 1
        per = plan.params.poly_modulus_degree / 8192
        assert self._row_geometry is not None
        return slot_cost_ms(self.evaluated, self._row_geometry, COST_MS_PER_PRIME, primes) * per

    def _run_row(self, x: Ciphertext, bundle: PublicBundle, packing: Any) -> Ciphertext:
        return self.slot_circuit().run(x, bundle)


class ProductSumClient(ProgramClient):
    """Client side of a product sum: the leveled client, with the row layout's packing."""

    kind = KIND

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        shift = spec.get("output_shift", 0)
        if isinstance(shift, bool) or not isinstance(shift, int) or abs(shift) > MAX_OUTPUT_SHIFT:
            raise WireFormatError(f"the output shift must be an integer of at most {MAX_OUTPUT_SHIFT} in magnitude")
        self.shift = shift

    def decrypt(self, response: bytes, n_samples: int | None = None) -> np.ndarray:
        """Outputs of a response, divided by the 2^output_shift they were computed at."""
        return super().decrypt(response, n_samples) / 2.0**self.shift

    def _check_plans(self, plans: dict[str, LayoutPlan], depth: int) -> dict[str, LayoutPlan]:
        batch = {k: v for k, v in plans.items() if k != "row"}
        checked = check_plans(batch, self.n_inputs, depth) if batch else {}
        if "row" in plans:
            _check_row_plan(plans["row"], self.n_inputs, None, None)
            checked["row"] = plans["row"]
        if not checked:
            raise WireFormatError("a product sum needs a plan for at least one layout")
        return checked

    def layout(self, name: object) -> BatchLayout | DiagonalLayout | SlotLayout:
        name = checked_layout(name, self.plans)
        if name == "row":
            return SlotLayout(self.plans["row"].params.slot_count, self.n_inputs, self.n_outputs)
        return super().layout(name)


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


def compile_product_sum(ps: ProductSum, X: np.ndarray, encoding: ThermometerEncoding | None = None,
                        headroom: float = DEFAULT_HEADROOM) -> ProductSumCircuit:
    """Plan and build the circuit of a product sum for raw inputs X (encoded first, if an
    encoding is given), its outputs computed at unit magnitude (`output_shift`)."""
    Xe = encoding.encode(X) if encoding is not None else np.asarray(X, dtype=np.float64)
    shift = output_shift(ps)
    return ProductSumCircuit(ps, plan_product_sum(ps.scaled(2.0**shift), Xe, headroom), encoding, shift)


__all__ = ["ProductSum", "ProductSumCircuit", "ProductSumClient", "SlotCircuit", "SlotGeometry", "SlotLayout",
           "compile_product_sum", "plan_product_sum"]
