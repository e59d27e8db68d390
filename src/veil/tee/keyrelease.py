"""Key release: the model-at-rest key goes only to a worker whose fresh evidence verifies.

Protocol (one round trip after the challenge; no step trusts the worker's word alone):

1. Broker -> worker: `KeyBroker.challenge(owner)` makes a 32-byte nonce from the OS CSPRNG, stores
   it in its `NonceStore` with its expiry (default 60 s) and the identity of the worker that asked
   (`owner`: in `veil serve`, the name of the worker token), and sends it with the broker's context.
2. Worker: `KeyRequester` generates an ephemeral X25519 key pair inside the enclave and asks its
   platform for evidence whose report data is
   ``key_release_report_data(nonce, public key, context)`` (`veil.tee.binding`), then sends
   `KeyRequest(nonce, public key, evidence)`.
3. Broker: `KeyBroker.release(request, owner)` (a) takes the nonce out of the store (single use: a
   second request with it, one after expiry, or one by another worker than the one it was issued
   to, is a `NonceError`, whatever its evidence); (b) refuses a
   request without evidence; (c) verifies the evidence with the policy's verifier for its platform
   and checks the claims against the policy (`veil.tee.policy`); (d) checks that the report data is
   exactly the binding of this nonce, this public key and this context; (e) wraps the model key to
   the worker's public key with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256),
   HKDF-SHA256, AES-256-GCM, from `cryptography`), with ``info`` binding the label, the nonce, the
   context and the SHA-256 of the evidence, and returns `KeyGrant(nonce, wrapped key)`.
4. Worker: `KeyRequester.unwrap` opens the grant with its ephemeral private key; any change to the
   grant, or a grant made for other evidence, nonce or context, fails as `KeyReleaseError`.

Every refusal in step 3 is raised as the `AttestationError` subclass naming the failed step, counted
in `RefusalCounter` by platform and reason (`veil serve` exports it on /metrics) and logged
(platform, reason, detail; never nonces or keys). Only the enclave ever holds the ephemeral private
key, so the model key is readable only inside software whose measurement the policy names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.tee.binding import KEY_RELEASE_LABEL, check_binding, key_release_report_data
from veil.tee.claims import Claims, Evidence
from veil.tee.errors import AttestationError, EvidenceFormatError, KeyReleaseError, NoEvidenceError, NonceError
from veil.tee.policy import Policy

log = logging.getLogger("veil.tee.keyrelease")

NONCE_BYTES = 32
X25519_BYTES = 32
MAX_CONTEXT_BYTES = 256
MAX_WRAPPED_BYTES = 1024
DEFAULT_CONTEXT = b"veil-model-key"
OTHER_PLATFORM = "other"
"""Refusals whose evidence names a platform the policy does not know are counted under this name."""
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(nonce: bytes, context: bytes, evidence: Evidence) -> bytes:
    return KEY_RELEASE_LABEL + nonce + hashlib.sha256(context).digest() + hashlib.sha256(evidence.blob).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, size: int | None = None, limit: int = MAX_WRAPPED_BYTES) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit:
        raise KeyReleaseError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyReleaseError(f"{what} is not valid base64") from None
    if (size is not None and len(raw) != size) or len(raw) > limit:
        raise KeyReleaseError(f"{what} must be {size if size is not None else f'at most {limit}'} bytes")
    return raw


@dataclass(frozen=True)
class Challenge:
    """A broker's fresh nonce, the context the key is released for, and how long the nonce lives."""

    nonce: bytes
    context: bytes
    expires_in: float

    def to_dict(self) -> dict[str, object]:
        return {"nonce": _b64(self.nonce), "context": _b64(self.context), "expires_in": self.expires_in}

    @classmethod
    def from_dict(cls, data: object) -> Challenge:
        if not isinstance(data, dict) or set(data) != {"nonce", "context", "expires_in"} or \
                not isinstance(data["expires_in"], int | float) or isinstance(data["expires_in"], bool):
            raise KeyReleaseError("a challenge has exactly nonce, context and expires_in")
        return cls(_unb64(data["nonce"], "nonce", NONCE_BYTES),
                   _unb64(data["context"], "context", limit=MAX_CONTEXT_BYTES), float(data["expires_in"]))


@dataclass(frozen=True)
class KeyRequest:
    """A worker's request: the broker's nonce, its ephemeral public key and its evidence (None if it has none)."""

    nonce: bytes
    public_key: bytes
    evidence: Evidence | None

    def to_dict(self) -> dict[str, object]:
        return {"nonce": _b64(self.nonce), "public_key": _b64(self.public_key),
                "evidence": None if self.evidence is None else self.evidence.to_dict()}

    @classmethod
    def from_dict(cls, data: object) -> KeyRequest:
        if not isinstance(data, dict) or set(data) != {"nonce", "public_key", "evidence"}:
            raise KeyReleaseError("a key request has exactly nonce, public_key and evidence")
        evidence = None if data["evidence"] is None else Evidence.from_dict(data["evidence"])
        return cls(_unb64(data["nonce"], "nonce", NONCE_BYTES),
                   _unb64(data["public_key"], "public_key", X25519_BYTES), evidence)


@dataclass(frozen=True)
class KeyGrant:
    """The model key wrapped (HPKE) to the requesting worker's ephemeral key."""

    nonce: bytes
    wrapped_key: bytes

    def to_dict(self) -> dict[str, object]:
        return {"nonce": _b64(self.nonce), "wrapped_key": _b64(self.wrapped_key)}

    @classmethod
    def from_dict(cls, data: object) -> KeyGrant:
        if not isinstance(data, dict) or set(data) != {"nonce", "wrapped_key"}:
            raise KeyReleaseError("a key grant has exactly nonce and wrapped_key")
        return cls(_unb64(data["nonce"], "nonce", NONCE_BYTES), _unb64(data["wrapped_key"], "wrapped_key"))


class RefusalCounter:
    """Refusals by (platform, reason) and grants by platform; thread-safe, read by metrics exporters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused: Counter[tuple[str, str]] = Counter()
        self._granted: Counter[str] = Counter()

    def refuse(self, platform: str, reason: str) -> None:
        with self._lock:
            self._refused[(platform, reason)] += 1

    def grant(self, platform: str) -> None:
        with self._lock:
            self._granted[platform] += 1

    def refusals(self) -> Mapping[tuple[str, str], int]:
        with self._lock:
            return dict(self._refused)

    def grants(self) -> Mapping[str, int]:
        with self._lock:
            return dict(self._granted)

    @property
    def total_refused(self) -> int:
        with self._lock:
            return sum(self._refused.values())


class NonceStore(Protocol):
    """Where a broker keeps its outstanding nonces: single use, expiring, bounded.

    `issue` remembers a nonce for `ttl` seconds as issued to `owner`; `consume` removes it and raises
    `NonceError` if it was unknown, already used, expired or issued to another owner. Both must be
    atomic: a nonce is consumed at most once however many requests race for it. `close` releases
    the store's connections (a server calls it once, at shutdown).
    """

    ttl: float

    def issue(self, nonce: bytes, owner: str) -> None: ...

    def consume(self, nonce: bytes, owner: str) -> None: ...

    def close(self) -> None: ...


class MemoryNonceStore:
    """Nonces of one broker process: an insertion-ordered map, the oldest forgotten past `max_pending`.

    Expired nonces are dropped whenever a new one is issued; an expired one still held is refused as
    expired, a forgotten one as unknown.
    """

    def __init__(self, ttl: float = 60.0, max_pending: int = 1024, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        if ttl <= 0 or max_pending < 1:
            raise ValueError("nonce ttl and max_pending must be positive")
        self.ttl, self._max_pending, self._clock = ttl, max_pending, clock
        self._pending: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, nonce: bytes, owner: str) -> None:
        now = self._clock()
        with self._lock:
            for old, (deadline, _) in list(self._pending.items()):
                if deadline < now:
                    del self._pending[old]
            while len(self._pending) >= self._max_pending:
                self._pending.popitem(last=False)
            self._pending[nonce] = (now + self.ttl, owner)

    def consume(self, nonce: bytes, owner: str) -> None:
        with self._lock:
            entry = self._pending.pop(nonce, None)
        if entry is None:
            raise NonceError("nonce is unknown or was already used")
        deadline, issued_to = entry
        if self._clock() > deadline:
            raise NonceError("nonce expired before the request arrived")
        if issued_to != owner:
            raise NonceError("nonce was issued to another worker")

    def close(self) -> None:
        """Nothing to release: the nonces are this process's memory."""
        return None


class KeyBroker:
    """Holds the model key and releases it, wrapped, to workers whose fresh evidence the policy trusts.

    Parameters
    ----------
    policy : the operator's `Policy`; its verifiers and requirements decide.
    model_key : the 32-byte key (``VEIL_MODEL_KEY``) to release.
    context : bound into the report data and the wrapping; names this deployment.
    nonce_ttl : seconds a challenge stays usable (for the default in-memory store).
    max_pending : challenges remembered at once by the default store; past it the oldest is forgotten
        (and then refused).
    clock : monotonic seconds, for the default store's nonce lifetimes (tests pass a fake one).
    nonces : where nonces live instead of this process's memory (`veil serve --queue` shares them in
        Redis, so any front end can answer a challenge another one issued, still only once).
    """

    def __init__(self, policy: Policy, model_key: bytes, *, context: bytes = DEFAULT_CONTEXT,
                 nonce_ttl: float = 60.0, max_pending: int = 1024, clock: Callable[[], float] = time.monotonic,
                 counter: RefusalCounter | None = None, nonces: NonceStore | None = None) -> None:
        if len(model_key) != 32:
            raise ValueError("the model key must be 32 bytes")
        if not 0 < len(context) <= MAX_CONTEXT_BYTES or nonce_ttl <= 0 or max_pending < 1:
            raise ValueError("context must be 1..256 bytes, nonce_ttl and max_pending positive")
        self.policy, self.context = policy, context
        self.nonces = nonces or MemoryNonceStore(nonce_ttl, max_pending, clock)
        self.nonce_ttl = self.nonces.ttl
        self.counter = counter or RefusalCounter()
        self._key = model_key

    def challenge(self, owner: str = "") -> Challenge:
        """Step 1: a fresh single-use nonce, usable only by `owner`."""
        nonce = os.urandom(NONCE_BYTES)
        self.nonces.issue(nonce, owner)
        return Challenge(nonce=nonce, context=self.context, expires_in=self.nonce_ttl)

    def release(self, request: KeyRequest, *, owner: str = "", at: datetime | None = None) -> KeyGrant:
        """Step 3: verify and wrap, or raise (and count and log) the refusal.

        `owner` is who sends the request (it must be who asked for the nonce); `at` is the
        certificate-validity time handed to the verifier (default: now); nonce lifetimes always follow
        the store's own clock.
        """
        platform = request.evidence.platform if request.evidence is not None else "none"
        try:
            claims = self._check(request, owner, at)
            wrapped = self._wrap(request)
        except AttestationError as exc:
            self.refused(platform, exc)
            raise
        self.counter.grant(platform)
        log.info("key released: platform=%s measurement=%s owner=%s", platform, claims.measurement.hex(), owner)
        return KeyGrant(nonce=request.nonce, wrapped_key=wrapped)

    def refused(self, platform: str, exc: AttestationError) -> None:
        """Count and log one refusal (also for requests refused before they reach `release`).

        The platform is the requester's word: it is counted under its own name only when the policy
        names it (or it is ``none``, no evidence), else as ``other``, so a caller cannot add a counter
        per invented name (unbounded memory and /metrics output)."""
        label = platform if platform == "none" or platform in self.policy.platforms else OTHER_PLATFORM
        self.counter.refuse(label, type(exc).__name__)
        log.warning("key release refused: platform=%s reason=%s detail=%s", label, type(exc).__name__, exc)

    def _wrap(self, request: KeyRequest) -> bytes:
        try:
            return SUITE.encrypt(self._key, X25519PublicKey.from_public_bytes(request.public_key),
                                 info=_info(request.nonce, self.context, request.evidence))
        except ValueError as exc:  # a low-order X25519 point: no shared secret exists
            raise KeyReleaseError(f"cannot wrap to the worker's public key: {exc}") from None

    def _check(self, request: KeyRequest, owner: str, at: datetime | None) -> Claims:
        self.nonces.consume(request.nonce, owner)
        if request.evidence is None:
            raise NoEvidenceError("key request carries no evidence: the worker did not attest")
        if len(request.public_key) != X25519_BYTES:
            raise EvidenceFormatError("worker public key must be 32 bytes (X25519)")
        claims = self.policy.verify(request.evidence, at=at)
        check_binding(claims, key_release_report_data(request.nonce, request.public_key, self.context),
                      "this nonce, worker key and context")
        return claims


class KeyRequester:
    """The worker's side: an ephemeral X25519 key made for one challenge, and the unwrapping (steps 2, 4)."""

    def __init__(self, challenge: Challenge) -> None:
        self.challenge = challenge
        self._private = X25519PrivateKey.generate()
        self.public_key = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._evidence: Evidence | None = None

    @property
    def report_data(self) -> bytes:
        """The 64 bytes to put into the evidence's report data (`veil.tee.binding`)."""
        return key_release_report_data(self.challenge.nonce, self.public_key, self.challenge.context)

    def request(self, evidence: Evidence | None) -> KeyRequest:
        self._evidence = evidence
        return KeyRequest(nonce=self.challenge.nonce, public_key=self.public_key, evidence=evidence)

    def unwrap(self, grant: KeyGrant) -> bytes:
        if self._evidence is None or grant.nonce != self.challenge.nonce:
            raise KeyReleaseError("grant does not answer this requester's request")
        try:
            key = SUITE.decrypt(grant.wrapped_key, self._private,
                                info=_info(self.challenge.nonce, self.challenge.context, self._evidence))
        except (InvalidTag, ValueError) as exc:
            raise KeyReleaseError(f"wrapped key does not open under this worker's key ({type(exc).__name__})") \
                from None
        if len(key) != 32:
            raise KeyReleaseError("released key is not 32 bytes")
        return key
