"""The encrypted affine map y = W x + b, split into what the server and the client each hold.

No rescaling happens: the product of the input scale and the weight scale must fit in the data
modulus with room for the largest output seen at calibration (times `headroom`). `compile`
chooses the two scales so that inputs and weights keep the same relative precision.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import seal

from veil.errors import PrecisionError, ShapeError, WireFormatError
from veil.he import HEContext, PublicBundle, SecretKeys, wire
from veil.he.linear import WeightedSum
from veil.he.params import CKKSParameters, preset
from veil.program.common import ClientBase, ServerBase, checked_layout
from veil.program.ir import MAX_DIM, Linear
from veil.program.kinds import CircuitKind, register
from veil.program.packing import (
    LAYOUTS,
    BatchLayout,
    GatherLayout,
    RowLayout,
    check_gather_index,
    gather_index,
    make_layout,
)
from veil.program.planner import first_beyond, input_box

DEFAULT_HEADROOM = 16.0
FRESH_NOISE_STD = 3.2
"""SEAL's error standard deviation per coefficient; fresh slot noise is this times sqrt(N/2)."""
MIN_PRODUCT_BITS = 24
BLOCK_DENSITY = 0.25
"""Least non-zero fraction of a block of the batch layout's weights (`weight_blocks`): dense
blocks go through BLAS at a small multiple of their non-zero weights' cost."""
DEFAULT_PRESETS = {"batch": "depth0", "row": "depth0-rotations"}
PER_SLOT = {"batch": 2}
"""The batch layout of an affine map puts two samples in each slot (real and imaginary parts)."""
# Rough single-core costs (ms) measured for the presets above; only used to pick a layout.
_COST_MS = {"batch": {"encrypt": 0.95, "mul": 0.06, "decrypt": 0.3},
            "row": {"encrypt": 0.5, "mul": 0.03, "rot": 0.35, "decrypt": 0.15}}


@dataclass(frozen=True)
class InputLimit:
    """What a client checks before encrypting, so no output can wrap around the modulus:
    sum_f magnitudes[f] * |x_f| <= limit, and every |x_f| <= value_limit. `magnitudes` are the
    largest |W| per feature rounded up to a power of two (a coarse bound, not the model)."""

    magnitudes: tuple[float, ...]
    limit: float
    value_limit: float

    def to_dict(self) -> dict:
        return {"magnitudes": list(self.magnitudes), "limit": self.limit, "value_limit": self.value_limit}

    @classmethod
    def from_dict(cls, d: object) -> InputLimit:
        """Parse untrusted JSON: finite non-negative numbers only (a NaN limit refuses nothing)."""
        if not isinstance(d, dict) or not isinstance(d.get("magnitudes"), list):
            raise WireFormatError("an input limit is an object with magnitudes, limit and value_limit")
        values = [*d["magnitudes"], d.get("limit"), d.get("value_limit")]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 2 ** 1023 and math.isfinite(v)
                   for v in values):
            raise WireFormatError("input limit magnitudes, limit and value_limit must be finite non-negative numbers")
        return cls(tuple(float(w) for w in d["magnitudes"]), float(d["limit"]), float(d["value_limit"]))

    def check_fits(self, params: CKKSParameters, input_bits: int, per_slot: int, n_features: int) -> None:
        """Refuse a limit that admits inputs whose encryption would not fit the data modulus."""
        if len(self.magnitudes) != n_features:
            raise ShapeError(f"input limit has {len(self.magnitudes)} magnitudes for {n_features} features")
        room = 2.0 ** (params.data_modulus_bits - 2) * (1 + 1e-9)
        if self.value_limit * math.sqrt(per_slot) * 2.0**input_bits > room:
            raise WireFormatError("the input limit admits values that do not fit the modulus at the input scale")

    def check(self, X: np.ndarray) -> None:
        """Raise PrecisionError naming the first sample the model was not compiled for."""
        absx = np.abs(X)
        load = absx @ np.asarray(self.magnitudes)
        bad = np.nonzero((load > self.limit) | (absx.max(axis=1) > self.value_limit))[0]
        if bad.size:
            i = int(bad[0])
            raise PrecisionError(
                f"sample {i} is outside the range the model was compiled for (weighted magnitude "
                f"{load[i]:.4g} > {self.limit:.4g} or a value above {self.value_limit:.4g}); "
                "recompile with calibration data or input_bounds covering it"
            )


def _parse_scales(scales: object) -> dict[str, dict]:
    if not isinstance(scales, dict) or not all(isinstance(v, dict) for v in scales.values()):
        raise WireFormatError("scales must be an object of layout objects")
    _check_scales(scales)
    for name, v in scales.items():
        if v.get("per_slot", 1) != 1 and name != "batch":
            raise WireFormatError(f"only the batch layout holds two samples per slot, not {name!r}")
    return scales


@dataclass(frozen=True)
class LayoutScales:
    """Parameters, fixed-point scales (powers of two) and the input limit of one layout."""

    params: CKKSParameters
    input_bits: int
    weight_bits: int
    input_limit: InputLimit
    per_slot: int = 1

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "input_bits": self.input_bits,
                "weight_bits": self.weight_bits, "input_limit": self.input_limit.to_dict(),
                "per_slot": self.per_slot}

    @classmethod
    def from_dict(cls, d: object) -> LayoutScales:
        if not isinstance(d, dict):
            raise WireFormatError("layout scales must be an object")
        params = CKKSParameters.from_dict(d.get("params"))
        input_bits = wire.strict_int(d.get("input_bits"), "input_bits", 0, 120)
        weight_bits = wire.strict_int(d.get("weight_bits"), "weight_bits", 0, 120)
        if input_bits + weight_bits > params.data_modulus_bits - 3:
            raise WireFormatError(f"a product scale of 2^{input_bits + weight_bits} leaves no room for outputs "
                                  f"in a {params.data_modulus_bits}-bit modulus")
        return cls(params, input_bits, weight_bits, InputLimit.from_dict(d.get("input_limit")),
                   wire.strict_int(d.get("per_slot", 1), "per_slot", 1, 2))

    def check_weights(self, W: np.ndarray, bias: np.ndarray) -> None:
        """The server's check of a loaded limit against the weights it holds: any input the limit
        admits gives outputs that fit the modulus at the product scale (no wrap-around)."""
        lim = self.input_limit
        lim.check_fits(self.params, self.input_bits, self.per_slot, W.shape[1])
        peak = lim.limit + float(np.max(np.abs(bias)))
        if (np.any(np.asarray(lim.magnitudes) < np.max(np.abs(W), axis=0))
                or peak > output_bound(self.params, self.input_bits, self.weight_bits, self.per_slot) * (1 + 1e-9)):
            raise WireFormatError("the input limit admits inputs whose outputs would wrap around the modulus")


def output_bound(params: CKKSParameters, input_bits: int, weight_bits: int, per_slot: int) -> float:
    """The largest |output| a layout's scales hold: 2^(data bits - 2 - input_bits - weight_bits),
    over sqrt(2) with two samples per slot (a slot's magnitude is up to sqrt(2) times the larger of
    its two outputs). The server refuses an input limit that admits larger outputs
    (`LayoutScales.check_weights`), so every output of an accepted input is within it, and the
    client refuses a decrypted output beyond it (`LinearClient.check_outputs`)."""
    return 2.0 ** (params.data_modulus_bits - 2 - input_bits - weight_bits) / math.sqrt(per_slot)


def input_weights(W: np.ndarray) -> np.ndarray:
    """Largest |W| per feature, rounded up to a power of two (0 for unused features)."""
    peak = np.max(np.abs(W), axis=0)
    out = np.zeros_like(peak)
    used = peak > 0
    out[used] = 2.0 ** np.ceil(np.log2(peak[used]))
    return out


def choose_scales(params: CKKSParameters, input_bounds: np.ndarray, W: np.ndarray, bias: np.ndarray,
                  observed: float, per_slot: int = 1) -> LayoutScales:
    """Split the data modulus between input and weight scales so that any output of an input
    within `input_bounds` (or of weighted magnitude up to the resulting limit) fits, balancing the
    two error sources; refuse if too few bits would be left for precision. With two samples per
    slot a slot's magnitude is up to sqrt(2) times the larger of its two outputs."""
    data_bits = params.data_modulus_bits
    a, bias_max = input_weights(W), float(np.max(np.abs(bias)))
    margin = math.sqrt(per_slot)
    output_bound = max(observed, float(a @ input_bounds) + bias_max, 1e-12)
    out_bits = max(1, math.ceil(math.log2(output_bound * margin)))
    product = data_bits - 2 - out_bits
    if product < MIN_PRODUCT_BITS:
        raise PrecisionError(
            f"outputs up to {output_bound:.3g} leave {product} bits of precision in a "
            f"{data_bits}-bit modulus; scale the inputs or use a larger preset"
        )
    # Output error ~ sum_f B_f 2^-w (weight rounding) + sum_f |w_f| sigma 2^-in (fresh noise):
    # equal when in - w = log2(noise term / rounding term).
    sigma = FRESH_NOISE_STD * math.sqrt(params.poly_modulus_degree / 2)
    noise = max(float(np.max(np.sum(np.abs(W), axis=1))) * sigma, 1e-12)
    rounding = max(float(np.sum(input_bounds)), 1e-12)
    in_bits = round((product + math.log2(noise / rounding)) / 2)
    in_cap = data_bits - 2 - max(0, math.ceil(math.log2(max(float(np.max(input_bounds)), 1e-12))))
    in_bits = int(min(max(in_bits, 8), product - 8, in_cap))
    limit = InputLimit(tuple(float(v) for v in a), 2.0**out_bits / margin - bias_max,
                       2.0 ** (data_bits - 2 - in_bits) / margin)
    return LayoutScales(params, in_bits, product - in_bits, limit, per_slot)


def quantize_weights(W: np.ndarray, bits: int) -> np.ndarray:
    """Weights as multiples of 2^-bits. An all-zero row keeps one unit so SEAL never produces a
    transparent (key-independent) ciphertext; its effect (|x| * 2^-bits) is below CKKS noise."""
    Wq = np.round(W * 2.0**bits)
    for row, orig in zip(Wq, W, strict=True):
        if not row.any():
            row[int(np.argmax(np.abs(orig)))] = 1.0
    return Wq / 2.0**bits


def weight_blocks(mask: np.ndarray, density: float = BLOCK_DENSITY) -> list[tuple[np.ndarray, np.ndarray]]:
    """A partition of the rows of a weight matrix's non-zero pattern `mask` (outputs x inputs) into
    blocks (rows, the inputs any of them reads), each with at least `density` of its sub-matrix
    non-zero (a single row always qualifies). Rows are taken in the order of their first input,
    which puts a convolution's channels at one position, then neighbouring positions, together;
    a block grows while it stays dense enough. A dense matrix is one block."""
    counts = mask.sum(axis=1)
    order = np.argsort(mask.argmax(axis=1), kind="stable")
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    rows: list[int] = []
    cols = np.zeros(mask.shape[1], dtype=bool)
    nnz = 0
    for r in order.tolist():
        grown = cols | mask[r]
        if rows and nnz + counts[r] < density * (len(rows) + 1) * np.count_nonzero(grown):
            blocks.append((np.asarray(rows), np.flatnonzero(cols)))
            rows, grown, nnz = [], mask[r].copy(), 0
        rows.append(r)
        cols, nnz = grown, nnz + int(counts[r])
    blocks.append((np.asarray(rows), np.flatnonzero(cols)))
    return blocks


def estimated_ms(packing: BatchLayout | RowLayout | GatherLayout, n_samples: int, terms: int | None = None) -> float:
    """Estimated single-core milliseconds to encrypt, evaluate and decrypt `n_samples` rows in a
    layout, from per-operation costs measured for its default preset; `terms` is the number of
    products of the batch layout (the map's non-zero weights; all of them when not given)."""
    if isinstance(packing, BatchLayout):
        c = _COST_MS["batch"]
        F, C = packing.n_features, packing.n_outputs
        products = F * C if terms is None else terms
        return packing.n_batches(n_samples) * (F * c["encrypt"] + products * c["mul"] + C * c["decrypt"])
    c = _COST_MS["row"]
    if isinstance(packing, GatherLayout):
        per_group = packing.parts * (packing.terms * (c["encrypt"] + c["mul"]) + c["decrypt"])
        return packing.n_groups(n_samples) * per_group
    per_group = c["mul"] + len(packing.rotation_steps) * c["rot"] + c["decrypt"]
    return packing.n_input_cts(n_samples) * (c["encrypt"] + packing.n_groups * per_group)


def choose_layout(n_samples: int, n_features: int, n_outputs: int, slots: dict[str, int],
                  per_slot: int = 1, index: np.ndarray | None = None) -> str:
    """Pick the layout with the lower estimated end-to-end time for this many samples (ties: batch)."""
    terms = None if index is None else int(np.count_nonzero(index >= 0))
    costs = {"batch": estimated_ms(BatchLayout(slots["batch"], n_features, n_outputs, per_slot=per_slot),
                                   n_samples, terms)}
    for name in ("row", "gather"):
        if name in slots:
            try:
                costs[name] = estimated_ms(make_layout(name, slots[name], n_features, n_outputs, index=index),
                                           n_samples)
            except ShapeError:
                continue
    return min(costs, key=lambda k: (costs[k], k != "batch"))


def _checked_gather(table: np.ndarray | None, scales: dict, n_outputs: int, n_features: int) -> np.ndarray | None:
    """The gather table, present exactly when the gather layout is, one row per output."""
    if ("gather" in scales) != (table is not None):
        raise WireFormatError("a gather table goes with the gather layout, and only with it")
    if table is None:
        return None
    return check_gather_index(np.asarray(table, dtype=np.int64).tolist(), n_outputs, n_features)


def _gather_digest(table: np.ndarray | None) -> dict:
    """What the two halves compare of a gather table: its digest (the table itself can be large)."""
    if table is None:
        return {}
    return {"gather": hashlib.sha256(np.ascontiguousarray(table, dtype="<i8").tobytes()).hexdigest()}


def _check_scales(scales: object) -> dict[str, LayoutScales]:
    if not isinstance(scales, dict) or not scales:
        raise WireFormatError("a model needs scales for at least one layout")
    unknown = set(scales) - set(LAYOUTS)
    if unknown:
        raise WireFormatError(f"unknown layouts {sorted(map(str, unknown))}; known: {list(LAYOUTS)}")
    return scales


class AffineKind:
    """The `affine` kind's answers, alike on both halves: depth 0, Galois keys for the row
    layout's rotations only, never relinearization keys."""

    kind = "affine"
    depth = 0

    def evaluation_keys(self, layout: str) -> tuple[bool, tuple[int, ...]]:
        packing = self.layout(layout)
        return False, tuple(packing.rotation_steps) if isinstance(packing, RowLayout) else ()


class LinearCircuit(AffineKind, ServerBase):
    """Server side of the affine map: weights, bias and the scales per layout."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray, scales: dict[str, LayoutScales],
                 gather: np.ndarray | None = None) -> None:
        self.weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        self.bias = np.asarray(bias, dtype=np.float64).ravel()
        if self.bias.shape[0] != self.weights.shape[0]:
            raise ShapeError("bias length must equal the number of weight rows")
        if not (np.all(np.isfinite(self.weights)) and np.all(np.isfinite(self.bias))):
            raise ShapeError("weights and bias must be finite")
        self.scales = _check_scales(scales)
        for name, s in self.scales.items():
            if s.per_slot != 1 and name != "batch":
                raise WireFormatError(f"only the batch layout holds two samples per slot, not {name!r}")
            s.check_weights(self.weights, self.bias)
        self.gather = _checked_gather(gather, scales, self.n_outputs, self.n_features)
        if self.gather is not None:
            covered = np.zeros(self.weights.shape, dtype=bool)
            rows = np.nonzero(self.gather >= 0)
            covered[rows[0], self.gather[rows]] = True
            if np.any(self.weights[~covered] != 0.0):
                raise WireFormatError("the gather table misses non-zero weights: the layout would drop them")
        self._contexts: dict[str, HEContext] = {}
        self._gather_weights: list[tuple[list[seal.Plaintext], seal.Plaintext]] | None = None
        self._row_weights: list[tuple[seal.Plaintext, seal.Plaintext]] | None = None
        self._batch_kernels: list[tuple[np.ndarray, np.ndarray, WeightedSum]] | None = None
        self._batch_biases: list[seal.Plaintext] | None = None
        self._quantized: dict[int, np.ndarray] = {}

    @property
    def n_features(self) -> int:
        return self.weights.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.weights.shape[0]

    @classmethod
    def calibrate(cls, weights: np.ndarray, bias: np.ndarray, X: np.ndarray,
                  headroom: float = DEFAULT_HEADROOM, presets: dict[str, str | None] | None = None,
                  input_bounds: float | np.ndarray | None = None,
                  support: np.ndarray | None = None) -> LinearCircuit:
        """Choose scales for each layout from calibration inputs X. Any input within
        `planner.input_box` (|x_f| <= INPUT_HEADROOM * max|X_f| per feature, or the explicit
        `input_bounds`) is accepted and guaranteed not to overflow; so is anything of no larger
        weighted magnitude.
        `presets` maps layouts to preset names over `DEFAULT_PRESETS`; None leaves a layout out.
        A `gather` preset builds the gather table from `support` (which weights may be non-zero,
        as the architecture fixes them; the non-zero weights are always added) so that the table
        shows the map's structure rather than which weights happen to be zero."""
        W = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        b = np.asarray(bias, dtype=np.float64).ravel()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != W.shape[1] or len(X) == 0:
            raise ShapeError(f"calibration data must be (n>0, {W.shape[1]}), got {X.shape}")
        bounds = input_box(X, input_bounds)
        observed = float(np.max(np.abs(X @ W.T + b))) * headroom
        chosen = {k: v for k, v in dict(DEFAULT_PRESETS, **(presets or {})).items() if v is not None}
        scales = {name: choose_scales(preset(p), bounds, W, b, observed, PER_SLOT.get(name, 1))
                  for name, p in chosen.items()}
        table = None
        if "gather" in scales:
            table = gather_index((W != 0) | (False if support is None else np.asarray(support, dtype=bool)))
        return cls(W, b, scales, table)

    def prepare(self) -> LinearCircuit:
        """Build SEAL contexts and encode the weights of every layout now rather than on first request."""
        for name in self.scales:
            self.context(name)
        if "row" in self.scales:
            self.row_weights()
        if "batch" in self.scales:
            self.batch_kernels()
            self.batch_biases()
        if "gather" in self.scales:
            self.gather_weights()
        return self

    def quantized(self, bits: int) -> np.ndarray:
        """Weights rounded to multiples of 2^-bits, cached per scale."""
        if bits not in self._quantized:
            self._quantized[bits] = quantize_weights(self.weights, bits)
        return self._quantized[bits]

    def row_weights(self) -> list[tuple[seal.Plaintext, seal.Plaintext]]:
        """Encoded (weights, bias) plaintexts per output group of the row layout, cached."""
        if self._row_weights is None:
            ctx, s = self.context("row"), self.scales["row"]
            layout = self.layout("row")
            Wq = self.quantized(s.weight_bits)
            scale_w = 2.0**s.weight_bits
            self._row_weights = [(ctx.encode(wv, scale_w), ctx.encode(bv, scale_w * 2.0**s.input_bits))
                                 for wv, bv in layout.weight_vectors(Wq, self.bias)]
        return self._row_weights

    def layout(self, name: object) -> BatchLayout | RowLayout | GatherLayout:
        """The packing of layout `name` (a value from an untrusted header: anything else is refused)."""
        s = self.scales[checked_layout(name, self.scales)]
        return make_layout(name, s.params.slot_count, self.n_features, self.n_outputs, s.per_slot, self.gather)

    def _gather_dict(self) -> dict:
        return {} if self.gather is None else {"gather": self.gather.tolist()}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "weights": self.weights.tolist(), "bias": self.bias.tolist(),
                "scales": {k: v.to_dict() for k, v in self.scales.items()}, **self._gather_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> LinearCircuit:
        """Rebuild from `to_dict` output; malformed structure raises WireFormatError, not a crash."""
        if not isinstance(d, dict):
            raise WireFormatError("an affine circuit must be an object")
        scales = _parse_scales(d.get("scales"))
        op = Linear(d.get("weights"), d.get("bias"))
        table = None if "gather" not in scales else check_gather_index(d.get("gather"), op.n_out, op.n_in)
        return cls(op.weight, op.bias, {k: LayoutScales.from_dict(v) for k, v in scales.items()}, table)

    def client_spec(self) -> dict:
        """What a client needs to encrypt and decrypt: no weights."""
        return {"kind": self.kind, "n_features": self.n_features, "n_outputs": self.n_outputs,
                "scales": {k: {"params": v.params.to_dict(), "input_bits": v.input_bits,
                               "weight_bits": v.weight_bits, "input_limit": v.input_limit.to_dict(),
                               "per_slot": v.per_slot}
                           for k, v in self.scales.items()}, **self._gather_dict()}

    def layout_params(self) -> dict[str, CKKSParameters]:
        return {name: s.params for name, s in self.scales.items()}

    def input_scale(self, layout: str) -> float:
        return 2.0 ** self.scales[layout].input_bits

    def agreement(self) -> dict[str, Any]:
        return {"input_bits": {k: v.input_bits for k, v in self.scales.items()},
                "input_limits": {k: v.input_limit.to_dict() for k, v in self.scales.items()},
                "per_slot": {k: v.per_slot for k, v in self.scales.items()}, **_gather_digest(self.gather)}

    def run(self, request: bytes | wire.Message, bundle: PublicBundle, extra: dict | None = None) -> bytes:
        """Evaluate the map on an encrypted request (bytes, or a message already decoded); the
        answer is ciphertexts only, its header naming layout, rows and outputs, plus `extra`
        fields (a staged program names its stage)."""
        msg = request if isinstance(request, wire.Message) else wire.decode(request, wire.Kind.CIPHERTEXTS)
        name, layout, ctx, cts, n = self.open_request(msg, bundle)
        if name == "batch":
            out = self._run_batch(ctx, layout, msg.blobs, n)
        elif name == "gather":
            out = self._run_gather(ctx, layout, cts, n)
        else:
            out = self._run_row(ctx, layout, cts, bundle)
        return ctx.pack(out, {**(extra or {}), "layout": name, "n_samples": n, "n_outputs": self.n_outputs})

    def gather_weights(self) -> list[tuple[list[seal.Plaintext], seal.Plaintext]]:
        """Per part of the gather layout: the encoded weight plaintext of each term and the bias
        (at the product scale), cached. Slots without a term multiply zeros by one unit of the
        weight scale, so no plaintext is all zero."""
        if self._gather_weights is None:
            ctx, s = self.context("gather"), self.scales["gather"]
            layout = self.layout("gather")
            scale_w = 2.0**s.weight_bits
            vectors = layout.weight_vectors(self.quantized(s.weight_bits), self.bias, 1.0 / scale_w)
            self._gather_weights = [([ctx.encode(w, scale_w) for w in ws], ctx.encode(bv, scale_w * 2.0**s.input_bits))
                                    for ws, bv in vectors]
        return self._gather_weights

    def _run_gather(self, ctx: HEContext, layout: GatherLayout, cts: list, n: int) -> list:
        ev = ctx.evaluator
        plains = self.gather_weights()
        out, K = [], layout.terms
        for g in range(layout.n_groups(n)):
            for p, (weights, bias) in enumerate(plains):
                first = (g * layout.parts + p) * K
                terms = [ev.multiply_plain(cts[first + k], w) for k, w in enumerate(weights)]
                acc = terms[0] if len(terms) == 1 else ev.add_many(terms)
                ev.add_plain_inplace(acc, bias)
                out.append(acc)
        return out

    def batch_kernels(self) -> list[tuple[np.ndarray, np.ndarray, WeightedSum]]:
        """The batch layout's weighted sums as `WeightedSum`s over the request's RNS coefficients
        (built once), one per block of `weight_blocks` (output rows, the input features they read,
        the kernel of that sub-matrix): bit-identical to a multiply_plain by each non-zero weight,
        encoded as a scalar at the weight scale, and an add per term, with no plaintext per weight
        to encode or keep. A convolution unrolled to a matrix is mostly zeros; its blocks are
        dense, so each goes through BLAS and the product costs a small multiple of its non-zero
        weights."""
        if self._batch_kernels is None:
            ctx, s = self.context("batch"), self.scales["batch"]
            Wq = self.quantized(s.weight_bits)
            self._batch_kernels = [(rows, cols, WeightedSum(ctx, Wq[np.ix_(rows, cols)], None, 2.0**s.weight_bits,
                                                            ctx.top_level))
                                   for rows, cols in weight_blocks(Wq != 0)]
        return self._batch_kernels

    def batch_biases(self) -> list[seal.Plaintext]:
        """Each output's encoded bias in the batch layout, at the product scale
        2^(input_bits+weight_bits), the only scale `run` lets a request's ciphertexts reach it
        with (two equal samples per slot when `per_slot` is 2). Cached, one plaintext per distinct
        value: a convolution's outputs share their channel's bias."""
        if self._batch_biases is None:
            ctx, s = self.context("batch"), self.scales["batch"]
            scale = 2.0 ** (s.input_bits + s.weight_bits)
            plains: dict[float, seal.Plaintext] = {}
            for b in self.bias.tolist():
                if b not in plains:
                    plains[b] = ctx.encode(complex(b, b) if s.per_slot == 2 else float(b), scale)
            self._batch_biases = [plains[b] for b in self.bias.tolist()]
        return self._batch_biases

    def _run_batch(self, ctx: HEContext, layout: BatchLayout, blobs: list[bytes], n: int) -> list:
        """Per batch of samples, the weighted sums of its feature ciphertexts (`batch_kernels`, on
        the request's validated serializations), then each output's bias."""
        kernels, biases, F, C = self.batch_kernels(), self.batch_biases(), self.n_features, self.n_outputs
        ev = ctx.evaluator
        out: list = [None] * (layout.n_batches(n) * C)
        for b in range(layout.n_batches(n)):
            part = blobs[b * F:(b + 1) * F]
            for rows, cols, kernel in kernels:
                for c, acc in zip(rows.tolist(), kernel.apply([part[f] for f in cols.tolist()]), strict=True):
                    ev.add_plain_inplace(acc, biases[c])
                    out[b * C + c] = acc
        return out

    def _run_row(self, ctx: HEContext, layout: RowLayout, cts: list, bundle: PublicBundle) -> list:
        missing = set(layout.rotation_steps) - set(bundle.rotation_steps)
        if missing:
            raise ShapeError(f"key bundle lacks Galois keys for rotation steps {sorted(missing)}")
        ev = ctx.evaluator
        out = []
        for ct in cts:
            for wplain, bplain in self.row_weights():
                acc = ev.multiply_plain(ct, wplain)
                for step in layout.rotation_steps:
                    ev.add_inplace(acc, ev.rotate_vector(acc, step, bundle.galois_keys))
                ev.add_plain_inplace(acc, bplain)
                out.append(acc)
        return out

    def simulate(self, X: np.ndarray, layout: str = "batch",
                 rng: np.random.Generator | None = None) -> np.ndarray:
        """Plaintext emulation of `run`: same input check, quantization and fresh-noise magnitude
        as the encrypted path, without encrypting."""
        s = self.scales[layout]
        s.input_limit.check(np.asarray(X))
        rng = rng if rng is not None else np.random.default_rng()
        Xq = np.round(np.asarray(X, dtype=np.float64) * 2.0**s.input_bits) / 2.0**s.input_bits
        Wq = self.quantized(s.weight_bits)
        Y = Xq @ Wq.T + self.bias
        noise_std = FRESH_NOISE_STD * math.sqrt(s.params.poly_modulus_degree / 2) / 2.0**s.input_bits
        return Y + rng.normal(size=Y.shape) * noise_std * np.linalg.norm(Wq, axis=1)


class LinearClient(AffineKind, ClientBase):
    """Client side of a `LinearCircuit`: keys, encryption of inputs in a layout, decryption of outputs."""

    def __init__(self, spec: dict) -> None:
        if not isinstance(spec, dict):
            raise WireFormatError("a client specification must be an object")
        self.n_features = wire.strict_int(spec.get("n_features"), "n_features", 1, MAX_DIM)
        self.n_outputs = wire.strict_int(spec.get("n_outputs"), "n_outputs", 1, MAX_DIM)
        scales = _parse_scales(spec.get("scales"))
        self.params = {k: CKKSParameters.from_dict(v.get("params")) for k, v in scales.items()}
        self.input_bits = {k: wire.strict_int(v.get("input_bits"), "input_bits", 0,
                                              self.params[k].data_modulus_bits - 3) for k, v in scales.items()}
        self.input_limits = {k: InputLimit.from_dict(v.get("input_limit")) for k, v in scales.items()}
        self.per_slot = {k: wire.strict_int(v.get("per_slot", 1), "per_slot", 1, 2) for k, v in scales.items()}
        for k, lim in self.input_limits.items():
            lim.check_fits(self.params[k], self.input_bits[k], self.per_slot[k], self.n_features)
        self.output_bounds: dict[str, float | None] = {}
        for k, v in scales.items():  # a specification written before weight_bits was published has no bound
            if "weight_bits" not in v:
                self.output_bounds[k] = None
                continue
            room = self.params[k].data_modulus_bits - 3 - self.input_bits[k]
            weight_bits = wire.strict_int(v.get("weight_bits"), "weight_bits", 0, max(0, room))
            self.output_bounds[k] = output_bound(self.params[k], self.input_bits[k], weight_bits, self.per_slot[k])
        self.gather = None if "gather" not in scales else check_gather_index(spec.get("gather"), self.n_outputs,
                                                                             self.n_features)
        self._keys: dict[str, SecretKeys] = {}

    def layout(self, name: object) -> BatchLayout | RowLayout | GatherLayout:
        """The packing of layout `name` (from a header the server wrote: checked all the same)."""
        name = checked_layout(name, self.params)
        return make_layout(name, self.params[name].slot_count, self.n_features, self.n_outputs,
                           self.per_slot[name], self.gather)

    def estimated_ms(self, layout: str, n_samples: int) -> float:
        """Estimated single-core milliseconds of `n_samples` rows in `layout` (see `estimated_ms`)."""
        terms = None if self.gather is None else int(np.count_nonzero(self.gather >= 0))
        return estimated_ms(self.layout(layout), n_samples, terms if layout == "batch" else None)

    def choose_layout(self, n_samples: int) -> str:
        return choose_layout(n_samples, self.n_features, self.n_outputs,
                             {k: p.slot_count for k, p in self.params.items()}, self.per_slot.get("batch", 1),
                             self.gather)

    def keys(self, layout: str) -> SecretKeys:
        """Secret keys for a layout, generated on first use (rotation keys only for the row layout)."""
        if layout not in self._keys:
            lay = self.layout(layout)
            steps = lay.rotation_steps if isinstance(lay, RowLayout) else ()
            self._keys[layout] = SecretKeys.generate(self.params[layout], rotation_steps=steps)
        return self._keys[layout]

    def set_keys(self, layout: str, keys: SecretKeys) -> None:
        if keys.params != self.params[layout]:
            raise ShapeError("these keys were made for other parameters")
        self._keys[layout] = keys

    def agreement(self) -> dict[str, Any]:
        return {"input_bits": dict(self.input_bits),
                "input_limits": {k: v.to_dict() for k, v in self.input_limits.items()},
                "per_slot": dict(self.per_slot), **_gather_digest(self.gather)}

    def encrypt(self, X: np.ndarray, layout: str, extra: dict | None = None) -> bytes:
        """A request for rows X in `layout`; `extra` header fields travel with it (a staged
        program names its stage)."""
        X = self.check_input(X)
        keys, lay = self.keys(layout), self.layout(layout)
        self.input_limits[layout].check(X)
        scale = 2.0 ** self.input_bits[layout]
        cts = [keys.encrypt(v, scale) for v in lay.pack(X)]
        return keys.context.pack(cts, {**(extra or {}), "layout": layout, "n_samples": len(X),
                                       "n_features": self.n_features})

    def check_outputs(self, layout: str, Y: np.ndarray) -> np.ndarray:
        """Refuse (PrecisionError) a decrypted output beyond `output_bound` of the layout's scales
        (`planner.first_beyond`, with its tolerance for CKKS noise), and return the outputs. No accepted input gets
        there, so what this catches is an answer that is not this model's under these keys: one
        computed for another key bundle or another model, or tampered with, decrypts to values
        spread over the whole modulus, about half of them beyond the bound."""
        bound = self.output_bounds.get(layout)
        if bound is not None and (at := first_beyond(Y, bound)) is not None:
            i, j = at
            raise PrecisionError(
                f"decrypted output {Y[i, j]:.4g} (sample {i}, output {j}) is beyond what this model can produce "
                f"(|y| <= {bound:.4g}): the answer was not computed by this model under these keys")
        return Y

    def _decryptor(self, layout: str, keys: SecretKeys) -> Any:
        """Two samples per slot decode from both parts of each complex slot."""
        return keys.decrypt_complex if self.per_slot[layout] == 2 else keys.decrypt


register(CircuitKind("affine", LinearCircuit.from_dict, LinearClient,
                     "a linear model (no ciphertext multiplication)"))
