"""CKKS parameter sets: named presets by circuit depth, checked for 128-bit security by SEAL."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import seal

from veil.errors import InsecureParametersError
from veil.he.wire import strict_int

MIN_SECURITY_BITS = 128
MAX_DEGREE = 1 << 17
MAX_PRIMES = 64
_SEC_LEVELS = {128: seal.sec_level_type.tc128, 192: seal.sec_level_type.tc192,
               256: seal.sec_level_type.tc256}


@dataclass(frozen=True)
class CKKSParameters:
    """Ring degree and coefficient-modulus prime sizes; the last prime is the key-switching prime
    whenever there is more than one."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    security_bits: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_modulus_bits", tuple(int(b) for b in self.coeff_modulus_bits))
        if self.security_bits not in _SEC_LEVELS:
            raise InsecureParametersError(
                f"security_bits must be one of {sorted(_SEC_LEVELS)} (at least "
                f"{MIN_SECURITY_BITS}); got {self.security_bits}"
            )
        n = self.poly_modulus_degree
        if not isinstance(n, int) or n < 1024 or n & (n - 1):
            raise InsecureParametersError(f"poly_modulus_degree must be a power of two >= 1024, got {n}")
        if not self.coeff_modulus_bits or any(not 20 <= b <= 60 for b in self.coeff_modulus_bits):
            raise InsecureParametersError(
                f"coeff_modulus_bits must be 1+ prime sizes in [20, 60], got {self.coeff_modulus_bits}"
            )
        limit = seal.CoeffModulus.MaxBitCount(n, _SEC_LEVELS[self.security_bits])
        if sum(self.coeff_modulus_bits) > limit:
            raise InsecureParametersError(
                f"coefficient modulus of {sum(self.coeff_modulus_bits)} bits exceeds the "
                f"{limit} bits allowed at N={n} for {self.security_bits}-bit security"
            )

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def uses_key_switching(self) -> bool:
        """True when a special prime exists, which rotations and relinearization require."""
        return len(self.coeff_modulus_bits) > 1

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus that ciphertexts are encrypted under (all but the special prime)."""
        bits = self.coeff_modulus_bits
        return sum(bits[:-1]) if len(bits) > 1 else bits[0]

    @cached_property
    def fingerprint(self) -> str:
        """Short stable identifier of the parameter set, carried in every wire message."""
        text = f"ckks:{self.poly_modulus_degree}:{','.join(map(str, self.coeff_modulus_bits))}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"poly_modulus_degree": self.poly_modulus_degree,
                "coeff_modulus_bits": list(self.coeff_modulus_bits),
                "security_bits": self.security_bits}

    @classmethod
    def from_dict(cls, data: dict) -> CKKSParameters:
        """Parse parameters from untrusted JSON: every number must be a true integer in range
        (no floats, infinities, booleans or strings), so bad input is an `InsecureParametersError`."""
        if not isinstance(data, dict):
            raise InsecureParametersError(f"CKKS parameters must be an object, got {type(data).__name__}")
        bits = data.get("coeff_modulus_bits")
        if not isinstance(bits, list | tuple) or not 1 <= len(bits) <= MAX_PRIMES:
            raise InsecureParametersError(f"coeff_modulus_bits must be a list of 1 to {MAX_PRIMES} prime sizes")
        check = {"error": InsecureParametersError}
        return cls(strict_int(data.get("poly_modulus_degree"), "poly_modulus_degree", 1, MAX_DEGREE, **check),
                   tuple(strict_int(b, "coeff_modulus_bits[]", 1, 61, **check) for b in bits),
                   strict_int(data.get("security_bits", 128), "security_bits", 0, 1024, **check))

    def seal_context(self) -> seal.SEALContext:
        """Build the SEAL context; SEAL itself enforces the HomomorphicEncryption.org bound."""
        parms = seal.EncryptionParameters(seal.scheme_type.ckks)
        parms.set_poly_modulus_degree(self.poly_modulus_degree)
        try:
            parms.set_coeff_modulus(seal.CoeffModulus.Create(self.poly_modulus_degree,
                                                             list(self.coeff_modulus_bits)))
        except (RuntimeError, ValueError) as exc:
            raise InsecureParametersError(f"SEAL cannot build this modulus: {exc}") from exc
        context = seal.SEALContext(parms, True, _SEC_LEVELS[self.security_bits])
        if not context.parameters_set():
            raise InsecureParametersError(
                f"SEAL rejected the parameters ({context.parameter_error_name()}): "
                f"{context.parameter_error_message()}"
            )
        return context


PRESETS: dict[str, CKKSParameters] = {
    "depth0": CKKSParameters(8192, (60,)),
    "depth0-rotations": CKKSParameters(4096, (60, 49)),
    "depth1": CKKSParameters(8192, (60, 40, 60)),
    "depth2": CKKSParameters(16384, (60, 40, 40, 60)),
}
"""Depth counts rescalings. Depth-0 sets evaluate plaintext-weighted sums without rescaling (the
product scale must fit the single data prime); "-rotations" adds a 49-bit special prime for Galois
keys, whose key-switching noise is about 2^25 in absolute terms: rotate at scales of 2^45 or more."""


def preset(name: str) -> CKKSParameters:
    """Look up a named preset, with a clear error listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InsecureParametersError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def preset_for(depth: int, rotations: bool) -> CKKSParameters:
    """Smallest preset that supports the given multiplicative depth, with or without rotations."""
    if depth < 0:
        raise ValueError("depth must be >= 0")
    if depth == 0:
        return PRESETS["depth0-rotations" if rotations else "depth0"]
    if depth == 1:
        return PRESETS["depth1"]
    if depth == 2:
        return PRESETS["depth2"]
    raise InsecureParametersError(f"no preset supports depth {depth} at 128-bit security")
