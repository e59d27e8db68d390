"""Slot layouts for an affine map y = W x + b on encrypted inputs.

* batch: one ciphertext per feature with samples in the slots. The server needs no evaluation
  keys at all, and cost per sample falls as the batch fills the slots (throughput).
* row: each sample's features are replicated once per output in blocks of B = 2^k >= n_features;
  the server multiplies by the weight rows and sums each block with log2(B) rotations (latency:
  one small ciphertext each way for a single sample).
* gather: a sample's outputs in consecutive slots, and the client gathers, for each output, the
  features its weights multiply (the map's sparsity pattern, which is public in this layout):
  K plaintext products per ciphertext group and no rotations, where K is the most weights of one
  output (a convolution: in_channels x kernel area). Latency for sparse maps (convolutions) that
  are too wide for the row layout's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from veil.errors import ShapeError

LAYOUTS = ("batch", "row", "gather")
"""The slot layouts of one affine map, the only definition of the layout names."""
PROGRAM_LAYOUTS = LAYOUTS[:2]
"""The layouts a whole program (leveled, staged, products) is planned and served in: batch for
throughput and row for latency (a staged program's row layout runs each stage in one of
`LATENCY_LAYOUTS`)."""
LATENCY_LAYOUTS = LAYOUTS[1:]
"""The single-sample layouts of one affine map: row, or gather for sparse maps too wide for row."""
MAX_GATHER_ENTRIES = 1 << 24
"""Largest gather table (outputs x terms) accepted: it is part of both artefacts."""


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


@dataclass(frozen=True, eq=False)
class GatherLayout:
    """The gather layout (module docstring). `index[j, k]` is the feature the k-th weight of output
    j multiplies, -1 where output j has fewer than k + 1 weights. With n_outputs <= slots a group
    of ciphertexts holds slots // n_outputs samples, each in a run of n_outputs slots; otherwise
    each sample spans `parts` = ceil(n_outputs / slots) parts of `slots` outputs. Input
    ciphertexts are ordered (group, part, term), outputs (group, part)."""

    slots: int
    n_features: int
    n_outputs: int
    index: np.ndarray
    name: str = "gather"

    def __post_init__(self) -> None:
        if self.index.ndim != 2 or self.index.shape[0] != self.n_outputs or self.index.shape[1] < 1:
            raise ShapeError(f"a gather table has one row per output ({self.n_outputs}), got shape {self.index.shape}")

    @property
    def terms(self) -> int:
        return int(self.index.shape[1])

    @property
    def parts(self) -> int:
        return -(-self.n_outputs // self.slots)

    @property
    def samples_per_ct(self) -> int:
        return max(1, self.slots // self.n_outputs)

    def n_groups(self, n_samples: int) -> int:
        return -(-n_samples // self.samples_per_ct)

    def n_input_cts(self, n_samples: int) -> int:
        return self.n_groups(n_samples) * self.parts * self.terms

    def n_output_cts(self, n_samples: int) -> int:
        return self.n_groups(n_samples) * self.parts

    def slot_map(self, part: int) -> tuple[np.ndarray, np.ndarray]:
        """Per slot of a ciphertext of `part`: the output it holds (-1: none) and its sample within the group."""
        t = np.arange(self.slots)
        if self.parts == 1:
            used = t < self.samples_per_ct * self.n_outputs
            return np.where(used, t % self.n_outputs, -1), t // self.n_outputs
        j = part * self.slots + t
        return np.where(j < self.n_outputs, j, -1), np.zeros(self.slots, dtype=np.int64)

    def pack(self, X: np.ndarray) -> list[np.ndarray]:
        """Slot vectors in order (group, part, term): slot t of term k holds x[index[j(t), k]]."""
        n = len(X)
        padded = np.concatenate([X, np.zeros((n, 1))], axis=1)  # column n_features: no term
        index = np.where(self.index >= 0, self.index, self.n_features)
        maps = [self.slot_map(p) for p in range(self.parts)]
        out: list[np.ndarray] = []
        for g in range(self.n_groups(n)):
            for j, s in maps:
                rows = g * self.samples_per_ct + s
                valid = (j >= 0) & (rows < n)
                block = np.zeros((self.slots, self.terms))
                block[valid] = padded[rows[valid][:, None], index[j[valid]]]
                out.extend(block.T)
        return out

    def weight_vectors(self, W: np.ndarray, b: np.ndarray, fill: float) -> list[tuple[list[np.ndarray], np.ndarray]]:
        """Per part: the weight slot vector of each term and the bias slot vector, aligned with
        `pack`. Slots without a term hold `fill` (they multiply zeros), so no plaintext is all
        zero: SEAL refuses products that would not depend on the key."""
        out = []
        for p in range(self.parts):
            j, _ = self.slot_map(p)
            used = j >= 0
            rows = self.index[np.where(used, j, 0)]
            weights = np.where(used[:, None] & (rows >= 0), W[np.where(used, j, 0)[:, None], np.maximum(rows, 0)], fill)
            weights[weights == 0.0] = fill
            out.append((list(weights.T), np.where(used, b[np.where(used, j, 0)], 0.0)))
        return out

    def unpack(self, vectors: list[np.ndarray], n_samples: int) -> np.ndarray:
        """Outputs (n_samples, n_outputs) from decrypted vectors in order (group, part)."""
        Y = np.empty((n_samples, self.n_outputs))
        maps = [self.slot_map(p) for p in range(self.parts)]
        for g in range(self.n_groups(n_samples)):
            for p, (j, s) in enumerate(maps):
                rows = g * self.samples_per_ct + s
                valid = (j >= 0) & (rows < n_samples)
                Y[rows[valid], j[valid]] = np.real(vectors[g * self.parts + p])[valid]
        return Y


def gather_index(support: np.ndarray) -> np.ndarray:
    """The gather table of a boolean support (outputs x features): each row's features in
    increasing order, padded with -1 to the longest row (at least one column)."""
    support = np.asarray(support, dtype=bool)
    counts = support.sum(axis=1)
    terms = max(1, int(counts.max(initial=0)))
    if support.shape[0] * terms > MAX_GATHER_ENTRIES:
        raise ShapeError(f"a gather table of {support.shape[0]} x {terms} entries is too large; use the row layout")
    index = np.full((support.shape[0], terms), -1, dtype=np.int64)
    rows, cols = np.nonzero(support)
    index[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = cols
    return index


def check_gather_index(index: object, n_outputs: int, n_features: int) -> np.ndarray:
    """A gather table from untrusted JSON: integers, one row per output, each row's features
    strictly increasing and followed only by -1 padding (a repeated feature would count twice)."""
    if not isinstance(index, list) or len(index) != n_outputs or not all(isinstance(r, list) for r in index):
        raise ShapeError(f"a gather table is a list of {n_outputs} rows")
    width = len(index[0]) if index else 0
    if not 1 <= width <= n_features or n_outputs * width > MAX_GATHER_ENTRIES or any(len(r) != width for r in index):
        raise ShapeError("gather table rows must all hold between 1 and n_features entries")
    if not all(isinstance(v, int) and not isinstance(v, bool) and -1 <= v < n_features for r in index for v in r):
        raise ShapeError(f"gather table entries must be integers from -1 to {n_features - 1}")
    arr = np.asarray(index, dtype=np.int64)
    present = arr >= 0
    if (np.any(arr < -1) or np.any(arr >= n_features) or np.any(~present[:, :-1] & present[:, 1:])
            or np.any(present[:, 1:] & (arr[:, 1:] <= arr[:, :-1]))):
        raise ShapeError("gather table rows must list distinct features in increasing order, then -1")
    return arr


def make_layout(name: str, slots: int, n_features: int, n_outputs: int, per_slot: int = 1,
                index: np.ndarray | None = None) -> BatchLayout | RowLayout | GatherLayout:
    if name == "batch":
        return BatchLayout(slots, n_features, n_outputs, per_slot=per_slot)
    if name == "row":
        return RowLayout(slots, n_features, n_outputs)
    if name == "gather" and index is not None:
        return GatherLayout(slots, n_features, n_outputs, index)
    raise ShapeError(f"unknown layout {name!r}; choose from {LAYOUTS} (gather needs its table)")

