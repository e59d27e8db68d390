"""The budget of request-body bytes a server holds at once (`veil.serve.app.BodyBudget`).

The adversary: principals with valid tokens who open many connections and send bodies slowly, each
under `max_body`, to make the server buffer far more than it can hold. Past its share a principal
gets 429, past the server's total everyone gets 503; both before the bytes over the budget are read,
with Retry-After, and the connection closed. Bytes come back when a request is answered or its
client goes away."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from veil.serve.app import BodyBudget
from veil.serve.auth import add_token_to_file
from veil.serve.errors import TooManyRequestsError, UnavailableError
from veil.serve.server import ServerConfig

from .helpers import running_server
from .test_attack_review import closed_by_server, connection, head, read_response, stream_chunked

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024


def test_budget_accounts_per_principal_and_in_all():
    budget = BodyBudget(per_principal=100, total=150)
    assert budget.take("alice", 60) is None and budget.take("alice", 40) is None
    assert isinstance(budget.take("alice", 1), TooManyRequestsError)
    assert budget.take("bob", 50) is None
    refused = budget.take("carol", 1)
    assert isinstance(refused, UnavailableError) and refused.status == 503
    assert budget.held == {"alice": 100, "bob": 50} and budget.in_all == 150
    budget.give_back("alice", 100)
    assert budget.take("carol", 100) is None
    budget.give_back("carol", 100)
    budget.give_back("bob", 50)
    assert budget.held == {} and budget.in_all == 0
    with pytest.raises(ValueError):
        BodyBudget(per_principal=200, total=100)
    with pytest.raises(ValueError):
        BodyBudget(per_principal=0, total=100)


@pytest.fixture
def budget_server(tmp_path):
    tokens = tmp_path / "tokens.json"
    names = {who: add_token_to_file(tokens, who, "client") for who in ("alice", "bob")}
    config = ServerConfig(data_dir=str(tmp_path / "data"), tokens_file=str(tokens), max_body=MiB,
                          max_buffered=2 * MiB, max_buffered_per_token=MiB + MiB // 2,
                          body_timeout=30.0, head_timeout=30.0)
    with running_server(config) as url:
        yield url, {who: {"authorization": f"Bearer {token}"} for who, token in names.items()}


def _hold(sock, auth: dict[str, str], length: int) -> None:
    """Start a body of `length` declared bytes and send half of it, so the server holds it."""
    sock.sendall(head("POST", "/v1/keys", dict(auth, **{"content-length": str(length)})))
    sock.sendall(b"x" * (length // 2))


def _refused(sock, auth: dict[str, str], length: int) -> tuple[int, dict[str, str], dict]:
    sock.sendall(head("POST", "/v1/keys", dict(auth, **{"content-length": str(length)})))
    status, headers, body, rest = read_response(sock)
    assert closed_by_server(sock, rest)
    return status, headers, json.loads(body)


def _small_post_answers(url: str, auth: dict[str, str]) -> int:
    """Status of a small, complete (and invalid) key upload: a 4xx about the body, not the budget."""
    with httpx.Client(base_url=url, headers=auth, timeout=30) as h:
        return h.post("/v1/keys", content=b"not a key bundle").status_code


def test_a_principal_past_its_share_gets_429_and_others_are_served(budget_server):
    url, auth = budget_server
    with connection(url) as held:
        _hold(held, auth["alice"], MiB)
        with connection(url) as second:
            status, headers, body = _refused(second, auth["alice"], MiB)
        assert status == 429 and body["error"] == "too_many_requests" and headers["retry-after"] == "1"
        status = _small_post_answers(url, auth["bob"])
        assert status not in (429, 503) and 400 <= status < 500
    deadline = time.monotonic() + 20
    while (status := _small_post_answers(url, auth["alice"])) == 429 and time.monotonic() < deadline:
        time.sleep(0.1)  # the server notices the disconnect, then gives alice's bytes back
    assert status not in (429, 503) and 400 <= status < 500


def test_the_server_past_its_total_gets_503_until_bytes_come_back(budget_server):
    url, auth = budget_server
    with connection(url) as alice, connection(url) as bob:
        _hold(alice, auth["alice"], MiB)
        _hold(bob, auth["bob"], MiB)
        with connection(url) as third:
            status, headers, body = _refused(third, auth["bob"], 1024)
        assert status == 503 and body["error"] == "unavailable" and headers["retry-after"] == "1"
        alice.sendall(b"x" * (MiB - MiB // 2))  # alice's body completes and is answered
        status, _, _, _ = read_response(alice)
        assert 400 <= status < 500 and status not in (429, 503)
        assert _small_post_answers(url, auth["bob"]) not in (429, 503)


def test_a_chunked_body_is_stopped_when_it_grows_past_the_share(budget_server):
    url, auth = budget_server
    with connection(url) as held:
        _hold(held, auth["alice"], MiB)
        with connection(url) as streaming:
            sent, status, body, rest, whole = stream_chunked(streaming, "/v1/keys", auth["alice"], 256)
            assert status == 429 and json.loads(body)["error"] == "too_many_requests"
            assert sent < whole and closed_by_server(streaming, rest)
