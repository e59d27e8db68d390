"""Slot layouts for an affine map y = W x + b on encrypted inputs.

* batch: one ciphertext per feature with samples in the slots. The server needs no evaluation
  keys at all, and cost per sample falls as the batch fills the slots (throughput).
* row: each sample's features are replicated once per output in blocks of B = 2^k >= n_features;
  the server multiplies by the weight rows and sums each block with log2(B) rotations (latency:
  one small ciphertext each way for a single sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from veil.errors import ShapeError

LAYOUTS = ("batch", "row")


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass(frozen=True)
class BatchLayout:
    """Samples in slots, one ciphertext per feature per batch. With `per_slot=2` each slot holds
    two samples, one in its real part and one in its imaginary part: a map with real weights acts
    on both parts independently, so affine models evaluate twice the samples per operation (not
    for programs with squares, which would mix the parts)."""

    slots: int
    n_features: int
    n_outputs: int
    name: str = "batch"
    per_slot: int = 1

    def __post_init__(self) -> None:
        if self.per_slot not in (1, 2):
            raise ShapeError(f"a slot holds 1 or 2 samples, not {self.per_slot}")

    @property
    def capacity(self) -> int:
        """Samples per ciphertext."""
        return self.slots * self.per_slot

    def n_input_cts(self, n_samples: int) -> int:
        return self.n_batches(n_samples) * self.n_features

    def n_output_cts(self, n_samples: int) -> int:
        return self.n_batches(n_samples) * self.n_outputs

    def n_batches(self, n_samples: int) -> int:
        return -(-n_samples // self.capacity)

    def pack(self, X: np.ndarray) -> list[np.ndarray]:
        """Slot vectors in order (batch, feature); complex when two samples share a slot."""
        out = []
        for b in range(self.n_batches(len(X))):
            block = X[b * self.capacity:(b + 1) * self.capacity]
            if self.per_slot == 1:
                out.extend(block[:, f] for f in range(self.n_features))
                continue
            both = np.zeros((self.slots, self.n_features), dtype=np.complex128)
            both.real[:min(len(block), self.slots)] = block[:self.slots]
            both.imag[:max(0, len(block) - self.slots)] = block[self.slots:]
            out.extend(both[:, f] for f in range(self.n_features))
        return out

    def unpack(self, vectors: list[np.ndarray], n_samples: int) -> np.ndarray:
        """Outputs (n_samples, n_outputs) from decrypted vectors in order (batch, output)."""
        Y = np.empty((n_samples, self.n_outputs))
        for b in range(self.n_batches(n_samples)):
            lo, hi = b * self.capacity, min(n_samples, (b + 1) * self.capacity)
            for c in range(self.n_outputs):
                v = vectors[b * self.n_outputs + c]
                if self.per_slot == 1:
                    Y[lo:hi, c] = np.real(v[:hi - lo])
                else:
                    both = np.concatenate([np.real(v), np.imag(v)])
                    Y[lo:hi, c] = both[:hi - lo]
        return Y


@dataclass(frozen=True)
class RowLayout:
    """Each sample replicated per output block; block sums by rotation."""

    slots: int
    n_features: int
    n_outputs: int
    name: str = "row"

    def __post_init__(self) -> None:
        if self.block > self.slots:
            raise ShapeError(
                f"row layout holds at most {self.slots} features, model has {self.n_features}; "
                "use the batch layout"
            )

    @property
    def block(self) -> int:
        return next_pow2(self.n_features)

    @property
    def group(self) -> int:
        """Outputs computed per ciphertext."""
        return min(self.n_outputs, self.slots // self.block)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.n_outputs / self.group)

    @property
    def stride(self) -> int:
        return self.block * self.group

    @property
    def samples_per_ct(self) -> int:
        return self.slots // self.stride

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        return tuple(1 << i for i in range(int(math.log2(self.block))))

    def n_input_cts(self, n_samples: int) -> int:
        return -(-n_samples // self.samples_per_ct)

    def n_output_cts(self, n_samples: int) -> int:
        return self.n_input_cts(n_samples) * self.n_groups

    def _slot_index(self, n_samples: int) -> np.ndarray:
        """Slot of (sample j, output-in-group k) block starts: shape (n_samples, group)."""
        j = np.arange(n_samples) % self.samples_per_ct
        return j[:, None] * self.stride + np.arange(self.group)[None, :] * self.block

    def pack(self, X: np.ndarray) -> list[np.ndarray]:
        n, spc, F = len(X), self.samples_per_ct, self.n_features
        n_ct = self.n_input_cts(n)
        flat = np.zeros((n_ct, self.slots))
        starts = self._slot_index(n)
        cts = np.arange(n) // spc
        cols = starts[:, :, None] + np.arange(F)[None, None, :]
        flat[cts[:, None, None], cols] = X[:, None, :]
        return list(flat)

    def weight_vectors(self, W: np.ndarray, b: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per output group: (weight slot vector, bias slot vector) aligned with `pack`."""
        out = []
        for g in range(self.n_groups):
            wv, bv = np.zeros(self.slots), np.zeros(self.slots)
            for j in range(self.samples_per_ct):
                for k in range(self.group):
                    c = g * self.group + k
                    if c >= self.n_outputs:
                        break
                    start = j * self.stride + k * self.block
                    wv[start:start + self.n_features] = W[c]
                    bv[start] = b[c]
            out.append((wv, bv))
        return out

    def unpack(self, vectors: list[np.ndarray], n_samples: int) -> np.ndarray:
        """Outputs from decrypted vectors in order (input ciphertext, output group)."""
        stacked = np.asarray(vectors).reshape(self.n_input_cts(n_samples), self.n_groups, self.slots)
        cts = np.arange(n_samples) // self.samples_per_ct
        picked = stacked[cts[:, None, None], np.arange(self.n_groups)[None, :, None],
                         self._slot_index(n_samples)[:, None, :]]
        return picked.reshape(n_samples, self.n_groups * self.group)[:, :self.n_outputs]


def make_layout(name: str, slots: int, n_features: int, n_outputs: int,
                per_slot: int = 1) -> BatchLayout | RowLayout:
    if name == "batch":
        return BatchLayout(slots, n_features, n_outputs, per_slot=per_slot)
    if name == "row":
        return RowLayout(slots, n_features, n_outputs)
    raise ShapeError(f"unknown layout {name!r}; choose from {LAYOUTS}")
