"""Serving backends: where the registries live and where predictions run, chosen by name.

The seam is `veil.serve.backends.base`: a `Store` (key and model registries, bytes only), an
`Executor` (runs an authorised prediction) and a `Backend` that makes both from a
`veil.serve.server.ServerConfig`. Everything else of serving (the HTTP app, authentication, the
`Service` that seals artefacts and checks requests, the client) is shared by every backend.

| name | store | executor |
|---|---|---|
| ``local`` | `SQLiteStore`: SQLite and files in ``--data-dir`` | `LocalExecutor`: this process's threads |
| ``redis`` | `RedisStore`: Redis at ``--queue URL`` | `RedisExecutor`: a Redis stream for `veil worker` |

`veil serve --backend NAME` picks one (`backend_for`: ``--queue URL`` alone means ``redis``,
neither means ``local``). A new backend is a module in this package with a class answering `Backend`, an
instance of it named ``BACKEND``, and one line in `BACKENDS`; its store must pass the registry
tests the other two pass (atomic quotas and versions under concurrency).

Only the chosen backend's module is imported (so `veil serve` on SQLite does not load the Redis
client, and this package is light enough for the command line to read `BACKENDS`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from veil.serve.backends.base import Backend
    from veil.serve.server import ServerConfig

BACKENDS: dict[str, str] = {"local": "veil.serve.backends.local", "redis": "veil.serve.backends.redis"}
"""Backend name -> the module defining its ``BACKEND``."""


def backend(name: str) -> Backend:
    """The backend registered as `name` (a key of `BACKENDS`); ValueError for any other name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown serving backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    return import_module(BACKENDS[name]).BACKEND


def backend_for(config: ServerConfig) -> Backend:
    """The backend `config` asks for: `config.backend`, else ``redis`` if a queue URL is given, else
    ``local``. A queue URL with the local backend is refused rather than silently ignored."""
    name = config.backend or ("redis" if config.queue else "local")
    if name == "local" and config.queue:
        raise ValueError("--queue is the Redis URL of the redis backend; drop it or use --backend redis")
    return backend(name)
