"""Issue 19, an attack review of the server: key ids private to their principal (equal bundles never
collide, another's id answers like an unknown one), no body byte read for a caller without a token,
bounded and timed body reads, and revocation atomic with the writes a token makes. The Redis side of
the key ids is in test_cluster.py."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import os
import select
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sklearn.datasets import load_iris

from veil import ml
from veil.errors import WireFormatError
from veil.he import PublicBundle, SecretKeys, preset
from veil.serve import Client, schemas
from veil.serve.app import _json_with_base64
from veil.serve.auth import TokenStore, add_token_to_file, revoke_tokens
from veil.serve.backends.base import KeyQuota, KeyRecord, legacy_key_id, scoped_key_id
from veil.serve.backends.local import SQLiteStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.errors import QuotaExceededError, UnauthorizedError
from veil.serve.server import ServerConfig, build
from veil.serve.service import Service

from .helpers import running_server

pytestmark = pytest.mark.timeout(300)
MiB = 1024 * 1024
BODY_TIMEOUT = 1.5
HEAD_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("review19")
    tokens = root / "tokens.json"
    names = {who: add_token_to_file(tokens, who, "admin" if who == "admin" else "client")
             for who in ("admin", "alice", "bob")}
    key_file = root / "model.key"
    key_file.write_text(ArtefactCipher.generate_key().hex())
    X, y = load_iris(return_X_y=True)
    iris = ml.LogisticRegression(max_iter=500).fit(X, y).compile(X)
    iris_dir = iris.save(root / "iris")

    def config(**kw) -> ServerConfig:
        base = {"data_dir": str(root / "data"), "tokens_file": str(tokens), "model_key_file": str(key_file),
                "body_timeout": BODY_TIMEOUT, "head_timeout": HEAD_TIMEOUT}
        return ServerConfig(**dict(base, **kw))

    return {"root": root, "tokens_file": tokens, "tokens": names, "config": config, "X": X, "iris": iris,
            "iris_dir": iris_dir}


@pytest.fixture(scope="module")
def server(env):
    with running_server(env["config"]()) as url:
        with Client(url, env["tokens"]["admin"]) as admin:
            admin.deploy(env["iris_dir"], "iris")
        yield url


def _bundles(n: int) -> list[bytes]:
    return [SecretKeys.generate(preset("depth0-rotations"), rotation_steps=[i + 1]).public_bundle().to_bytes()
            for i in range(n)]


# --- raw HTTP, for what httpx will not send ----------------------------------------------------

@contextlib.contextmanager
def connection(url: str, timeout: float = 30.0) -> Iterator[socket.socket]:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, already: bytes = b"") -> tuple[int, dict[str, str], bytes, bytes]:
    """(status, headers, body, what followed) of the next response; interim 1xx answers are returned
    like any other, so a caller sees a `100 Continue`."""
    data = already
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data[:200]!r}")
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" not in headers and status >= 200 and headers.get("connection", "").lower() == "close":
        with contextlib.suppress(ConnectionResetError):  # a body delimited by the end of the connection
            while chunk := sock.recv(65536):
                rest += chunk
        return status, headers, rest, b""
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def send_until_answered(sock: socket.socket, pieces: Iterable[bytes], seconds: float = 60.0) -> tuple[int, bytes]:
    """Send `pieces` while watching for an answer, as a careful client would: stop at the end of the
    answer's headers, when the server closes or resets the connection, or after `seconds`.
    Returns (body bytes sent, bytes received)."""
    sent, got, pending, more = 0, b"", memoryview(b""), iter(pieces)
    deadline = time.monotonic() + seconds
    sock.setblocking(False)
    try:
        while time.monotonic() < deadline and b"\r\n\r\n" not in got:
            try:
                data = sock.recv(65536)
                if not data:
                    break
                got += data
                continue
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            if not pending:
                following = next(more, None)
                if following is None:
                    select.select([sock], [], [], 0.05)
                    continue
                pending = memoryview(following)
            try:
                n = sock.send(pending)
                sent, pending = sent + n, pending[n:]
            except BlockingIOError:
                select.select([sock], [sock], [], 0.05)
            except (BrokenPipeError, ConnectionResetError):
                break
    finally:
        sock.setblocking(True)
    return sent, got


def stream_chunked(sock: socket.socket, path: str, headers: dict[str, str],
                   pieces: int) -> tuple[int, int, bytes, bytes, int]:
    """POST `pieces` chunks of 64 KiB to `path` until the server answers; (body bytes sent, status,
    body, what followed, bytes the whole stream would have been)."""
    sock.sendall(head("POST", path, dict(headers, **{"transfer-encoding": "chunked"})))
    piece = b"y" * 65536
    framed = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent, answer = send_until_answered(sock, itertools.repeat(framed, pieces))
    sock.settimeout(10)
    status, _, body, rest = read_response(sock, answer)
    return sent, status, body, rest, pieces * len(framed)


def closed_by_server(sock: socket.socket, leftover: bytes = b"") -> bool:
    """True once the server has closed the connection (EOF or reset), without sending anything more."""
    if leftover:
        return False
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def rss_bytes() -> int:
    """Resident memory of this process, which runs the server in a thread."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Samples resident memory every few milliseconds while the block runs; yields {"base", "peak"}."""
    out = {"base": rss_bytes(), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join(5)
        out["peak"] = max(out["peak"], rss_bytes())


# --- 1. key ids are private to their principal -----------------------------------------------

def test_two_principals_register_the_same_keyless_bundle_and_both_predict(env, server):
    X, iris = env["X"], env["iris"]
    ids, bundles = {}, {}
    for who in ("bob", "alice"):  # bob first, as in the review
        with Client(server, env["tokens"][who]) as client:
            assert np.array_equal(client.predict(X, "iris", layout="batch"), iris.predict(X))
            _, mc = client.model("iris")
            bundles[who] = mc.public_bundle_bytes("batch")
            ids[who] = client.register(bundles[who])
            assert client.register(bundles[who]) == ids[who]
    assert bundles["alice"] == bundles["bob"], "a linear model's batch bundle holds parameters only"
    parsed = PublicBundle.from_bytes(bundles["alice"])
    assert parsed.rotation_steps == () and parsed.relin_keys is None
    assert ids["alice"] != ids["bob"] and legacy_key_id(bundles["alice"]) not in ids.values()
    with httpx.Client(base_url=server, headers={"authorization": f"Bearer {env['tokens']['alice']}"}) as h:
        again = h.post("/v1/keys", content=bundles["alice"])
        assert again.status_code == 200 and again.json()["key_id"] == ids["alice"], "idempotent for its owner"
        assert h.get(f"/v1/keys/{ids['alice']}").json()["owner"] == "alice"


def test_another_principals_key_id_answers_exactly_like_an_unknown_one(env, server):
    with Client(server, env["tokens"]["alice"]) as alice:
        _, mc = alice.model("iris")
        _, request = mc.encrypt(env["X"][:3], "batch")
        key_id = alice.register(mc.public_bundle_bytes("batch"))
    unknown = "0123456789abcdef" * 2
    with httpx.Client(base_url=server, headers={"authorization": f"Bearer {env['tokens']['bob']}"}) as bob:
        def answers(kid: str) -> list[tuple[int, dict]]:
            got = [bob.get(f"/v1/keys/{kid}"), bob.delete(f"/v1/keys/{kid}"),
                   bob.post("/v1/models/iris/predict", content=request, headers={"x-veil-key-id": kid}),
                   bob.post("/v1/models/iris/predict/json", json={"key_id": kid, "ciphertexts": ""})]
            return [(r.status_code, {k: v.replace(kid, "ID") for k, v in r.json().items()}) for r in got]

        theirs, nobodys = answers(key_id), answers(unknown)
    assert theirs == nobodys
    assert {status for status, _ in theirs} == {404}
    with httpx.Client(base_url=server, headers={"authorization": f"Bearer {env['tokens']['alice']}"}) as h:
        assert h.get(f"/v1/keys/{key_id}").status_code == 200, "bob's attempts changed nothing"


def test_key_ids_are_keyed_by_a_secret_of_the_registry(tmp_path):
    store, other = SQLiteStore(tmp_path / "a"), SQLiteStore(tmp_path / "b")
    assert SQLiteStore(tmp_path / "a").key_id_secret() == store.key_id_secret(), "kept across restarts"
    assert store.key_id_secret() != other.key_id_secret() and len(store.key_id_secret()) == 32
    bundle = b"the same public bundle"
    ids = {scoped_key_id(s.key_id_secret(), who, bundle) for s in (store, other) for who in ("alice", "bob")}
    assert len(ids) == 4


def test_keys_registered_with_content_hash_ids_stay_idempotent(tmp_path):
    """A registry written before ids were scoped: the owner's bundle under its content hash keeps its
    id, registering it again returns that record (no second copy against the quota), and another
    principal registering the same bundle gets a record of its own."""
    bundle = _bundles(1)[0]
    legacy = KeyRecord(legacy_key_id(bundle), "alice", "p", (1,), 1.0, bundle)
    SQLiteStore(tmp_path)
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:  # as veil before issue 19 left it
        db.execute("DROP TABLE settings")
        db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?)", (legacy.key_id, "alice", "p", "[1]", 1.0, bundle))
    store = SQLiteStore(tmp_path)
    service = Service(store, ArtefactCipher(ArtefactCipher.generate_key()), key_quota=KeyQuota(max_keys=1))
    alice, bob = TokenStore(), TokenStore()
    alice.add("a-token", "alice", "client")
    bob.add("b-token", "bob", "client")
    assert service.register_key(alice.authenticate("Bearer a-token"), bundle).key_id == legacy.key_id
    assert service.key(alice.authenticate("Bearer a-token"), legacy.key_id).owner == "alice"
    theirs = service.register_key(bob.authenticate("Bearer b-token"), bundle)
    assert theirs.owner == "bob" and theirs.key_id != legacy.key_id
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:
        assert db.execute("SELECT owner, COUNT(*) FROM keys GROUP BY owner ORDER BY owner").fetchall() == \
            [("alice", 1), ("bob", 1)]


def test_sqlite_quota_is_exact_under_parallel_registration(tmp_path):
    stores = [SQLiteStore(tmp_path), SQLiteStore(tmp_path)]  # as two processes on one data directory
    quota = KeyQuota(max_keys=5, max_bytes=10_000)
    secret = stores[0].key_id_secret()
    results: list[object] = []
    lock = threading.Lock()

    def register(i: int) -> None:
        owner = ("alice", "bob")[i % 2]
        bundle = b"same" * 10 if i % 3 == 0 else bytes([i]) * 100
        record = KeyRecord(scoped_key_id(secret, owner, bundle), owner, "p", (), 1.0, bundle)
        try:
            got: object = stores[(i // 2) % 2].put_key(record, quota)
        except QuotaExceededError as exc:
            got = exc
        with lock:
            results.append((owner, got))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 24
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:
        rows = dict(db.execute("SELECT owner, COUNT(*) FROM keys GROUP BY owner").fetchall())
    assert rows == {"alice": 5, "bob": 5}
    for owner in ("alice", "bob"):
        stored = {r.key_id for o, r in results if o == owner and isinstance(r, KeyRecord)}
        assert len(stored) == 5, "every accepted registration is one of the five stored"


# --- 2. nothing read for a caller without a token; bounded, timed bodies -----------------------

def test_unauthenticated_200_mib_json_body_is_refused_without_being_read(env, server):
    total, prefix = 200 * MiB, b'{"bundle":"'
    chunk = memoryview(b"A" * MiB)
    body = itertools.chain([prefix], itertools.repeat(chunk, total // MiB - 1), [chunk[len(prefix):]])
    with peak_rss() as memory, connection(server) as sock:
        sock.sendall(head("POST", "/v1/keys/json", {"content-type": "application/json",
                                                    "content-length": str(total)}))
        sent, got = send_until_answered(sock, body)
        sock.settimeout(10)
        status, headers, answer, rest = read_response(sock, got)
        assert status == 401 and json.loads(answer)["error"] == "unauthorized"
        assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
        assert closed_by_server(sock, rest)
    assert sent < total, "the server answered without waiting for the body"
    assert memory["peak"] - memory["base"] < 8 * MiB, memory


@pytest.mark.parametrize("framing", [{"transfer-encoding": "chunked"},
                                     {"content-length": str(64 * MiB), "expect": "100-continue"}],
                         ids=["chunked", "expect-100-continue"])
def test_unauthenticated_bodies_get_401_from_the_headers_alone(env, server, framing):
    for path in ("/v1/keys", "/v1/keys/json", "/v1/models", "/v1/models/iris/predict/json", "/healthz"):
        with connection(server, timeout=10) as sock:
            sock.sendall(head("POST", path, dict(framing, authorization="Bearer not-a-token")))
            status, _, body, rest = read_response(sock)
            assert (status, json.loads(body)["error"]) == (401, "unauthorized"), (path, status)
            assert closed_by_server(sock, rest), path


def test_authenticated_expect_100_continue_is_served(env, server):
    bundle = _bundles(1)[0]
    with connection(server) as sock:
        sock.sendall(head("POST", "/v1/keys", {"authorization": f"Bearer {env['tokens']['bob']}",
                                               "content-length": str(len(bundle)), "expect": "100-continue"}))
        status, _, _, rest = read_response(sock)
        assert status == 100 and not rest
        sock.sendall(bundle)
        status, _, body, _ = read_response(sock)
        assert status == 200 and json.loads(body)["owner"] == "bob"


def test_stalled_upload_is_cut_off_at_the_deadline(env, server):
    bundle = _bundles(1)[0]
    with connection(server, timeout=BODY_TIMEOUT + 20) as stalled:
        start = time.monotonic()
        stalled.sendall(head("POST", "/v1/keys", {"authorization": f"Bearer {env['tokens']['alice']}",
                                                  "content-length": str(len(bundle))}) + bundle[:100])
        status, headers, body, rest = read_response(stalled)
        elapsed = time.monotonic() - start
        assert status == 408 and json.loads(body)["error"] == "request_timeout"
        assert headers["connection"] == "close" and closed_by_server(stalled, rest)
        assert elapsed >= BODY_TIMEOUT * 0.9, "cut off by the deadline, not before"


def test_clients_are_served_while_uploads_stall(env, tmp_path):
    """Stalled authenticated uploads (the only ones the server waits for) and unauthenticated ones do
    not hold up a logged-in client; the stalled ones are still open, unanswered, afterwards. The
    body budget is set to hold all four (800 MiB for one token; `test_body_budget.py` tests it)."""
    X, iris = env["X"], env["iris"]
    config = env["config"](data_dir=str(tmp_path / "data"), body_timeout=120, max_buffered=1024 * MiB,
                           max_buffered_per_token=1024 * MiB)
    with running_server(config) as url, contextlib.ExitStack() as stack:
        with Client(url, env["tokens"]["admin"]) as admin:
            admin.deploy(env["iris_dir"], "iris")
        stalled = [stack.enter_context(connection(url)) for _ in range(4)]
        for sock in stalled:
            sock.sendall(head("POST", "/v1/keys/json", {"authorization": f"Bearer {env['tokens']['alice']}",
                                                        "content-type": "application/json",
                                                        "content-length": str(200 * MiB)}) + b'{"bundle":"AAAA')
        anonymous = [stack.enter_context(connection(url)) for _ in range(4)]
        for sock in anonymous:
            sock.sendall(head("POST", "/v1/keys/json", {"content-type": "application/json",
                                                        "content-length": str(200 * MiB)}) + b'{"bundle":"AAAA')
        with Client(url, env["tokens"]["bob"], retries=0) as bob:
            assert {m["name"] for m in bob.models()} >= {"iris"}
            assert np.array_equal(bob.predict(X[:10], "iris"), iris.predict(X[:10]))
        for sock in anonymous:
            assert read_response(sock)[0] == 401
        for sock in stalled:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)


def test_slow_upload_past_the_deadline_is_cut_off_mid_stream(env, server):
    """Trickling a byte at a time keeps the connection busy but not past the total deadline."""
    with connection(server, timeout=BODY_TIMEOUT + 20) as sock:
        sock.sendall(head("POST", "/v1/keys", {"authorization": f"Bearer {env['tokens']['alice']}",
                                               "content-length": "100000"}))
        sock.settimeout(0.1)
        answer = b""
        for _ in range(int(BODY_TIMEOUT * 10 + 100)):
            try:
                sock.sendall(b"x")
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if b"\r\n\r\n" in answer:
                break
        sock.settimeout(10)
        status, _, body, _ = read_response(sock, answer)
    assert status == 408 and json.loads(body)["error"] == "request_timeout"


def test_declared_and_streamed_bodies_over_the_limit_answer_413_and_close(env, tmp_path):
    config = env["config"](data_dir=str(tmp_path / "data"), max_body=MiB)
    with running_server(config) as url:
        auth = {"authorization": f"Bearer {env['tokens']['alice']}"}
        with connection(url) as sock:
            sock.sendall(head("POST", "/v1/keys", dict(auth, **{"content-length": str(2 * MiB)})))
            status, _, body, rest = read_response(sock)
            assert status == 413 and closed_by_server(sock, rest)
        with connection(url) as sock:
            sent, status, body, rest, whole = stream_chunked(sock, "/v1/keys", auth, 1024)
            assert status == 413 and json.loads(body)["error"] == "payload_too_large"
            assert sent < whole and closed_by_server(sock, rest)
        with httpx.Client(base_url=url, headers=auth) as h:
            assert h.get("/healthz").status_code == 200


def test_huge_request_heads_are_refused_unread(env, server):
    """A request line or headers far over the limit, from a caller without a token: refused after a
    few KiB and the connection closed, with nothing of it kept (RSS) and the server answering others."""
    for what, opening, filler in (("url", b"GET /", b"a"), ("one header", b"GET /healthz HTTP/1.1\r\nX-A: ", b"a"),
                                  ("many headers", b"GET /healthz HTTP/1.1\r\n", b"X-A: b\r\n")):
        with peak_rss() as memory, connection(server) as sock:
            sock.sendall(opening)
            sent, got = send_until_answered(sock, itertools.repeat(filler * (64 * 1024 // len(filler)), 1024))
            sock.settimeout(10)
            status, _, _, rest = read_response(sock, got)
            assert status == 400 and closed_by_server(sock, rest), what
        assert sent < 64 * MiB and memory["peak"] - memory["base"] < 8 * MiB, (what, sent, memory)
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_slow_or_idle_connections_are_closed_at_the_head_deadline(env, server):
    with connection(server, timeout=HEAD_TIMEOUT + 20) as idle, \
            connection(server, timeout=HEAD_TIMEOUT + 20) as slow:
        start = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        slow.settimeout(0.2)
        answer = b""
        for _ in range(int(HEAD_TIMEOUT * 5 + 100)):  # a header byte every 0.2 s, never the end of the head
            try:
                slow.sendall(b"x")
                answer += slow.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if b"\r\n\r\n" in answer:
                break
        slow.settimeout(10)
        status, _, body, rest = read_response(slow, answer)
        assert status == 408 and json.loads(body)["error"] == "request_timeout"
        assert closed_by_server(slow, rest) and time.monotonic() - start >= HEAD_TIMEOUT * 0.9
        assert idle.recv(65536) == b"", "an idle connection is closed, silently"
        assert time.monotonic() - start >= HEAD_TIMEOUT * 0.9


def test_the_head_deadline_restarts_at_each_response(env, tmp_path):
    """Three requests on one connection, each head sent at once, 0.6 deadlines apart: the last comes
    more than a deadline after the connection opened and is still served."""
    config = env["config"](data_dir=str(tmp_path / "data"), head_timeout=4.0)
    with running_server(config) as url, connection(url) as sock:
        for i in range(3):
            if i:
                time.sleep(0.6 * config.head_timeout)
            sock.sendall(head("GET", "/healthz", {}))
            status, _, body, _ = read_response(sock)
            assert status == 200 and json.loads(body) == {"status": "ok"}, i


def test_absurd_content_lengths_answer_413_through_asgi_too(env):
    """h11 refuses malformed lengths over the network; an ASGI caller of the app gets a 4xx, not a 500."""
    app, _ = build(env["config"](data_dir=str(env["root"] / "asgi")))
    auth = f"Bearer {env['tokens']['alice']}".encode()
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    for length in (b"9" * 5000, "\u00b2".encode("latin-1"), b"1" * 19):
        sent.clear()
        scope = {"type": "http", "method": "POST", "path": "/v1/keys", "raw_path": b"/v1/keys", "query_string": b"",
                 "headers": [(b"content-length", length), (b"authorization", auth)],
                 "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
                 "root_path": "", "asgi": {"version": "3.0"}}
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] in (400, 413), (length[:5], sent[0]["status"])


def test_json_twins_parse_and_decode_off_the_event_loop_with_fastapis_answers(env, server):
    """The JSON bodies FastAPI no longer parses answer as it did: 422 for malformed JSON, a wrong
    content type or a schema violation, 400 for bad base64; and the twins still work."""
    X, iris = env["X"], env["iris"]
    with httpx.Client(base_url=server, headers={"authorization": f"Bearer {env['tokens']['alice']}"}) as h:
        for what, kwargs, status in (
                ("malformed", {"content": b'{"bundle": ', "headers": {"content-type": "application/json"}}, 422),
                ("not json", {"content": b'{"bundle": "AAAA"}', "headers": {"content-type": "text/plain"}}, 422),
                ("no type", {"content": b'{"bundle": "AAAA"}'}, 422),
                ("missing field", {"json": {}}, 422), ("extra padding", {"json": {"bundle": "AA==AAAA"}}, 400),
                ("bad base64", {"json": {"bundle": "!!!!"}}, 400), ("short", {"json": {"bundle": "AAA"}}, 400)):
            r = h.post("/v1/keys/json", **kwargs)
            assert r.status_code == status and set(r.json()) == {"error", "detail"}, (what, r.text[:200])
    with Client(server, env["tokens"]["alice"]) as alice:
        raw = alice.predict_json(X[:8], "iris")
    np.testing.assert_allclose(raw, iris.decision_function(X[:8]), atol=1e-3)


def test_large_base64_values_are_never_parsed_whole(monkeypatch):
    """Pydantic holds the interpreter for a whole parse; a twin's base64 value (8 MiB here) must be cut
    out of the body before pydantic sees it, and decoded from the body itself."""
    raw = bytes(range(256)) * (6 * MiB // 256)
    body = json.dumps({"key_id": "ab" * 16, "ciphertexts": base64.b64encode(raw).decode()}).encode()
    seen: list[int] = []
    validate = schemas.PredictJSON.model_validate_json

    def spy(data, **kw):
        seen.append(len(data))
        return validate(data, **kw)

    monkeypatch.setattr(schemas.PredictJSON, "model_validate_json", spy)
    parsed, payload = _json_with_base64(schemas.PredictJSON, "ciphertexts", "application/json", body)
    assert payload == raw and parsed.key_id == "ab" * 16
    assert seen and max(seen) < 200


REFERENCE_BODIES = [b'{"bundle":"QUJD"}', b' {\r\n "bundle" :\t"QUJD" , "x": "y"}\n', b'{"x":"\\"", "bundle":"QUJD"}',
                    b'{"bundle":"QU\\/D"}', b'{"bundle":"QUJD","bundle":"QQ=="}', b'{"bundle":1}', b'{}', b'[]',
                    b'{"bundle":"QUJD"} x', b'{"bundle":"QUJD",}', b'{"bundle":"AA==AAAA"}', b'{"bundle":"AAA"}',
                    b'{"bundle":"QUJD\x01"}', '{"bundle":"QUJD", "\u00e9": "\u00e9"}'.encode(),
                    b'{"bundle":"' + b"A" * (2 * MiB - 4) + b'AA==AAAA"}', b'{"bundle":"QUJD"', b'', b'{"bundle":null}']


@pytest.mark.parametrize("body", REFERENCE_BODIES, ids=range(len(REFERENCE_BODIES)))
def test_the_base64_fast_path_answers_like_a_whole_parse(body):
    """Pydantic and `base64.b64decode(validate=True)` on the whole body, as before issue 19, give the same
    bytes or the same status; the one difference: a raw control character inside the base64 value
    (invalid JSON and invalid base64 alike) answers 400 rather than 422."""
    def outcome(parse):
        try:
            return parse()
        except (RequestValidationError, ValidationError):
            return 422
        except (WireFormatError, binascii.Error):
            return 400

    def reference():
        parsed = schemas.RegisterKeyJSON.model_validate_json(body)
        return base64.b64decode(parsed.bundle, validate=True)

    fast = outcome(lambda: _json_with_base64(schemas.RegisterKeyJSON, "bundle", "application/json", body)[1])
    assert fast == (400 if b"\x01" in body else outcome(reference))


# --- 3. revocation is atomic with the writes a token makes ------------------------------------

@pytest.fixture
def revocable(env, tmp_path):
    tokens = tmp_path / "tokens.json"
    names = {who: add_token_to_file(tokens, who, role) for who, role in (("carol", "client"), ("root", "admin"))}
    store = TokenStore.load(tokens, environ={})
    service = Service(SQLiteStore(tmp_path / "data"), ArtefactCipher(ArtefactCipher.generate_key()))
    return {"path": tokens, "names": names, "store": store, "service": service}


def test_a_write_authenticated_before_revocation_does_not_commit_after_it(env, revocable):
    service, store = revocable["service"], revocable["store"]
    bundles = _bundles(2)
    carol = store.authenticate(f"Bearer {revocable['names']['carol']}")
    kept = service.register_key(carol, bundles[0])
    root = store.authenticate(f"Bearer {revocable['names']['root']}")
    artefacts = {k: json.loads((env["iris_dir"] / f"{k}.json").read_text()) for k in ("server", "client")}
    revoke_tokens(revocable["path"], "carol")
    revoke_tokens(revocable["path"], "root")
    with pytest.raises(UnauthorizedError, match="revoked"):
        service.register_key(carol, bundles[1])
    with pytest.raises(UnauthorizedError, match="revoked"):
        service.delete_key(carol, kept.key_id)
    with pytest.raises(UnauthorizedError, match="revoked"):
        service.deploy(root, "late", artefacts["server"], artefacts["client"])
    assert service.store.key_owner(scoped_key_id(service.store.key_id_secret(), "carol", bundles[1])) is None
    assert service.store.key_owner(kept.key_id) == "carol", "the delete did not commit either"
    assert service.store.resolve_version("late") is None


def test_revocation_waits_for_a_commit_in_progress(revocable):
    carol = revocable["store"].authenticate(f"Bearer {revocable['names']['carol']}")
    done = threading.Event()
    revoker = threading.Thread(target=lambda: (revoke_tokens(revocable["path"], "carol"), done.set()))
    with carol.committing():
        revoker.start()
        assert not done.wait(0.5), "revoke must wait while a commit holds the token"
    revoker.join(10)
    assert done.is_set()
    with pytest.raises(UnauthorizedError), carol.committing():
        pass


def test_a_commit_sees_a_revocation_the_file_metadata_hides(revocable):
    """The commit-time check re-reads the tokens file whatever its metadata: here the revoking edit
    keeps the file's inode, size and modification time (coarse timestamps and reused inodes can do that)."""
    path = revocable["path"]
    carol = revocable["store"].authenticate(f"Bearer {revocable['names']['carol']}")
    before, st = path.read_text(), path.stat()
    data = json.loads(before)
    for row in data["tokens"]:
        if row["name"] == "carol":
            row["sha256"] = "0" * len(row["sha256"])  # carol's token no longer matches
    after = json.dumps(data, indent=2)
    assert len(after) == len(before)
    with open(path, "r+") as fh:  # in place: same inode
        fh.write(after)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    with pytest.raises(UnauthorizedError), carol.committing():
        pass


def test_registration_whose_upload_spans_a_revocation_answers_401(env, tmp_path):
    tokens = tmp_path / "tokens.json"
    dave = add_token_to_file(tokens, "dave", "client")
    bundle = _bundles(1)[0]
    config = env["config"](data_dir=str(tmp_path / "data"), tokens_file=str(tokens), body_timeout=60)
    with running_server(config) as url, connection(url) as sock:
        sock.sendall(head("POST", "/v1/keys", {"authorization": f"Bearer {dave}", "expect": "100-continue",
                                               "content-length": str(len(bundle))}))
        assert read_response(sock)[0] == 100, "100 Continue comes only after the token was accepted"
        sock.sendall(bundle[: len(bundle) // 2])
        revoke_tokens(tokens, "dave")
        sock.sendall(bundle[len(bundle) // 2:])
        status, _, body, _ = read_response(sock)
        assert status == 401 and "revoked" in json.loads(body)["detail"]
        with sqlite3.connect(tmp_path / "data" / "registry.sqlite3") as db:
            assert db.execute("SELECT COUNT(*) FROM keys").fetchone() == (0,)
