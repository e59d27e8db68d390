"""The `local` serving backend: registries in SQLite, predictions in this process's threads.

`SQLiteStore` keeps the registries in `<data_dir>/registry.sqlite3` and each model version's two
sealed artefacts as files in `<data_dir>/models/`; `LocalExecutor` evaluates off the event loop in
the server's thread pool. One machine, any number of `veil serve` processes on the same data
directory (writes are SQLite transactions). The default of `veil serve` (``--backend local``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from veil.serve.backends.base import (
    MAX_VERSION,
    KeyQuota,
    KeyRecord,
    ModelRecord,
    check_key_conflict,
    check_version,
    last_version_error,
    legacy_key_id,
    new_key_id_secret,
)
from veil.serve.errors import ConflictError

if TYPE_CHECKING:
    from veil.serve.auth import Principal
    from veil.serve.server import ServerConfig
    from veil.serve.service import Service


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

    def close(self) -> None:
        """Nothing to release here: each thread's SQLite connection belongs to that thread (SQLite
        refuses to close it from another) and is closed with it."""
        return None


class LocalExecutor:
    """`Executor` evaluating in this process, off the event loop (`Service.predict` in a thread)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def predict(self, principal: Principal, name: str, version: int | None, key_id: str,
                      payload: bytes) -> tuple[int, bytes]:
        """Authorise and evaluate in the server's thread pool."""
        return await run_in_threadpool(self.service.predict, principal, name, version, key_id, payload)

    def check(self) -> None:
        """Always ready: evaluation needs nothing beyond this process."""
        return None

    async def aclose(self) -> None:
        """Nothing to release: the threads are the server's own pool."""
        return None


class LocalBackend:
    """`Backend` of one machine: `SQLiteStore` in the data directory, `LocalExecutor`, nonces in memory."""

    name = "local"

    def store(self, config: ServerConfig) -> SQLiteStore:
        """The registries in `config.data_dir`."""
        return SQLiteStore(config.data_dir)

    def executor(self, config: ServerConfig, service: Service) -> LocalExecutor:
        """Predictions in this process."""
        return LocalExecutor(service)

    def nonce_store(self, config: ServerConfig) -> None:
        """A single front end keeps its key-release nonces in memory (`veil.tee.KeyBroker`'s default)."""
        return None


BACKEND = LocalBackend()
