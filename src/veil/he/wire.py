"""Versioned binary envelope for ciphertexts and key bundles.

Layout: magic ``VEIL`` | version u8 | kind u8 | header length u32 | JSON header |
blob count u32 | (blob length u32 | blob bytes)*. Every length is checked against the input,
so truncated or forged messages raise `WireFormatError` before SEAL sees a byte.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from veil.errors import WireFormatError

MAGIC = b"VEIL"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_BLOBS = 1 << 20
INT64_MAX = 2**63 - 1
_PREFIX = struct.Struct("<4sBBI")
_U32 = struct.Struct("<I")


def strict_int(value: object, what: str, low: int = -INT64_MAX - 1, high: int = INT64_MAX,
               error: type[Exception] = WireFormatError) -> int:
    """`value` if it is a true integer in [low, high]; else raise `error` naming `what`.

    Decoded JSON gives floats (1e400 is inf), booleans (True == 1) and strings where integers are
    expected; `int()` would round, overflow or accept them, so headers and artefacts are checked here.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be an integer, got {type(value).__name__} {_short(value)}")
    if not low <= value <= high:
        raise error(f"{what} must be in [{low}, {high}], got {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Kind(IntEnum):
    """What a message holds; a receiver states the kind it expects."""

    CIPHERTEXTS = 1
    PUBLIC_BUNDLE = 2
    SECRET_KEYS = 3


@dataclass
class Message:
    """A decoded envelope: its kind, JSON header and raw blobs (SEAL serializations)."""

    kind: Kind
    header: dict
    blobs: list[bytes] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        head = json.dumps(self.header, separators=(",", ":"), sort_keys=True).encode()
        if len(head) > MAX_HEADER_BYTES:
            raise WireFormatError("header too large")
        parts = [_PREFIX.pack(MAGIC, VERSION, int(self.kind), len(head)), head,
                 _U32.pack(len(self.blobs))]
        for blob in self.blobs:
            parts.append(_U32.pack(len(blob)))
            parts.append(blob)
        return b"".join(parts)

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())


def decode(data: bytes | bytearray | memoryview, expected: Kind | None = None) -> Message:
    """Parse an envelope, checking magic, version, kind and every length."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireFormatError(f"expected bytes, got {type(data).__name__}")
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise WireFormatError(f"message too short ({len(view)} bytes)")
    magic, version, kind, head_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireFormatError("not a veil message (bad magic)")
    if version != VERSION:
        raise WireFormatError(f"unsupported wire version {version} (this build reads {VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise WireFormatError(f"unknown message kind {kind}") from None
    if expected is not None and kind != expected:
        raise WireFormatError(f"expected a {expected.name} message, got {kind.name}")
    pos = _PREFIX.size
    if head_len > MAX_HEADER_BYTES or pos + head_len + _U32.size > len(view):
        raise WireFormatError("truncated or oversized header")
    try:
        header = json.loads(bytes(view[pos:pos + head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireFormatError("header must be a JSON object")
    pos += head_len
    (count,) = _U32.unpack_from(view, pos)
    pos += _U32.size
    if count > MAX_BLOBS:
        raise WireFormatError(f"too many blobs ({count})")
    blobs = []
    for i in range(count):
        if pos + _U32.size > len(view):
            raise WireFormatError(f"truncated before blob {i}")
        (size,) = _U32.unpack_from(view, pos)
        pos += _U32.size
        if pos + size > len(view):
            raise WireFormatError(f"blob {i} truncated ({size} bytes announced)")
        blobs.append(bytes(view[pos:pos + size]))
        pos += size
    if pos != len(view):
        raise WireFormatError(f"{len(view) - pos} trailing bytes after the last blob")
    return Message(kind, header, blobs)
