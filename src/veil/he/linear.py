"""Weighted sums of CKKS ciphertexts as matrix products over their RNS coefficients.

A layer of plaintext-weighted sums, y_j = sum_i w_ji x_i + b_j on ciphertexts x_i, is what SEAL
computes with one `multiply_plain` by a scalar-encoded plaintext and one `add_inplace` per
non-zero weight, plus one `add_plain` for the bias. A scalar plaintext in NTT form holds the same
integer round(w * scale) mod q in every coefficient, and CKKS ciphertexts are kept in NTT form,
so that chain computes, for every prime q of the level, every component and every coefficient k,

    y_j[k] = (sum_i W_ji * x_i[k] + [component 0] B_j) mod q,    W_ji = round(w_ji * scale)

which is one integer matrix product per prime and component. `WeightedSum` computes it in
float64, exactly:

1. The integer weights are split into signed limbs of k bits and the coefficients into unsigned
   limbs of k bits, with k chosen per prime so that every partial sum of a limb product is below
   2^52 (the largest row sum of |weight limb| times 2^k): float64 products and sums are then exact
   whatever order they are added in. Dense weights go through BLAS; sparse ones (a convolution,
   where each output reads a few inputs) through a CSR product, so their cost is their non-zero
   weights.
2. The limb products of one coefficient limb are combined exactly in int64 (a row's sum of
   |weight| times 2^k stays below 2^61), consecutive coefficient limbs too while they fit 61 bits,
   and each such chunk is reduced modulo q once (a quotient estimated in float64); chunks are
   joined by Horner's rule, x * 2^k mod q by shifts or, for large primes, one long-double quotient.

The results are canonical residues, as SEAL's, so the output ciphertexts are bit-identical to the
SEAL chain (tests compare the bytes). Ciphertexts come from SEAL and go back to SEAL: they are read
from SEAL's own uncompressed serialization and written in the same layout, and SEAL validates them
when loading (parameters, level, scale and every coefficient against its prime). Memory: the inputs
stay in their serialized bytes and are copied one (component, prime) slab at a time; outputs are
produced in blocks of rows (`OUTPUT_BLOCK_BYTES`) handed to SEAL block by block; the float64
working set per step stays near `WORKING_BYTES` per thread.

Threads: the (prime, component) products of a block of rows are independent and write disjoint
parts of the outputs, so they run on a pool of `threads()` threads, each with its own input slab
(n_in x N words, at most `SLAB_BYTES` in all) and every BLAS call single-threaded (threadpoolctl):
numpy's ufuncs, BLAS and scipy's sparse products release the GIL, so a batch uses every core of
the process. Each thread computes exactly what the single-threaded loop computes, so the bytes are
the same.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sparse
import seal
from threadpoolctl import ThreadpoolController

from veil.errors import ScaleMismatchError, ShapeError, WireFormatError
from veil.he.context import HEContext

EXACT_BITS = 52
"""Every float64 partial sum stays below 2^EXACT_BITS, so products, sums and the reduction modulo q
(which adds at most q to a value) are exact."""
OUTPUT_BLOCK_BYTES = 768 << 20
"""Output rows are computed in blocks of at most this many bytes of 2-component ciphertexts (1.5
times that for 3 components); each block reads the inputs again, so blocks are large."""
WORKING_BYTES = 1 << 20
"""Float64 working set of one column step of one thread (its coefficient limbs): near a core's L2
cache, where the sparse product of a convolution streams its inputs (measured here: 12% less CPU
time than 16 MiB on CryptoNets' convolution, the same on its dense layer)."""
MAX_WEIGHT_LIMBS = 4
MAX_THREADS: int | None = None
"""Threads of one evaluation (None: the cores this process may run on, `threads`)."""
SLAB_BYTES = 512 << 20
"""Input slabs (n_in x N words each, one per thread) of one evaluation: fewer threads when more
would hold more than this, so memory stays bounded on many cores (845 inputs at N=8192: 9 threads)."""
SPARSE_DENSITY = 0.125
"""Weights with fewer non-zeros than this fraction go through a CSR product (about 8 times BLAS's
cost per multiply-add here, but only over the non-zeros)."""

# SEAL's serialization of a Ciphertext (compression none): SEALHeader (16 bytes: magic, header size,
# version, compression mode, reserved, total size u64), parms_id (4 x u64), is_ntt_form (u8), size,
# poly_modulus_degree, coeff_modulus_size (u64 each), scale (f64), correction factor (u64), then the
# data as a DynArray: its own SEALHeader, element count (u64) and the coefficients (u64 each) in the
# order (component, prime, coefficient).
_SEAL_MAGIC = 0xA15E
_TOTAL = struct.Struct("<Q")
_META = struct.Struct("<32sBQQQdQ")
_META_AT, _INNER_AT = 16, 16 + _META.size
_COUNT_AT = _INNER_AT + 16
DATA_OFFSET = _COUNT_AT + 8


def seal_round(values: np.ndarray) -> np.ndarray:
    """C's round() (halves away from zero), which SEAL's encoder applies to value * scale; numpy's
    own rounding sends halves to even."""
    values = np.asarray(values, dtype=np.float64)
    whole = np.trunc(values)
    return whole + np.where(np.abs(values - whole) >= 0.5, np.sign(values), 0.0)


def encoded_integer(value: float, scale: float) -> int:
    """The integer SEAL's CKKSEncoder puts in every coefficient when it encodes the scalar `value`
    at `scale` (before reduction modulo each prime): round(value * scale) as a double, exactly."""
    return int(seal_round(np.float64(value) * np.float64(scale)))


def _parse_prefix(blob: bytes) -> tuple:
    if len(blob) < DATA_OFFSET or int.from_bytes(blob[:2], "little") != _SEAL_MAGIC or blob[5] != 0:
        raise WireFormatError("not an uncompressed SEAL ciphertext serialization")
    meta = _META.unpack_from(blob, _META_AT)
    _, ntt, size, n, primes, _, _ = meta
    (count,) = _TOTAL.unpack_from(blob, _COUNT_AT)
    if ntt != 1 or count != size * n * primes or _TOTAL.unpack_from(blob, 8)[0] != len(blob):
        raise WireFormatError("unexpected SEAL ciphertext layout (expected NTT form, uncompressed)")
    return meta


def write_ciphertext(context: HEContext, prefix: bytes, data: np.ndarray, scale: float) -> seal.Ciphertext:
    """A SEAL ciphertext of coefficients `data` (component, prime, k) at the level of `prefix`
    (the first DATA_OFFSET bytes of a serialization at that level) and `scale`, loaded and validated
    by SEAL."""
    size, primes, n = data.shape
    head = bytearray(prefix)
    parms, ntt, _, _, _, _, correction = _META.unpack_from(head, _META_AT)
    count = size * primes * n
    _TOTAL.pack_into(head, 8, DATA_OFFSET + 8 * count)
    _META.pack_into(head, _META_AT, parms, ntt, size, n, primes, scale, correction)
    _TOTAL.pack_into(head, _INNER_AT + 8, 16 + 8 + 8 * count)
    _TOTAL.pack_into(head, _COUNT_AT, count)
    try:
        return context.seal.from_cipher_str(b"".join((head, np.ascontiguousarray(data, dtype="<u8").data)))
    except (RuntimeError, ValueError) as exc:
        raise WireFormatError(f"SEAL refused a computed ciphertext: {exc}") from None


def _limbs(A: np.ndarray, k: int, as_sparse: bool) -> list[np.ndarray | sparse.csr_matrix]:
    """Signed k-bit limbs of the integer matrix A (int64), A = sum_a limbs[a] * 2^(a k), as float64
    arrays or CSR matrices."""
    sign, mag = np.sign(A), np.abs(A)
    out: list[np.ndarray | sparse.csr_matrix] = []
    while True:
        limb = (sign * (mag & ((1 << k) - 1))).astype(np.float64)
        out.append(sparse.csr_matrix(limb) if as_sparse else limb)
        mag = mag >> k
        if not mag.any():
            return out


@dataclass(frozen=True)
class LimbPlan:
    """How one prime's product is split: weights in `n_w` signed limbs of `k_w` bits, coefficients
    in `n_x` limbs of `k_x` bits (every partial sum of a limb product below 2^52), and whether the
    limbs recombine in float64 (`exact_float`: one weight limb and q * 2^k_x <= 2^51)."""

    k_w: int
    n_w: int
    k_x: int
    n_x: int
    exact_float: bool


def _limb_plan(W: np.ndarray, q: int, l1: float) -> LimbPlan:
    """The plan with the fewest limb products for prime q, then the fewest weight limbs. Weight
    limbs of k_w bits have row sums of |limb| at most `worst`; coefficient limbs then get
    k_x = 51 - log2(worst) bits (and l1 * 2^k_x < 2^61 keeps a row's sum over weight limbs exact in
    int64)."""
    rows, _ = np.nonzero(W)
    mag = np.abs(W[W != 0])
    top = max(1, int(mag.max()).bit_length())
    bits = q.bit_length()
    best: tuple | None = None
    for n_w in range(1, min(top, MAX_WEIGHT_LIMBS) + 1):
        k_w = math.ceil(top / n_w)
        worst = max(float(np.bincount(rows, weights=((mag >> (a * k_w)) & ((1 << k_w) - 1)).astype(np.float64)).max())
                    for a in range(n_w))
        k_x = min(bits, EXACT_BITS - 1 - math.ceil(math.log2(max(worst, 1.0))), 60 - math.ceil(math.log2(l1)))
        if k_x < 1:
            continue
        n_x = math.ceil(bits / k_x)
        cost = (n_w * n_x, n_w)
        if best is None or cost < best[0]:
            best = (cost, LimbPlan(k_w, n_w, k_x, n_x, n_w == 1 and bits + k_x <= EXACT_BITS - 1))
        if n_w * n_x <= 1:
            break
    if best is None:
        raise ShapeError("weights too large for an exact product (a row sum of |weight * scale| reaches 2^51)")
    return best[1]


def _balance(v: np.ndarray, q: int) -> np.ndarray:
    """v minus the multiple of q nearest to it, in place, for float64 integers |v| <= 2^53 - q and
    q >= 2^20: the quotient v * (1/q) is within 2^-19 of v / q, so the multiple is within q / 2 +
    2^-19 q of v (below 2^53: exact) and the result below q in magnitude (about q / 2)."""
    t = v * (1.0 / q)
    np.rint(t, out=t)
    t *= q
    v -= t
    return v


def _fmod(v: np.ndarray, q: int) -> np.ndarray:
    """v mod q in [0, q), in place, for float64 integers |v| <= 2^53 - q (`_balance`, then q added to
    the negative residues: a product by the comparison, about 8 times faster than a masked add)."""
    _balance(v, q)
    v += (v < 0.0) * float(q)
    return v


def _mod(x: np.ndarray, q: int) -> np.ndarray:
    """x mod q in [0, q) for int64 |x| < 2^62 (the quotient estimated in float64 is off by at most
    one: float(x) is within 2^9 of x and q >= 2^20)."""
    r = x - np.floor(x * (1.0 / q)).astype(np.int64) * q
    r += (r >> 63) & q
    r -= q
    r += (r >> 63) & q
    return r


_LONG = np.finfo(np.longdouble).nmant >= 63
"""x86-64's 80-bit long double (64-bit mantissa) estimates a quotient of two 62-bit numbers' product
by q to within one, which makes a single-step modular product possible."""


def _shift_mod(x: np.ndarray, k: int, q: int) -> np.ndarray:
    """x * 2^k mod q for x in [0, q): shifts of at most 61 - bits(q) bits, each reduced, or one
    long-double product when that would take more than three shifts (long double with a 64-bit
    mantissa only; elsewhere the shifts)."""
    step = 61 - q.bit_length()
    if k > 3 * step and _LONG:
        c = pow(2, k, q)
        quot = np.floor(x.astype(np.longdouble) * (np.longdouble(c) / np.longdouble(q))).astype(np.uint64)
        r = (x.astype(np.uint64) * np.uint64(c) - quot * np.uint64(q)).view(np.int64)
        r += (r >> 63) & q
        r -= q
        r += (r >> 63) & q
        return r
    step = max(1, step)
    while k > 0:
        t = min(step, k)
        x = _mod(x << t, q)
        k -= t
    return x


@functools.cache
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded (found once). Every BLAS call of an evaluation is single-threaded:
    its threads are the kernel's own (`threads`). BLAS's threads spin while they wait, and on shared
    cores two of them on a 100 x 845 product cost about 2.8 times the CPU time of one (measured here
    on CryptoNets' dense layer)."""
    return ThreadpoolController()


def threads() -> int:
    """Threads a `WeightedSum` evaluation uses: `MAX_THREADS`, or the cores this process may run
    on. Its threads never spin (each BLAS call is single-threaded), so in a pool of worker
    processes that all compute at once the cores are time-shared, not oversubscribed by spinning."""
    if MAX_THREADS is not None:
        return max(1, MAX_THREADS)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class WeightedSum:
    """y_j = sum_i encode(W[j, i], weight_scale) * x_i + encode(bias[j], x.scale * weight_scale) over
    ciphertexts x_i at one level, bit-identical to SEAL's multiply_plain / add_inplace / add_plain
    chain (zero weights are skipped, as that chain would skip them). Built once per layer and
    level; `__call__` evaluates it on a list of SEAL ciphertexts and returns SEAL ciphertexts.

    A row whose weights all round to zero would be a transparent (key-independent) ciphertext,
    which SEAL itself refuses to produce: it is refused here too (ShapeError)."""

    def __init__(self, context: HEContext, weights: np.ndarray, bias: np.ndarray | None, weight_scale: float,
                 level: int) -> None:
        W = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        self.context, self.level, self.weight_scale = context, level, float(weight_scale)
        self.n_out, self.n_in = W.shape
        self.bias = np.zeros(self.n_out) if bias is None else np.asarray(bias, dtype=np.float64).ravel()
        if self.bias.shape != (self.n_out,) or not (np.all(np.isfinite(W)) and np.all(np.isfinite(self.bias))):
            raise ShapeError("weights and bias must be finite, with one bias per row")
        self.primes = context.primes_at(level)
        self.modulus_bits = context.modulus_bits_at(level)
        scaled = W * self.weight_scale
        if np.any(np.abs(scaled) >= 2.0**62):
            raise ShapeError("a weight times its scale reaches 2^62: encode at a smaller scale")
        self.W = seal_round(scaled).astype(np.int64)
        if not self.W.any(axis=1).all():
            raise ShapeError("a row of weights rounds to zero at this scale: its sum would be transparent")
        self._l1 = float(np.max(np.abs(self.W).sum(axis=1, dtype=np.float64)))
        if self._l1 >= 2.0**61:
            raise ShapeError("weights too large for an exact product (a row sum of |weight * scale| reaches 2^61)")
        self.sparse = np.count_nonzero(self.W) < SPARSE_DENSITY * self.W.size
        ct_bytes = 2 * len(self.primes) * context.params.poly_modulus_degree * 8
        per = max(1, OUTPUT_BLOCK_BYTES // ct_bytes)
        self._blocks = [np.arange(lo, min(lo + per, self.n_out)) for lo in range(0, self.n_out, per)]
        self._plans: dict[int, LimbPlan] = {}
        self._limb_cache: dict[tuple[int, int], list[np.ndarray | sparse.csr_matrix]] = {}

    def plan(self, q: int) -> LimbPlan:
        """The limb plan of prime q (it depends on its bit length only)."""
        bits = q.bit_length()
        if bits not in self._plans:
            self._plans[bits] = _limb_plan(self.W, q, self._l1)
        return self._plans[bits]

    def _weight_limbs(self, block: int, k: int) -> list[np.ndarray | sparse.csr_matrix]:
        if (block, k) not in self._limb_cache:
            self._limb_cache[(block, k)] = _limbs(self.W[self._blocks[block]], k, self.sparse)
        return self._limb_cache[(block, k)]

    def limb_products(self, size: int, n: int) -> list[tuple[np.ndarray | sparse.csr_matrix, tuple[int, int]]]:
        """The matrix products one evaluation on ciphertexts of `size` components and degree `n`
        computes, as (weight limb, shape of the coefficient limbs it multiplies), one per weight
        limb, row block, prime and component: its arithmetic, for benchmarks of the limit."""
        out = []
        for b in range(len(self._blocks)):
            for q in self.primes:
                plan = self.plan(q)
                out.extend((limb, (self.n_in, plan.n_x * n)) for limb in self._weight_limbs(b, plan.k_w)
                           for _ in range(size))
        return out

    def _bias_residues(self, scale: float) -> np.ndarray:
        """(n_out, primes) residues of the bias encoded at the product scale (exact integers)."""
        out = np.zeros((self.n_out, len(self.primes)), dtype=np.int64)
        for j, b in enumerate(self.bias):
            if b != 0.0:
                value = encoded_integer(b, scale)
                if value and math.log2(abs(value)) + 2 >= self.modulus_bits:
                    raise ScaleMismatchError(f"the bias {b:.3g} at scale 2^{math.log2(scale):.1f} does not fit the "
                                             f"{self.modulus_bits}-bit modulus of level {self.level}")
                out[j] = [value % q for q in self.primes]
        return out

    def __call__(self, cts: Sequence[seal.Ciphertext]) -> list[seal.Ciphertext]:
        """The weighted sums of SEAL ciphertexts (read through their serialization)."""
        return self.apply([ct.to_string() for ct in cts])

    def apply(self, blobs: Sequence[bytes]) -> list[seal.Ciphertext]:
        """The weighted sums of ciphertexts given as SEAL serializations (as a request carries them,
        after SEAL has validated them), all at this level with one scale. Their sizes may differ
        (squares left unrelinearized beside values carried past them): a ciphertext of fewer
        components counts as having zero further components, as SEAL's add_inplace treats it, so
        the outputs have the largest size."""
        if len(blobs) != self.n_in:
            raise ShapeError(f"a weighted sum over {self.n_in} ciphertexts got {len(blobs)}")
        metas = [_parse_prefix(b) for b in blobs]
        parms, _, _, n, n_primes, scale, _ = metas[0]
        sizes = [m[2] for m in metas]
        size = max(sizes)
        if any(len(b) != DATA_OFFSET + 8 * m[2] * n_primes * n or m[:2] + m[3:] != metas[0][:2] + metas[0][3:]
               for b, m in zip(blobs, metas, strict=True)):
            raise ScaleMismatchError("ciphertexts of one weighted sum must share their level and scale")
        if tuple(np.frombuffer(parms, dtype="<u8")) != tuple(self.context.parms_id_at(self.level)):
            raise ScaleMismatchError(f"ciphertexts are not at level {self.level}")
        out_scale = scale * self.weight_scale
        if out_scale <= 0 or int(math.log2(out_scale)) >= self.modulus_bits:
            raise ScaleMismatchError(f"a product at scale 2^{math.log2(out_scale):.1f} does not fit the "
                                     f"{self.modulus_bits}-bit modulus at level {self.level}")
        bias = self._bias_residues(out_scale) if self.bias.any() else None
        views = [np.frombuffer(b, dtype=np.uint8, count=8 * k * n_primes * n, offset=DATA_OFFSET)
                 for b, k in zip(blobs, sizes, strict=True)]
        prefix = blobs[0][:DATA_OFFSET]
        result: list[seal.Ciphertext] = []
        Y = np.empty((len(self._blocks[0]), size, n_primes, n), dtype="<u8")
        tasks = [(j, p) for j in range(n_primes) for p in range(size)]
        workers = min(threads(), len(tasks), max(1, SLAB_BYTES // (8 * self.n_in * n)))
        local = threading.local()

        def task(b: int, j: int, p: int) -> None:
            slab = getattr(local, "slab", None)
            if slab is None:
                slab = local.slab = np.empty((self.n_in, n), dtype="<u8")
            self._slab_product(b, j, p, views, sizes, slab, bias, Y)

        with contextlib.ExitStack() as stack:
            stack.enter_context(_blas().limit(limits=1, user_api="blas"))
            pool = None
            if workers > 1:
                pool = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="veil-weighted-sum"))
            for b, rows in enumerate(self._blocks):
                for q in self.primes:  # plans and weight limbs cached before the threads read them
                    self._weight_limbs(b, self.plan(q).k_w)
                if pool is None:
                    for j, p in tasks:
                        task(b, j, p)
                else:
                    for done in [pool.submit(task, b, j, p) for j, p in tasks]:
                        done.result()
                result.extend(write_ciphertext(self.context, prefix, Y[i], out_scale) for i in range(len(rows)))
        return result

    def _slab_product(self, b: int, j: int, p: int, views: list[np.ndarray], sizes: list[int], slab: np.ndarray,
                      bias: np.ndarray | None, Y: np.ndarray) -> None:
        """Component p, prime j of the outputs of row block b, into Y[:rows, p, j]: the inputs' words
        of that (component, prime) copied into `slab` (byte copies: the coefficients start
        unaligned), then their product by the weights, a column step at a time."""
        rows, q = self._blocks[b], self.primes[j]
        n_primes, n = Y.shape[2], Y.shape[3]
        plan = self.plan(q)
        limbs = self._weight_limbs(b, plan.k_w)
        step = WORKING_BYTES // (8 * plan.n_x * max(self.n_in, len(rows)))
        step = int(min(n, 1 << max(6, int(math.log2(max(1, step))))))
        at = 8 * (p * n_primes + j) * n
        slab_bytes = slab.view(np.uint8)
        for i, v in enumerate(views):
            slab_bytes[i] = v[at:at + 8 * n] if p < sizes[i] else 0
        for lo in range(0, n, step):
            cols = slice(lo, min(lo + step, n))
            part = self._product(limbs, self._coefficient_limbs(slab[:, cols], plan), plan, q)
            if bias is not None and p == 0:
                part += bias[rows, j][:, None]
                part -= np.where(part >= q, q, 0).astype(part.dtype)
            Y[:len(rows), p, j, cols] = part

    @staticmethod
    def _coefficient_limbs(X: np.ndarray, plan: LimbPlan) -> np.ndarray:
        """(n_in, n_x * width) float64: the k_x-bit limbs of coefficients X (n_in, width), side by side."""
        width, last = X.shape[1], plan.n_x - 1
        out = np.empty((X.shape[0], plan.n_x * width), dtype=np.float64)
        mask = np.uint64((1 << plan.k_x) - 1)
        limb = np.empty(X.shape, dtype=np.uint64) if plan.n_x > 2 else None
        for b in range(plan.n_x):  # one pass per limb, the last shift and the first mask cast as they go
            dst = out[:, b * width:(b + 1) * width]
            if b == last:
                np.right_shift(X, np.uint64(b * plan.k_x), out=dst, casting="unsafe")
            elif b == 0:
                np.bitwise_and(X, mask, out=dst, casting="unsafe")
            else:
                assert limb is not None
                np.right_shift(X, np.uint64(b * plan.k_x), out=limb)
                np.bitwise_and(limb, mask, out=dst, casting="unsafe")
        return out

    def _product(self, w_limbs: list[np.ndarray | sparse.csr_matrix], x_limbs: np.ndarray, plan: LimbPlan,
                 q: int) -> np.ndarray:
        """(rows, width) of sum_i W_ji x_i mod q in [0, q), from the limbs of W and of x.

        P_ab = W_a @ X_b is exact (below 2^52). With one weight limb and q * 2^k_x <= 2^51, Horner's
        rule over the coefficient limbs stays in float64 (canonical residues, as float64): each step
        balanced to |acc| < q (`_balance`), so acc * 2^k_x + P_b < 2^53, and only the last one
        made canonical. Otherwise T_b = sum_a 2^(a k_w) P_ab is W @ X_b exactly in int64
        (|T_b| <= l1 * 2^k_x < 2^60); consecutive T_b are combined while l1 * 2^(k_x * count) < 2^61,
        each such chunk reduced once, and the chunks joined by Horner's rule modulo q."""
        k, n_x = plan.k_x, plan.n_x
        width = x_limbs.shape[1] // n_x
        if plan.exact_float:
            P = np.asarray(w_limbs[0] @ x_limbs)
            acc = P[:, (n_x - 1) * width:]
            for b in range(n_x - 2, -1, -1):
                acc = _balance(acc, q)
                acc *= float(1 << k)
                acc += P[:, b * width:(b + 1) * width]
            return _fmod(acc, q)
        T = None
        for a, limb in enumerate(w_limbs):
            part = np.asarray(limb @ x_limbs).astype(np.int64)
            if a:
                part <<= a * plan.k_w
                T += part
            else:
                T = part
        assert T is not None
        per = max(1, int((61 - math.log2(max(self._l1, 1.0))) // k))
        acc = None
        for hi in range(n_x, 0, -per):
            lo = max(0, hi - per)
            y = T[:, (hi - 1) * width:hi * width]
            for b in range(hi - 2, lo - 1, -1):
                y = (y << k) + T[:, b * width:(b + 1) * width]
            y = _mod(y, q)
            acc = y if acc is None else _mod(_shift_mod(acc, k * (hi - lo), q) + y, q)
        assert acc is not None
        return acc
