"""FastAPI application: key registry, model deployment, prediction on ciphertexts, operations.

The routes hold no storage and run no evaluation themselves: they call the `Service` and hand each
prediction to an `Executor`, both on the serving backend the caller chose (`veil.serve.backends`;
`veil.serve.server.build` chooses by name)."""

import asyncio
import binascii
import contextlib
import email.message
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import veil
from veil.errors import VeilError, WireFormatError
from veil.names import NAME_PATTERN, is_name
from veil.serve import schemas
from veil.serve.auth import BODY_ROLE_ATTR, Principal, TokenStore, body_role
from veil.serve.backends.base import MAX_VERSION, Executor, KeyRecord, ModelRecord
from veil.serve.backends.local import LocalExecutor, SQLiteStore
from veil.serve.errors import (
    INTERNAL_DETAIL,
    ForbiddenError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServeError,
    TooManyRequestsError,
    UnauthorizedError,
    UnavailableError,
    error_fields,
)
from veil.serve.service import KEY_ID_PATTERN, Service
from veil.serve.tee import JSON_BODIES as TEE_JSON_BODIES
from veil.serve.tee import RefusalCollector, TeeState, add_routes

log = logging.getLogger("veil.serve")
OCTET = "application/octet-stream"
DEFAULT_MAX_BODY = 256 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 120.0
BUFFERED_BODIES = 4
"""Default budget of request-body bytes held at once: this many largest bodies in all, and half of it
for one principal (`BodyBudget`)."""
"""Seconds a request body may take to arrive, counted from its headers (408 past it)."""
SLICE = 1 << 20
"""Large bodies are searched, copied and base64-coded this many bytes at a time (a multiple of 4), so
the thread doing it hands the interpreter back to the event loop between slices."""
JSON_SPACE = re.compile(rb"[ \t\r\n]*")
AUTH_SCOPE = "veil.auth"
"""Scope key under which `Gate` leaves a request's principal, or the 401 it deserves."""
BODY_SCOPE = "veil.body"
"""Scope key under which `Gate` leaves the body it read (routes take it from there: Starlette's
`Request.body()` would copy it once more, on the event loop)."""
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
"""A client's X-Request-Id is kept only if it matches this; otherwise the server makes its own, so
nothing a client chooses beyond these characters reaches response headers or log lines."""
PATH_CHECKS = {"name": is_name, "key_id": re.compile(KEY_ID_PATTERN).fullmatch}
"""Which values of each path parameter name a resource (the others match no route)."""


class KeyIdConvertor(Convertor):
    """Routes /v1/keys/{key_id} only for well-formed key ids, so /v1/keys/json is never taken for one
    (GET /v1/keys/json answers 405 with `Allow: POST`, as the schema says)."""

    regex = KEY_ID_PATTERN.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("veil_key_id", KeyIdConvertor())
DOCS_ASSETS_URL = "/static/docs"
BINARY = {"type": "string", "format": "binary"}


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    bytes_in: Counter
    bytes_out: Counter

    @classmethod
    def create(cls) -> "Metrics":
        reg = CollectorRegistry()
        return cls(reg,
                   Counter("veil_requests_total", "HTTP requests", ["route", "status"], registry=reg),
                   Histogram("veil_request_seconds", "HTTP request latency", ["route"], registry=reg,
                             buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)),
                   Counter("veil_request_bytes_total", "request body bytes", ["route"], registry=reg),
                   Counter("veil_response_bytes_total", "response body bytes", ["route"], registry=reg))


class BodyBudget:
    """Request-body bytes `Gate` holds at once: at most `per_principal` for one token, `total` for all.

    A body is held from its first byte until its response has been sent. Bytes are reserved before
    they are read: a declared Content-Length whole, up front; a chunked body chunk by chunk. A
    request that would pass its principal's share answers 429 (that caller sends too much at once;
    others are unaffected); one that would pass the total answers 503. Both carry Retry-After and
    close the connection, so the bytes over the budget are never taken in. Without it, a few valid
    tokens opening many connections could make the server buffer `max_body` bytes on each.
    Used from the event loop only, so it needs no lock."""

    def __init__(self, per_principal: int, total: int) -> None:
        if not 0 < per_principal <= total:
            raise ValueError(f"need 0 < per_principal ({per_principal}) <= total ({total})")
        self.per_principal, self.total = per_principal, total
        self.held: dict[str, int] = {}
        self.in_all = 0

    @classmethod
    def of(cls, max_body: int, total: int | None = None, per_principal: int | None = None) -> "BodyBudget":
        """The budget for bodies of at most `max_body` bytes: `total` defaults to `BUFFERED_BODIES`
        largest bodies, `per_principal` to half of it (but at least one largest body)."""
        total = total or BUFFERED_BODIES * max_body
        return cls(per_principal or max(total // 2, max_body), total)

    def take(self, principal: str, n: int) -> ServeError | None:
        """Reserve `n` more bytes for `principal`; the error to answer instead if that passes a bound."""
        mine = self.held.get(principal, 0)
        if mine + n > self.per_principal:
            return TooManyRequestsError(
                f"token {principal!r} would have over {self.per_principal} request-body bytes in flight; "
                "retry when its earlier requests have answered")
        if self.in_all + n > self.total:
            return UnavailableError(f"the server holds {self.total} request-body bytes at most and is full; "
                                    "retry shortly")
        self.held[principal] = mine + n
        self.in_all += n
        return None

    def give_back(self, principal: str, n: int) -> None:
        """Release `n` bytes `take` reserved for `principal`."""
        left = self.held.get(principal, 0) - n
        if left > 0:
            self.held[principal] = left
        else:
            self.held.pop(principal, None)
        self.in_all -= n


class Gate:
    """Pure ASGI layer in front of the app, and the only place a request body is read.

    1. Authenticate from the headers alone; the principal, or the 401 the request deserves, goes in
       the scope for the routes' dependency (`authenticated`). Authorization stays in the service.
    2. A request announcing a body (a non-zero Content-Length, or any Transfer-Encoding) without a
       valid token is answered 401 before any body byte is read (so no `100 Continue` either), and
       its connection is closed: a caller without a token gets nothing buffered or parsed. So is,
       with 403, a principal whose role cannot use the route it names (the role an endpoint
       declares with `body_role`; the service still checks it too).
    3. An authenticated body is read here, whole, before the app runs: over `limit` bytes (declared
       or while streaming) answers 413, not complete within `timeout` seconds of the headers answers
       408, past the `budget` of bytes held at once answers 429 or 503; all close the connection.
       The app then finds the body in the scope (`request_body`), and receives it as a single
       message if it asks.
    """

    def __init__(self, app: ASGIApp, tokens: TokenStore, limit: int, timeout: float, metrics: "Metrics",
                 budget: BodyBudget | None = None) -> None:
        self.app, self.tokens, self.limit, self.timeout, self.metrics = app, tokens, limit, timeout, metrics
        self.budget = budget or BodyBudget.of(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        headers = Headers(scope=scope)
        verdict = _authenticate(self.tokens, headers.get("authorization"))
        scope[AUTH_SCOPE] = verdict
        declared = headers.get("content-length", "").strip()
        has_body = declared not in ("", "0") or "transfer-encoding" in headers
        length = declared_length(declared)
        if not has_body:
            scope[BODY_SCOPE] = b""
            await self.app(scope, receive, send)
            return
        if isinstance(verdict, UnauthorizedError):
            await self._refuse(scope, receive, send, verdict)
            return
        role = self._body_role(scope)
        if role is not None and not verdict.has_role(role):
            await self._refuse(scope, receive, send, ForbiddenError(
                f"this needs the {role!r} role; token {verdict.name!r} has {verdict.role!r}"))
            return
        too_large = PayloadTooLargeError(f"request body exceeds {self.limit} bytes")
        if length is not None and length > self.limit:
            await self._refuse(scope, receive, send, too_large)
            return
        held = _Held(self.budget, verdict.name)
        try:
            refused = held.grow_to(length or 0)
            if refused is not None:
                await self._refuse(scope, receive, send, refused)
                return
            try:
                async with asyncio.timeout_at(deadline):
                    body = await self._read(receive, held)
            except TimeoutError:
                await self._refuse(scope, receive, send, RequestTimeoutError(
                    f"the request body did not arrive within {self.timeout:g} s"))
                return
            except _TooLargeError:
                await self._refuse(scope, receive, send, too_large)
                return
            except _OverBudgetError as exc:
                await self._refuse(scope, receive, send, exc.error)
                return
            except _GoneError:
                return
            scope[BODY_SCOPE] = body
            await self.app(scope, _replay(body, receive), send)
        finally:
            held.release()

    def _body_role(self, scope: Scope) -> str | None:
        """The role the endpoint this request names declares (`body_role`), if any."""
        for route in getattr(self.app, "routes", ()):
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(getattr(route, "endpoint", None), BODY_ROLE_ATTR, None)
        return None

    async def _read(self, receive: Receive, held: "_Held") -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _GoneError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _TooLargeError
            refused = held.grow_to(size)
            if refused is not None:
                raise _OverBudgetError(refused)
            chunks.append(chunk)
            if not message.get("more_body", False):
                # joining hundreds of MiB takes a while (page faults): off the loop (the copy releases the GIL)
                return b"".join(chunks) if size <= SLICE else await run_in_threadpool(b"".join, chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: ServeError) -> None:
        """Answer `error` before (or instead of) reading the body, and close the connection: its
        unread bytes are never taken in."""
        status, code, detail = error_fields(error)
        headers = {"connection": "close"}
        if status == 401:
            headers["www-authenticate"] = "Bearer"
        if status in (429, 503):
            headers["retry-after"] = "1"
        given = Headers(scope=scope).get("x-request-id")
        headers["x-request-id"] = request_id(given)
        self.metrics.requests.labels("before_routing", str(status)).inc()
        log.info("request refused before its body", extra={
            "request_id": headers["x-request-id"], "method": scope.get("method"),
            "path": str(scope.get("path", ""))[:200], "status": status})
        await _error(status, code, detail, headers)(scope, receive, send)


class _Held:
    """The bytes of one request's body reserved in a `BodyBudget`, released once when it is done."""

    def __init__(self, budget: BodyBudget, principal: str) -> None:
        self.budget, self.principal, self.bytes = budget, principal, 0

    def grow_to(self, size: int) -> ServeError | None:
        """Hold at least `size` bytes; the error to answer if the budget refuses."""
        if size <= self.bytes:
            return None
        refused = self.budget.take(self.principal, size - self.bytes)
        if refused is None:
            self.bytes = size
        return refused

    def release(self) -> None:
        self.budget.give_back(self.principal, self.bytes)
        self.bytes = 0


class _OverBudgetError(Exception):
    """A streamed body grew past what the `BodyBudget` lets its principal or the server hold."""

    def __init__(self, error: ServeError) -> None:
        super().__init__(str(error))
        self.error = error


class _TooLargeError(Exception):
    """The body grew past the limit while `Gate` read it."""


class _GoneError(Exception):
    """The client disconnected before its body arrived: there is no one to answer."""


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's `receive`: the body read by `Gate` as one message, then the connection's own events."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _authenticate(tokens: TokenStore, authorization: str | None) -> Principal | UnauthorizedError:
    """The principal of a bearer `Authorization` header (scheme in any case), or the 401 to give."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return UnauthorizedError("missing bearer token")
    try:
        return tokens.authenticate(f"Bearer {credentials.strip()}")
    except UnauthorizedError as exc:
        return exc


def authenticated(scope: Scope) -> Principal:
    """The principal `Gate` authenticated for this request, or its 401."""
    verdict = scope.get(AUTH_SCOPE)
    if isinstance(verdict, Principal):
        return verdict
    raise verdict if isinstance(verdict, UnauthorizedError) else UnauthorizedError("missing bearer token")


def declared_length(value: str) -> int | None:
    """A Content-Length header's value, if it is one (ASCII digits); a length beyond any body
    counts as 2**63 rather than being converted (Python refuses integers of over 4300 digits)."""
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) <= 18 else 2**63


def request_body(request: Request) -> bytes:
    """The body `Gate` read for this request, without copying it."""
    return request.scope.get(BODY_SCOPE, b"")


def request_id(given: str | None) -> str:
    """A client's X-Request-Id if it matches `REQUEST_ID_RE`, else a new one."""
    return given if given and REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex[:16]


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _info(record: ModelRecord) -> dict[str, Any]:
    meta = record.meta
    return {"name": record.name, "version": record.version, "created": record.created,
            "model": meta.get("model", ""), "n_features": meta["n_features"],
            "n_outputs": meta["n_outputs"], "layouts": meta.get("layouts", []),
            "kind": meta.get("kind", "affine"), "depth": meta.get("depth", 0), "keys": meta.get("keys", {})}


def _key_info(record: KeyRecord) -> dict[str, Any]:
    return {"key_id": record.key_id, "owner": record.owner, "params": record.params,
            "rotation_steps": list(record.rotation_steps), "created": record.created}


Body = TypeVar("Body", bound=BaseModel)


def _b64(data: str | bytes | memoryview, what: str) -> bytes:
    """Strict base64 (alphabet, padding only at the end), decoded `SLICE` bytes at a time so the thread
    decoding a large body hands the interpreter back to the event loop between slices."""
    try:
        view = memoryview(data.encode("ascii") if isinstance(data, str) else data)
        if len(view) % 4:
            raise ValueError("length not a multiple of 4")
        out = []
        for start in range(0, len(view), SLICE):
            piece = view[start:start + SLICE]
            if start + SLICE < len(view) and piece[-1] == ord("="):  # strict mode sees one slice only
                raise ValueError("padding before the end")
            out.append(binascii.a2b_base64(piece, strict_mode=True))
    except (ValueError, binascii.Error):
        raise WireFormatError(f"{what} is not valid base64") from None
    return b"".join(out)


def _b64encode(data: bytes) -> bytes:
    """Base64 of `data`, encoded a slice at a time (3 bytes become 4, so the slices concatenate)."""
    view, step = memoryview(data), 3 * (SLICE // 4)
    return b"".join(binascii.b2a_base64(view[i:i + step], newline=False) for i in range(0, len(view), step))


def _find(data: bytes, byte: bytes, start: int, stop: int) -> int:
    """`data.find(byte, start, stop)` for a single byte, one `SLICE` at a time."""
    for at in range(start, stop, SLICE):
        found = data.find(byte, at, min(stop, at + SLICE))
        if found >= 0:
            return found
    return -1


def _skip_space(body: bytes, i: int) -> int:
    return JSON_SPACE.match(body, i).end()  # type: ignore[union-attr]


def _plain_string(body: bytes, i: int) -> tuple[int, int] | None:
    """(start, end) of the characters of the JSON string opening at `i`, if it holds no escape."""
    if body[i:i + 1] != b'"':
        return None
    end = _find(body, b'"', i + 1, len(body))
    if end < 0 or _find(body, b"\\", i + 1, end) >= 0:
        return None
    return i + 1, end


def _plain_strings(body: bytes) -> dict[bytes, tuple[int, int]] | None:
    """Spans of the values, by key, of a JSON object whose members are all strings without escapes and
    whose keys are distinct; None for any other body."""
    i = _skip_space(body, 0)
    if body[i:i + 1] != b"{":
        return None
    spans: dict[bytes, tuple[int, int]] = {}
    i = _skip_space(body, i + 1)
    while True:
        key = _plain_string(body, i)
        if key is None:
            return None
        i = _skip_space(body, key[1] + 1)
        if body[i:i + 1] != b":":
            return None
        value = _plain_string(body, _skip_space(body, i + 1))
        name = body[key[0]:key[1]]
        if value is None or name in spans:
            return None
        spans[name] = value
        i = _skip_space(body, value[1] + 1)
        if body[i:i + 1] == b"}":
            return spans if _skip_space(body, i + 1) == len(body) else None
        if body[i:i + 1] != b",":
            return None
        i = _skip_space(body, i + 1)


def _json_with_base64(model: type[Body], field: str, content_type: str | None, body: bytes) -> tuple[Body, bytes]:
    """A base64 twin's body validated as `model`, and its base64 `field` decoded (in a worker thread).

    Pydantic holds the interpreter for a whole parse (~4 ms per MiB, so a 200 MiB body would stall the
    event loop for most of a second). In the body clients send, a flat object of plain strings (base64
    needs no escape), the value is cut out by windowed searches, pydantic validates the rest and
    `_b64` decodes the value from the body itself, a slice at a time. Any other body is parsed whole,
    with the same answers."""
    span = (_plain_strings(body) or {}).get(field.encode())
    if span is None:
        parsed = _parse_json(model, content_type, body)
        return parsed, _b64(getattr(parsed, field), field)
    start, end = span
    return _parse_json(model, content_type, body[:start] + body[end:]), _b64(memoryview(body)[start:end], field)


JSON_BODIES: tuple[type[BaseModel], ...] = (schemas.RegisterKeyJSON, schemas.PredictJSON, schemas.DeployRequest,
                                             *TEE_JSON_BODIES)
"""Request bodies parsed by `_json_body` rather than by FastAPI, which would parse and validate them on
the event loop; `create_app` adds their schemas to the OpenAPI document."""


def _json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route reading `model` with `_json_body`."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


async def _json_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body validated as `model` in a worker thread (422 as FastAPI would answer)."""
    return await run_in_threadpool(_parse_json, model, request.headers.get("content-type"), request_body(request))


def _parse_json(model: type[Body], content_type: str | None, body: bytes) -> Body:
    message = email.message.Message()
    message["content-type"] = content_type or ""
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "input": None,
                                       "msg": "expected a JSON body (Content-Type: application/json)"}])
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([dict(e, loc=("body", *e["loc"])) for e in exc.errors(include_url=False)]) \
            from None


def _body_schemas() -> dict[str, Any]:
    """Component schemas of `JSON_BODIES`, as FastAPI would have written them."""
    _, top = models_json_schema([(m, "validation") for m in JSON_BODIES],
                                ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


def docs_assets() -> FilePath | None:
    """Directory of the Swagger UI and ReDoc files shipped by the `fastapi-offline` package (MIT),
    served by the server itself so /docs and /redoc work without internet access."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    static = FilePath(fastapi_offline.__file__).parent / "static"
    return static if (static / "swagger-ui-bundle.js").exists() else None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody} for code in (400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 503)}
NAME = Annotated[str, Path(description="model name", json_schema_extra={"pattern": NAME_PATTERN})]
KEY_ID = Annotated[str, Path(description="key id returned at registration",
                             json_schema_extra={"pattern": KEY_ID_PATTERN})]
VERSION = Annotated[int | None, Query(ge=1, le=MAX_VERSION, description="default: the latest version")]


def create_app(service: Service, tokens: TokenStore, executor: Executor | None = None,
               max_body: int = DEFAULT_MAX_BODY, protect_metrics: bool = False,
               protect_docs: bool = False, body_timeout: float = DEFAULT_BODY_TIMEOUT,
               tee: TeeState | None = None, budget: BodyBudget | None = None) -> Gate:
    """Build the ASGI app; the caller chooses storage, tokens and where predictions run.

    Requests pass through `Gate` (authentication from the headers, then the body, at most `max_body`
    bytes arriving within `body_timeout` seconds, within the `budget` of body bytes held at once: by
    default `BUFFERED_BODIES` largest bodies in all, half of that per principal). `protect_metrics`
    and `protect_docs` make /metrics, and /docs, /redoc and /openapi.json, require a valid bearer
    token (any role) for servers whose operations data should not be public. `tee` makes it a key
    broker and/or an attested enclave (`veil.serve.tee`); its endpoints exist either way and answer
    404 where it is not set. When the server shuts down (the ASGI lifespan's end), what holds
    connections is closed, each once and all even if one fails: the executor (`Executor.aclose`), the
    service's store (`Store.close`), the key broker's nonce store (`NonceStore.close`) and the
    collateral source that completes SGX/TDX evidence (`CollateralSource.close`: a PCCS's HTTP client)."""
    executor = executor or LocalExecutor(service)
    tee = tee or TeeState()
    metrics = Metrics.create()
    if tee.broker is not None:
        metrics.registry.register(RefusalCollector(tee.broker.counter))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as closing:
            if tee.broker is not None:
                closing.callback(tee.broker.nonces.close)
            if tee.collateral is not None:
                closing.callback(tee.collateral.close)
            closing.callback(service.store.close)
            closing.push_async_callback(executor.aclose)
            yield

    app = FastAPI(title="veil", version=veil.__version__, responses=ERRORS, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan,
                  description="Encrypted inference: clients send CKKS ciphertexts and get ciphertexts back.")
    app.state.service, app.state.executor, app.state.metrics = service, executor, metrics
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            fastapi_openapi()["components"]["schemas"].update(_body_schemas())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(VeilError)
    async def _veil_error(_: Request, exc: VeilError) -> JSONResponse:
        status, code, detail = error_fields(exc)
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        return _error(status, code, detail, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        if exc.status_code == 405:  # Starlette names only the first route's methods; list them all
            headers["allow"] = ", ".join(sorted(_allowed_methods(app, request.scope)))
        return _error(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        def brief(error: dict) -> dict:  # the offending input may be the whole (large) body
            return {k: (repr(v)[:200] if k == "input" else v) for k, v in error.items()}

        return _error(422, "validation_error", json.dumps([brief(e) for e in exc.errors()[:20]], default=str)[:2000])

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Metrics and one log line per request; also the last-resort handler: an unexpected exception
        still answers a JSON 500 on a connection that stays usable, and is logged and counted."""
        start, rid = time.perf_counter(), request_id(request.headers.get("x-request-id"))
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid, "method": request.method,
                                                    "path": request.url.path[:200]})
            response = _error(500, "internal_error", INTERNAL_DETAIL)
        route = request.scope.get("route")
        name = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - start
        size_in = min(declared_length(request.headers.get("content-length", "")) or 0, max_body)
        size_out = int(response.headers.get("content-length") or 0)
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(elapsed)
        metrics.bytes_in.labels(name).inc(size_in)
        metrics.bytes_out.labels(name).inc(size_out)
        response.headers["x-request-id"] = rid
        log.info("request", extra={"request_id": rid, "method": request.method, "route": name,
                                   "status": response.status_code, "ms": round(elapsed * 1e3, 2),
                                   "bytes_in": size_in, "bytes_out": size_out})
        return response

    bearer = HTTPBearer(auto_error=False, description="a token made by `veil token add`")

    async def principal(request: Request,
                        _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        """The principal `Gate` authenticated from the headers (HTTPBearer only documents the scheme)."""
        return authenticated(request.scope)

    Auth = Annotated[Principal, Depends(principal)]
    guard_metrics = [Depends(principal)] if protect_metrics else []
    guard_docs = [Depends(principal)] if protect_docs else []

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard_docs)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    assets = docs_assets()
    if assets is not None:
        app.mount(DOCS_ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False, dependencies=guard_docs)
    async def swagger_ui() -> HTMLResponse:
        """Swagger UI with its script and styles served from this server (no CDN)."""
        if assets is None:
            return _offline_page()
        return get_swagger_ui_html(openapi_url="/openapi.json", title="veil API",
                                   swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png")

    @app.get("/redoc", include_in_schema=False, dependencies=guard_docs)
    async def redoc() -> HTMLResponse:
        """ReDoc with its script served from this server and no web fonts."""
        if assets is None:
            return _offline_page()
        return get_redoc_html(openapi_url="/openapi.json", title="veil API",
                              redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False)

    @app.get("/healthz", response_model=schemas.Health, tags=["operations"])
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Readiness, tags=["operations"],
             responses={503: {"model": schemas.Readiness}})
    async def readyz() -> JSONResponse:
        """Readiness: the registry and, in cluster mode, the queue answer."""
        checks = {}
        for name, probe in (("store", service.store.ping), ("executor", executor.check)):
            try:
                await run_in_threadpool(probe)
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"error: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                            status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response, dependencies=guard_metrics,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        """Prometheus text format: requests, latency and bytes per route."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _register(who: Principal, data: bytes) -> dict:
        return _key_info(await run_in_threadpool(service.register_key, who, data))

    @app.post("/v1/keys", response_model=schemas.KeyInfo, tags=["keys"],
              openapi_extra={"requestBody": {"required": True, "content": {OCTET: {"schema": BINARY}}}})
    @body_role('client')
    async def register_key(request: Request, who: Auth) -> dict:
        """Register a public key bundle (binary body); a secret key is refused. Counts against the
        token's key quota (403 quota_exceeded when full)."""
        return await _register(who, request_body(request))

    @app.post("/v1/keys/json", response_model=schemas.KeyInfo, tags=["keys"],
              openapi_extra=_json_body_doc(schemas.RegisterKeyJSON))
    @body_role('client')
    async def register_key_json(request: Request, who: Auth) -> dict:
        """Same as /v1/keys with the bundle in base64 JSON."""
        _, bundle = await run_in_threadpool(_json_with_base64, schemas.RegisterKeyJSON, "bundle",
                                            request.headers.get("content-type"), request_body(request))
        return await _register(who, bundle)

    @app.get("/v1/keys/{key_id:veil_key_id}", response_model=schemas.KeyInfo, tags=["keys"])
    async def get_key(key_id: KEY_ID, who: Auth) -> dict:
        """A registered key's description, for its owner or an admin."""
        return _key_info(await run_in_threadpool(service.key, who, key_id))

    @app.delete("/v1/keys/{key_id:veil_key_id}", status_code=204, tags=["keys"], response_class=Response)
    async def delete_key(key_id: KEY_ID, who: Auth) -> Response:
        """Delete a registered key (its owner only); frees its share of the token's quota."""
        await run_in_threadpool(service.delete_key, who, key_id)
        return Response(status_code=204)

    @app.post("/v1/models", response_model=schemas.ModelInfo, tags=["models"], status_code=201,
              openapi_extra=_json_body_doc(schemas.DeployRequest))
    @body_role('admin')
    async def deploy(request: Request, who: Auth) -> dict:
        """Deploy a model saved by veil.ml (admin); stored encrypted with AES-256-GCM."""
        body = await _json_body(request, schemas.DeployRequest)
        record = await run_in_threadpool(service.deploy, who, body.name, body.server, body.client,
                                         body.version)
        return _info(record)

    @app.get("/v1/models", response_model=list[schemas.ModelInfo], tags=["models"])
    async def list_models(who: Auth) -> list[dict]:
        """Every deployed version of every model (client or admin tokens)."""
        who.require("client")
        return [_info(r) for r in await run_in_threadpool(service.store.list_models)]

    @app.get("/v1/models/{name}", response_model=schemas.ModelDetail, tags=["models"])
    async def model_detail(name: NAME, who: Auth, version: VERSION = None) -> dict:
        """A model's public description with the client specification needed to encrypt (client or
        admin tokens)."""
        who.require("client")
        record = await run_in_threadpool(service.record, name, version)
        spec = await run_in_threadpool(service.client_spec, record)
        return dict(_info(record), client=spec)

    @app.post("/v1/models/{name}/predict", tags=["predict"], response_class=Response,
              openapi_extra={"requestBody": {"required": True, "content": {OCTET: {"schema": BINARY}}},
                             "responses": {"200": {"content": {OCTET: {"schema": BINARY}}}}})
    @body_role('client')
    async def predict(name: NAME, request: Request, who: Auth,
                      x_veil_key_id: Annotated[str, Header(json_schema_extra={"pattern": KEY_ID_PATTERN})],
                      version: VERSION = None) -> Response:
        """Evaluate on a binary CIPHERTEXTS message; the answer holds ciphertexts only. The key id
        must be one the caller registered (admins included)."""
        used, out = await executor.predict(who, name, version, x_veil_key_id, request_body(request))
        return Response(out, media_type=OCTET, headers={"x-veil-model-version": str(used)})

    @app.post("/v1/models/{name}/predict/json", response_model=schemas.PredictionJSON, tags=["predict"],
              openapi_extra=_json_body_doc(schemas.PredictJSON))
    @body_role('client')
    async def predict_json(name: NAME, request: Request, who: Auth, version: VERSION = None) -> Response:
        """Same as /predict with base64 JSON (a third larger on the wire)."""
        body, payload = await run_in_threadpool(_json_with_base64, schemas.PredictJSON, "ciphertexts",
                                                request.headers.get("content-type"), request_body(request))
        used, out = await executor.predict(who, name, version, body.key_id, payload)

        def answer() -> bytes:  # base64 needs no JSON escape
            head = json.dumps({"model": name, "version": used})[:-1].encode()
            return b"".join([head, b', "ciphertexts": "', _b64encode(out), b'"}'])

        return Response(await run_in_threadpool(answer), media_type="application/json")

    add_routes(app, tee, service, principal, _json_body, _json_body_doc)
    return Gate(app, tokens, max_body, body_timeout, metrics, budget)


def _allowed_methods(app: FastAPI, scope: Scope) -> set[str]:
    """Every method the schema documents at this request's path: routes whose path matches, with
    path parameters that fit their patterns (so /v1/keys/json is not also /v1/keys/{key_id})."""
    allowed: set[str] = set()
    for route in app.router.routes:
        match, child = route.matches(scope)
        params = child.get("path_params", {})
        if match != Match.NONE and all(PATH_CHECKS[k](str(v)) for k, v in params.items()
                                       if k in PATH_CHECKS):
            allowed |= set(getattr(route, "methods", None) or ())
    return allowed


def _offline_page() -> HTMLResponse:
    """Without the docs assets installed: a self-contained page pointing at the schema."""
    return HTMLResponse("<!doctype html><title>veil API</title><h1>veil API</h1>"
                        "<p>The OpenAPI schema is at <a href=\"/openapi.json\">/openapi.json</a>; install "
                        "<code>fastapi-offline</code> for the interactive pages.</p>")


def openapi_schema() -> dict:
    """The OpenAPI document of the server, without starting one (kept in docs/openapi.json)."""
    from veil.serve.crypto import ArtefactCipher

    with tempfile.TemporaryDirectory() as tmp:
        service = Service(SQLiteStore(tmp), ArtefactCipher(bytes(32)))
        app = create_app(service, TokenStore())
        return app.app.openapi()  # type: ignore[attr-defined]
