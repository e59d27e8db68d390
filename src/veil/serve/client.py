"""`veil.Client`: keys stay here; only public bundles and ciphertexts cross the network.

With ``attest=policy`` the client trusts an enclave instead of encrypting: before its first request
it verifies the server's evidence, bound to the server's TLS key (`veil.serve.attested`), keeps every
connection pinned to that key, and sends plaintext features to ``/predict/plain``."""

from __future__ import annotations

import base64
import hashlib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from veil.errors import VeilError, WireFormatError
from veil.program import request_bytes, rows_per_request
from veil.program.artefact import CLIENT_FILE, SERVER_FILE, ModelClient, read_artefact_file
from veil.program.common import Send

if TYPE_CHECKING:
    from veil.serve.attested import AttestedServer
    from veil.tee import Policy

RETRY_STATUS = (502, 503, 504)
PLAIN_VALUE_BYTES = 25
"""Upper estimate of one feature's bytes in a plaintext JSON request (for chunking by bytes)."""
MAX_CHUNK_ROWS = 16384
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
"""Requests are sized to stay under this by default: a quarter of the server's default body limit
(256 MiB), so a leveled network (one ~0.4-0.5 MB ciphertext per feature per 4096 rows) and an affine
model alike are sent in bounded pieces."""


class RequestError(VeilError):
    """The server answered with an error; `status`, `code` and `detail` come from its JSON body."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


def checked_token(token: object) -> str:
    """`token` if it can be sent as a bearer token: a non-empty string of visible ASCII characters.
    Else ValueError, before any request: an empty token or one read from a file with its newline
    would otherwise fail deep inside httpx as an illegal header value."""
    if not isinstance(token, str) or not token:
        raise ValueError(f"token must be a non-empty string, got {type(token).__name__} {token!r}"[:120])
    if not all("!" <= c <= "~" for c in token):
        raise ValueError("token holds whitespace or characters that cannot go in a header"
                         " (read from a file? strip its newline)")
    return token


def _existing(path: str | Path, what: str) -> str:
    """`path` as a string, else FileNotFoundError naming it (ssl's own error names no file)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist or is not a file")
    return str(path)


def tls_context(verify: bool | str | Path = True, cert: str | tuple[str, str] | None = None) -> ssl.SSLContext | bool:
    """httpx `verify` argument: a CA bundle path and/or a client certificate become an SSL context.
    A path that is not a file raises FileNotFoundError naming it."""
    if isinstance(verify, Path):
        verify = str(verify)
    if isinstance(verify, str):
        verify = _existing(verify, "CA bundle")
    for path in (() if cert is None else (cert,) if isinstance(cert, str) else cert):
        _existing(path, "client certificate or key")
    if cert is None and not isinstance(verify, str):
        return verify
    ctx = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else ssl.create_default_context()
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(*((cert,) if isinstance(cert, str) else cert))
    return ctx


class Client:
    """HTTP client for a veil server: register keys once, then predict on ciphertexts.

    `verify` is True, False or a CA bundle path; `cert` is a client certificate (path or
    (cert, key)) for mutual TLS. Transport failures and 502/503/504 are retried `retries` times.
    Inputs are sent `chunk_size` rows per request; by default (None) as many rows, up to
    MAX_CHUNK_ROWS, as keep each encrypted request under `max_request_bytes` for the model and
    layout at hand (ciphertext sizes differ by orders of magnitude between model kinds).

    `attest` (a `veil.tee.Policy`, or a policy file) trusts the server's enclave instead of
    encrypting: `predict`, `predict_proba` and `predict_raw` send plaintext features to
    ``/predict/plain``, and no request at all is sent before the server's evidence verified under the
    policy and bound the TLS key of the connection (`attest()`; failures are `veil.tee` errors such
    as `BindingError`, `MeasurementError` or `NoEvidenceError`). Every connection afterwards must
    present the attested certificate. ``verify=False`` then means the evidence alone authenticates
    the server.
    """

    def __init__(self, url: str, token: str, *, verify: bool | str | Path = True, cert: Any = None,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.25,
                 chunk_size: int | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 attest: Policy | str | Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.chunk_size = retries, backoff, chunk_size
        self.max_request_bytes = max_request_bytes
        self._token, self._verify, self._cert, self._timeout = checked_token(token), verify, cert, timeout
        if isinstance(attest, str | Path):
            from veil.tee import load_policy

            attest = load_policy(attest)
        self.attest_policy = attest
        self.attested: AttestedServer | None = None
        self._http = self._session(tls_context(verify, cert))
        self._models: dict[tuple[str, int], ModelClient] = {}
        self._key_ids: dict[str, str] = {}

    def _session(self, verify: ssl.SSLContext | bool) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self._token}"}, verify=verify,
                            timeout=self._timeout)

    def attest(self) -> AttestedServer:
        """Verify the server's enclave now (see the class docstring) and pin later connections to its
        attested TLS certificate; raises the `veil.tee.AttestationError` naming what failed."""
        from veil.serve.attested import attest_server

        if self.attest_policy is None:
            raise ValueError("this client was made without attest=: there is no policy to verify the server by")
        attested = attest_server(self.url, self._token, self.attest_policy, verify=self._verify, cert=self._cert,
                                 timeout=self._timeout)
        self._http.close()
        self._http = self._session(attested.context)
        self.attested = attested
        return attested

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.attest_policy is not None and self.attested is None:
            self.attest()
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    break
            time.sleep(self.backoff * 2**attempt)
        if response.status_code >= 400:
            try:
                body = response.json()
                code, detail = body.get("error", "error"), body.get("detail", response.text)
            except ValueError:
                code, detail = "error", response.text[:500]
            raise RequestError(response.status_code, code, detail)
        return response

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()

    def deploy(self, model: str | Path | dict, name: str, version: int | None = None) -> dict:
        """Upload a model saved by `veil.ml` (a directory, or {"server": ..., "client": ...}); admin."""
        if isinstance(model, dict):
            server, client = model["server"], model["client"]
        else:
            if not Path(model).is_dir():
                raise WireFormatError(f"{model} is not a model directory (one saved by veil.ml)")
            server, client = read_artefact_file(model, SERVER_FILE), read_artefact_file(model, CLIENT_FILE)
        body = {"name": name, "version": version, "server": server, "client": client}
        return self._request("POST", "/v1/models", json=body).json()

    def model(self, name: str, version: int | None = None) -> tuple[int, ModelClient]:
        """The model's client side (pinned to a version, so spec and server always agree)."""
        if version is not None and (name, version) in self._models:
            return version, self._models[(name, version)]
        detail = self._request("GET", f"/v1/models/{name}",
                               params={} if version is None else {"version": version}).json()
        key = (name, int(detail["version"]))
        if key not in self._models:
            self._models[key] = ModelClient.from_dict(detail["client"])
        return key[1], self._models[key]

    def register(self, bundle: bytes) -> str:
        """Register a public bundle once; returns its key id (cached)."""
        digest = hashlib.sha256(bundle).hexdigest()
        if digest not in self._key_ids:
            info = self._request("POST", "/v1/keys", content=bundle,
                                 headers={"content-type": "application/octet-stream"}).json()
            self._key_ids[digest] = info["key_id"]
        return self._key_ids[digest]

    def delete_key(self, key_id: str) -> None:
        """Delete a key this token registered (frees its share of the key quota)."""
        self._request("DELETE", f"/v1/keys/{key_id}")
        self._key_ids = {d: k for d, k in self._key_ids.items() if k != key_id}

    def send(self, model: str, version: int | None, key_id: str, request: bytes) -> bytes:
        """POST one encrypted request; returns the encrypted response bytes."""
        response = self._request("POST", f"/v1/models/{model}/predict", content=request,
                                 params={} if version is None else {"version": version},
                                 headers={"content-type": "application/octet-stream", "x-veil-key-id": key_id})
        return response.content

    def auto_layouts(self, mc: ModelClient) -> list[str]:
        """The layouts "auto" may pick: those whose smallest request (one group of ciphertexts)
        fits `max_request_bytes`, or all of them if none does. A tree ensemble's batch group is
        one ciphertext per grid bit (hundreds of MB for 30 features), which the server's body limit
        would refuse, so such a model goes row by row unless the layout is named."""
        names = sorted(mc.circuit.params)
        fitting = [n for n in names if request_bytes(mc.circuit, n, 1) <= self.max_request_bytes]
        return fitting or names

    def chunk_rows(self, mc: ModelClient, layout: str = "auto") -> int:
        """Rows per request for this model: `chunk_size` when set, else the most rows whose
        request fits `max_request_bytes` in every layout `layout` may pick."""
        if self.chunk_size is not None:
            return self.chunk_size
        names = self.auto_layouts(mc) if layout == "auto" else [layout]
        return min(rows_per_request(mc.circuit, name, self.max_request_bytes, MAX_CHUNK_ROWS) for name in names)

    @staticmethod
    def _chunks(n: int, size: int) -> Iterator[slice]:
        for start in range(0, n, size):
            yield slice(start, min(n, start + size))

    def send_plain(self, model: str, version: int | None, X: np.ndarray) -> np.ndarray:
        """POST plaintext features to an attested server; returns its raw outputs (n, n_outputs)."""
        if self.attest_policy is None:
            raise ValueError("plaintext is sent only to an attested server: make the client with attest=policy")
        body = {"features": np.asarray(X, dtype=np.float64).tolist()}
        out = self._request("POST", f"/v1/models/{model}/predict/plain", json=body,
                            params={} if version is None else {"version": version}).json()
        raw = np.asarray(out.get("outputs"), dtype=np.float64)
        if raw.ndim != 2 or len(raw) != len(X):
            raise RequestError(200, "bad_response", f"expected {len(X)} rows of outputs, got shape {raw.shape}")
        return raw

    def _run_plain(self, X: Any, model: str, version: int | None,
                   progress: Callable[[int], None] | None) -> tuple[ModelClient, np.ndarray]:
        version, mc = self.model(model, version)
        X = mc.circuit.check_input(X)
        rows = self.chunk_size or max(1, min(MAX_CHUNK_ROWS, self.max_request_bytes //
                                             (PLAIN_VALUE_BYTES * mc.n_features)))
        parts = []
        for part in self._chunks(len(X), rows):
            parts.append(self.send_plain(model, version, X[part]))
            if progress is not None:
                progress(part.stop - part.start)
        return mc, np.vstack(parts)

    def _transport(self, model: str, version: int, mc: ModelClient) -> Send:
        """Requests of `mc`'s protocol (one per chunk, or one per stage of an interactive model,
        each naming its stage) to the model's predict endpoint, under the layout's registered key."""
        return lambda request, layout: self.send(model, version, self.register(mc.public_bundle_bytes(layout)),
                                                 request)

    def _json_transport(self, model: str, version: int, mc: ModelClient) -> Send:
        """The same protocol through the base64 JSON endpoints."""
        def send(request: bytes, layout: str) -> bytes:
            bundle = base64.b64encode(mc.public_bundle_bytes(layout)).decode()
            key_id = self._request("POST", "/v1/keys/json", json={"bundle": bundle}).json()["key_id"]
            body = {"key_id": key_id, "ciphertexts": base64.b64encode(request).decode()}
            out = self._request("POST", f"/v1/models/{model}/predict/json", json=body,
                                params={"version": version}).json()
            return base64.b64decode(out["ciphertexts"])
        return send

    def _run(self, X: Any, model: str, version: int | None, layout: str,
             progress: Callable[[int], None] | None) -> tuple[ModelClient, np.ndarray]:
        if self.attest_policy is not None:
            return self._run_plain(X, model, version, progress)
        version, mc = self.model(model, version)
        X = mc.circuit.check_input(X)
        parts = []
        allowed = self.auto_layouts(mc) if layout == "auto" else [layout]
        for part in self._chunks(len(X), self.chunk_rows(mc, layout)):
            name = layout
            if layout == "auto":
                name = mc.choose_layout(part.stop - part.start)
                name = name if name in allowed else allowed[0]
            parts.append(mc.circuit.infer(X[part], name, self._transport(model, version, mc)))
            if progress is not None:
                progress(part.stop - part.start)
        return mc, np.vstack(parts)

    def predict_raw(self, X: Any, model: str, version: int | None = None, layout: str = "auto",
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Decrypted raw outputs (n_samples, n_outputs); large inputs go in several requests."""
        return self._run(X, model, version, layout, progress)[1]

    def predict(self, X: Any, model: str, version: int | None = None, layout: str = "auto",
                progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Plaintext predictions for X, computed by the server on ciphertexts only (with `attest`:
        on plaintext, by the attested enclave)."""
        mc, raw = self._run(X, model, version, layout, progress)
        return mc.predict(raw)

    def predict_proba(self, X: Any, model: str, version: int | None = None,
                      layout: str = "auto") -> np.ndarray:
        mc, raw = self._run(X, model, version, layout, None)
        return mc.predict_proba(raw)

    def predict_json(self, X: Any, model: str, version: int | None = None,
                     layout: str = "auto") -> np.ndarray:
        """Like `predict_raw` but through the base64 JSON endpoints."""
        version, mc = self.model(model, version)
        X = mc.circuit.check_input(X)
        name = mc.choose_layout(len(X)) if layout == "auto" else layout
        return mc.circuit.infer(X, name, self._json_transport(model, version, mc))
