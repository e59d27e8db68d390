"""Leveled programs (networks with polynomial activations): the server circuit and its backends.

`LeveledCircuit` holds the normalised stages of a `Program` and a `LayoutPlan` per layout, and
runs them three ways: `run` (SEAL, on ciphertexts), `simulate` (the same quantization of inputs
and weights plus Gaussian noise of the CKKS magnitude, no encryption) and `evaluate` (plaintext).

Batch layout (samples in slots, one ciphertext per feature, no rotations): a Linear stage is, per
output, a sum of ciphertexts times scalar plaintexts encoded at the prime the rescale divides by,
so the scale is unchanged by the stage; a Poly stage is s t^2 + c1 t + c0 per ciphertext.

Row layout (one sample per block of 2*half slots, see `DiagonalLayout`): a Linear stage is the
diagonal method W x = sum_i diag_i(W) * rot(x, i) in baby-step giant-step form,
sum_g rot(sum_b rot(diag_{gB+b}, -gB) * rot(x, b), gB): B - 1 + G - 1 rotations for
B * G = half, plus one rotation that re-duplicates the block before every Linear but the first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import seal

from veil.errors import KeyMaterialError, PrecisionError, ShapeError, WireFormatError
from veil.he import HEContext, PublicBundle, SecretKeys, wire
from veil.he.ciphertext import Ciphertext, add_many, aligned
from veil.program.common import ClientBase, ServerBase, checked_layout
from veil.program.encoding import ThermometerEncoding, load_encoding
from veil.program.ir import Linear, Op, Poly, Program, is_exact
from veil.program.kinds import CircuitKind, register
from veil.program.packing import BatchLayout, DiagonalLayout
from veil.program.planner import (
    NOISE_SLOTS,
    LayoutPlan,
    check_intermediate,
    diagonal_steps,
    interval_bounds,
    required_keys,
    row_capable,
    stage_levels,
)

KIND = "leveled"
MAX_BATCH_WORKING_BYTES = 4 << 30
"""Largest working set of one batch-layout evaluation (two layers of ciphertexts live at once):
a forged or oversized program is refused at load, not by exhausting the server's memory."""
COST_MS_PER_PRIME = {"encrypt": 1.0, "mul_add": 0.13, "add": 0.02, "rescale": 0.35, "square": 0.16, "rotate": 0.8}
"""Single-core SEAL costs per prime of the current level at N=8192, measured on the project machine."""
PROGRAM_LAYOUTS = ("batch", "row")
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


def check_plans(plans: dict[str, LayoutPlan], n_features: int, depth: int,
                stages: list[Op] | None = None, non_negative: bool = False) -> dict[str, LayoutPlan]:
    """The consistency both sides check on loading: a plan per known layout, filed under its own
    name, with bounds for every feature, one prime per level-consuming stage (at most `depth`)
    plus the first and special ones, and exactly the evaluation keys the program needs (the
    server, which knows the stages: a forged plan is refused here, not per request)."""
    if not plans:
        raise WireFormatError("a leveled circuit needs a plan for at least one layout")
    for name, p in plans.items():
        if name != p.layout:
            raise WireFormatError(f"plan for {p.layout!r} filed under {name!r}")
        if name == "batch" and stages is not None:
            widest = max([n_features] + [op.n_out for op in stages if isinstance(op, Linear)])
            ct_bytes = 2 * p.params.poly_modulus_degree * (len(p.params.coeff_modulus_bits) - 1) * 8
            if 2 * widest * ct_bytes > MAX_BATCH_WORKING_BYTES:
                raise ShapeError(
                    f"a layer of {widest} values holds {2 * widest * ct_bytes / 2**30:.1f} GiB of ciphertexts "
                    f"per batch of samples (limit {MAX_BATCH_WORKING_BYTES / 2**30:.0f} GiB): use narrower "
                    "layers (fewer channels, pooling earlier)")
        if len(p.input_bounds) != n_features:
            raise ShapeError("input bounds do not match the number of features")
        bits = p.params.coeff_modulus_bits
        levels = depth if stages is None else sum(stage_levels(stages, name))
        if not 2 < len(bits) <= levels + 2 or (stages is not None and len(bits) != levels + 2):
            raise WireFormatError("the modulus chain does not match the program's depth")
        if any(b != p.scale_bits for b in bits[1:-1]) or bits[0] < p.scale_bits + 3:
            raise WireFormatError(f"the {name} plan's scale 2^{p.scale_bits} does not match its modulus chain "
                                  f"{list(bits)}: every rescale must divide by a prime of the scale's size, "
                                  "and the first prime must exceed it")
        if max(p.input_bounds) >= 2.0 ** (sum(bits[:-1]) - p.scale_bits - 2):
            raise WireFormatError(f"the {name} plan's input bounds do not fit its modulus")
        if p.layout == "batch" and (p.half or p.rotation_steps):
            raise WireFormatError("the batch layout uses no blocks or rotations")
        if p.layout == "row" and stages is not None and not row_capable(stages):
            raise WireFormatError("the row layout cannot run per-element polynomials")
        if p.layout == "row" and (p.half < 1 or p.half & (p.half - 1)
                                  or not set(diagonal_steps(p.half)[2]) <= set(p.rotation_steps)):
            raise WireFormatError(f"the row layout's block half-width {p.half} must be a power of two "
                                  "with the rotation steps of its diagonal method")
        if stages is not None:
            relin, steps, half = required_keys(stages, n_features, name, p.params.slot_count, p.relin_last)
            if (p.relin, tuple(sorted(p.rotation_steps)), p.half) != (relin, steps, half):
                raise WireFormatError(f"the {name} plan's evaluation keys (relin {p.relin}, rotation steps, "
                                      f"half {p.half}) are not the ones its program needs")
            with np.errstate(over="ignore", invalid="ignore"):
                bounds = interval_bounds(stages, np.asarray(p.input_bounds), non_negative)
            try:
                check_intermediate(stages, bounds, p.params, p.scale_bits, name)
            except PrecisionError as exc:
                raise WireFormatError(f"the {name} plan cannot hold this program: {exc}") from None
            peak = bounds[-1]
            if not math.isfinite(peak) or bits[0] < p.scale_bits + max(1, math.ceil(math.log2(max(peak, 1.0)))) + 2:
                raise WireFormatError(f"the {name} plan's first prime ({bits[0]} bits) cannot hold values up to "
                                      f"{peak:.3g} at scale 2^{p.scale_bits}: outputs would wrap around")
        if name == "row" and (2 * p.half > p.params.slot_count or p.half < n_features):
            raise WireFormatError("the row layout's blocks do not fit the ring")
    return dict(plans)


def make_packing(plan: LayoutPlan, n_features: int, n_outputs: int) -> BatchLayout | DiagonalLayout:
    slots = plan.params.slot_count
    if plan.layout == "batch":
        return BatchLayout(slots, n_features, n_outputs)
    return DiagonalLayout(slots, n_features, n_outputs, plan.half)


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
        self._diagonals: dict[int, list[list[tuple[int, int, seal.Plaintext]]]] = {}

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

    @property
    def scales(self) -> dict[str, LayoutPlan]:
        return self.plans

    def prepare(self) -> LeveledCircuit:
        for name in self.plans:
            self.context(name)
        return self

    def layout(self, name: object) -> BatchLayout | DiagonalLayout:
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
        batch layout, one ciphertext in the row layout. From operation counts and per-operation
        costs measured with SEAL at N=8192 (per prime of the level, scaled by N / 8192); the
        client uses it to pick the cheaper layout without seeing the weights."""
        plan = self.plans[layout]
        per = plan.params.poly_modulus_degree / 8192
        top = len(plan.params.coeff_modulus_bits) - 1
        cost = COST_MS_PER_PRIME["encrypt"] * top * (self.n_inputs if layout == "batch" else 1)
        width, seen_linear, used = self.n_inputs, False, 0
        for i, (op, costs) in enumerate(zip(self.stages, stage_levels(self.stages, layout), strict=True)):
            primes = top - used
            used += int(costs)
            if isinstance(op, Linear):
                if layout == "batch" and not costs:
                    ops = np.count_nonzero(op.weight) * COST_MS_PER_PRIME["add"]
                elif layout == "batch":
                    ops = np.count_nonzero(op.weight) * COST_MS_PER_PRIME["mul_add"]
                    ops += op.n_out * COST_MS_PER_PRIME["rescale"]
                else:
                    _, _, steps = diagonal_steps(plan.half)
                    rotations = len(steps) + (1 if seen_linear else 0)
                    ops = rotations * COST_MS_PER_PRIME["rotate"] + plan.half * COST_MS_PER_PRIME["mul_add"]
                    ops += COST_MS_PER_PRIME["rescale"]
                seen_linear, width = True, op.n_out
            else:
                relin = COST_MS_PER_PRIME["rotate"] if plan.relinearize_at(i, self.stages) else 0.0
                one = COST_MS_PER_PRIME["square"] + relin + COST_MS_PER_PRIME["rescale"]
                ops = one * (width if layout == "batch" else 1)
            cost += ops * primes
        return cost * per

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
            out = [self._run_row(ct, bundle, packing) for ct in cts]
        return ctx.pack([c.data for c in out], {"layout": name, "n_samples": n, "n_outputs": self.n_outputs})

    def _poly(self, z: Ciphertext, coeffs: tuple[float, float, float], relin: bool, bundle: PublicBundle,
              c0_vector: np.ndarray | None = None) -> Ciphertext:
        """s z^2 + c1 z + c0 with s = +-1, or z itself for a carried element (0, 1, 0): the
        product by 1 at the ciphertext's scale keeps it at the squares' level and scale."""
        c0, c1, sign = coeffs
        if coeffs == CARRIED:
            return z.mul_plain_(1.0, z.scale).rescale_()
        t = z.square()
        if relin:
            t.relinearize_(bundle.relin_keys)
        if sign < 0:
            t.neg_()
        if c1 != 0.0:
            t.add_(z.mul_plain_(c1, z.scale))
        if c0 != 0.0:
            t.add_(c0 if c0_vector is None else c0_vector * c0)
        return t.rescale_()

    def _run_batch(self, xs: list[Ciphertext], bundle: PublicBundle) -> list[Ciphertext]:
        for i, op in enumerate(self.stages):
            if is_exact(op):
                xs = self._linear_exact(op, xs)
            elif isinstance(op, Linear):
                xs = self._linear_batch(op, xs)
            else:
                relin = self.plans["batch"].relinearize_at(i, self.stages)
                xs = [self._poly(z, op.element(j), relin, bundle) for j, z in enumerate(xs)]
        return xs

    @staticmethod
    def _linear_batch(op: Linear, xs: list[Ciphertext]) -> list[Ciphertext]:
        """y_j = sum_i w_ji x_i + b_j, weights encoded at the prime the rescale removes. The hot
        loop calls SEAL directly (one product and one in-place sum per non-zero weight): the
        operands are aligned by construction, having been checked as one level and one scale."""
        first = aligned(xs, "combine")
        ctx, q = first.context, float(first.next_prime())
        ev, pid, scale = ctx.evaluator, first.data.parms_id(), first.scale
        datas = [x.data for x in xs]
        out = []
        for w_row, b in zip(op.weight, op.bias, strict=True):
            nz = np.flatnonzero(np.round(w_row * q))
            # an all-zero row keeps one unit weight (1/q): SEAL refuses key-independent results
            pairs = [(int(j), float(w_row[j])) for j in nz] or [(0, 1.0 / q)]
            acc = None
            for j, w in pairs:
                term = ev.multiply_plain(datas[j], ctx.encode_at(w, q, pid))
                if acc is None:
                    acc = term
                else:
                    ev.add_inplace(acc, term)
            if b != 0.0:
                ev.add_plain_inplace(acc, ctx.encode_at(float(b), scale * q, pid))
            ev.rescale_to_next_inplace(acc)
            out.append(Ciphertext(ctx, acc))
        return out

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

    def _diagonals_for(self, stage: int, x: Ciphertext, plan: LayoutPlan) -> list[list[tuple[int, seal.Plaintext]]]:
        """Encoded pre-rotated diagonals of stage `stage` per giant step (cached: they depend only
        on the weights and the level)."""
        if stage not in self._diagonals:
            op = self.stages[stage]
            assert isinstance(op, Linear)
            half, slots = plan.half, plan.params.slot_count
            baby, giant, _ = diagonal_steps(half)
            q = float(x.next_prime())
            W = np.zeros((half, half))
            W[:op.n_out, :op.n_in] = op.weight
            rows = np.arange(half)
            groups = []
            for g in range(giant):
                group = []
                for b in range(baby):
                    i = g * baby + b
                    diag = W[rows, (rows + i) % half]
                    if not diag.any():
                        continue
                    block = np.zeros(2 * half)
                    block[g * baby:g * baby + half] = diag
                    vec = np.tile(block, slots // (2 * half))
                    group.append((b, x.context.encode_at(vec, q, x.data.parms_id())))
                groups.append(group)
            self._diagonals[stage] = groups
        return self._diagonals[stage]

    def _run_row(self, x: Ciphertext, bundle: PublicBundle, packing: DiagonalLayout) -> Ciphertext:
        plan = self.plans["row"]
        half, slots = plan.half, plan.params.slot_count
        baby, _, _ = diagonal_steps(half)
        mask = np.tile(np.r_[np.ones(half), np.zeros(half)], slots // (2 * half))
        seen_linear = False
        ev, gk = x.context.evaluator, bundle.galois_keys
        for i, op in enumerate(self.stages):
            if isinstance(op, Linear):
                if seen_linear:
                    x = x + x.rotate(slots - half, gk)
                seen_linear = True
                babies = [x] + [x.rotate(b, gk) for b in range(1, baby)]
                acc: Ciphertext | None = None
                for g, group in enumerate(self._diagonals_for(i, x, plan)):
                    if not group:
                        continue
                    terms = [Ciphertext(x.context, ev.multiply_plain(babies[b].data, pt)) for b, pt in group]
                    inner = add_many(terms)
                    if g:
                        inner = inner.rotate(g * baby, gk)
                    acc = inner if acc is None else acc.add_(inner)
                if acc is None:
                    raise ShapeError("a linear stage with all-zero weights cannot be evaluated")
                bias = np.tile(np.r_[op.bias, np.zeros(2 * half - op.n_out)], slots // (2 * half))
                x = acc.add_(bias).rescale_()
            else:
                x = self._poly(x, op.coeffs, plan.relinearize_at(i, self.stages), bundle, c0_vector=mask)
        return x


class ProgramClient(LeveledKind, ClientBase):
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
        return check_plans(plans, self.n_inputs, depth)

    def layout(self, name: object) -> BatchLayout | DiagonalLayout:
        return make_packing(self.plans[checked_layout(name, self.plans)], self.n_inputs, self.n_outputs)

    def choose_layout(self, n_samples: int) -> str:
        """The layout with the lower estimated cost for this many samples (`cost_ms` from the server)."""
        if len(self.plans) == 1:
            return next(iter(self.plans))
        total = {}
        for name in self.plans:
            packing = self.layout(name)
            units = packing.n_batches(n_samples) if name == "batch" else packing.n_input_cts(n_samples)
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


register(CircuitKind(KIND, LeveledCircuit.from_dict, ProgramClient))
