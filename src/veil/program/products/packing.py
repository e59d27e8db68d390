"""Where everything sits in the row (slot) layout of a product sum, and its packing (the
protocol steps are in `veil.program.products`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from veil.errors import ShapeError
from veil.he import CKKSParameters
from veil.program.packing import next_pow2
from veil.program.products.ir import ProductSum

MAX_ROW_WORDS = 1 << 27
"""Largest row-layout selection (nonzero diagonals x N x data primes, 8-byte words: 1 GiB of encoded
plaintexts): beyond it a model has no row plan (the batch layout serves it), and a forged artefact
claiming one is refused at load instead of allocating tens of gigabytes on its first request."""


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
