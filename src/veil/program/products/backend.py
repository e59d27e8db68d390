"""The `product-sum` circuit kind: the row-layout evaluation (`SlotCircuit`, protocol steps in
`veil.program.products`), and its server and client; the batch layout runs the lowered program
on the leveled backend."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import seal

from veil.errors import KeyMaterialError, ShapeError, WireFormatError
from veil.he import PublicBundle
from veil.he.ciphertext import Ciphertext
from veil.program.common import checked_layout
from veil.program.encoding import ThermometerEncoding, load_encoding
from veil.program.ir import normalise
from veil.program.kinds import CircuitKind, register
from veil.program.leveled import LeveledCircuit, LeveledClient, check_plans
from veil.program.packing import BatchLayout
from veil.program.planner import COST_MS_PER_PRIME, DEFAULT_HEADROOM, NOISE_SLOTS, LayoutPlan
from veil.program.products.ir import ProductSum
from veil.program.products.packing import SlotGeometry, SlotLayout
from veil.program.products.planner import check_row_plan, plan_product_sum, slot_cost_ms, slot_row_levels
from veil.program.tiled import TiledLayout

KIND = "product-sum"
MAX_OUTPUT_SHIFT = 200


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
            check_row_plan(p, self.evaluated.n_inputs, slot_row_levels(self.evaluated), geometry)
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

    def layout(self, name: object) -> BatchLayout | TiledLayout | SlotLayout:
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

    def agreement(self) -> dict[str, Any]:
        return {**super().agreement(), "output_shift": self.shift}

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

    def _run_row(self, xs: list[Ciphertext], bundle: PublicBundle, packing: Any) -> Ciphertext:
        return self.slot_circuit().run(xs[0], bundle)


class ProductSumClient(LeveledClient):
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

    def agreement(self) -> dict[str, Any]:
        return {**super().agreement(), "output_shift": self.shift}

    def _check_plans(self, plans: dict[str, LayoutPlan], depth: int) -> dict[str, LayoutPlan]:
        batch = {k: v for k, v in plans.items() if k != "row"}
        checked = check_plans(batch, self.n_inputs, depth) if batch else {}
        if "row" in plans:
            check_row_plan(plans["row"], self.n_inputs, None, None)
            checked["row"] = plans["row"]
        if not checked:
            raise WireFormatError("a product sum needs a plan for at least one layout")
        return checked

    def layout(self, name: object) -> BatchLayout | TiledLayout | SlotLayout:
        name = checked_layout(name, self.plans)
        if name == "row":
            return SlotLayout(self.plans["row"].params.slot_count, self.n_inputs, self.n_outputs)
        return super().layout(name)


def compile_product_sum(ps: ProductSum, X: np.ndarray, encoding: ThermometerEncoding | None = None,
                        headroom: float = DEFAULT_HEADROOM) -> ProductSumCircuit:
    """Plan and build the circuit of a product sum for raw inputs X (encoded first, if an
    encoding is given), its outputs computed at unit magnitude (`output_shift`)."""
    Xe = encoding.encode(X) if encoding is not None else np.asarray(X, dtype=np.float64)
    shift = output_shift(ps)
    return ProductSumCircuit(ps, plan_product_sum(ps.scaled(2.0**shift), Xe, headroom), encoding, shift)


register(CircuitKind(KIND, ProductSumCircuit.from_dict, ProductSumClient,
                     "a tree ensemble (sums of products of 0/1 literals over a public input grid the client "
                     "encodes)"))
