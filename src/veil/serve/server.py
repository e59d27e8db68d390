"""Configuration and start-up of the HTTP server (uvicorn), with TLS and optional mutual TLS.

uvicorn always speaks HTTP/1.1 through h11 here (its httptools parser, used whenever that package
happens to be installed, bounds neither a request's line nor its headers), with two bounds that
hold before any request reaches the app, so before a token can be checked: a request head over
`MAX_HEAD_BYTES` is refused (400), and one that does not arrive within `head_timeout` seconds of
the connection opening or of the previous response is cut off: the connection is closed, after a
408 if part of a head had come (`HeadDeadline`: slowloris and idle connections). Bodies are bounded
by `veil.serve.app.Gate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from veil.net import free_port
from veil.program.parallel import tune_allocator
from veil.serve.app import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY, BodyBudget, create_app
from veil.serve.auth import TokenStore, add_token_to_file
from veil.serve.backends import backend_for
from veil.serve.backends.base import KeyQuota
from veil.serve.crypto import ArtefactCipher, key_from_env, key_from_file
from veil.serve.errors import RequestTimeoutError, error_fields
from veil.serve.service import DEFAULT_KEY_QUOTA, Service

log = logging.getLogger("veil.serve")
MAX_HEAD_BYTES = 16 * 1024
"""Largest request line plus headers accepted (h11's incomplete-event limit); a bearer token and the
headers a client sends are far below it."""
DEFAULT_HEAD_TIMEOUT = 20.0
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
    max_buffered: int | None = None
    """Request-body bytes held at once in all (default `BUFFERED_BODIES` times `max_body`); past it, 503."""
    max_buffered_per_token: int | None = None
    """Request-body bytes held at once for one principal (default half of `max_buffered`); past it, 429."""
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    """Seconds a request body may take to arrive after its headers; a slower upload answers 408."""
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    """Seconds a request's line and headers may take to arrive (from the connection opening or the
    previous response); a slower or idle connection gets a 408 and is closed."""
    backend: str | None = None
    """The serving backend by name (`veil.serve.backends.BACKENDS`: ``local``, ``redis``); None
    chooses ``redis`` when `queue` is given, else ``local``."""
    queue: str | None = None
    """Redis URL of the ``redis`` backend (front ends and workers)."""
    queue_timeout: float = 120.0
    """Seconds a front end of the ``redis`` backend waits for a worker's answer (503 past it)."""
    log_level: str = "info"
    insecure: bool = False
    """Allow plain HTTP on a non-loopback address (behind a TLS-terminating proxy, say)."""
    protect_metrics: bool = False
    protect_docs: bool = False
    max_keys: int | None = DEFAULT_KEY_QUOTA.max_keys
    """Default number of key bundles one principal may store (a token row may set its own)."""
    max_key_bytes: int | None = DEFAULT_KEY_QUOTA.max_bytes
    attest_policy: str | None = None
    """Policy file (`veil.tee.load_policy`): this server releases the model key to workers whose
    evidence it accepts (`veil worker --attest`)."""
    attest_verifiers: tuple[str, ...] | list[str] = ()
    """Further verifiers for the policy, as ``PLATFORM=module:factory`` (plug-ins, development)."""
    attest: str | None = None
    """This process's own TEE platform (sgx, tdx, sev-snp, nitro): a server attests itself to clients
    and serves plaintext predictions; a worker attests to obtain the model key."""
    attest_provider: str | None = None
    """An evidence provider as ``module:factory`` instead of `attest`'s device (development)."""
    dcap_collateral: str | None = None
    """Intel collateral JSON file added to SGX/TDX evidence (kept current by the operator)."""
    pccs_url: str | None = None
    """PCCS (or Intel PCS) base URL to fetch SGX/TDX collateral from, instead of a file."""
    nonce_ttl: float = 60.0
    """Seconds a key-release nonce stays usable."""

    @property
    def tokens_path(self) -> Path:
        return Path(self.tokens_file) if self.tokens_file else Path(self.data_dir) / "tokens.json"


def load_cipher(config: ServerConfig) -> ArtefactCipher:
    """The model key's cipher (see `load_model_key`)."""
    return ArtefactCipher(load_model_key(config))


def load_model_key(config: ServerConfig) -> bytes:
    """Model key from VEIL_MODEL_KEY, VEIL_MODEL_KEY_FILE or --model-key-file; otherwise a key is
    created once in the data directory (mode 0600) and a warning says to keep it elsewhere."""
    if config.model_key_file:
        return key_from_file(config.model_key_file)
    key = key_from_env()
    if key is not None:
        return key
    path = Path(config.data_dir) / "model.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(ArtefactCipher.generate_key().hex())
        log.warning("created a model key beside the data; set VEIL_MODEL_KEY(_FILE) to keep it apart",
                    extra={"path": str(path)})
    return key_from_file(path)


def build(config: ServerConfig) -> tuple[Any, Service]:
    """The ASGI app and its service for a configuration, on the backend it names
    (`veil.serve.backends.backend_for`: SQLite in-process, or Redis and workers)."""
    from veil.serve.tee_setup import tee_state

    model_key = load_model_key(config)
    chosen = backend_for(config)
    store = chosen.store(config)
    service = Service(store, ArtefactCipher(model_key), key_quota=KeyQuota(config.max_keys, config.max_key_bytes))
    executor = chosen.executor(config, service)
    tokens = TokenStore.load(config.tokens_path)
    if not len(tokens):
        log.warning("no tokens configured: every request will be refused until `veil token add` writes "
                    "one (the tokens file is followed while the server runs)",
                    extra={"path": str(config.tokens_path)})
    budget = BodyBudget.of(config.max_body, config.max_buffered, config.max_buffered_per_token)
    app = create_app(service, tokens, executor, config.max_body, protect_metrics=config.protect_metrics,
                     protect_docs=config.protect_docs, body_timeout=config.body_timeout,
                     tee=tee_state(config, model_key, chosen), budget=budget)
    return app, service


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
    in clear. `--insecure` overrides (e.g. a TLS-terminating proxy on the same host). With TLS,
    its files must load (`check_tls_files`)."""
    if config.tls_cert:
        check_tls_files(config)
        return
    if config.insecure or is_loopback(config.host):
        return
    raise ValueError(f"refusing to serve plain HTTP on {config.host}: give --tls-cert/--tls-key, bind a "
                     "loopback address, or pass --insecure if TLS is terminated in front of this server")


def check_tls_files(config: ServerConfig) -> None:
    """Load the TLS certificate chain, key and client CA once before serving, so that a missing or
    unreadable file is refused with an error naming it (ValueError) instead of ssl's bare
    "PEM lib" or "No such file" from inside the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = f"--tls-cert {config.tls_cert}" + (f" / --tls-key {config.tls_key}" if config.tls_key else "")
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS certificate and key from {files}: {exc}") from None
    if config.tls_client_ca:
        try:
            ctx.load_verify_locations(cafile=config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the client CA from --tls-client-ca {config.tls_client_ca}: {exc}") from None


def ssl_options(config: ServerConfig) -> dict[str, Any]:
    if not config.tls_cert:
        if config.tls_key or config.tls_client_ca:
            raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
        return {}
    opts: dict[str, Any] = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
    if config.tls_client_ca:
        opts.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return opts


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with the deadlines it lacks outside the app:

    - before a request: its line and headers must arrive within `head_timeout` seconds of the
      connection opening or of the previous response, else the connection is closed (after a 408
      if part of a head has come). The timer restarts at every response; when it fires while a
      request is being read or answered, it does nothing (the body has its own deadline in
      `veil.serve.app.Gate`);
    - while answering: once the kernel's send buffer is full (the transport pauses writing), the
      reader must take data again within `head_timeout` seconds, else the connection is aborted:
      a peer that never reads its answers (pipelining requests for large ones) holds no file
      descriptor and no buffered response beyond that deadline."""

    head_timeout = DEFAULT_HEAD_TIMEOUT
    _head_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.head_timeout, self._write_overdue)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_overdue(self) -> None:
        """The peer has not read for `head_timeout` seconds with a full send buffer: drop it (an
        abort, since a close would wait for the buffer to drain)."""
        self._write_timer = None
        log.info("connection aborted: the peer read nothing for %g s", self.head_timeout)
        self.transport.abort()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        """Close a connection still waiting for a request head; answer 408 only if part of one has
        arrived (an idle connection closes silently, as at the keep-alive timeout, so a client
        reusing it never reads a 408 meant for no request)."""
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:
            status, code, detail = error_fields(RequestTimeoutError(
                f"the request line and headers did not arrive within {self.head_timeout:g} s"))
            body = json.dumps({"error": code, "detail": detail}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (status, HTTPStatus(status).phrase.encode(),
                                                                       len(body), body))
        self.transport.close()


def uvicorn_config(app: Any, config: ServerConfig) -> Any:
    """The uvicorn configuration of `veil serve`: h11 with `MAX_HEAD_BYTES` and `HeadDeadline`, TLS."""
    import uvicorn

    protocol = type("HeadDeadline", (HeadDeadline,), {"head_timeout": config.head_timeout})
    return uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False, ws="none",
                          http=protocol, h11_max_incomplete_event_size=MAX_HEAD_BYTES, **ssl_options(config))


@contextlib.contextmanager
def serve_in_background(config: ServerConfig, timeout: float = 20.0) -> Iterator[str]:
    """Serve `config` from a thread on a free loopback port; yields the base URL, stops on exit."""
    import uvicorn

    config.host, config.port = "127.0.0.1", free_port()
    app, _ = build(config)
    server = uvicorn.Server(uvicorn_config(app, config))
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


@contextlib.contextmanager
def serve_deployed(data_dir: str | Path, model_dir: str | Path, name: str, user: str, *, verify: bool | str = True,
                   **config: Any) -> Iterator[tuple[str, str]]:
    """A throwaway server for demos and benchmarks. In `data_dir`: an admin token, a client token
    for `user` and a fresh random model key; the server (`serve_in_background`, `config` as further
    `ServerConfig` fields) then gets `model_dir` deployed as `name` by the admin (its CA: `verify`).
    Yields the base URL and the client token."""
    from veil.serve.client import Client

    root = Path(data_dir)
    admin = add_token_to_file(root / "tokens.json", "admin", "admin")
    token = add_token_to_file(root / "tokens.json", user, "client")
    (root / "model.key").write_text(secrets.token_hex(32))
    with serve_in_background(ServerConfig(data_dir=str(root), model_key_file=str(root / "model.key"),
                                          **config)) as url:
        with Client(url, admin, verify=verify) as client:
            client.deploy(model_dir, name)
        yield url, token


def serve(config: ServerConfig) -> None:
    """Run until interrupted, in a process that keeps freed memory for the next request
    (`veil.program.parallel.tune_allocator`, applied once the configuration is accepted)."""
    import uvicorn

    configure_logging(config.log_level)
    check_transport(config)
    app, _ = build(config)
    if not config.tls_cert and not is_loopback(config.host):
        log.warning("serving plain HTTP beyond loopback (--insecure)", extra={"host": config.host})
    log.info("starting", extra={"host": config.host, "port": config.port, "tls": bool(config.tls_cert),
                                "mtls": bool(config.tls_client_ca), "backend": backend_for(config).name})
    tune_allocator()
    uvicorn.Server(uvicorn_config(app, config)).run()
