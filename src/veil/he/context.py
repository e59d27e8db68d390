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

    @property
    def slot_count(self) -> int:
        return self.encoder.slot_count()

    def encode(self, values: np.ndarray | float, scale: float) -> seal.Plaintext:
        """Encode a real vector (zero-padded to the slot count) or a scalar broadcast to all slots."""
        if np.isscalar(values):
            return self.encoder.encode(float(values), float(scale))
        arr = np.asarray(values, dtype=np.float64).ravel()
        if arr.size > self.slot_count:
            raise ValueError(f"{arr.size} values do not fit in {self.slot_count} slots")
        if not np.all(np.isfinite(arr)):
            raise ValueError("cannot encode NaN or infinite values")
        return self.encoder.encode(arr, float(scale))

    def load_ciphertext(self, blob: bytes) -> seal.Ciphertext:
        """Deserialize and validate one SEAL ciphertext against this context."""
        try:
            ct = self.seal.from_cipher_str(blob)
        except (RuntimeError, ValueError) as exc:
            raise WireFormatError(f"invalid ciphertext: {exc}") from None
        if ct.size() != 2:
            raise WireFormatError(f"expected a 2-component ciphertext, got {ct.size()}")
        if ct.poly_modulus_degree() != self.params.poly_modulus_degree:
            raise ParameterMismatchError("ciphertext ring degree does not match the parameters")
        return ct

    def pack(self, cts: Sequence[seal.Ciphertext], header: dict) -> bytes:
        """Serialize ciphertexts into one versioned message tagged with this parameter set."""
        head = dict(header, params=self.params.fingerprint)
        return wire.Message(wire.Kind.CIPHERTEXTS, head, [ct.to_string() for ct in cts]).to_bytes()

    def unpack(self, data: bytes | wire.Message) -> tuple[dict, list[seal.Ciphertext]]:
        """Parse a ciphertext message (bytes, or already decoded) made under this parameter set."""
        msg = data if isinstance(data, wire.Message) else wire.decode(data, wire.Kind.CIPHERTEXTS)
        if msg.kind != wire.Kind.CIPHERTEXTS:
            raise WireFormatError(f"expected a CIPHERTEXTS message, got {msg.kind.name}")
        if msg.header.get("params") != self.params.fingerprint:
            raise ParameterMismatchError(
                f"ciphertexts were made for parameters {msg.header.get('params')!r}, "
                f"this context uses {self.params.fingerprint!r}"
            )
        return msg.header, [self.load_ciphertext(b) for b in msg.blobs]
