"""Typed errors of the MPC engine, so callers can tell a crashed peer from a protocol misuse."""

from veil.errors import VeilError


class MPCError(VeilError):
    """Base class of every error raised on purpose by `veil.mpc`."""


class PartyFailureError(MPCError, RuntimeError):
    """Another party or the dealer crashed or closed its connection: the computation is over."""


class MPCTimeoutError(PartyFailureError, TimeoutError):
    """No message from a peer within the configured timeout: the computation is over."""


class FrameError(PartyFailureError):
    """A peer announced a message of another size than the one the protocol expects from it
    now: refused before anything is allocated, and the link to that peer is closed."""


class ProtocolError(MPCError, ValueError):
    """An operation that the protocols cannot perform securely or that is used wrongly."""


class AgreementError(ProtocolError):
    """The parties were started on different terms (share files, result holder): every party
    stops before computing."""


class AccessError(MPCError, PermissionError):
    """A reveal to a party other than the one named in the call."""


class RangeError(MPCError, ArithmeticError):
    """In the range-check mode (`veil.mpc.range_checks`): a secret value left the range in which
    its operation is exact or meets its stated error bound (a product that wrapped around the
    ring, an approximation outside its domain). Raised by every party at the same check point."""
