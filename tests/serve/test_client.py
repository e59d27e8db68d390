"""Client retries and error reporting, against a scripted transport and a closed port."""

import httpx
import pytest

from veil.serve import Client, RequestError

from .helpers import free_port


def _scripted(statuses: list[int]) -> tuple[httpx.MockTransport, list[int]]:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = statuses[min(len(seen), len(statuses) - 1)]
        seen.append(status)
        if status == 200:
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(status, json={"error": "unavailable", "detail": f"status {status}"})

    return httpx.MockTransport(handler), seen


def _client_with(transport: httpx.MockTransport, retries: int) -> Client:
    client = Client("http://test", "token", retries=retries, backoff=0.001)
    client._http = httpx.Client(base_url="http://test", transport=transport)
    return client


def test_retries_transient_errors_then_succeeds():
    transport, seen = _scripted([503, 502, 200])
    assert _client_with(transport, retries=3).health() == {"status": "ok"}
    assert seen == [503, 502, 200]


def test_gives_up_after_bounded_retries_with_the_server_error():
    transport, seen = _scripted([503])
    with pytest.raises(RequestError) as exc:
        _client_with(transport, retries=2).health()
    assert len(seen) == 3 and exc.value.status == 503 and exc.value.code == "unavailable"


def test_client_errors_are_not_retried():
    transport, seen = _scripted([404, 200])
    with pytest.raises(RequestError) as exc:
        _client_with(transport, retries=3).health()
    assert seen == [404] and exc.value.status == 404


def test_connection_refused_is_bounded():
    client = Client(f"http://127.0.0.1:{free_port()}", "token", retries=1, backoff=0.001, timeout=2)
    with pytest.raises(httpx.ConnectError):
        client.health()


@pytest.mark.parametrize("token", ["", None, "veil_abc\n", " veil_abc", "veil a"])
def test_a_token_that_cannot_be_sent_is_refused_before_any_request(token):
    with pytest.raises(ValueError, match="token"):
        Client("http://test", token)


def test_missing_tls_files_are_named(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(FileNotFoundError, match=r"ca\.pem"):
        Client("https://test", "token", verify=str(missing))
    with pytest.raises(FileNotFoundError, match=r"ca\.pem"):
        Client("https://test", "token", verify=missing)
    present = tmp_path / "client.pem"
    present.write_text("")
    with pytest.raises(FileNotFoundError, match=r"client\.key"):
        Client("https://test", "token", cert=(str(present), str(tmp_path / "client.key")))
