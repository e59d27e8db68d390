"""A CKKS ciphertext as a value that knows its level and scale (as TenSEAL's `CKKSVector`).

Every operation checks its operands first: ciphertexts made under other parameters, at different
levels of the modulus chain or at different scales are refused with `ScaleMismatchError` instead
of letting SEAL produce a wrong answer or a bare RuntimeError. Operations come in pure form
(`a + b`, `a.square()`) and in-place form (`a.add_(b)`, `a.square_()`), as in torch.

Plaintext operands (scalars or slot vectors) are encoded on the fly at the ciphertext's level:
additions at the ciphertext's scale, multiplications at a scale the caller states (by default
the prime the next rescale divides by, so that `(x * w).rescale()` keeps the scale of `x`).
"""

from __future__ import annotations

import math

import numpy as np
import seal

from veil.errors import KeyMaterialError, ScaleMismatchError
from veil.he.context import HEContext

SCALE_RTOL = 1e-9
"""Two scales are the same when they agree to this relative tolerance (SEAL itself compares
exactly; encoders round the scale to a double, so exact equality of computed scales can fail)."""

Plain = float | int | np.ndarray


class Ciphertext:
    """One CKKS ciphertext with its context. `level` is SEAL's chain index: fresh ciphertexts sit at
    `context.top_level`, each rescale lowers it by one, and level 0 can no longer be rescaled."""

    __slots__ = ("context", "data")

    def __init__(self, context: HEContext, data: seal.Ciphertext) -> None:
        self.context = context
        self.data = data

    # --- what the value knows about itself ------------------------------------------------
    @property
    def level(self) -> int:
        return self.context.level_of(self.data.parms_id())

    @property
    def scale(self) -> float:
        return self.data.scale()

    @property
    def size(self) -> int:
        """Number of polynomials: 2 when fresh or relinearized, 3 after a product without relinearization."""
        return self.data.size()

    def copy(self) -> Ciphertext:
        return Ciphertext(self.context, seal.Ciphertext(self.data))

    def __repr__(self) -> str:
        return f"Ciphertext(level={self.level}, scale=2^{math.log2(self.scale):.2f}, size={self.size})"

    # --- checks ---------------------------------------------------------------------------
    def _same_context(self, other: Ciphertext) -> None:
        if other.context.params != self.context.params:
            raise ScaleMismatchError("operands were made under different encryption parameters")

    def _check_aligned(self, other: Ciphertext, what: str) -> None:
        self._same_context(other)
        if other.level != self.level:
            raise ScaleMismatchError(f"cannot {what} ciphertexts at levels {self.level} and {other.level}")
        if not math.isclose(other.scale, self.scale, rel_tol=SCALE_RTOL):
            raise ScaleMismatchError(
                f"cannot {what} ciphertexts at scales 2^{math.log2(self.scale):.3f} and "
                f"2^{math.log2(other.scale):.3f}")

    def _plain(self, values: Plain, scale: float) -> seal.Plaintext:
        """Encode a scalar or slot vector at `scale`, at this ciphertext's level."""
        return self.context.encode_at(values, scale, self.data.parms_id())

    # --- additions --------------------------------------------------------------------------
    def add_(self, other: Ciphertext | Plain) -> Ciphertext:
        ev = self.context.evaluator
        if isinstance(other, Ciphertext):
            self._check_aligned(other, "add")
            if other.size > self.size:
                self.data = ev.add(other.data, self.data)
            else:
                ev.add_inplace(self.data, other.data)
        else:
            ev.add_plain_inplace(self.data, self._plain(other, self.scale))
        return self

    def sub_(self, other: Ciphertext | Plain) -> Ciphertext:
        ev = self.context.evaluator
        if isinstance(other, Ciphertext):
            self._check_aligned(other, "subtract")
            if other.size > self.size:
                self.data = ev.add(ev.negate(other.data), self.data)
            else:
                ev.sub_inplace(self.data, other.data)
        else:
            ev.sub_plain_inplace(self.data, self._plain(other, self.scale))
        return self

    def neg_(self) -> Ciphertext:
        self.context.evaluator.negate_inplace(self.data)
        return self

    def __add__(self, other: Ciphertext | Plain) -> Ciphertext:
        return self.copy().add_(other)

    __radd__ = __add__

    def __sub__(self, other: Ciphertext | Plain) -> Ciphertext:
        return self.copy().sub_(other)

    def __neg__(self) -> Ciphertext:
        return self.copy().neg_()

    # --- products -------------------------------------------------------------------------
    def next_prime(self) -> int:
        """The prime the next rescale divides by (refused at level 0)."""
        if self.level == 0:
            raise ScaleMismatchError("the ciphertext is at level 0: no multiplicative level is left")
        return self.context.prime_at(self.level)

    def mul_plain_(self, values: Plain, scale: float | None = None) -> Ciphertext:
        """Multiply by a plaintext encoded at `scale` (default: the next prime, so a rescale
        brings the result back to this ciphertext's scale)."""
        s = float(self.next_prime()) if scale is None else float(scale)
        self.context.evaluator.multiply_plain_inplace(self.data, self._plain(values, s))
        return self

    def mul_(self, other: Ciphertext | Plain) -> Ciphertext:
        if not isinstance(other, Ciphertext):
            return self.mul_plain_(other)
        self._same_context(other)
        if other.level != self.level:
            raise ScaleMismatchError(f"cannot multiply ciphertexts at levels {self.level} and {other.level}")
        self._check_capacity(self.scale * other.scale)
        self.context.evaluator.multiply_inplace(self.data, other.data)
        return self

    def square_(self) -> Ciphertext:
        self._check_capacity(self.scale**2)
        self.context.evaluator.square_inplace(self.data)
        return self

    def _check_capacity(self, scale: float) -> None:
        if math.log2(scale) >= self.context.modulus_bits_at(self.level) - 1:
            raise ScaleMismatchError(
                f"a product at scale 2^{math.log2(scale):.1f} does not fit the "
                f"{self.context.modulus_bits_at(self.level)}-bit modulus left at level {self.level}")

    def __mul__(self, other: Ciphertext | Plain) -> Ciphertext:
        return self.copy().mul_(other)

    __rmul__ = __mul__

    def square(self) -> Ciphertext:
        return self.copy().square_()

    # --- maintenance ------------------------------------------------------------------------
    def relinearize_(self, relin_keys: seal.RelinKeys | None) -> Ciphertext:
        if self.size > 2:
            if relin_keys is None:
                raise KeyMaterialError("relinearization needs relinearization keys in the bundle")
            self.context.evaluator.relinearize_inplace(self.data, relin_keys)
        return self

    def rescale_(self) -> Ciphertext:
        """Divide by the next prime and drop one level."""
        self.next_prime()
        self.context.evaluator.rescale_to_next_inplace(self.data)
        return self

    def rescale(self) -> Ciphertext:
        return self.copy().rescale_()

    def rotate(self, steps: int, galois_keys: seal.GaloisKeys | None) -> Ciphertext:
        """Cyclic left rotation of the slots by `steps` (needs the Galois key for that step)."""
        if galois_keys is None:
            raise KeyMaterialError(f"rotation by {steps} needs Galois keys in the bundle")
        if self.size != 2:
            raise ScaleMismatchError("relinearize before rotating (rotations need 2-component ciphertexts)")
        return Ciphertext(self.context, self.context.evaluator.rotate_vector(self.data, int(steps), galois_keys))


def aligned(values: list[Ciphertext], what: str) -> Ciphertext:
    """The first of `values` once all are checked to share its parameters, level and scale (so a
    loop over their SEAL objects may combine them directly)."""
    if not values:
        raise ValueError(f"nothing to {what}")
    first = values[0]
    for v in values[1:]:
        first._check_aligned(v, what)
    return first


def add_many(values: list[Ciphertext]) -> Ciphertext:
    """Sum of aligned ciphertexts (one SEAL call)."""
    first = aligned(values, "add")
    if len(values) == 1:
        return first.copy()
    return Ciphertext(first.context, first.context.evaluator.add_many([v.data for v in values]))
