"""Serving errors, each mapped to one HTTP status so every failure answers a clear JSON body.

`error_fields` is the single map from any exception to (status, code, detail): the HTTP app and the
queue workers both answer through it, so an error has the same status in-process and through Redis.
Anything a client can send maps to a 4xx; an exception that is not a veil error is a bug and maps to
500 ``internal_error`` with a detail that reveals nothing about it.
"""

from __future__ import annotations

from veil.errors import (
    InsecureParametersError,
    KeyMaterialError,
    PrecisionError,
    ShapeError,
    VeilError,
    WireFormatError,
)
from veil.tee.errors import AttestationError, EvidenceFormatError, KeyReleaseError, NoEvidenceError


class ServeError(VeilError):
    """Base of serving errors; `status` is the HTTP status the server answers with."""

    status = 400
    code = "bad_request"


class UnauthorizedError(ServeError):
    status, code = 401, "unauthorized"


class ForbiddenError(ServeError):
    status, code = 403, "forbidden"


class QuotaExceededError(ServeError):
    """A token already stores as many key bundles (or bytes of them) as its quota allows."""

    status, code = 403, "quota_exceeded"


class NotFoundError(ServeError):
    status, code = 404, "not_found"


class ConflictError(ServeError):
    status, code = 409, "conflict"


class RequestTimeoutError(ServeError):
    """A request's head or body did not arrive in time (the connection is closed after it)."""

    status, code = 408, "request_timeout"


class PayloadTooLargeError(ServeError):
    """A request body over the server's limit, declared or while it streams in."""

    status, code = 413, "payload_too_large"


class TooManyRequestsError(ServeError):
    """A principal already has as many request-body bytes in flight as the server holds for one
    token (`veil serve --max-buffered-mb-per-token`); it may retry once its requests have answered."""

    status, code = 429, "too_many_requests"


class IntegrityError(ServeError):
    """A stored artefact failed its AES-GCM authentication: tampered, rolled back, or another key."""

    status, code = 409, "integrity_check_failed"


class UnavailableError(ServeError):
    """The queue or a registry cannot be reached, or no worker answered in time."""

    status, code = 503, "unavailable"


class TeeUnavailableError(ServeError):
    """A trusted-execution endpoint on a server not configured for it (no --attest-policy, or not
    running in an attested enclave: no --attest)."""

    status, code = 404, "tee_unavailable"


# Status of the errors raised below the serving layer (he, ml, tee); checked in order, first match wins.
# Attestation: malformed evidence or messages are 400; evidence refused (chain, signature, binding,
# policy, nonce, or none at all) is 403.
VEIL_ERROR_STATUS: tuple[tuple[type[VeilError], int], ...] = (
    (WireFormatError, 400), (KeyMaterialError, 400), (InsecureParametersError, 400),
    (ShapeError, 422), (PrecisionError, 422),
    (NoEvidenceError, 403), (EvidenceFormatError, 400), (KeyReleaseError, 400), (AttestationError, 403))
INTERNAL_DETAIL = "the server failed to handle this request; it has been logged"


def error_fields(exc: BaseException) -> tuple[int, str, str]:
    """(status, code, detail) for an exception, exactly as the server answers it."""
    if isinstance(exc, ServeError):
        return exc.status, exc.code, str(exc)
    if isinstance(exc, VeilError):
        status = next((s for cls, s in VEIL_ERROR_STATUS if isinstance(exc, cls)), 400)
        return status, type(exc).__name__, str(exc)
    return 500, "internal_error", INTERNAL_DETAIL
