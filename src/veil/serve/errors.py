"""Serving errors, each mapped to one HTTP status so every failure answers a clear 4xx JSON body."""

from veil.errors import VeilError


class ServeError(VeilError):
    """Base of serving errors; `status` is the HTTP status the server answers with."""

    status = 400
    code = "bad_request"


class UnauthorizedError(ServeError):
    status, code = 401, "unauthorized"


class ForbiddenError(ServeError):
    status, code = 403, "forbidden"


class NotFoundError(ServeError):
    status, code = 404, "not_found"


class ConflictError(ServeError):
    status, code = 409, "conflict"


class PayloadTooLargeError(ServeError):
    status, code = 413, "payload_too_large"


class IntegrityError(ServeError):
    """A stored artefact failed its AES-GCM authentication: tampered or encrypted with another key."""

    status, code = 409, "integrity_check_failed"


class UnavailableError(ServeError):
    """The queue or a registry cannot be reached, or no worker answered in time."""

    status, code = 503, "unavailable"
