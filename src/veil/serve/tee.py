"""Trusted execution in `veil serve`: the model key released to attested workers, plaintext served
only by an attested enclave.

Endpoints (always in the schema; each answers 404 ``tee_unavailable`` on a server not set up for it):

- ``POST /v1/tee/key-release/challenge`` (worker token, no body): step 1 of key release
  (`veil.tee.keyrelease`): a fresh nonce, recorded as issued to this token.
- ``POST /v1/tee/key-release`` (worker token): the nonce, the enclave's ephemeral X25519 key and the
  evidence over both; the broker verifies them under the operator's policy (``--attest-policy``)
  and answers the model key (``VEIL_MODEL_KEY``) HPKE-wrapped to that key, or 403 naming the refusal
  (``MeasurementError``, ``NonceError``, ``NoEvidenceError``...), which is logged and counted
  (``veil_tee_key_refusals_total{platform,reason}`` on /metrics, beside
  ``veil_tee_key_grants_total{platform}``).
- ``POST /v1/tee/evidence`` (client token): a server running in an enclave (``--attest``) attests
  over the client's nonce and its own TLS public key, ``veil.tee.tls_report_data(nonce, SPKI)``;
  `veil.Client(attest=policy)` checks it before sending plaintext (`veil.serve.attested`).
- ``POST /v1/models/{name}/predict/plain`` (client token): plaintext features in, raw outputs out.
  Evaluated here, in the attested process, never queued to Redis workers: plaintext does not leave
  the enclave.

Authentication is `veil.serve.app.Gate`'s: the token is checked from the headers before any body
byte is read, so an unauthenticated caller gets 401 with nothing parsed. A worker token (``veil
token add NAME --role worker``) can do nothing but key release; the nonce a token asked for can be
used only with that token (`veil.tee.NonceStore` owner).

What each party learns: the broker learns the worker's evidence (platform, measurement, TCB) and
public key, the worker learns the model key only inside the enclave that generated the ephemeral
key, the host relaying them learns neither; a client learns the server's evidence, the server
learns the features and the outputs, the host running the enclave neither (TLS ends inside it).
"""

import base64
import binascii
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as RoutePath
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from veil.errors import ShapeError, WireFormatError
from veil.names import NAME_PATTERN
from veil.serve import schemas
from veil.serve.auth import Principal, body_role
from veil.serve.backends.base import MAX_VERSION
from veil.serve.errors import TeeUnavailableError, UnavailableError
from veil.serve.service import Service
from veil.tee import AttestationError, DeviceError, Evidence, KeyBroker, KeyRequest, RefusalCounter, tls_report_data
from veil.tee.collateral import CollateralSource, with_collateral
from veil.tee.keyrelease import NONCE_BYTES
from veil.tee.providers import EvidenceProvider

log = logging.getLogger("veil.serve")
JSON_BODIES = (schemas.KeyReleaseRequest, schemas.EvidenceRequest, schemas.PlainPredictRequest)
"""Request bodies of these routes, parsed off the event loop like the app's own (`veil.serve.app`)."""


def read_spki(cert_file: str | Path) -> bytes:
    """DER SubjectPublicKeyInfo of the first certificate of a PEM file: the TLS key clients see."""
    try:
        cert = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())[0]
    except (ValueError, IndexError):
        raise ValueError(f"{cert_file} holds no PEM certificate") from None
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class EnclaveAttester:
    """This server's own evidence, bound to its TLS key and a client's nonce.

    One attestation at a time: Gramine's ``/dev/attestation`` is a write-then-read of one pseudo-file,
    which concurrent requests would interleave.
    """

    def __init__(self, provider: EvidenceProvider, spki_der: bytes, collateral: CollateralSource | None = None
                 ) -> None:
        self.provider, self.spki_der, self.collateral = provider, spki_der, collateral
        self._lock = threading.Lock()

    @property
    def platform(self) -> str:
        return self.provider.platform

    def evidence(self, nonce: bytes) -> Evidence:
        """Evidence over ``tls_report_data(nonce, SPKI)``; a failing device is 503 (the server's fault)."""
        with self._lock:
            try:
                found = self.provider.attest(tls_report_data(nonce, self.spki_der))
            except DeviceError as exc:
                log.error("attestation device failed", extra={"error": str(exc)[:200]})
                raise UnavailableError(f"this server cannot attest right now: {exc}") from None
        return with_collateral(found, self.collateral)


class RefusalCollector(Collector):
    """Exports a `RefusalCounter` to Prometheus at scrape time (so no count is kept twice)."""

    def __init__(self, counter: RefusalCounter) -> None:
        self.counter = counter

    def collect(self) -> Iterator[CounterMetricFamily]:
        refused = CounterMetricFamily("veil_tee_key_refusals", "key releases refused, by platform and reason",
                                      labels=["platform", "reason"])
        for (platform, reason), count in sorted(self.counter.refusals().items()):
            refused.add_metric([platform, reason], count)
        granted = CounterMetricFamily("veil_tee_key_grants", "model keys released, by platform",
                                      labels=["platform"])
        for platform, count in sorted(self.counter.grants().items()):
            granted.add_metric([platform], count)
        yield refused
        yield granted


@dataclass
class TeeState:
    """What this server does in trusted execution: broker the model key, attest itself, or neither.
    `collateral` completes SGX/TDX evidence that workers send without a current copy (the attester
    shares it); the app's lifespan closes it at shutdown (`veil.serve.app.create_app`)."""

    broker: KeyBroker | None = None
    attester: EnclaveAttester | None = None
    collateral: CollateralSource | None = None

    def release(self, data: dict[str, Any], owner: str) -> dict[str, Any]:
        """Parse, complete and judge one key request (blocking: verification, maybe a PCCS fetch);
        every refusal, malformed requests included, is counted by the broker."""
        broker = _available(self.broker, "release model keys", "--attest-policy FILE")
        platform = data["evidence"]["platform"] if data.get("evidence") else "none"
        try:
            request = KeyRequest.from_dict(data)
            if request.evidence is not None:
                request = replace(request, evidence=with_collateral(request.evidence, self.collateral))
        except AttestationError as exc:
            broker.refused(platform, exc)
            raise
        return broker.release(request, owner=owner).to_dict()


def _available(part: Any, what: str, option: str) -> Any:
    if part is None:
        raise TeeUnavailableError(f"this server does not {what} (start it with {option})")
    return part


def _nonce(text: str) -> bytes:
    """A client's nonce: strict base64 of exactly `NONCE_BYTES` bytes, else 400."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireFormatError("nonce is not valid base64") from None
    if len(raw) != NONCE_BYTES:
        raise WireFormatError(f"nonce must be {NONCE_BYTES} bytes")
    return raw


def plain_outputs(circuit: Any, X: np.ndarray) -> np.ndarray:
    """Raw outputs of a deployed circuit on plaintext features: its own plaintext backend
    (`evaluate`: leveled networks, tree ensembles), or for an affine circuit its exact affine map."""
    evaluate = getattr(circuit, "evaluate", None)
    if evaluate is not None:
        return np.asarray(evaluate(X), dtype=np.float64)
    return X @ np.asarray(circuit.weights).T + np.asarray(circuit.bias)


def predict_plain(service: Service, name: str, version: int | None, features: list[list[float]]
                  ) -> tuple[int, np.ndarray]:
    """(version, raw outputs) of a model on plaintext features; a wrong shape is a 422 `ShapeError`."""
    record = service.record(name, version)
    circuit = service.model(record).circuit
    X = np.asarray(features, dtype=np.float64) if len({len(row) for row in features}) == 1 else None
    if X is None or X.ndim != 2 or X.shape[1] != circuit.n_features:
        raise ShapeError(f"features must be rows of {circuit.n_features} numbers each")
    out = plain_outputs(circuit, X)
    if not np.all(np.isfinite(out)):
        raise ShapeError("these features give non-finite outputs")
    return record.version, out


def add_routes(app: FastAPI, state: TeeState, service: Service, auth: Callable[..., Principal],
               json_body: Callable[..., Any], json_doc: Callable[[type], dict[str, Any]]) -> None:
    """Register the four endpoints of the module docstring on `app` (see `veil.serve.app.create_app`)."""
    Auth = Annotated[Principal, Depends(auth)]
    name_param = Annotated[str, RoutePath(description="model name", json_schema_extra={"pattern": NAME_PATTERN})]
    version_param = Annotated[int | None, Query(ge=1, le=MAX_VERSION, description="default: the latest version")]

    @app.post("/v1/tee/key-release/challenge", response_model=schemas.KeyChallenge, tags=["trusted execution"])
    @body_role('worker')
    async def key_challenge(who: Auth) -> dict:
        """Step 1 of key release (worker token): a single-use nonce for this token, valid `expires_in` s."""
        who.require("worker")
        broker = _available(state.broker, "release model keys", "--attest-policy FILE")
        challenge = await run_in_threadpool(broker.challenge, who.token or who.name)
        return challenge.to_dict()

    @app.post("/v1/tee/key-release", response_model=schemas.KeyReleaseGrant, tags=["trusted execution"],
              openapi_extra=json_doc(schemas.KeyReleaseRequest))
    @body_role('worker')
    async def key_release(request: Request, who: Auth) -> dict:
        """Step 2 (worker token): evidence over the nonce and an ephemeral key; answers the model key
        wrapped to that key, or 403 naming why the evidence was refused (logged and counted)."""
        who.require("worker")
        _available(state.broker, "release model keys", "--attest-policy FILE")
        body = await json_body(request, schemas.KeyReleaseRequest)
        return await run_in_threadpool(state.release, body.model_dump(), who.token or who.name)

    @app.post("/v1/tee/evidence", response_model=schemas.ServerEvidence, tags=["trusted execution"],
              openapi_extra=json_doc(schemas.EvidenceRequest))
    @body_role('client')
    async def server_evidence(request: Request, who: Auth) -> dict:
        """This server's evidence over the client's nonce and the server's TLS public key (client token)."""
        who.require("client")
        attester = _available(state.attester, "run in an attested enclave", "--attest PLATFORM")
        body = await json_body(request, schemas.EvidenceRequest)
        evidence = await run_in_threadpool(attester.evidence, _nonce(body.nonce))
        return {"platform": evidence.platform, "evidence": evidence.to_dict()}

    @app.post("/v1/models/{name}/predict/plain", response_model=schemas.PlainPrediction, tags=["predict"],
              openapi_extra=json_doc(schemas.PlainPredictRequest))
    @body_role('client')
    async def predict_plaintext(name: name_param, request: Request, who: Auth, version: version_param = None
                                ) -> dict:
        """Plaintext features, only on a server running in an attested enclave (404 elsewhere): verify
        its evidence first (`veil.Client(attest=policy)` does). Evaluated in this process, never queued."""
        who.require("client")
        _available(state.attester, "run in an attested enclave", "--attest PLATFORM")
        body = await json_body(request, schemas.PlainPredictRequest)
        used, out = await run_in_threadpool(predict_plain, service, name, version, body.features)
        return {"model": name, "version": used, "outputs": out.tolist()}
