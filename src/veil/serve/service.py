"""The serving logic shared by the HTTP front end and the queue workers: key registration,
deployment, and prediction on ciphertexts, with artefacts encrypted at rest."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any

from veil.errors import VeilError, WireFormatError
from veil.he import PublicBundle
from veil.names import NAME_RULE, is_name
from veil.program import describe
from veil.program.artefact import ModelClient, ModelServer
from veil.serve.auth import Principal
from veil.serve.backends.base import MAX_VERSION, KeyQuota, KeyRecord, ModelRecord, Store, scoped_key_id
from veil.serve.crypto import ArtefactCipher
from veil.serve.errors import ConflictError, ForbiddenError, IntegrityError, NotFoundError, ServeError

KEY_ID_PATTERN = r"^[0-9a-f]{32}$"
DEFAULT_KEY_QUOTA = KeyQuota(max_keys=64, max_bytes=256 * 1024 * 1024)
RESERVE_ATTEMPTS = 5


def check_name(name: str) -> str:
    """Model names become file names and URL path segments (`veil.names`)."""
    if not is_name(name):
        raise ServeError(f"invalid model name {name!r}: use {NAME_RULE}")
    return name


def _identity(name: str, version: int, kind: str, digest: str) -> str:
    """AES-GCM associated data of an artefact: a file only opens as the exact (name, version, kind,
    content) it was sealed as, so neither a copy under another name nor an older version's file put
    in a newer version's place (a rollback, even with the registry edited to match) authenticates."""
    return f"veil-model:{name}:{version}:{kind}:{digest}"


def _describe(model: ModelServer, spec: ModelClient) -> dict[str, Any]:
    """The public description of a deployment, after checking that its two halves describe the
    same program (`veil.program.describe`): a client built from a mismatched client.json could
    only fail later, on every request."""
    try:
        described = describe(model.circuit, spec.circuit)
    except WireFormatError as exc:
        raise ServeError(str(exc)) from None
    return {"model": model.model, **described}


def _not_deployed(name: str, version: int | None) -> NotFoundError:
    """The 404 of a model, or a version of it, that is not deployed."""
    if version is None:
        return NotFoundError(f"model {name!r} is not deployed")
    return NotFoundError(f"model {name!r} has no version {version} deployed")


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def pop_key(self, key: Any) -> None:
        with self.lock:
            self.pop(key, None)

    def get_or(self, key: Any, make: Any) -> Any:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            while len(self) > self.size:
                self.popitem(last=False)
        return value


class Service:
    """Registries plus caches of parsed bundles and models; safe to share between threads."""

    def __init__(self, store: Store, cipher: ArtefactCipher, cache_size: int = 64,
                 key_quota: KeyQuota = DEFAULT_KEY_QUOTA) -> None:
        self.store = store
        self.cipher = cipher
        self.key_quota = key_quota
        self._bundles = _LRU(cache_size)
        self._models = _LRU(cache_size)
        self._keys = _LRU(cache_size)

    def quota_for(self, principal: Principal) -> KeyQuota:
        """The principal's own quota from the tokens file where set, else the server's default."""
        return KeyQuota(self.key_quota.max_keys if principal.max_keys is None else principal.max_keys,
                        self.key_quota.max_bytes if principal.max_key_bytes is None else principal.max_key_bytes)

    def register_key(self, principal: Principal, data: bytes) -> KeyRecord:
        """Validate a public bundle (a secret key is refused) and store it under the principal's own
        key id for it (`veil.serve.backends.base.scoped_key_id`), within the principal's quota of stored
        bundles. Registering the same bundle again returns the same record; nothing here depends on
        what other principals registered. Commits only if the token is still valid."""
        principal.require("client")
        bundle = PublicBundle.from_bytes(data)
        record = KeyRecord(scoped_key_id(self.store.key_id_secret(), principal.name, data), principal.name,
                           bundle.params.fingerprint, bundle.rotation_steps, time.time(), data)
        with principal.committing():
            return self.store.put_key(record, self.quota_for(principal))

    def _owner(self, principal: Principal, key_id: str) -> str:
        """The owner of `key_id` if `principal` may know the key exists, else the 404 of an unknown id.

        The one rule for a key id that is not the caller's: a client gets exactly the answer of an
        id that was never registered (same status, same detail, one owner lookup either way), so no
        response tells one client about another principal's keys. An admin, who may read any key's
        description, is told (403) when it tries to use or delete one that is not its own."""
        owner = self.store.key_owner(key_id)
        if owner is None or (owner != principal.name and principal.role != "admin"):
            raise NotFoundError(f"unknown key id {key_id!r}: register the public bundle first")
        return owner

    def key(self, principal: Principal, key_id: str) -> KeyRecord:
        """A key's record for its owner or an admin (to read its description, not to use it)."""
        self._owner(principal, key_id)
        record = self.key_record(key_id)
        if record is None:
            raise NotFoundError(f"unknown key id {key_id!r}: register the public bundle first")
        return record

    def delete_key(self, principal: Principal, key_id: str) -> None:
        """Delete a bundle; only its owner may (it frees their quota). Caches forget it at once.
        Commits only if the token is still valid."""
        if self._owner(principal, key_id) != principal.name:
            raise ForbiddenError("only the principal who registered a key can delete it")
        with principal.committing():
            self.store.delete_key(key_id, principal.name)
        self._keys.pop_key(key_id)
        self._bundles.pop_key(key_id)

    def authorise(self, principal: Principal, name: str, version: int | None, key_id: str) -> int:
        """Check a prediction may run, reading only owners and version numbers (bundles and artefacts
        can be megabytes): the caller owns the key (an admin too: admins deploy, they do not borrow
        keys) and the model version exists. Returns the version to evaluate."""
        principal.require("client")
        check_name(name)
        if self._owner(principal, key_id) != principal.name:
            raise ForbiddenError("this key id belongs to another principal")
        resolved = self.store.resolve_version(name, version)
        if resolved is None:
            raise _not_deployed(name, version)
        return resolved

    def key_record(self, key_id: str) -> KeyRecord | None:
        """A registered key, cached: an id names one owner's one bundle, so a record never changes. A
        deleted key may linger in another process's cache, which is why `authorise` reads owners uncached."""
        record = self._keys.get(key_id)
        if record is None:
            record = self.store.get_key(key_id)
            if record is not None:
                self._keys.get_or(key_id, lambda: record)
        return record

    def bundle(self, record: KeyRecord) -> PublicBundle:
        return self._bundles.get_or(record.key_id, lambda: PublicBundle.from_bytes(record.bundle))

    def deploy(self, principal: Principal, name: str, server: dict, client: dict,
               version: int | None = None) -> ModelRecord:
        """Check both artefacts parse and agree, then store them encrypted and sealed to their version
        (committed only if the token is still valid)."""
        principal.require("admin")
        check_name(name)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or not 1 <= version <= MAX_VERSION):
            raise ServeError(f"version must be an integer in [1, {MAX_VERSION}]")
        try:
            model = ModelServer.from_dict(server)
            spec = ModelClient.from_dict(client)
            meta = _describe(model, spec)
        except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError, RuntimeError,
                VeilError) as exc:
            if isinstance(exc, ServeError):
                raise
            raise ServeError(f"invalid model artefact: {type(exc).__name__}: {exc}"[:500]) from None
        server_bytes = json.dumps(server).encode()
        client_bytes = json.dumps(client).encode()
        meta.update({"deployed_by": principal.name,
                     "server_sha256": hashlib.sha256(server_bytes).hexdigest(),
                     "client_sha256": hashlib.sha256(client_bytes).hexdigest()})
        for attempt in range(RESERVE_ATTEMPTS):
            number = version if version is not None else self.store.reserve_version(name)
            server_blob = self.cipher.encrypt(server_bytes, _identity(name, number, "server", meta["server_sha256"]))
            client_blob = self.cipher.encrypt(client_bytes, _identity(name, number, "client", meta["client_sha256"]))
            try:
                with principal.committing():
                    return self.store.put_model(name, number, meta, server_blob, client_blob)
            except ConflictError:  # an explicit deploy took the reserved number: reserve another
                if version is not None or attempt == RESERVE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def record(self, name: str, version: int | None = None) -> ModelRecord:
        check_name(name)
        record = self.store.get_model(name, version)
        if record is None:
            raise _not_deployed(name, version)
        return record

    def _open(self, record: ModelRecord, kind: str) -> bytes:
        blob = record.server_blob if kind == "server" else record.client_blob
        digest = record.meta[f"{kind}_sha256"]
        data = self.cipher.decrypt(blob, _identity(record.name, record.version, kind, digest))
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"model {record.name!r} {kind} artefact does not match its registry entry")
        return data

    def model(self, record: ModelRecord) -> ModelServer:
        """The parsed server model; re-checked whenever the stored bytes change."""
        blob_digest = hashlib.sha256(record.server_blob).digest()
        key = (record.name, record.version, blob_digest)
        return self._models.get_or(
            key, lambda: ModelServer.from_dict(json.loads(self._open(record, "server"))))

    def client_spec(self, record: ModelRecord) -> dict:
        return json.loads(self._open(record, "client"))

    def predict(self, principal: Principal, name: str, version: int | None, key_id: str,
                payload: bytes) -> tuple[int, bytes]:
        """Authorise, then evaluate the model on the ciphertexts; returns (version, response)."""
        resolved = self.authorise(principal, name, version, key_id)
        key = self.key_record(key_id)
        if key is None:
            raise NotFoundError(f"unknown key id {key_id!r}: register the public bundle first")
        return resolved, self.evaluate(self.record(name, resolved), key, payload)

    def evaluate(self, record: ModelRecord, key: KeyRecord, payload: bytes) -> bytes:
        """The computation alone (workers call this after the front end has authorised)."""
        model = self.model(record)
        try:
            return model.run(payload, self.bundle(key))
        except VeilError:
            raise
        except (RuntimeError, ValueError, TypeError, ArithmeticError) as exc:
            raise ServeError(f"cannot evaluate these ciphertexts: {exc}") from None
