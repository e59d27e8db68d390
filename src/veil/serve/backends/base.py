"""The serving backend seam: what a backend provides, and the records its store holds.

A serving backend is two parts, chosen together by name (`veil.serve.backends.BACKENDS`):

* a `Store`: the key and model registries. It holds bytes only; encryption at rest, parsing and
  authorisation happen in `veil.serve.service.Service`, which every backend shares;
* an `Executor`: where an authorised prediction runs. The FastAPI routes (`veil.serve.app`) hand
  every prediction to it and never evaluate themselves.

A `Backend` makes both from a `veil.serve.server.ServerConfig` (and, when the front ends of a
cluster must share them, the key-release nonces of `veil.tee.KeyBroker`). `local` keeps the
registries in SQLite and evaluates in this process's threads; `redis` shares the registries in
Redis and queues predictions for `veil worker` processes.

Key ids belong to one principal: `scoped_key_id` is an HMAC, under a random secret the registry
makes once (`Store.key_id_secret`), of the owner's name and the bundle's digest. Two principals
registering the same bundle (a linear model's batch bundle holds parameters only, the same for
everyone) get two ids and two records, and nobody can compute another principal's id. The same
owner registering the same bundle again gets the same id. Keys registered before ids were scoped
kept their content-hash id (`legacy_key_id`); registering such a bundle again by its owner returns
that record rather than storing a second copy.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from veil.he.keys import key_id as legacy_key_id
from veil.serve.errors import ConflictError, QuotaExceededError, ServeError

if TYPE_CHECKING:
    from veil.serve.auth import Principal
    from veil.serve.server import ServerConfig
    from veil.serve.service import Service
    from veil.tee.keyrelease import NonceStore

__all__ = ["MAX_VERSION", "Backend", "Executor", "KeyQuota", "KeyRecord", "ModelRecord", "Store",
           "check_key_conflict", "check_version", "last_version_error", "legacy_key_id", "new_key_id_secret",
           "scoped_key_id"]

MAX_VERSION = 2**31 - 1
"""Highest model version: exact as a Redis sorted-set score and as a Lua number, an SQLite INTEGER,
and a JSON number in every client; a larger `version` is refused at the boundary (422)."""


@dataclass(frozen=True)
class KeyRecord:
    """A registered public bundle and the principal who owns it."""

    key_id: str
    owner: str
    params: str
    rotation_steps: tuple[int, ...]
    created: float
    bundle: bytes = field(repr=False)


@dataclass(frozen=True)
class KeyQuota:
    """How many public bundles, and how many bytes of them, one principal may store (None: no limit)."""

    max_keys: int | None = None
    max_bytes: int | None = None

    def check(self, count: int, used: int, size: int) -> None:
        """Raise `QuotaExceededError` if storing one more bundle of `size` bytes would exceed the quota."""
        if self.max_keys is not None and count + 1 > self.max_keys:
            raise QuotaExceededError(f"key quota reached: {count} of {self.max_keys} bundles stored; "
                                     "delete unused keys (DELETE /v1/keys/{key_id})")
        if self.max_bytes is not None and used + size > self.max_bytes:
            raise QuotaExceededError(f"key storage quota reached: {used} + {size} bytes exceeds {self.max_bytes}; "
                                     "delete unused keys (DELETE /v1/keys/{key_id})")


def scoped_key_id(secret: bytes, owner: str, bundle: bytes) -> str:
    """The key id of `owner`'s bundle: HMAC-SHA256 under the registry's secret, so ids of equal
    bundles differ between principals and cannot be derived without the secret."""
    message = owner.encode() + b"\0" + hashlib.sha256(bundle).digest()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def new_key_id_secret() -> bytes:
    """A fresh secret for `scoped_key_id` (a store makes one, once)."""
    return secrets.token_bytes(32)


def check_version(version: int) -> int:
    """A stored version is an integer in [1, MAX_VERSION] (callers validate earlier; this is the last line)."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ServeError(f"version must be an integer in [1, {MAX_VERSION}]")
    return version


def last_version_error(name: str) -> ConflictError:
    """The 409 of a deploy past `MAX_VERSION`."""
    return ConflictError(f"model {name!r} has reached version {MAX_VERSION}; deploy under a new name")


@dataclass(frozen=True)
class ModelRecord:
    """A deployed model version: metadata plus its two encrypted artefacts."""

    name: str
    version: int
    created: float
    meta: dict
    server_blob: bytes = field(repr=False, default=b"")
    client_blob: bytes = field(repr=False, default=b"")


class Store(Protocol):
    """The key and model registries of a backend: what `veil.serve.service.Service` needs.

    Bytes in, bytes out: model artefacts arrive sealed (AES-256-GCM, `veil.serve.crypto`) and key
    bundles unparsed. A store makes its writes atomic on its own (one transaction, one script), so
    any number of front ends and workers may share it."""

    def ping(self) -> None:
        """Raise if the registry cannot be reached (readiness)."""

    def key_id_secret(self) -> bytes:
        """The secret of `scoped_key_id`, made once and then shared by every user of the store."""

    def put_key(self, record: KeyRecord, quota: KeyQuota | None = None) -> KeyRecord:
        """Store `record` unless its owner already holds this bundle (under its id or its legacy one),
        within `quota`; the record kept is returned."""

    def get_key(self, key_id: str) -> KeyRecord | None:
        """The bundle registered under `key_id`, or None."""

    def key_owner(self, key_id: str) -> str | None:
        """The owner of `key_id`, without reading the (possibly large) bundle."""

    def delete_key(self, key_id: str, owner: str) -> bool:
        """Delete `owner`'s bundle `key_id`; False if there is no such bundle of theirs."""

    def reserve_version(self, name: str) -> int:
        """The next version of `name`, never handed out twice (it is sealed into the artefacts)."""

    def resolve_version(self, name: str, version: int | None = None) -> int | None:
        """The version a request for (name, version) would use (None: the latest), or None."""

    def put_model(self, name: str, version: int | None, meta: dict, server_blob: bytes,
                  client_blob: bytes) -> ModelRecord:
        """Store a model version (the next one if `version` is None); 409 if it exists."""

    def get_model(self, name: str, version: int | None = None) -> ModelRecord | None:
        """A model version with its artefacts (None: the latest), or None."""

    def list_models(self) -> list[ModelRecord]:
        """Every version of every model, without their artefacts."""

    def close(self) -> None:
        """Release the store's connections; the app calls it once, at shutdown."""


def check_key_conflict(existing: KeyRecord | None, record: KeyRecord) -> KeyRecord | None:
    """The record already stored under `record`'s id, which must be its owner's. Scoped ids never
    collide between principals; a store caller that chose an id itself is refused (409) rather than
    handed another principal's key."""
    if existing is not None and existing.owner != record.owner:
        raise ConflictError("this key id is taken")
    return existing


class Executor(Protocol):
    """Where an authorised prediction runs: this process's threads, or a queue of workers.

    `predict` authorises (`Service.authorise`, so a bad request fails with its 4xx before any work is
    queued), evaluates on the ciphertexts and returns (the version used, the response bytes); a
    failure is raised as the `veil.serve.errors` type the HTTP app answers with. The app closes its
    executor when it shuts down (`aclose`)."""

    async def predict(self, principal: Principal, name: str, version: int | None, key_id: str,
                      payload: bytes) -> tuple[int, bytes]:
        """(version used, response bytes) of `principal`'s request, or its error."""

    def check(self) -> None:
        """Raise if predictions cannot be run now (readiness: the queue is unreachable)."""

    async def aclose(self) -> None:
        """Release what the executor holds (connections to a queue); the app calls it once, at shutdown."""


class Backend(Protocol):
    """A named serving backend: makes its store and executor from a server's configuration.

    `veil.serve.server.build` asks for the store, builds the `Service` on it (model key, key quota)
    and hands that to `executor`; `nonce_store` is where a key broker keeps its nonces (None: in
    this process's memory, enough for a single front end)."""

    name: str

    def store(self, config: ServerConfig) -> Store:
        """The registries for `config` (a data directory, a Redis URL, ...)."""

    def executor(self, config: ServerConfig, service: Service) -> Executor:
        """The executor running `service`'s predictions."""

    def nonce_store(self, config: ServerConfig) -> NonceStore | None:
        """Key-release nonces shared by the front ends of this backend, or None."""
