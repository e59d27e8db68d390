"""Key and model registries. `SQLiteStore` keeps them in a data directory (models as encrypted
files); `veil.serve.redis_backend.RedisStore` shares them across machines. Both implement `Store`.
Stores hold bytes only: encryption and parsing happen in `veil.serve.service`.

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
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from veil.he.keys import key_id as legacy_key_id
from veil.serve.errors import ConflictError, QuotaExceededError, ServeError

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
    return secrets.token_bytes(32)


def check_version(version: int) -> int:
    """A stored version is an integer in [1, MAX_VERSION] (callers validate earlier; this is the last line)."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ServeError(f"version must be an integer in [1, {MAX_VERSION}]")
    return version


def last_version_error(name: str) -> ConflictError:
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
    """What the service needs from a registry backend."""

    def ping(self) -> None: ...

    def key_id_secret(self) -> bytes: ...

    def put_key(self, record: KeyRecord, quota: KeyQuota | None = None) -> KeyRecord: ...

    def get_key(self, key_id: str) -> KeyRecord | None: ...

    def key_owner(self, key_id: str) -> str | None: ...

    def delete_key(self, key_id: str, owner: str) -> bool: ...

    def reserve_version(self, name: str) -> int: ...

    def resolve_version(self, name: str, version: int | None = None) -> int | None: ...

    def put_model(self, name: str, version: int | None, meta: dict, server_blob: bytes,
                  client_blob: bytes) -> ModelRecord: ...

    def get_model(self, name: str, version: int | None = None) -> ModelRecord | None: ...

    def list_models(self) -> list[ModelRecord]: ...


def check_key_conflict(existing: KeyRecord | None, record: KeyRecord) -> KeyRecord | None:
    """The record already stored under `record`'s id, which must be its owner's. Scoped ids never
    collide between principals; a store caller that chose an id itself is refused (409) rather than
    handed another principal's key."""
    if existing is not None and existing.owner != record.owner:
        raise ConflictError("this key id is taken")
    return existing


class SQLiteStore:
    """Registries in `<data_dir>/registry.sqlite3`; model artefacts in `<data_dir>/models/`."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        (self.data_dir / "models").mkdir(parents=True, exist_ok=True)
        self._path = self.data_dir / "registry.sqlite3"
        self._local = threading.local()
        self._lock = threading.Lock()
        with self._conn() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("""CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, owner TEXT NOT NULL,
                          params TEXT NOT NULL, rotation_steps TEXT NOT NULL, created REAL NOT NULL,
                          bundle BLOB NOT NULL)""")
            db.execute("""CREATE TABLE IF NOT EXISTS models (name TEXT NOT NULL, version INTEGER NOT NULL,
                          created REAL NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (name, version))""")
            db.execute("CREATE INDEX IF NOT EXISTS keys_owner ON keys (owner)")
            db.execute("""CREATE TABLE IF NOT EXISTS reserved_versions (name TEXT PRIMARY KEY,
                          last INTEGER NOT NULL)""")
            db.execute("CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
            db.execute("INSERT OR IGNORE INTO settings VALUES ('key_id_secret', ?)", (new_key_id_secret(),))
            self._secret = bytes(db.execute("SELECT value FROM settings WHERE name = 'key_id_secret'").fetchone()[0])

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=30)
            self._local.conn = conn
        return conn

    def ping(self) -> None:
        self._conn().execute("SELECT 1").fetchone()

    def key_id_secret(self) -> bytes:
        """The secret of `scoped_key_id`, made once with the database."""
        return self._secret

    def put_key(self, record: KeyRecord, quota: KeyQuota | None = None) -> KeyRecord:
        """Insert unless the owner already holds this bundle (under this id or its legacy one), within
        the owner's quota: lookup, count and insert are one write transaction (BEGIN IMMEDIATE), so
        parallel registrations, from any number of threads or processes, never overshoot it."""
        with self._lock, self._conn() as db:
            db.execute("BEGIN IMMEDIATE")
            existing = check_key_conflict(self.get_key(record.key_id), record)
            legacy = legacy_key_id(record.bundle)
            if existing is None and self.key_owner(legacy) == record.owner:
                existing = self.get_key(legacy)
            if existing is not None:
                return existing
            if quota is not None:
                count, used = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(bundle)), 0) FROM keys "
                                         "WHERE owner = ?", (record.owner,)).fetchone()
                quota.check(count, used, len(record.bundle))
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?)",
                       (record.key_id, record.owner, record.params, json.dumps(list(record.rotation_steps)),
                        record.created, record.bundle))
        return record

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._conn().execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            return None
        return KeyRecord(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4], bytes(row[5]))

    def key_owner(self, key_id: str) -> str | None:
        """The owner of a registered bundle, without reading the bundle."""
        row = self._conn().execute("SELECT owner FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else row[0]

    def delete_key(self, key_id: str, owner: str) -> bool:
        """Delete `owner`'s bundle `key_id`; False if there is no such bundle of theirs."""
        with self._lock, self._conn() as db:
            return db.execute("DELETE FROM keys WHERE key_id = ? AND owner = ?", (key_id, owner)).rowcount > 0

    def reserve_version(self, name: str) -> int:
        """The next unused version of `name`, never handed out twice (so it can be sealed into the
        artefacts' associated data before they are stored)."""
        with self._lock, self._conn() as db:
            latest = db.execute("SELECT MAX(version) FROM models WHERE name = ?", (name,)).fetchone()[0] or 0
            row = db.execute("SELECT last FROM reserved_versions WHERE name = ?", (name,)).fetchone()
            version = max(latest, row[0] if row else 0) + 1
            if version > MAX_VERSION:
                raise last_version_error(name)
            db.execute("INSERT OR REPLACE INTO reserved_versions VALUES (?, ?)", (name, version))
        return version

    def resolve_version(self, name: str, version: int | None = None) -> int | None:
        """The version a request for (name, version) would use, without reading the artefacts."""
        db = self._conn()
        if version is None:
            return db.execute("SELECT MAX(version) FROM models WHERE name = ?", (name,)).fetchone()[0]
        row = db.execute("SELECT version FROM models WHERE name = ? AND version = ?", (name, version)).fetchone()
        return None if row is None else row[0]

    def _files(self, name: str, version: int) -> tuple[Path, Path]:
        base = self.data_dir / "models" / name
        return base / f"{version}.server.enc", base / f"{version}.client.enc"

    def put_model(self, name: str, version: int | None, meta: dict, server_blob: bytes,
                  client_blob: bytes) -> ModelRecord:
        with self._lock, self._conn() as db:
            latest = db.execute("SELECT MAX(version) FROM models WHERE name = ?", (name,)).fetchone()[0]
            if version is None:
                version = (latest or 0) + 1
                if version > MAX_VERSION:
                    raise last_version_error(name)
            elif db.execute("SELECT 1 FROM models WHERE name = ? AND version = ?",
                            (name, check_version(version))).fetchone():
                raise ConflictError(f"model {name!r} version {version} already exists")
            created = time.time()
            # The row first, the files second: a failure anywhere rolls the row back, and files are
            # only written for a version the database accepted (no orphans from a refused version).
            db.execute("INSERT INTO models VALUES (?, ?, ?, ?)", (name, version, created, json.dumps(meta)))
            server_file, client_file = self._files(name, version)
            server_file.parent.mkdir(parents=True, exist_ok=True)
            for path, blob in ((server_file, server_blob), (client_file, client_blob)):
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(blob)
                tmp.replace(path)
        return ModelRecord(name, version, created, meta, server_blob, client_blob)

    def get_model(self, name: str, version: int | None = None) -> ModelRecord | None:
        db = self._conn()
        if version is None:
            row = db.execute("SELECT * FROM models WHERE name = ? ORDER BY version DESC LIMIT 1",
                             (name,)).fetchone()
        else:
            row = db.execute("SELECT * FROM models WHERE name = ? AND version = ?",
                             (name, version)).fetchone()
        if row is None:
            return None
        server_file, client_file = self._files(row[0], row[1])
        try:
            server_blob, client_blob = server_file.read_bytes(), client_file.read_bytes()
        except FileNotFoundError:
            server_blob = client_blob = b""
        return ModelRecord(row[0], row[1], row[2], json.loads(row[3]), server_blob, client_blob)

    def list_models(self) -> list[ModelRecord]:
        rows = self._conn().execute("SELECT * FROM models ORDER BY name, version").fetchall()
        return [ModelRecord(r[0], r[1], r[2], json.loads(r[3])) for r in rows]
