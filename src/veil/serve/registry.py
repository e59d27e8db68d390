"""Key and model registries. `SQLiteStore` keeps them in a data directory (models as encrypted
files); `veil.serve.redis_backend.RedisStore` shares them across machines. Both implement `Store`.
Stores hold bytes only: encryption and parsing happen in `veil.serve.service`."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from veil.serve.errors import ConflictError


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

    def put_key(self, record: KeyRecord) -> KeyRecord: ...

    def get_key(self, key_id: str) -> KeyRecord | None: ...

    def put_model(self, name: str, version: int | None, meta: dict, server_blob: bytes,
                  client_blob: bytes) -> ModelRecord: ...

    def get_model(self, name: str, version: int | None = None) -> ModelRecord | None: ...

    def list_models(self) -> list[ModelRecord]: ...


def check_key_conflict(existing: KeyRecord | None, record: KeyRecord) -> KeyRecord | None:
    """Registering the same bundle twice is idempotent for its owner and refused for anyone else."""
    if existing is None:
        return None
    if existing.owner != record.owner:
        raise ConflictError("this key bundle is already registered by another principal")
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

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=30)
            self._local.conn = conn
        return conn

    def ping(self) -> None:
        self._conn().execute("SELECT 1").fetchone()

    def put_key(self, record: KeyRecord) -> KeyRecord:
        with self._lock, self._conn() as db:
            existing = check_key_conflict(self.get_key(record.key_id), record)
            if existing is not None:
                return existing
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?)",
                       (record.key_id, record.owner, record.params, json.dumps(list(record.rotation_steps)),
                        record.created, record.bundle))
        return record

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._conn().execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            return None
        return KeyRecord(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4], bytes(row[5]))

    def _files(self, name: str, version: int) -> tuple[Path, Path]:
        base = self.data_dir / "models" / name
        return base / f"{version}.server.enc", base / f"{version}.client.enc"

    def put_model(self, name: str, version: int | None, meta: dict, server_blob: bytes,
                  client_blob: bytes) -> ModelRecord:
        with self._lock, self._conn() as db:
            latest = db.execute("SELECT MAX(version) FROM models WHERE name = ?", (name,)).fetchone()[0]
            if version is None:
                version = (latest or 0) + 1
            elif db.execute("SELECT 1 FROM models WHERE name = ? AND version = ?",
                            (name, version)).fetchone():
                raise ConflictError(f"model {name!r} version {version} already exists")
            server_file, client_file = self._files(name, version)
            server_file.parent.mkdir(parents=True, exist_ok=True)
            for path, blob in ((server_file, server_blob), (client_file, client_blob)):
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(blob)
                tmp.replace(path)
            created = time.time()
            db.execute("INSERT INTO models VALUES (?, ?, ?, ?)", (name, version, created, json.dumps(meta)))
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
