"""SEAL context, encoder and evaluator for one parameter set, with typed loading of ciphertexts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import seal

from veil.errors import ParameterMismatchError, WireFormatError
from veil.he import wire
from veil.he.params import CKKSParameters


class HEContext:
    """Everything both sides share for a parameter set: no key material lives here."""

    def __init__(self, params: CKKSParameters) -> None:
        self.params = params
        self.seal = params.seal_context()
        self.encoder = seal.CKKSEncoder(self.seal)
        self.evaluator = seal.Evaluator(self.seal)
        chain, data = [], self.seal.first_context_data()
        while data is not None:
            chain.append(data)
            data = data.next_context_data()
        # chain[i] is the level with chain index top_level - i
        self._levels = {tuple(d.parms_id()): d.chain_index() for d in chain}
        self._by_level = {d.chain_index(): d for d in chain}

    @property
    def top_level(self) -> int:
        """Chain index of fresh ciphertexts (the number of rescales they can undergo)."""
        return self.seal.first_context_data().chain_index()

    def level_of(self, parms_id: object) -> int:
        try:
            return self._levels[tuple(parms_id)]
        except KeyError:
            raise ParameterMismatchError("value belongs to no level of this parameter set") from None

    def parms_id_at(self, level: int) -> list[int]:
        return self._by_level[level].parms_id()

    def prime_at(self, level: int) -> int:
        """The last prime of the modulus at `level`: the one a rescale from there divides by."""
        return self._by_level[level].parms().coeff_modulus()[-1].value()

    def primes_at(self, level: int) -> list[int]:
        """The primes of the modulus at `level`, in SEAL's order (the last is the next rescale's)."""
        return [m.value() for m in self._by_level[level].parms().coeff_modulus()]

    def modulus_bits_at(self, level: int) -> int:
        return self._by_level[level].total_coeff_modulus_bit_count()

    def encode_at(self, values: np.ndarray | float, scale: float, parms_id: object) -> seal.Plaintext:
        """Encode at `scale`, then switch the plaintext down to the level of `parms_id`."""
        plain = self.encode(values, scale)
        if tuple(parms_id) != tuple(plain.parms_id()):
            self.evaluator.mod_switch_to_inplace(plain, parms_id)
        return plain

    @property
    def slot_count(self) -> int:
        return self.encoder.slot_count()

    def encode(self, values: np.ndarray | complex, scale: float) -> seal.Plaintext:
        """Encode a real or complex vector (zero-padded to the slot count) or a scalar broadcast
        to all slots. Complex values put a second real number in each slot's imaginary part."""
        if np.isscalar(values):
            if isinstance(values, complex | np.complexfloating):
                return self.encoder.encode_complex(complex(values), float(scale))
            return self.encoder.encode(float(values), float(scale))
        is_complex = np.iscomplexobj(values)
        arr = np.asarray(values, dtype=np.complex128 if is_complex else np.float64).ravel()
        if arr.size > self.slot_count:
            raise ValueError(f"{arr.size} values do not fit in {self.slot_count} slots")
        if not np.all(np.isfinite(arr)):
            raise ValueError("cannot encode NaN or infinite values")
        if is_complex:
            return self.encoder.encode_complex(arr, float(scale))
        return self.encoder.encode(arr, float(scale))

    def load_ciphertext(self, blob: bytes, max_size: int = 2) -> seal.Ciphertext:
        """Deserialize and validate one SEAL ciphertext against this context (requests are always
        2-component; a response may hold 3 when the program skips its last relinearization)."""
        try:
            ct = self.seal.from_cipher_str(blob)
        except (RuntimeError, ValueError) as exc:
            raise WireFormatError(f"invalid ciphertext: {exc}") from None
        if not 2 <= ct.size() <= max_size:
            raise WireFormatError(f"expected a ciphertext of 2 to {max_size} components, got {ct.size()}")
        if ct.poly_modulus_degree() != self.params.poly_modulus_degree:
            raise ParameterMismatchError("ciphertext ring degree does not match the parameters")
        return ct

    def pack(self, cts: Sequence[seal.Ciphertext], header: dict) -> bytes:
        """Serialize ciphertexts into one versioned message tagged with this parameter set."""
        head = dict(header, params=self.params.fingerprint)
        return wire.Message(wire.Kind.CIPHERTEXTS, head, [ct.to_string() for ct in cts]).to_bytes()

    def unpack(self, data: bytes | wire.Message, max_size: int = 2) -> tuple[dict, list[seal.Ciphertext]]:
        """Parse a ciphertext message (bytes, or already decoded) made under this parameter set."""
        msg = data if isinstance(data, wire.Message) else wire.decode(data, wire.Kind.CIPHERTEXTS)
        if msg.kind != wire.Kind.CIPHERTEXTS:
            raise WireFormatError(f"expected a CIPHERTEXTS message, got {msg.kind.name}")
        if msg.header.get("params") != self.params.fingerprint:
            raise ParameterMismatchError(
                f"ciphertexts were made for parameters {msg.header.get('params')!r}, "
                f"this context uses {self.params.fingerprint!r}"
            )
        return msg.header, [self.load_ciphertext(b, max_size) for b in msg.blobs]
