"""Configuration and start-up of the HTTP server (uvicorn), with TLS and optional mutual TLS."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.net import free_port
from veil.serve.app import DEFAULT_MAX_BODY, Executor, LocalExecutor, create_app
from veil.serve.auth import TokenStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.registry import KeyQuota, SQLiteStore, Store
from veil.serve.service import DEFAULT_KEY_QUOTA, Service

log = logging.getLogger("veil.serve")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line; extra fields are included (never bodies, keys or ciphertexts)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger("veil")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


@dataclass
class ServerConfig:
    """Everything `veil serve` and `veil worker` take; defaults bind to loopback only."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "veil-data"
    tokens_file: str | None = None
    model_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    queue: str | None = None
    queue_timeout: float = 120.0
    log_level: str = "info"
    insecure: bool = False
    """Allow plain HTTP on a non-loopback address (behind a TLS-terminating proxy, say)."""
    protect_metrics: bool = False
    protect_docs: bool = False
    max_keys: int | None = DEFAULT_KEY_QUOTA.max_keys
    """Default number of key bundles one principal may store (a token row may set its own)."""
    max_key_bytes: int | None = DEFAULT_KEY_QUOTA.max_bytes

    @property
    def tokens_path(self) -> Path:
        return Path(self.tokens_file) if self.tokens_file else Path(self.data_dir) / "tokens.json"


def load_cipher(config: ServerConfig) -> ArtefactCipher:
    """Model key from VEIL_MODEL_KEY, VEIL_MODEL_KEY_FILE or --model-key-file; otherwise a key is
    created once in the data directory (mode 0600) and a warning says to keep it elsewhere."""
    if config.model_key_file:
        return ArtefactCipher.from_file(config.model_key_file)
    cipher = ArtefactCipher.from_env()
    if cipher is not None:
        return cipher
    path = Path(config.data_dir) / "model.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(ArtefactCipher.generate_key().hex())
        log.warning("created a model key beside the data; set VEIL_MODEL_KEY(_FILE) to keep it apart",
                    extra={"path": str(path)})
    return ArtefactCipher.from_file(path)


def build(config: ServerConfig) -> tuple[Any, Service]:
    """The ASGI app and its service for a configuration (SQLite, or Redis with --queue)."""
    cipher = load_cipher(config)
    quota = KeyQuota(config.max_keys, config.max_key_bytes)
    store: Store
    executor: Executor | None
    if config.queue:
        from veil.serve.redis_backend import RedisExecutor, RedisStore

        store = RedisStore(config.queue)
        check_redis_persistence(store.client)
        service = Service(store, cipher, key_quota=quota)
        executor = RedisExecutor(config.queue, service, timeout=config.queue_timeout)
    else:
        store = SQLiteStore(config.data_dir)
        service = Service(store, cipher, key_quota=quota)
        executor = LocalExecutor(service)
    tokens = TokenStore.load(config.tokens_path)
    if not len(tokens):
        log.warning("no tokens configured: every request will be refused until `veil token add` writes "
                    "one (the tokens file is followed while the server runs)",
                    extra={"path": str(config.tokens_path)})
    app = create_app(service, tokens, executor, config.max_body, protect_metrics=config.protect_metrics,
                     protect_docs=config.protect_docs)
    return app, service


def check_redis_persistence(client: Any) -> bool:
    """Warn at start-up when Redis would lose the registries on restart (no AOF, no RDB snapshots):
    models and keys live only in Redis in cluster mode. True if some persistence is on."""
    import redis

    try:
        aof = client.config_get("appendonly").get("appendonly", "")
        save = client.config_get("save").get("save", "")
    except redis.RedisError as exc:  # CONFIG renamed or forbidden by an ACL, or Redis not up yet
        log.warning("cannot read Redis persistence settings; make sure appendonly or "
                    "save is on, or every model and key is lost when Redis restarts",
                    extra={"error": str(exc)[:200]})
        return False
    if aof != "yes" and not save.strip():
        log.warning("Redis has no persistence (appendonly no, save \"\"): a Redis restart loses every "
                    "deployed model and registered key, and clients get 404 until they are redeployed; "
                    "set appendonly yes (see README, Serving)", extra={"appendonly": aof, "save": save})
        return False
    if aof != "yes":
        log.warning("Redis persists by RDB snapshots only: models and keys written since the last snapshot "
                    "are lost if Redis stops; appendonly yes is safer", extra={"save": save})
    return True


def is_loopback(host: str) -> bool:
    """True if every address `host` names is a loopback address (127/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_transport(config: ServerConfig) -> None:
    """Refuse to serve plain HTTP beyond loopback: bearer tokens and key ids would cross the network
    in clear. `--insecure` overrides (e.g. a TLS-terminating proxy on the same host)."""
    if config.tls_cert or config.insecure or is_loopback(config.host):
        return
    raise ValueError(f"refusing to serve plain HTTP on {config.host}: give --tls-cert/--tls-key, bind a "
                     "loopback address, or pass --insecure if TLS is terminated in front of this server")


def ssl_options(config: ServerConfig) -> dict[str, Any]:
    if not config.tls_cert:
        if config.tls_key or config.tls_client_ca:
            raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
        return {}
    opts: dict[str, Any] = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
    if config.tls_client_ca:
        opts.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return opts


@contextlib.contextmanager
def serve_in_background(config: ServerConfig, timeout: float = 20.0) -> Iterator[str]:
    """Serve `config` from a thread on a free loopback port; yields the base URL, stops on exit."""
    import uvicorn

    config.host, config.port = "127.0.0.1", free_port()
    app, _ = build(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                                           access_log=False, ws="none", **ssl_options(config)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the background server did not start")
        time.sleep(0.02)
    scheme = "https" if config.tls_cert else "http"
    try:
        yield f"{scheme}://{config.host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def serve(config: ServerConfig) -> None:
    """Run until interrupted."""
    import uvicorn

    configure_logging(config.log_level)
    check_transport(config)
    app, _ = build(config)
    if not config.tls_cert and not is_loopback(config.host):
        log.warning("serving plain HTTP beyond loopback (--insecure)", extra={"host": config.host})
    log.info("starting", extra={"host": config.host, "port": config.port, "tls": bool(config.tls_cert),
                                "mtls": bool(config.tls_client_ca), "queue": bool(config.queue)})
    uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=False, ws="none",
                **ssl_options(config))
