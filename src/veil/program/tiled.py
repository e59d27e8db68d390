"""The row layout of leveled programs: each sample's values tiled in a virtual vector of its own,
a convolution-aware first stage (client-side windows) and the hybrid diagonal method after it.

Virtual vectors. A ciphertext of S slots holds n = S / V samples interleaved: slot n*t + j holds
virtual slot t (0 <= t < V) of sample j. A rotation by n*r is then a rotation by r of every
sample's virtual vector at once, cyclic within it, so samples never mix and no rotation has to
re-duplicate a block. A virtual vector is *tiled with period p* (a power of two dividing V) when
virtual slot t holds value number t mod p: rotating it by r rotates its period cyclically.

Stage 0, windows (im2col, as Gazelle and LoLa pack convolutions). Output o of the first Linear reads
the inputs of its window, the non-zero columns of its weight row (for a convolution: the pixels
under the kernel at that position, the same for every channel). The client, which knows its own
input, sends K = (longest window) *views*: view k holds, at virtual slot o, the k-th input of
output o's window. `stack` views share a ciphertext, each in a block of `period` slots (period >= the
outputs), so a request holds ceil(K / stack) ciphertexts per group of samples. The server computes

    y = fold( sum_c  ct_c * P_c ),   P_c = at block j, slot o: W[o, window(o)[c * stack + j]]

one plaintext product per ciphertext, no rotation before the fold; the fold (rotate-and-add by
period * stack / 2, ..., period: log2(stack) rotations) adds the blocks, leaving y tiled with
`period`. The windows are public: they reveal which inputs feed each first-layer output (for a
convolution its kernel size, stride, padding and channel count), not the weights. A dense first
layer is one window holding every input.

Stage l, diagonal (Halevi-Shoup's diagonal method in its hybrid form for rectangular matrices).
The input x is tiled with period L >= n_in, the weights W' are padded with zero rows and columns
to R x L (R = rows, a power of two); with d = min(R, L) diagonals

    D_i[t] = W'[t mod R, (t + i) mod L],   y_pre = sum_{i < d} D_i * rot(x, i)

and, when L > R, a fold by L/2, ..., R adds the L/R partial sums: slot t then holds row t mod R
of W' x, complete, tiled with period R (the next stage's L). In baby-step giant-step form with
i = g*B + b, the babies rot(x, b) are made by repeated rotations by 1 and the giant steps by Horner:

    y_pre = rot(... rot(inner_{G-1}, B) + inner_{G-2} ..., B) + inner_0,
    inner_g = sum_b rot(D_{gB+b}, -gB) * rot(x, b)

so a stage costs d plaintext products, B - 1 + G - 1 + log2(L / R) rotations and one rescale, and
the whole program needs Galois keys for 1, each stage's B and the fold steps only (times n).
Padded slots hold exact zeros (zero weights and biases; the constant of an activation is added
to real slots only), so every slot's value obeys the planner's bounds. Only the diagonals that
hold a weight are encoded and multiplied (entry (r, c) lies on diagonal (c - r) mod d), and each
stage takes the baby-step size that needs the fewest rotations for those diagonals. The stage
before a diagonal stage with B > 1 leaves its result unrescaled (`TiledGeometry.deferred`): the
babies are rotated at about 2^(2s) and rescaled one by one, so the error their key switches add
(which SEAL's uncentered digits concentrate on a few slots, `planner.keyswitch_variance`) is 2^s
times smaller relative to the values.

Placement (`place`, used when lowering torch networks). Where a stage's values sit in the virtual
vector is free: a permutation (with gaps) of a Linear's rows, applied to the next Linear's columns,
computes the same function. A convolution reading a pooled convolution in C-order touches
diagonals everywhere (LeNet-5's second convolution: all 2,048); placed channel-blocked
(`grid_positions`: the pooling phases and channels as blocks, each a grid with the row stride of
the next convolution's output grid), each weight's diagonal depends only on its kernel offset and
channel difference (400 diagonals).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from veil.errors import ShapeError, WireFormatError
from veil.he.wire import strict_int
from veil.program.ir import MAX_DIM, Linear, Op
from veil.program.packing import next_pow2

MAX_VIEW_CTS = 256
"""Most ciphertexts per sample group in a windows stage (a request stays a bounded size)."""
MAX_WINDOW_ENTRIES = 1 << 21
"""Most input indices in the windows of a plan (what a client parses and packs by)."""
MAX_ROW_WORDS = 1 << 27
"""Largest set of encoded row-layout plaintexts (plaintexts x N x primes at their level, 8-byte
words: 1 GiB): beyond it a program has no row plan, and a forged plan claiming one is refused at load
instead of allocating it on its first request."""


def _pow2(value: int, what: str, lo: int, hi: int) -> int:
    if not lo <= value <= hi or value & (value - 1):
        raise WireFormatError(f"{what} must be a power of two in [{lo}, {hi}], got {value}")
    return value


def _log2(value: int) -> int:
    return value.bit_length() - 1


def fold_steps(period: int, width: int) -> tuple[int, ...]:
    """Rotate-and-add steps width/2, ..., period that sum `width // period` blocks of `period`."""
    steps = []
    step = width // 2
    while step >= period:
        steps.append(step)
        step //= 2
    return tuple(steps)


@dataclass(frozen=True)
class Windows:
    """Stage 0 by client-side windows (module docstring): distinct `windows` (input indices each),
    `window_of[o]` the window of output o, `stack` views per ciphertext in blocks of `period`."""

    windows: tuple[tuple[int, ...], ...]
    window_of: tuple[int, ...]
    period: int
    stack: int

    @property
    def n_outputs(self) -> int:
        return len(self.window_of)

    @property
    def n_views(self) -> int:
        return max(len(w) for w in self.windows)

    @property
    def n_cts(self) -> int:
        """Ciphertexts per group of samples."""
        return -(-self.n_views // self.stack)

    @property
    def fold(self) -> tuple[int, ...]:
        return fold_steps(self.period, self.period * self.stack)

    def index_table(self, fill: int) -> np.ndarray:
        """(n_cts, stack * period) input index of every virtual slot of every view ciphertext
        (`fill` where a view is empty or the slot is padding)."""
        table = np.full((self.n_cts * self.stack, self.period), fill, dtype=np.int64)
        for o, w in enumerate(self.window_of):
            cols = self.windows[w]
            table[:len(cols), o] = cols
        return table.reshape(self.n_cts, self.stack * self.period)

    def to_dict(self) -> dict:
        return {"windows": [list(w) for w in self.windows], "window_of": list(self.window_of),
                "period": self.period, "stack": self.stack}

    @classmethod
    def from_dict(cls, d: object, virtual: int) -> Windows:
        if not isinstance(d, dict) or set(d) != {"windows", "window_of", "period", "stack"}:
            raise WireFormatError("a windows stage is an object with windows, window_of, period and stack")
        raw, of = d["windows"], d["window_of"]
        if not isinstance(raw, list) or not isinstance(of, list) or not raw or not of:
            raise WireFormatError("windows and window_of must be non-empty lists")
        if len(raw) > MAX_DIM or len(of) > MAX_DIM or not all(isinstance(w, list) and w for w in raw) \
                or sum(len(w) for w in raw) > MAX_WINDOW_ENTRIES:
            raise WireFormatError(f"windows must be at most {MAX_DIM} non-empty lists of at most "
                                  f"{MAX_WINDOW_ENTRIES} input indices in all")
        windows = tuple(tuple(strict_int(i, "window input", 0, MAX_DIM - 1) for i in w) for w in raw)
        if any(len(set(w)) != len(w) for w in windows):
            raise WireFormatError("a window lists an input twice (it would be counted twice)")
        window_of = tuple(strict_int(w, "window of an output", 0, len(windows) - 1) for w in of)
        period = _pow2(strict_int(d["period"], "windows period", 1, virtual), "windows period", 1, virtual)
        stack = _pow2(strict_int(d["stack"], "windows stack", 1, virtual), "windows stack", 1, virtual)
        g = cls(windows, window_of, period, stack)
        if period < g.n_outputs or period * stack > virtual or g.n_cts > MAX_VIEW_CTS:
            raise WireFormatError(f"windows of {g.n_outputs} outputs in blocks of {period} x {stack} do not fit "
                                  f"{virtual} virtual slots in at most {MAX_VIEW_CTS} ciphertexts")
        return g


def used_diagonals(d: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Indices of the diagonals (of d = min(rows, period_in)) that hold the non-zero weights at
    (rows[k], cols[k]): entry (r, c) lies on diagonal (c - r) mod d (module docstring)."""
    out = np.zeros(d, dtype=bool)
    out[(cols - rows) % d] = True
    return np.flatnonzero(out)


@dataclass(frozen=True)
class Diagonal:
    """A Linear stage by the hybrid diagonal method (module docstring): input tiled with period
    `period_in`, `rows` output rows (padded), `baby` baby steps."""

    period_in: int
    rows: int
    baby: int

    @property
    def n_diagonals(self) -> int:
        return min(self.rows, self.period_in)

    @property
    def giant(self) -> int:
        return self.n_diagonals // self.baby

    @property
    def fold(self) -> tuple[int, ...]:
        return fold_steps(self.rows, self.period_in)

    @property
    def n_rotations(self) -> int:
        return self.baby - 1 + self.giant - 1 + len(self.fold)

    @classmethod
    def fitted(cls, period_in: int, rows: int, used: np.ndarray | None = None) -> Diagonal:
        """The stage with the baby step that needs the fewest rotations when the diagonals `used`
        (`used_diagonals`) hold the weights (the products do not depend on it), 2^ceil(log2(d) / 2)
        on ties and without weights: about sqrt(d) for dense diagonals, larger when the diagonals
        used cluster (a convolution's kernel offsets repeated per channel difference)."""
        d = min(rows, period_in)
        default = cls(period_in, rows, 1 << math.ceil(_log2(d) / 2))
        if used is None or not len(used):
            return default
        options = [default] + [cls(period_in, rows, 1 << k) for k in range(_log2(d) + 1)]
        return min(options, key=lambda g: g._rotations(used))

    def _rotations(self, used: np.ndarray) -> int:
        """Rotations of the backend when the diagonals `used` (indices, non-empty) hold weights: it
        makes baby steps up to the largest one used and Horner steps below the highest giant step
        used, then the fold."""
        return int(np.max(used % self.baby)) + int(np.max(used // self.baby)) + len(self.fold)

    def counts(self, W: np.ndarray | None = None) -> dict[str, int]:
        """Plaintext products and rotations of this stage: all diagonals without W (an upper bound);
        with W the backend's own counts, which skip all-zero diagonals (`_rotations`)."""
        if W is None:
            return {"input_cts": 0, "mul_plain": self.n_diagonals, "rotations": self.n_rotations}
        used = used_diagonals(self.n_diagonals, *np.nonzero(W))
        if not len(used):
            return {"input_cts": 0, "mul_plain": 0, "rotations": len(self.fold)}
        return {"input_cts": 0, "mul_plain": len(used), "rotations": self._rotations(used)}

    def plaintext_vectors(self, W: np.ndarray) -> list[list[tuple[int, np.ndarray]]]:
        """Per giant step g, the (b, rot(D_{gB+b}, -gB)) over one period max(rows, L) of every baby
        step b whose diagonal holds a non-zero weight (`used_diagonals`: the backend skips the
        others)."""
        R, L, B = self.rows, self.period_in, self.baby
        t = np.arange(max(R, L))
        r = t % R
        out: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(self.giant)]
        for i in used_diagonals(self.n_diagonals, *np.nonzero(W)):
            g, b = divmod(int(i), B)
            c = (t + i) % L
            inside = (r < W.shape[0]) & (c < W.shape[1])  # W padded with zeros to R x L, never built
            diag = np.zeros(len(t))
            diag[inside] = W[r[inside], c[inside]]
            out[g].append((b, np.roll(diag, g * B)))  # rot(v, -gB)[t] = v[t - gB]
        return out

    def to_dict(self) -> dict:
        return {"period_in": self.period_in, "rows": self.rows, "baby": self.baby}

    @classmethod
    def from_dict(cls, d: object, virtual: int) -> Diagonal:
        if not isinstance(d, dict) or set(d) != {"period_in", "rows", "baby"}:
            raise WireFormatError("a diagonal stage is an object with period_in, rows and baby")
        period_in, rows, baby = (_pow2(strict_int(d[k], k, 1, virtual), k, 1, virtual)
                                 for k in ("period_in", "rows", "baby"))
        if baby > min(rows, period_in):
            raise WireFormatError(f"{baby} baby steps exceed the {min(rows, period_in)} diagonals of the stage")
        return cls(period_in, rows, baby)


@dataclass(frozen=True)
class TiledGeometry:
    """Where a leveled program's values sit in the row layout (module docstring): `virtual` slots
    per sample out of `slots`, the first stage by `windows` (or by the diagonal method), then one
    `Diagonal` per later Linear stage."""

    slots: int
    virtual: int
    windows: Windows | None
    diagonals: tuple[Diagonal, ...]

    @property
    def samples_per_ct(self) -> int:
        return self.slots // self.virtual

    @property
    def cts_per_group(self) -> int:
        return self.windows.n_cts if self.windows is not None else 1

    @property
    def input_period(self) -> int:
        """Period of the input vectors a client encrypts (windows: the stacked blocks)."""
        if self.windows is not None:
            return self.windows.period * self.windows.stack
        return self.diagonals[0].period_in

    @property
    def n_linear(self) -> int:
        return len(self.diagonals) + (self.windows is not None)

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        """Galois steps of the whole program (virtual steps times the interleaving)."""
        steps: set[int] = set(self.windows.fold) if self.windows is not None else set()
        for d in self.diagonals:
            steps.update(d.fold)
            if d.baby > 1:
                steps.add(1)
            if d.giant > 1:
                steps.add(d.baby)
        n = self.samples_per_ct
        return tuple(sorted(n * s for s in steps))

    def babies(self, stages: list[Op]) -> list[int]:
        """Per stage, the baby-step size B of its diagonal stage (1 for the windows stage and for a
        Poly: no baby steps)."""
        diagonals = iter(self.diagonals)
        return [next(diagonals).baby if isinstance(op, Linear) and not (i == 0 and self.windows is not None) else 1
                for i, op in enumerate(stages)]

    def deferred(self, stages: list[Op]) -> list[bool]:
        """Per stage, whether the backend leaves its result unrescaled, at about 2^(2s), for the
        next stage's baby steps (a diagonal stage with B > 1): the babies are rotated at that scale
        and rescaled one by one, so a rotation's key-switching error is 2^s times smaller relative
        to the values than at 2^s (`planner.output_noise`), for one more prime per baby rotation
        and B rescales instead of one. The levels used are the same."""
        babies = self.babies(stages)
        return [i + 1 < len(stages) and babies[i + 1] > 1 for i in range(len(stages))]

    def op_counts(self, stages: list[Op] | None = None) -> list[dict[str, int]]:
        """Per Linear stage: plaintext products and rotations (`Diagonal.counts`: without `stages`
        all diagonals, an upper bound; with them the backend's exact counts, all-zero diagonals
        skipped); the windows stage also counts its ciphertexts."""
        out = []
        if self.windows is not None:
            w = self.windows
            out.append({"input_cts": w.n_cts, "mul_plain": w.n_cts, "rotations": len(w.fold)})
        linears = [op for op in stages if isinstance(op, Linear)][self.windows is not None:] if stages else None
        for k, d in enumerate(self.diagonals):
            out.append(d.counts(None if linears is None else linears[k].weight))
        if self.windows is None:
            out[0]["input_cts"] = 1
        return out

    def check(self, n_inputs: int, n_outputs: int, stages: list[Op] | None = None) -> None:
        """The consistency both sides check at load: periods chain from stage to stage and hold
        every stage's width, windows index real inputs; with `stages` (the server), the windows
        cover every non-zero weight of the first Linear exactly once and every width matches."""
        chain = ([] if self.windows is None else [self.windows.period]) + [d.rows for d in self.diagonals]
        ins = [d.period_in for d in self.diagonals]
        if self.windows is None and ins[0] < n_inputs:
            raise WireFormatError(f"the row plan's input period {ins[0]} cannot hold {n_inputs} inputs")
        if ins[1 if self.windows is None else 0:] != chain[:len(chain) - 1]:
            raise WireFormatError("each stage of the row plan must read its input with the period the stage "
                                  "before leaves")
        if chain[-1] < n_outputs:
            raise WireFormatError(f"the row plan's last period {chain[-1]} cannot hold {n_outputs} outputs")
        if self.windows is not None and max(max(w) for w in self.windows.windows) >= n_inputs:
            raise WireFormatError(f"a window reads an input beyond the {n_inputs} the program takes")
        if stages is None:
            return
        linears = [op for op in stages if isinstance(op, Linear)]
        if len(linears) != self.n_linear:
            raise WireFormatError(f"the row plan has {self.n_linear} linear stages, the program {len(linears)}")
        first = linears[0]
        if self.windows is not None:
            if self.windows.n_outputs != first.n_out:
                raise WireFormatError("the row plan's windows do not match the first stage's outputs")
            covered = np.zeros(first.weight.shape, dtype=bool)
            for o, w in enumerate(self.windows.window_of):
                covered[o, list(self.windows.windows[w])] = True
            if np.any((first.weight != 0) & ~covered):
                raise WireFormatError("the row plan's windows miss weights of the first stage")
        for d, op in zip(self.diagonals, linears[self.windows is not None:], strict=True):
            if d.rows < op.n_out or d.period_in < op.n_in:
                raise WireFormatError(f"a {op.n_out} x {op.n_in} stage does not fit blocks of {d.rows} x {d.period_in}")

    def to_dict(self) -> dict:
        return {"virtual": self.virtual, "windows": None if self.windows is None else self.windows.to_dict(),
                "diagonals": [d.to_dict() for d in self.diagonals]}

    @classmethod
    def from_dict(cls, d: object, slots: int) -> TiledGeometry:
        """Parse untrusted JSON strictly: bounded sizes, powers of two, periods within the virtual
        vector (the checks against a program's widths are `check`)."""
        if not isinstance(d, dict) or set(d) != {"virtual", "windows", "diagonals"}:
            raise WireFormatError("a row geometry is an object with virtual, windows and diagonals")
        virtual = _pow2(strict_int(d["virtual"], "virtual slots", 1, slots), "virtual slots", 1, slots)
        windows = None if d["windows"] is None else Windows.from_dict(d["windows"], virtual)
        raw = d["diagonals"]
        if not isinstance(raw, list) or len(raw) > MAX_DIM or (windows is None and not raw):
            raise WireFormatError("diagonals must be a list of stages (at least one without windows)")
        diagonals = tuple(Diagonal.from_dict(x, virtual) for x in raw)
        return cls(slots, virtual, windows, diagonals)


def windows_of(W: np.ndarray) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Distinct windows (non-zero columns of each row, in order) and the window of each row."""
    index: dict[tuple[int, ...], int] = {}
    of = []
    for row in W:
        cols = tuple(int(c) for c in np.flatnonzero(row)) or (0,)
        of.append(index.setdefault(cols, len(index)))
    return tuple(index), tuple(of)


def build(stages: list[Op], n_inputs: int, slots: int, first: str) -> TiledGeometry:
    """The geometry of `stages` on `slots` slots with the first stage by windows (`first="windows"`)
    or by the diagonal method: periods the next power of two of each width, as many views per
    ciphertext as are useful, and the smallest virtual vector that holds them (most samples per
    ciphertext). ShapeError when the ring is too small."""
    linears = [op for op in stages if isinstance(op, Linear)]
    windows = None
    if first == "windows":
        ws, of = windows_of(linears[0].weight)
        period = next_pow2(linears[0].n_out)
        views = next_pow2(max(len(w) for w in ws))
        stack = max(1, min(views, slots // period))
        windows = Windows(ws, of, period, stack)
        periods, rest = [period], linears[1:]
        if sum(len(w) for w in ws) > MAX_WINDOW_ENTRIES or windows.n_cts > MAX_VIEW_CTS:
            raise ShapeError("the first stage's windows are too large for the row layout")
    else:
        periods, rest = [next_pow2(n_inputs)], linears
    diagonals = []
    for op in rest:
        rows = next_pow2(op.n_out)
        used = used_diagonals(min(rows, periods[-1]), *np.nonzero(op.weight))
        diagonals.append(Diagonal.fitted(periods[-1], rows, used))
        periods.append(rows)
    need = max(periods + ([windows.period * windows.stack] if windows is not None else []))
    if need > slots:
        raise ShapeError(f"the row layout needs {need} slots per sample, the ring has {slots}: use the batch layout")
    return TiledGeometry(slots, need, windows, tuple(diagonals))


def plaintext_words(geometry: TiledGeometry, primes_top: int, degree: int, stages: list[Op] | None = None) -> int:
    """Words of the plaintexts the server encodes: Linear stage l of a normalised program (stage
    2l, the stages alternating with Polys) sits at primes_top - 2l primes; with `stages`, only
    the non-zero diagonals the backend encodes are counted (`TiledGeometry.op_counts`)."""
    words = 0
    for level, ops in enumerate(geometry.op_counts(stages)):
        words += ops["mul_plain"] * degree * max(1, primes_top - 2 * level)
    return words


@dataclass(frozen=True)
class TiledLayout:
    """The client's packing of the row layout: per group of `samples_per_ct` samples, the view
    ciphertexts of the windows stage (or one ciphertext of the input tiled with its period);
    outputs at virtual slots 0..n_outputs-1 of each sample."""

    slots: int
    n_features: int
    n_outputs: int
    geometry: TiledGeometry
    name: str = "row"

    @property
    def samples_per_ct(self) -> int:
        return self.geometry.samples_per_ct

    def n_output_cts(self, n_samples: int) -> int:
        return -(-n_samples // self.samples_per_ct)

    def n_input_cts(self, n_samples: int) -> int:
        return self.n_output_cts(n_samples) * self.geometry.cts_per_group

    def spread(self, virtual: np.ndarray) -> np.ndarray:
        """Virtual vectors (..., samples_per_ct, V) to slot vectors (..., slots), interleaved."""
        return np.swapaxes(virtual, -1, -2).reshape(*virtual.shape[:-2], self.slots)

    def pack(self, X: np.ndarray) -> list[np.ndarray]:
        """Slot vectors in order (group of samples, view ciphertext)."""
        g, n, V = self.geometry, len(X), self.geometry.virtual
        spc, groups = self.samples_per_ct, self.n_output_cts(n)
        padded = np.zeros((groups * spc, self.n_features + 1))
        padded[:n, :self.n_features] = X
        if g.windows is not None:
            virt = padded[:, g.windows.index_table(self.n_features)]  # (samples, cts, period * stack)
        else:
            virt = np.zeros((groups * spc, 1, g.input_period))
            virt[:, 0, :self.n_features] = padded[:, :self.n_features]
        virt = np.tile(virt, (1, 1, V // virt.shape[-1]))
        per_group = virt.reshape(groups, spc, g.cts_per_group, V).transpose(0, 2, 1, 3)
        return list(self.spread(per_group).reshape(-1, self.slots))

    def unpack(self, vectors: list[np.ndarray], n_samples: int) -> np.ndarray:
        """Outputs (n_samples, n_outputs) from decrypted vectors in group order."""
        spc = self.samples_per_ct
        stacked = np.real(np.asarray(vectors)).reshape(-1, self.geometry.virtual, spc)
        return np.swapaxes(stacked, 1, 2).reshape(-1, self.geometry.virtual)[:n_samples, :self.n_outputs]


def grid_positions(shape: tuple[int, int, int], factor: int, stride: int) -> np.ndarray:
    """Virtual slot of every element (in C-order) of a (C, H, W) value laid out channel-blocked
    for the diagonal method (module docstring, placement): element (c, y, x) at
    ((y % f * f + x % f) * C + c) * block + (y // f) * stride + x // f, with f = `factor` dividing
    H and W, `stride` >= W / f and block the power of two holding an (H/f) x stride grid."""
    C, H, W = shape
    block = next_pow2((H // factor - 1) * stride + W // factor)
    c, y, x = np.unravel_index(np.arange(C * H * W), shape)
    return ((y % factor * factor + x % factor) * C + c) * block + y // factor * stride + x // factor


def grid_candidates(shape: tuple[int, ...] | None, strides: set[int]) -> list[np.ndarray | None]:
    """The placements tried for a value: in order (None) and, for a (C, H, W) value, every
    channel-blocked grid (`grid_positions`) with a factor 1..4 dividing H and W and a stride out
    of `strides` (the grid widths of the other values, so a convolution's input and output grids
    can share a stride) at least W / f, that at most doubles the value's period."""
    out: list[np.ndarray | None] = [None]
    if shape is None or len(shape) != 3:
        return out
    C, H, W = shape
    for f in (1, 2, 3, 4):
        if H % f or W % f:
            continue
        for stride in sorted({W // f} | {s for s in strides if s >= W // f}):
            pos = grid_positions((C, H, W), f, stride)
            if next_pow2(int(pos.max()) + 1) <= 2 * next_pow2(C * H * W):
                out.append(pos)
    return out


def place(ops: list[Op], candidates: list[list[np.ndarray | None]],
          cost: Callable[[dict[str, int]], float]) -> tuple[list[Op], float, float]:
    """The chain Linear, Poly, ..., Linear (uniform Polys) with the values between its Linears
    placed where the diagonal method needs the fewest products and rotations: `candidates[k]`
    lists the placements tried for the value that Linear k computes and Linear k + 1 reads (None:
    in order; an array: the virtual slot of each element, injective), `cost` weighs a stage's
    products and rotations (`Diagonal.counts`). The choice minimises the summed cost of Linears 1.. (the first runs by
    windows, whose cost does not depend on where its outputs go) by dynamic programming over the
    chain; the placed program computes the same function: a placed Linear has zero rows (and
    zero bias) at the slots no element takes, the Poly maps them to its constant, and the next
    Linear has zero columns there. Returns (ops, cost placed, cost in order)."""
    linears = ops[0::2]
    assert len(candidates) == len(linears) - 1 and all(isinstance(op, Linear) for op in linears)
    coords = [np.nonzero(op.weight) for op in linears]

    def positions(p: np.ndarray | None, n: int) -> np.ndarray:
        return np.arange(n) if p is None else p

    def stage_cost(k: int, cols: np.ndarray | None, rows: np.ndarray | None) -> float:
        op = linears[k]
        rpos, cpos = positions(rows, op.n_out), positions(cols, op.n_in)
        R, L = next_pow2(int(rpos.max()) + 1), next_pow2(int(cpos.max()) + 1)
        used = used_diagonals(min(R, L), rpos[coords[k][0]], cpos[coords[k][1]])
        if not len(used):
            return 0.0
        return cost({"mul_plain": len(used), "rotations": Diagonal.fitted(L, R, used)._rotations(used)})

    # best[j]: least cost of Linears 1..k with the value Linear k computes placed by candidates[k][j]
    best = [0.0] * len(candidates[0])
    choice: list[list[int]] = []
    for k in range(1, len(linears)):
        outs = candidates[k] if k < len(candidates) else [None]
        step = [[best[i] + stage_cost(k, cols, rows) for i, cols in enumerate(candidates[k - 1])] for rows in outs]
        choice.append([int(np.argmin(s)) for s in step])
        best = [min(s) for s in step]
    picks = [0]
    for back in reversed(choice):
        picks.append(back[picks[-1]])
    picks = picks[::-1][:-1]
    natural = sum(stage_cost(k, None, None) for k in range(1, len(linears)))
    placed = [candidates[k][j] for k, j in enumerate(picks)]
    out = list(ops)
    for k, p in enumerate(placed):
        if p is None:
            continue
        width = int(p.max()) + 1
        a, b = linears[k], linears[k + 1]
        W = np.zeros((width, a.n_in))
        W[p] = a.weight
        bias = np.zeros(width)
        bias[p] = a.bias
        out[2 * k] = linears[k] = Linear(W, bias)
        W = np.zeros((b.n_out, width))
        W[:, p] = b.weight
        out[2 * k + 2] = linears[k + 1] = Linear(W, b.bias)
    return out, float(min(best)), natural
