"""Leveled programs (networks with polynomial activations): the server circuit and its backends.

`LeveledCircuit` holds the normalised stages of a `Program` and a `LayoutPlan` per layout, and
runs them three ways: `run` (SEAL, on ciphertexts), `simulate` (the same quantization of inputs
and weights plus Gaussian noise of the CKKS magnitude, no encryption) and `evaluate` (plaintext).

Batch layout (samples in slots, one ciphertext per feature, no rotations): a Linear stage is, per
output, a sum of ciphertexts times scalar plaintexts encoded at the prime the rescale divides by,
computed for all outputs at once as a matrix product over the ciphertexts' RNS coefficients
(`veil.he.linear.WeightedSum`, bit-identical to SEAL's multiply_plain and add_inplace per weight);
a Poly stage is s t^2 + c1 t + c0 per ciphertext. A Poly followed by such a Linear is left at
scale 2^(2s), unrelinearized and unrescaled; the Linear relinearizes its (fewer) outputs once and
rescales them twice, so each pair still costs two levels and the scale returns to about 2^s.

Row layout (`veil.program.tiled`: each sample's values tiled in a virtual vector of its own): the
first Linear stage is one plaintext product per ciphertext of client-side windows (im2col) and a
fold of log2(stack) rotations, or the diagonal method; every later Linear stage is the hybrid
diagonal method in baby-step giant-step form (Horner over the giant steps) and a fold; a Poly
stage is s t^2 + c1 t + c0 on the real slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import seal

from veil.errors import KeyMaterialError, PrecisionError, ShapeError, WireFormatError
from veil.he import CKKSParameters, HEContext, PublicBundle, SecretKeys, wire
from veil.he.ciphertext import Ciphertext, add_many, aligned
from veil.he.linear import SPARSE_DENSITY, WeightedSum, seal_round
from veil.program.common import ClientBase, ServerBase, checked_layout
from veil.program.encoding import ThermometerEncoding, load_encoding
from veil.program.ir import Linear, Op, Poly, Program, is_exact
from veil.program.kinds import CircuitKind, register
from veil.program.packing import BatchLayout
from veil.program.planner import (
    COST_MS_PER_PRIME,
    NOISE_SLOTS,
    LayoutPlan,
    check_batch_memory,
    check_intermediate,
    interval_bounds,
    output_primes,
    output_value_bits,
    required_keys,
    row_capable,
    row_cost_ms,
    stage_levels,
)
from veil.program.tiled import MAX_ROW_WORDS, Diagonal, TiledGeometry, TiledLayout, plaintext_words

KIND = "leveled"
CARRIED = (0.0, 1.0, 0.0)
"""The element of a per-element polynomial that carries its value unchanged (a skip connection)."""


def check_normal(stages: list[Op]) -> None:
    """Every element of a per-element polynomial is +-z^2 + c1 z + c0 or the carried identity, as
    `normalise` leaves them (anything else would be evaluated wrongly, or as a key-independent
    product SEAL refuses)."""
    for i, op in enumerate(stages):
        if isinstance(op, Poly) and not op.is_uniform:
            c0, c1, c2 = op.coeffs
            carried = (c2 == 0.0) & (c1 == 1.0) & (c0 == 0.0)
            if not np.all(carried | (np.abs(c2) == 1.0)):
                raise WireFormatError(f"stage {i}: a per-element polynomial must be normalised (leading "
                                      "coefficients +-1, or the carried identity)")


def _sound_output(p: LayoutPlan, stages: list[Op], non_negative: bool) -> LayoutPlan:
    """A sound plan with its output bound checked against the interval bounds the server computes
    itself from the plan's input box (and recorded, for a plan written before it was)."""
    with np.errstate(over="ignore", invalid="ignore"):
        bounds = interval_bounds(stages, np.asarray(p.input_bounds), non_negative)
    try:
        check_intermediate(stages, bounds, p.params, p.scale_bits, p.layout)
    except PrecisionError as exc:
        raise WireFormatError(f"the {p.layout} plan cannot hold this program: {exc}") from None
    peak = bounds[-1]
    # (relative slack: a sum in another order may differ in its last bits from the planner's)
    if not math.isfinite(peak) or (p.output_bound and p.output_bound < peak * (1 - 1e-9)):
        raise WireFormatError(f"the {p.layout} plan's output bound {p.output_bound:.3g} is below the program's "
                              f"sound bound {peak:.3g} over its input box: outputs could wrap around")
    return p if p.output_bound else replace(p, output_bound=peak)


def check_plans(plans: dict[str, LayoutPlan], n_features: int, depth: int,
                stages: list[Op] | None = None, non_negative: bool = False,
                n_outputs: int | None = None) -> dict[str, LayoutPlan]:
    """The consistency both sides check on loading: a plan per known layout, filed under its own
    name, with bounds for every feature, one prime per level-consuming stage (at most `depth`)
    plus the output level's and the special one, an output level that holds the planned output
    bound, a row geometry that holds the program's widths (`n_outputs`: the client's count, which
    knows no stages) and exactly the evaluation keys the program needs (the server, which knows
    the stages, also recomputes a sound plan's bounds: a forged plan is refused here, not per
    request). Returns the plans, each with its output bound."""
    if not plans:
        raise WireFormatError("a leveled circuit needs a plan for at least one layout")
    checked: dict[str, LayoutPlan] = {}
    for name, p in plans.items():
        if name != p.layout:
            raise WireFormatError(f"plan for {p.layout!r} filed under {name!r}")
        if name == "row" and stages is not None and not row_capable(stages):
            raise WireFormatError("the row layout cannot run per-element polynomials")
        if name == "batch" and stages is not None:
            check_batch_memory(stages, n_features, p.params)
        if len(p.input_bounds) != n_features:
            raise ShapeError("input bounds do not match the number of features")
        if stages is not None and p.bounds == "sound":  # calibrated bounds came from data the server lacks
            p = _sound_output(p, stages, non_negative or p.non_negative)
        bits = p.params.coeff_modulus_bits
        levels = depth if stages is None else sum(stage_levels(stages, name))
        value_bits = output_value_bits(p.output_bound, p.bounds)
        bottom = len(output_primes(p.scale_bits, value_bits))
        if not 2 < len(bits) <= levels + bottom + 1 or (stages is not None and len(bits) != levels + bottom + 1):
            raise WireFormatError("the modulus chain does not match the program's depth")
        if sum(bits[:bottom]) < p.scale_bits + value_bits + 2:
            raise WireFormatError(f"the {name} plan's output level ({sum(bits[:bottom])} bits) cannot hold outputs "
                                  f"up to {p.output_bound:.3g} at scale 2^{p.scale_bits} ({p.bounds} bounds): "
                                  "they would wrap around")
        if any(b != p.scale_bits for b in bits[1:-1]) or bits[0] < p.scale_bits + 3:
            raise WireFormatError(f"the {name} plan's scale 2^{p.scale_bits} does not match its modulus chain "
                                  f"{list(bits)}: every rescale must divide by a prime of the scale's size, "
                                  "and the first prime must exceed it")
        if max(p.input_bounds) >= 2.0 ** (sum(bits[:-1]) - p.scale_bits - 2):
            raise WireFormatError(f"the {name} plan's input bounds do not fit its modulus")
        if p.layout == "batch" and (p.half or p.rotation_steps or p.geometry is not None):
            raise WireFormatError("the batch layout uses no blocks, geometry or rotations")
        if p.layout == "row":
            _check_row_geometry(p, n_features, stages, n_outputs)
        if stages is not None:
            relin, steps, half = required_keys(stages, name, p.relin_last, p.geometry)
            if (p.relin, tuple(sorted(p.rotation_steps)), p.half) != (relin, steps, half):
                raise WireFormatError(f"the {name} plan's evaluation keys (relin {p.relin}, rotation steps, "
                                      f"half {p.half}) are not the ones its program needs")
        checked[name] = p
    return checked


def _check_row_geometry(p: LayoutPlan, n_features: int, stages: list[Op] | None, n_outputs: int | None) -> None:
    """A row plan's geometry holds the program (`TiledGeometry.check`), its plaintexts fit
    MAX_ROW_WORDS and its rotation steps are the geometry's."""
    g = p.geometry
    if g is None or p.half:
        raise WireFormatError("the row plan of a leveled program needs its geometry (and no block half-width)")
    if stages is not None:
        n_outputs = Program(n_features, stages).n_outputs
    g.check(n_features, 1 if n_outputs is None else n_outputs, stages)
    top = len(p.params.coeff_modulus_bits) - 1
    # (the plaintexts are the server's: only it, knowing the weights, counts the diagonals it encodes)
    if g.n_linear > top or (stages is not None
                            and plaintext_words(g, top, p.params.poly_modulus_degree, stages) > MAX_ROW_WORDS):
        raise WireFormatError("the row plan's geometry has more linear stages than levels, or would encode "
                              "more plaintexts than a row plan may hold")
    if tuple(sorted(p.rotation_steps)) != g.rotation_steps:
        raise WireFormatError("the row plan's rotation steps are not the ones its geometry needs")


def make_packing(plan: LayoutPlan, n_features: int, n_outputs: int) -> BatchLayout | TiledLayout:
    slots = plan.params.slot_count
    if plan.layout == "batch":
        return BatchLayout(slots, n_features, n_outputs)
    assert plan.geometry is not None
    return TiledLayout(slots, n_features, n_outputs, plan.geometry)


class LeveledKind:
    """The answers of the leveled kinds, alike on both halves: everything follows from the plans
    (and the public input encoding)."""

    kind = KIND
    plans: dict[str, LayoutPlan]
    encoding: ThermometerEncoding | None

    @property
    def depth(self) -> int:
        return max(len(p.params.coeff_modulus_bits) - 2 for p in self.plans.values())

    def evaluation_keys(self, layout: str) -> tuple[bool, tuple[int, ...]]:
        plan = self.plans[layout]
        return plan.relin, tuple(plan.rotation_steps)

    def agreement(self) -> dict[str, Any]:
        return {"plans": {k: v.to_dict() for k, v in self.plans.items()},
                "encoding": None if self.encoding is None else self.encoding.to_dict()}


class LeveledCircuit(LeveledKind, ServerBase):
    """Server side of a leveled program: stages (weights stay here) and per-layout plans."""

    def __init__(self, stages: list[Op], n_inputs: int, plans: dict[str, LayoutPlan],
                 encoding: ThermometerEncoding | None = None) -> None:
        self.program = Program(n_inputs, stages)
        self.stages = self.program.ops
        check_normal(self.stages)
        self.encoding = encoding
        if encoding is not None and encoding.width != n_inputs:
            raise ShapeError(f"the input encoding gives {encoding.width} values, the program takes {n_inputs}")
        self.plans = self._check_plans(plans)
        self._contexts: dict[str, HEContext] = {}
        self._row_plain: dict[tuple, Any] = {}
        self._kernels: dict[tuple[int, int], WeightedSum] = {}

    def _check_plans(self, plans: dict[str, LayoutPlan]) -> dict[str, LayoutPlan]:
        return check_plans(plans, self.n_inputs, len(self.stages), self.stages, non_negative=self.encoding is not None)

    # interface shared with LinearCircuit ---------------------------------------------------
    @property
    def n_features(self) -> int:
        """Features a client sends (before its public input encoding, if any)."""
        return self.encoding.n_features if self.encoding is not None else self.program.n_inputs

    @property
    def n_inputs(self) -> int:
        """Values encrypted per sample: the program's inputs."""
        return self.program.n_inputs

    def encode(self, X: np.ndarray) -> np.ndarray:
        """The program's inputs for raw features X (the client's public encoding, if any)."""
        return self.encoding.encode(X) if self.encoding is not None else np.asarray(X, dtype=np.float64)

    @property
    def n_outputs(self) -> int:
        return self.program.n_outputs

    def layout_params(self) -> dict[str, CKKSParameters]:
        return {name: p.params for name, p in self.plans.items()}

    def prepare(self) -> LeveledCircuit:
        for name in self.plans:
            self.context(name)
        return self

    def layout(self, name: object) -> BatchLayout | TiledLayout:
        return make_packing(self.plans[checked_layout(name, self.plans)], self.n_inputs, self.n_outputs)

    def _encoding_dict(self) -> dict:
        return {} if self.encoding is None else {"encoding": self.encoding.to_dict()}

    def to_dict(self) -> dict:
        return {"kind": KIND, "program": self.program.to_dict(),
                "plans": {k: v.to_dict() for k, v in self.plans.items()}, **self._encoding_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> LeveledCircuit:
        if not isinstance(d, dict) or d.get("kind") != KIND or not isinstance(d.get("plans"), dict):
            raise WireFormatError("not a leveled circuit")
        program = Program.from_dict(d.get("program"))
        return cls(program.ops, program.n_inputs, {k: LayoutPlan.from_dict(v) for k, v in d["plans"].items()},
                   load_encoding(d.get("encoding")))

    def client_spec(self) -> dict:
        """What a client needs to encrypt and decrypt: parameters, bounds and the public input
        encoding, no weights."""
        return {"kind": self.kind, "n_features": self.n_inputs, "n_outputs": self.n_outputs,
                "depth": len(self.stages), "plans": {k: v.to_dict() for k, v in self.plans.items()},
                "cost_ms": {k: round(self.cost_ms(k), 3) for k in self.plans}, **self._encoding_dict()}

    def cost_ms(self, layout: str) -> float:
        """Estimated single-core milliseconds per unit of work: one batch of `slots` samples in the
        batch layout, one group of samples (an answer ciphertext) in the row layout
        (`planner.row_cost_ms`). From operation counts and per-operation costs measured with SEAL at
        N=8192 (per prime of the level, scaled by N / 8192); the client uses it to pick the cheaper
        layout without seeing the weights."""
        plan = self.plans[layout]
        if layout == "row":
            assert plan.geometry is not None
            relin = [plan.relinearize_at(i, self.stages) for i in range(len(self.stages))]
            return row_cost_ms(self.stages, plan.geometry, plan.params, relin)
        per = plan.params.poly_modulus_degree / 8192
        top = len(plan.params.coeff_modulus_bits) - 1
        return self._batch_cost_ms(plan, top) * per

    def _batch_cost_ms(self, plan: LayoutPlan, top: int) -> float:
        """One batch as `_run_batch` evaluates it: a square followed by a Linear is neither
        relinearized nor rescaled, and the Linear's outputs (3 components) are relinearized once
        and rescaled twice."""
        c = COST_MS_PER_PRIME
        cost = c["encrypt"] * top * self.n_inputs
        width, primes, pending = self.n_inputs, top, None
        for i, op in enumerate(self.stages):
            if is_exact(op):
                cost += np.count_nonzero(op.weight) * c["add"] * primes
                width = op.n_out
            elif isinstance(op, Linear):
                nnz = np.count_nonzero(op.weight)
                per_weight = c["weighted_sum_sparse"] if nnz < SPARSE_DENSITY * op.weight.size else c["weighted_sum"]
                comps = 1.5 if pending is not None else 1.0
                relin = c["rotate"] if pending is not None and plan.relinearize_at(pending, self.stages) else 0.0
                rescales = 2 if pending is not None else 1
                cost += (nnz * per_weight * comps + op.n_out * (relin + rescales * c["rescale"])) * primes
                primes -= rescales
                width, pending = op.n_out, None
            elif self.deferred(i):
                cost += width * c["square"] * primes
                pending = i
            else:
                relin = c["rotate"] if plan.relinearize_at(i, self.stages) else 0.0
                cost += width * (c["square"] + relin + c["rescale"]) * primes
                primes -= 1
        return cost

    # plaintext and simulation backends -----------------------------------------------------
    def evaluate(self, X: np.ndarray) -> np.ndarray:
        return self.program.evaluate(self.encode(X))

    def simulate(self, X: np.ndarray, layout: str = "batch", rng: np.random.Generator | None = None) -> np.ndarray:
        """What `run` computes, without encryption: inputs rounded to the input scale, weights to
        the scale they are encoded at, and Gaussian noise of CKKS's per-slot magnitude after the
        encryption and after every stage (sqrt(N) times more once a square is left
        unrelinearized, as measured)."""
        plan = self.plans[layout]
        X = self.encode(X)
        plan.check_input(X)
        rng = rng if rng is not None else np.random.default_rng()
        delta = 2.0 ** plan.scale_bits
        sigma = NOISE_SLOTS * plan.params.poly_modulus_degree / delta
        out = np.round(X * delta) / delta + rng.normal(size=X.shape) * sigma
        three = False
        for i, (op, costs) in enumerate(zip(self.stages, stage_levels(self.stages, layout), strict=True)):
            if isinstance(op, Linear) and not costs:
                out = out @ op.weight.T + op.bias  # sums of ciphertexts: exact, the noise only adds up
                continue
            if isinstance(op, Linear):
                Wq = np.round(op.weight * delta) / delta
                out = out @ Wq.T + op.bias
            else:
                out = op(out)
                three = three or not plan.relinearize_at(i, self.stages)
            # rescaling a 3-component ciphertext multiplies the rounding by s^2: sqrt(N) more noise
            amp = math.sqrt(plan.params.poly_modulus_degree) if three else 1.0
            out = out + rng.normal(size=out.shape) * sigma * amp
        return out

    # SEAL backend ------------------------------------------------------------------------
    def input_scale(self, layout: str) -> float:
        return 2.0 ** self.plans[layout].scale_bits

    def run(self, request: bytes, bundle: PublicBundle) -> bytes:
        """Evaluate the program on an encrypted request; the answer is ciphertexts only."""
        name, packing, ctx, raw, n = self.open_request(request, bundle)
        plan = self.plans[name]
        if plan.relin and bundle.relin_keys is None:
            raise KeyMaterialError("this program needs relinearization keys; the bundle has none")
        missing = set(plan.rotation_steps) - set(bundle.rotation_steps)
        if missing:
            raise KeyMaterialError(f"key bundle lacks Galois keys for rotation steps {sorted(missing)}")
        cts = [Ciphertext(ctx, ct) for ct in raw]
        if name == "batch":
            out = []
            for b in range(packing.n_batches(n)):
                out.extend(self._run_batch(cts[b * self.n_inputs:(b + 1) * self.n_inputs], bundle))
        else:
            per = len(cts) // packing.n_output_cts(n)
            out = [self._run_row(cts[g * per:(g + 1) * per], bundle, packing) for g in range(packing.n_output_cts(n))]
        return ctx.pack([c.data for c in out], {"layout": name, "n_samples": n, "n_outputs": self.n_outputs})

    def _poly(self, z: Ciphertext, coeffs: tuple[float, float, float], relin: bool, bundle: PublicBundle,
              c0_plain: Callable[[float], seal.Plaintext] | None = None, rescale: bool = True) -> Ciphertext:
        """s z^2 + c1 z + c0 with s = +-1, rescaled unless `rescale` is false (a square the next
        Linear relinearizes and rescales), or z itself for a carried element (0, 1, 0): the product
        by 1 at the ciphertext's scale keeps it at the squares' level and scale. `c0_plain(scale)`,
        when given, is the constant as an encoded plaintext at that scale (the row layout adds it
        to real slots only)."""
        c0, c1, sign = coeffs
        if coeffs == CARRIED:
            carried = z.mul_plain_(1.0, z.scale)
            return carried.rescale_() if rescale else carried
        t = z.square()
        if relin:
            t.relinearize_(bundle.relin_keys)
        if sign < 0:
            t.neg_()
        if c1 != 0.0:
            t.add_(z.mul_plain_(c1, z.scale))
        if c0 != 0.0 and c0_plain is not None:
            t.context.evaluator.add_plain_inplace(t.data, c0_plain(t.scale))
        elif c0 != 0.0:
            t.add_(c0)
        return t.rescale_() if rescale else t

    def _run_batch(self, xs: list[Ciphertext], bundle: PublicBundle) -> list[Ciphertext]:
        """The stages on one batch. A Poly followed by a (non-exact) Linear is left at the product
        scale, unrelinearized and unrescaled: the Linear then takes the squares as they are, and its
        outputs (usually far fewer) are relinearized once, at the scale of the products (where key
        switching adds the least noise), and rescaled twice. A Poly elsewhere (last, or before an
        exact Linear) is relinearized and rescaled at once."""
        plan = self.plans["batch"]
        pending: int | None = None
        for i, op in enumerate(self.stages):
            if is_exact(op):
                xs = self._linear_exact(op, xs)
            elif isinstance(op, Linear):
                relin = pending is not None and plan.relinearize_at(pending, self.stages)
                xs = self._linear_batch(i, op, xs, bundle if relin else None, 2 if pending is not None else 1)
                pending = None
            elif self.deferred(i):
                xs = [self._poly(z, op.element(j), False, bundle, rescale=False) for j, z in enumerate(xs)]
                pending = i
            else:
                relin = plan.relinearize_at(i, self.stages)
                xs = [self._poly(z, op.element(j), relin, bundle) for j, z in enumerate(xs)]
        return xs

    def deferred(self, stage: int) -> bool:
        """Whether the batch layout leaves the Poly `stage` unrelinearized and unrescaled for the
        Linear after it (any Linear that costs a level). A per-element polynomial's carried
        elements stay 2-component ciphertexts beside the 3-component squares (the weighted sum
        takes both)."""
        nxt = self.stages[stage + 1] if stage + 1 < len(self.stages) else None
        return isinstance(nxt, Linear) and not is_exact(nxt)

    def _linear_batch(self, stage: int, op: Linear, xs: list[Ciphertext], relin: PublicBundle | None,
                      rescales: int) -> list[Ciphertext]:
        """y_j = sum_i w_ji x_i + b_j, weights encoded at the prime the first rescale removes, as
        one `WeightedSum` over the ciphertexts' RNS coefficients (bit-identical to a multiply_plain
        and an add_inplace per non-zero weight); then relinearized with `relin`'s keys (when given)
        and rescaled `rescales` times."""
        first = aligned(xs, "combine")
        ctx, level = first.context, first.level
        kernel = self._weighted_sum(stage, ctx, level, float(first.next_prime()))
        out = []
        for ct in kernel([x.data for x in xs]):
            y = Ciphertext(ctx, ct)
            if relin is not None:
                y.relinearize_(relin.relin_keys)
            for _ in range(rescales):
                y.rescale_()
            out.append(y)
        return out

    def _weighted_sum(self, stage: int, ctx: HEContext, level: int, q: float) -> WeightedSum:
        """The kernel of a Linear stage at `level` (cached: it depends on the weights and the level
        only). A row whose weights all round to zero at scale q keeps one unit weight (1/q on the
        first input), far below CKKS noise: SEAL refuses key-independent results."""
        key = (stage, level)
        if key not in self._kernels:
            op = self.stages[stage]
            assert isinstance(op, Linear)
            W = op.weight.copy()
            empty = ~seal_round(W * q).any(axis=1)
            W[empty, 0] = 1.0 / q
            self._kernels[key] = WeightedSum(ctx, W, op.bias, q, level)
        return self._kernels[key]

    @staticmethod
    def _linear_exact(op: Linear, xs: list[Ciphertext]) -> list[Ciphertext]:
        """y_j = sum_i w_ji x_i + b_j with small integer weights: additions and subtractions of
        ciphertexts at one level and scale (larger integers as products by a scale-1 plaintext,
        which changes no scale), then the bias at that scale. No rescale: no level is used."""
        first = aligned(xs, "combine")
        ctx = first.context
        ev, pid, scale = ctx.evaluator, first.data.parms_id(), first.scale
        datas = [x.data for x in xs]
        out = []
        for w_row, b in zip(op.weight, op.bias, strict=True):
            acc: seal.Ciphertext | None = None
            for j in np.flatnonzero(w_row):
                w = int(w_row[j])
                if abs(w) != 1:
                    term = ev.multiply_plain(datas[j], ctx.encode_at(float(abs(w)), 1.0, pid))
                else:
                    term = datas[j]
                if acc is None:
                    acc = ev.negate(term) if w < 0 else seal.Ciphertext(term)
                elif w < 0:
                    ev.sub_inplace(acc, term)
                else:
                    ev.add_inplace(acc, term)
            if acc is None:
                raise ShapeError("an exact linear stage needs a non-zero weight in every row")
            if b != 0.0:
                ev.add_plain_inplace(acc, ctx.encode_at(float(b), scale, pid))
            out.append(Ciphertext(ctx, acc))
        return out

    def _plain(self, key: tuple, x: Ciphertext, scale: float, virtual: Callable[[], np.ndarray]) -> seal.Plaintext:
        """The row layout's plaintext `key` (weights, biases, constants: fixed by the program) at
        `scale` and the level of `x`, encoded once: `virtual()` gives its virtual vector (one period),
        tiled and spread over the slots (`veil.program.tiled`)."""
        full = (key, x.level, scale)
        if full not in self._row_plain:
            g = self.plans["row"].geometry
            assert g is not None
            v = virtual()
            vec = np.repeat(np.tile(v, g.virtual // len(v)), g.samples_per_ct)
            self._row_plain[full] = x.context.encode_at(vec, scale, x.data.parms_id())
        return self._row_plain[full]

    @staticmethod
    def _periodic(values: np.ndarray, period: int) -> np.ndarray:
        out = np.zeros(period)
        out[:len(values)] = values
        return out

    def _windows_stage(self, stage: int, xs: list[Ciphertext], g: TiledGeometry, gk: Any) -> Ciphertext:
        """sum_c ct_c * P_c, then the fold of the stacked blocks (`veil.program.tiled`, stage 0)."""
        op = self.stages[stage]
        assert isinstance(op, Linear) and g.windows is not None
        w = g.windows
        q = float(xs[0].next_prime())
        if (stage, "weights") not in self._row_plain:
            table = w.index_table(-1)
            slot_out = np.arange(w.stack * w.period) % w.period
            rows = np.minimum(slot_out, op.n_out - 1)
            weights = np.where((table >= 0) & (slot_out < op.n_out), op.weight[rows, np.maximum(table, 0)], 0.0)
            self._row_plain[(stage, "weights")] = weights
        weights = self._row_plain[(stage, "weights")]
        terms = []
        for c, x in enumerate(xs):
            if weights[c].any():
                pt = self._plain((stage, "view", c), x, q, lambda c=c: weights[c])
                terms.append(Ciphertext(x.context, x.context.evaluator.multiply_plain(x.data, pt)))
        if not terms:
            raise ShapeError("a linear stage with all-zero weights cannot be evaluated")
        acc = add_many(terms)
        for step in w.fold:
            acc.add_(acc.rotate(step * g.samples_per_ct, gk))
        return acc

    def _diagonal_stage(self, stage: int, x: Ciphertext, d: Diagonal, g: TiledGeometry, gk: Any,
                        deferred: bool = False) -> Ciphertext:
        """The hybrid diagonal method in baby-step giant-step form, Horner over the giant steps,
        then the fold (`veil.program.tiled`, stage l). With `deferred`, x is the previous stage's
        result before its rescale (`TiledGeometry.deferred`): the babies are rotated at that scale
        and each is rescaled once made."""
        op = self.stages[stage]
        assert isinstance(op, Linear)
        raw = x
        if deferred:
            x = x.rescale()
        n, q = g.samples_per_ct, float(x.next_prime())
        if (stage, "diagonals") not in self._row_plain:
            self._row_plain[(stage, "diagonals")] = d.plaintext_vectors(op.weight)
        groups = self._row_plain[(stage, "diagonals")]
        babies = [x]
        acc: Ciphertext | None = None
        ev = x.context.evaluator
        for gi in range(len(groups) - 1, -1, -1):
            if acc is not None:
                acc = acc.rotate(d.baby * n, gk)
            terms = []
            for b, v in groups[gi]:
                while len(babies) <= b:
                    raw = raw.rotate(n, gk)
                    babies.append(raw.rescale() if deferred else raw)
                pt = self._plain((stage, "diagonal", gi, b), x, q, lambda v=v: v)
                terms.append(Ciphertext(x.context, ev.multiply_plain(babies[b].data, pt)))
            if terms:
                inner = add_many(terms)
                acc = inner if acc is None else acc.add_(inner)
        if acc is None:
            raise ShapeError("a linear stage with all-zero weights cannot be evaluated")
        for step in d.fold:
            acc.add_(acc.rotate(step * n, gk))
        return acc

    def _run_row(self, xs: list[Ciphertext], bundle: PublicBundle, packing: TiledLayout) -> Ciphertext:
        """One group of samples through every stage (`veil.program.tiled`)."""
        plan = self.plans["row"]
        g = plan.geometry
        assert g is not None
        gk = bundle.galois_keys
        diagonals = iter(g.diagonals)
        deferred = g.deferred(self.stages)
        x, period, width = xs[0], g.input_period, self.n_inputs
        for i, op in enumerate(self.stages):
            if isinstance(op, Linear):
                if i == 0 and g.windows is not None:
                    acc, period = self._windows_stage(i, xs, g, gk), g.windows.period
                else:
                    d = next(diagonals)
                    acc, period = self._diagonal_stage(i, x, d, g, gk, i > 0 and deferred[i - 1]), d.rows
                width = op.n_out
                bias = self._plain((i, "bias"), acc, acc.scale, lambda p=period, b=op.bias: self._periodic(b, p))
                acc.context.evaluator.add_plain_inplace(acc.data, bias)
                x = acc if deferred[i] else acc.rescale_()
            else:
                def c0_plain(scale: float, i: int = i, p: int = period, w: int = width, z: Ciphertext = x,
                             c0: float = op.coeffs[0]) -> seal.Plaintext:
                    return self._plain((i, "c0"), z, scale, lambda: self._periodic(np.full(w, c0), p))

                x = self._poly(x, op.coeffs, plan.relinearize_at(i, self.stages), bundle, c0_plain=c0_plain,
                               rescale=not deferred[i])
        return x


class LeveledClient(LeveledKind, ClientBase):
    """Client side of a leveled program: keys per layout, encryption, decryption."""

    response_max_size = 3  # the last square may be left unrelinearized

    def __init__(self, spec: dict) -> None:
        if not isinstance(spec, dict) or spec.get("kind") != self.kind or not isinstance(spec.get("plans"), dict):
            raise WireFormatError("not a leveled client specification")
        self.n_inputs = wire.strict_int(spec.get("n_features"), "n_features", 1, 1 << 16)
        self.n_outputs = wire.strict_int(spec.get("n_outputs"), "n_outputs", 1, 1 << 16)
        depth = wire.strict_int(spec.get("depth"), "depth", 1, 1 << 10)
        self.encoding = load_encoding(spec.get("encoding"))
        if self.encoding is not None and self.encoding.width != self.n_inputs:
            raise ShapeError(f"the input encoding gives {self.encoding.width} values, the program takes "
                             f"{self.n_inputs}")
        self.n_features = self.encoding.n_features if self.encoding is not None else self.n_inputs
        self.plans = self._check_plans({k: LayoutPlan.from_dict(v) for k, v in spec["plans"].items()}, depth)
        self.params = {k: p.params for k, p in self.plans.items()}
        costs = spec.get("cost_ms")
        if not isinstance(costs, dict) or set(costs) != set(self.plans) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e12 for v in costs.values()):
            raise WireFormatError("cost_ms must give a non-negative number per layout")
        self.cost_ms = {k: float(v) for k, v in costs.items()}
        self._keys: dict[str, Any] = {}

    def _check_plans(self, plans: dict[str, LayoutPlan], depth: int) -> dict[str, LayoutPlan]:
        return check_plans(plans, self.n_inputs, depth, n_outputs=self.n_outputs)

    def layout(self, name: object) -> BatchLayout | TiledLayout:
        return make_packing(self.plans[checked_layout(name, self.plans)], self.n_inputs, self.n_outputs)

    def check_outputs(self, layout: str, Y: np.ndarray) -> np.ndarray:
        """Outputs beyond the plan's output bound raise PrecisionError (`LayoutPlan.check_output`)."""
        return self.plans[layout].check_output(Y)

    def choose_layout(self, n_samples: int) -> str:
        """The layout with the lower estimated cost for this many samples (`cost_ms` from the server)."""
        if len(self.plans) == 1:
            return next(iter(self.plans))
        total = {}
        for name in self.plans:
            packing = self.layout(name)
            units = packing.n_batches(n_samples) if name == "batch" else packing.n_output_cts(n_samples)
            total[name] = units * self.cost_ms[name]
        return min(total, key=lambda k: (total[k], k))

    def keys(self, layout: str) -> SecretKeys:
        if layout not in self._keys:
            plan = self.plans[layout]
            self.layout(layout)
            self._keys[layout] = SecretKeys.generate(plan.params, rotation_steps=plan.rotation_steps,
                                                     relin=plan.relin)
        return self._keys[layout]

    def set_keys(self, layout: str, keys: SecretKeys) -> None:
        plan = self.plans[layout]
        if keys.params != plan.params:
            raise ShapeError("these keys were made for other parameters")
        if set(plan.rotation_steps) - set(keys.rotation_steps) or (plan.relin and not keys.relin):
            raise KeyMaterialError("these keys lack evaluation keys the program needs")
        self._keys[layout] = keys

    def encrypt(self, X: Any, layout: str) -> bytes:
        X = self.check_input(X)
        if self.encoding is not None:
            X = self.encoding.encode(X)
        packing, plan = self.layout(layout), self.plans[layout]
        plan.check_input(X)
        keys = self.keys(layout)
        scale = 2.0 ** plan.scale_bits
        cts = [keys.encrypt(v, scale) for v in packing.pack(X)]
        return keys.context.pack(cts, {"layout": layout, "n_samples": len(X), "n_features": self.n_features})


register(CircuitKind(KIND, LeveledCircuit.from_dict, LeveledClient,
                     "a network with polynomial activations (one rescale per stage)"))
