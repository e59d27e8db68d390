"""The two callers of `veil.serve.tee`: a worker obtaining the model key, a client verifying a server.

**Worker** (`request_model_key`, used by `veil worker --attest`), one round trip after the challenge:

1. ``POST /v1/tee/key-release/challenge`` with the worker token: a nonce and the context;
2. `veil.tee.KeyRequester` makes an ephemeral X25519 key; the platform's provider attests
   ``key_release_report_data(nonce, key, context)`` (SGX/TDX collateral added when configured);
   a worker whose device fails sends its request without evidence, so the broker logs and counts
   the refusal (``NoEvidenceError``) and the operator sees it;
3. ``POST /v1/tee/key-release``; the grant is unwrapped with the ephemeral private key, which never
   left this process. Any refusal is a `KeyReleaseError` naming the broker's answer.

**Client** (`attest_server`, used by `veil.Client(attest=policy)`), before any plaintext leaves:

1. a TLS handshake with the server, verified as usual (``verify``), yields its certificate;
2. every later connection trusts that certificate only (``VERIFY_X509_PARTIAL_CHAIN`` with it as the
   sole trust anchor, and the hostname checked), so all that follows reaches the holder of its key;
3. ``POST /v1/tee/evidence`` with 32 fresh random bytes; the evidence must verify under the
   client's policy and carry ``tls_report_data(nonce, certificate's SubjectPublicKeyInfo)``: a relay
   (its own TLS key), a replay (another nonce), another measurement or no enclave at all is an
   `AttestationError` subclass, and nothing but the nonce was sent.
This is RA-TLS's binding checked after the handshake instead of inside a certificate extension.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.tee import (
    AttestationError,
    Challenge,
    Claims,
    DeviceError,
    Evidence,
    KeyGrant,
    KeyReleaseError,
    KeyRequester,
    NoEvidenceError,
    Policy,
    check_binding,
    tls_report_data,
)
from veil.tee.collateral import CollateralSource, with_collateral
from veil.tee.providers import EvidenceProvider

RETRY_STATUS = (502, 503, 504)


def _answer(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"HTTP {response.status_code} {body.get('error', 'error')}: {body.get('detail', '')}"
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"


def _post(http: httpx.Client, path: str, attempts: int, backoff: float, **kwargs: Any) -> httpx.Response:
    """POST with bounded retries on transport errors and 502/503/504 (a broker still starting)."""
    for attempt in range(attempts):
        try:
            response = http.post(path, **kwargs)
        except httpx.TransportError as exc:
            if attempt == attempts - 1:
                raise KeyReleaseError(f"cannot reach the key broker at {http.base_url}: {type(exc).__name__}") \
                    from None
        else:
            if response.status_code not in RETRY_STATUS or attempt == attempts - 1:
                return response
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def request_model_key(broker_url: str, token: str, provider: EvidenceProvider, *,
                      verify: bool | ssl.SSLContext = True, collateral: CollateralSource | None = None,
                      timeout: float = 30.0, attempts: int = 5, backoff: float = 0.5) -> bytes:
    """The model key, released by the broker at `broker_url` to this worker's fresh evidence."""
    with httpx.Client(base_url=broker_url.rstrip("/"), headers={"authorization": f"Bearer {token}"},
                      verify=verify, timeout=timeout) as http:
        response = _post(http, "/v1/tee/key-release/challenge", attempts, backoff)
        if response.status_code != 200:
            raise KeyReleaseError(f"the key broker gave no challenge: {_answer(response)}")
        requester = KeyRequester(Challenge.from_dict(response.json()))
        cannot: DeviceError | None = None
        try:
            evidence: Evidence | None = with_collateral(provider.attest(requester.report_data), collateral)
        except DeviceError as exc:
            evidence, cannot = None, exc
        response = _post(http, "/v1/tee/key-release", 1, backoff, json=requester.request(evidence).to_dict())
        if response.status_code != 200:
            why = f"; this worker cannot attest: {cannot}" if cannot is not None else ""
            raise KeyReleaseError(f"the key broker refused the model key: {_answer(response)}{why}")
        return requester.unwrap(KeyGrant.from_dict(response.json()))


@dataclass(frozen=True)
class AttestedServer:
    """A server whose evidence verified: its claims, its TLS certificate (DER), and an SSL context
    that trusts that certificate alone (for every later connection to it)."""

    claims: Claims
    certificate: bytes
    context: ssl.SSLContext


def _client_context(verify: bool | str, cert: Any, trusted: bytes | None = None) -> ssl.SSLContext:
    """TLS context checking the server as `verify` says, or trusting only the DER `trusted`."""
    if trusted is not None:
        ctx = ssl.create_default_context(cadata=trusted)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.check_hostname = verify is not False
    elif verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if cert is not None:
        ctx.load_cert_chain(*((cert,) if isinstance(cert, str) else cert))
    return ctx


def _peer_certificate(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise AttestationError(f"TLS handshake with {host}:{port} failed: {exc}") from None
    if not der:
        raise AttestationError(f"{host}:{port} presented no TLS certificate")
    return der


def attest_server(url: str, token: str, policy: Policy, *, verify: bool | str = True, cert: Any = None,
                  timeout: float = 30.0, at: datetime | None = None) -> AttestedServer:
    """Verify the server at `url` runs in an enclave `policy` trusts and holds the TLS key it presents
    (steps in the module docstring); raises the `AttestationError` subclass naming what failed.

    With ``verify=False`` the evidence alone authenticates the server (RA-TLS's self-signed case);
    otherwise the certificate must also verify as usual."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise AttestationError(f"attest= needs an https:// URL (the evidence binds the server's TLS key), got {url!r}")
    leaf = _peer_certificate(parts.hostname, parts.port or 443, _client_context(verify, cert), timeout)
    pinned = _client_context(verify, cert, trusted=leaf)
    spki = x509.load_der_x509_certificate(leaf).public_key().public_bytes(Encoding.DER,
                                                                            PublicFormat.SubjectPublicKeyInfo)
    nonce = os.urandom(32)
    try:
        with httpx.Client(base_url=url.rstrip("/"), headers={"authorization": f"Bearer {token}"}, verify=pinned,
                          timeout=timeout) as http:
            response = http.post("/v1/tee/evidence", json={"nonce": base64.b64encode(nonce).decode()})
    except httpx.HTTPError as exc:
        raise AttestationError(f"cannot obtain the server's evidence: {type(exc).__name__}: {exc}") from None
    if response.status_code == 404:
        raise NoEvidenceError(f"the server offers no evidence ({_answer(response)}): it does not run in an "
                              "attested enclave")
    if response.status_code != 200:
        raise AttestationError(f"the server's evidence could not be obtained: {_answer(response)}")
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or "evidence" not in data:
        raise NoEvidenceError("the server's answer holds no evidence")
    evidence = Evidence.from_dict(data["evidence"])
    claims = policy.verify(evidence, at=at)
    check_binding(claims, tls_report_data(nonce, spki), "this client's nonce and the server's TLS key")
    return AttestedServer(claims, leaf, pinned)
