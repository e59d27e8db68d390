"""Key material split by owner.

`SecretKeys` stays with the client: it encrypts (symmetric RLWE, so no public key is needed) and
decrypts. `PublicBundle` is all a server ever receives: the parameters plus only the evaluation
keys the model needs (no Galois keys without rotations, and only the rotation steps used).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import seal

from veil.errors import KeyMaterialError, ParameterMismatchError, WireFormatError
from veil.he import wire
from veil.he.context import HEContext
from veil.he.params import CKKSParameters


def _normalise_steps(steps: Iterable[int], slots: int) -> tuple[int, ...]:
    out = sorted({int(s) % slots for s in steps} - {0})
    return tuple(out)


def _bundle_steps(head: dict, slots: int) -> tuple[tuple[int, ...], bool]:
    """The rotation steps and relin flag a bundle header declares, checked as strict values:
    distinct integers in (-slots, slots) and a JSON boolean (a float, string or 1e400 is refused)."""
    raw = head.get("rotation_steps", [])
    if not isinstance(raw, list) or len(raw) > 2 * slots:
        raise KeyMaterialError("rotation_steps must be a list of integers")
    steps = tuple(wire.strict_int(s, "rotation step", -slots + 1, slots - 1, KeyMaterialError) for s in raw)
    if len(set(steps)) != len(steps):
        raise KeyMaterialError("rotation_steps repeats a step")
    relin = head.get("relin", False)
    if not isinstance(relin, bool):
        raise KeyMaterialError(f"relin must be true or false, got {type(relin).__name__}")
    return steps, relin


def key_id(bundle: bytes) -> str:
    """Content hash of a serialized public bundle: the same keys always get the same id."""
    return hashlib.sha256(bundle).hexdigest()[:32]


class PublicBundle:
    """Parameters and evaluation keys for a server. It holds no secret key and cannot decrypt."""

    def __init__(self, context: HEContext, galois_keys: seal.GaloisKeys | None,
                 rotation_steps: tuple[int, ...], relin_keys: seal.RelinKeys | None) -> None:
        self.context = context
        self.galois_keys = galois_keys
        self.rotation_steps = rotation_steps
        self.relin_keys = relin_keys

    @property
    def params(self) -> CKKSParameters:
        return self.context.params

    def to_bytes(self) -> bytes:
        header = {"params": self.params.to_dict(), "fingerprint": self.params.fingerprint,
                  "rotation_steps": list(self.rotation_steps),
                  "relin": self.relin_keys is not None}
        blobs = []
        if self.galois_keys is not None:
            blobs.append(self.galois_keys.to_string())
        if self.relin_keys is not None:
            blobs.append(self.relin_keys.to_string())
        return wire.Message(wire.Kind.PUBLIC_BUNDLE, header, blobs).to_bytes()

    @property
    def key_id(self) -> str:
        return key_id(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, context: HEContext | None = None) -> PublicBundle:
        """Load a bundle, refusing secret keys, unknown parameters and inconsistent key lists."""
        msg = wire.decode(data)
        if msg.kind == wire.Kind.SECRET_KEYS:
            raise KeyMaterialError("refused: this is a secret key; a server only accepts public bundles")
        if msg.kind != wire.Kind.PUBLIC_BUNDLE:
            raise WireFormatError(f"expected a PUBLIC_BUNDLE message, got {msg.kind.name}")
        head = msg.header
        unknown = set(head) - {"params", "fingerprint", "rotation_steps", "relin"}
        if unknown:
            raise KeyMaterialError(f"unexpected fields in bundle: {sorted(unknown)}")
        params = CKKSParameters.from_dict(head.get("params") or {})
        if head.get("fingerprint") != params.fingerprint:
            raise WireFormatError("bundle fingerprint does not match its parameters")
        if context is None:
            context = HEContext(params)
        elif context.params != params:
            raise ParameterMismatchError(
                f"bundle parameters {params.fingerprint} differ from the model's "
                f"{context.params.fingerprint}")
        steps, relin = _bundle_steps(head, context.slot_count)
        expected_blobs = (1 if steps else 0) + (1 if relin else 0)
        if len(msg.blobs) != expected_blobs:
            raise KeyMaterialError(f"bundle announces {expected_blobs} key blobs, carries {len(msg.blobs)}")
        galois = relin_keys = None
        blobs = list(msg.blobs)
        try:
            if steps:
                galois = context.seal.from_galois_str(blobs.pop(0))
                if galois.size() != len(steps):
                    raise KeyMaterialError(
                        f"bundle holds {galois.size()} Galois keys for {len(steps)} declared steps")
                # the Galois element of a rotation by s slots is 3^s mod 2N (3 has order N/2)
                absent = [s for s in steps if not galois.has_key(
                    pow(3, s % context.slot_count, 2 * context.params.poly_modulus_degree))]
                if absent:
                    raise KeyMaterialError(f"bundle declares rotation steps {absent} it holds no Galois keys for")
            if relin:
                relin_keys = context.seal.from_relin_str(blobs.pop(0))
        except (RuntimeError, ValueError) as exc:
            if isinstance(exc, KeyMaterialError):
                raise
            raise KeyMaterialError(f"invalid evaluation key in bundle: {exc}") from None
        return cls(context, galois, steps, relin_keys)


class SecretKeys:
    """The client's keys. The secret key never leaves this object except through `to_bytes`,
    which is meant for the owner's own disk, and is refused by every server entry point."""

    def __init__(self, context: HEContext, keygen: seal.KeyGenerator, secret_key: seal.SecretKey,
                 rotation_steps: tuple[int, ...], relin: bool) -> None:
        self.context = context
        self._keygen = keygen
        self._secret_key = secret_key
        self.rotation_steps = rotation_steps
        self.relin = relin
        self._encryptor = seal.Encryptor(context.seal, secret_key)
        self._decryptor = seal.Decryptor(context.seal, secret_key)
        self._bundle: PublicBundle | None = None

    @classmethod
    def generate(cls, params: CKKSParameters | HEContext, rotation_steps: Iterable[int] = (),
                 relin: bool = False) -> SecretKeys:
        """Fresh keys from SEAL's CSPRNG-seeded key generator."""
        context = params if isinstance(params, HEContext) else HEContext(params)
        steps = _normalise_steps(rotation_steps, context.slot_count)
        if (steps or relin) and not context.params.uses_key_switching:
            raise KeyMaterialError("rotations and relinearization need a parameter set with a special prime")
        keygen = seal.KeyGenerator(context.seal)
        return cls(context, keygen, keygen.secret_key(), steps, relin)

    @property
    def params(self) -> CKKSParameters:
        return self.context.params

    def public_bundle(self) -> PublicBundle:
        """Evaluation keys for exactly the declared rotation steps (none if there are none)."""
        if self._bundle is None:
            galois = None
            if self.rotation_steps:
                galois = seal.GaloisKeys()
                self._keygen.create_galois_keys(list(self.rotation_steps), galois)
            relin = self._keygen.create_relin_keys() if self.relin else None
            self._bundle = PublicBundle(self.context, galois, self.rotation_steps, relin)
        return self._bundle

    def encrypt(self, values: np.ndarray, scale: float) -> seal.Ciphertext:
        """Encrypt one slot vector under the secret key (symmetric RLWE encryption)."""
        return self._encryptor.encrypt_symmetric(self.context.encode(values, scale))

    def decrypt(self, ct: seal.Ciphertext) -> np.ndarray:
        """Decrypt and decode one ciphertext to its real slot values."""
        return self.context.encoder.decode(self._decryptor.decrypt(ct))

    def decrypt_complex(self, ct: seal.Ciphertext) -> np.ndarray:
        """Decrypt and decode one ciphertext to its complex slot values (two reals per slot)."""
        return self.context.encoder.decode_complex(self._decryptor.decrypt(ct))

    def to_bytes(self) -> bytes:
        """Serialize for the owner's own storage (never send this to a server)."""
        header = {"params": self.params.to_dict(), "rotation_steps": list(self.rotation_steps),
                  "relin": self.relin}
        return wire.Message(wire.Kind.SECRET_KEYS, header, [self._secret_key.to_string()]).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretKeys:
        msg = wire.decode(data, wire.Kind.SECRET_KEYS)
        params = CKKSParameters.from_dict(msg.header.get("params") or {})
        context = HEContext(params)
        if len(msg.blobs) != 1:
            raise KeyMaterialError("a secret-key message holds exactly one key")
        try:
            sk = context.seal.from_secret_str(msg.blobs[0])
        except (RuntimeError, ValueError) as exc:
            raise KeyMaterialError(f"invalid secret key: {exc}") from None
        keygen = seal.KeyGenerator(context.seal, sk)
        steps, relin = _bundle_steps(msg.header, context.slot_count)
        return cls(context, keygen, sk, _normalise_steps(steps, context.slot_count), relin)
