"""Model artefacts at rest: AES-256-GCM from `cryptography`, bound to the artefact's name.

File layout: magic ``VEILENC1`` | 12-byte random nonce | ciphertext and 16-byte tag. The
associated data is the magic plus the artefact's identity (e.g. ``model:name:version``), so a file
copied under another name fails authentication just like a modified one.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.serve.errors import IntegrityError

MAGIC = b"VEILENC1"
NONCE_BYTES = 12
KEY_ENV = "VEIL_MODEL_KEY"
KEY_FILE_ENV = "VEIL_MODEL_KEY_FILE"


class ArtefactCipher:
    """Encrypts and authenticates stored artefacts with one 256-bit key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the model key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)

    @staticmethod
    def generate_key() -> bytes:
        return AESGCM.generate_key(bit_length=256)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ArtefactCipher | None:
        """Key from VEIL_MODEL_KEY (base64 or hex) or from the file named by VEIL_MODEL_KEY_FILE."""
        key = key_from_env(environ)
        return None if key is None else cls(key)

    @classmethod
    def from_file(cls, path: str | Path) -> ArtefactCipher:
        return cls(key_from_file(path))

    def encrypt(self, data: bytes, identity: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, data, MAGIC + identity.encode())

    def decrypt(self, blob: bytes, identity: str) -> bytes:
        if len(blob) < len(MAGIC) + NONCE_BYTES + 16 or not blob.startswith(MAGIC):
            raise IntegrityError(f"artefact {identity!r} is not an encrypted veil artefact")
        nonce = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES:], MAGIC + identity.encode())
        except InvalidTag:
            raise IntegrityError(
                f"artefact {identity!r} failed authentication: tampered or wrong key") from None


def key_from_env(environ: dict[str, str] | None = None) -> bytes | None:
    """The model key from VEIL_MODEL_KEY (base64 or hex) or the file VEIL_MODEL_KEY_FILE names, if set."""
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV):
        return parse_key(env[KEY_ENV])
    if env.get(KEY_FILE_ENV):
        return key_from_file(env[KEY_FILE_ENV])
    return None


def key_from_file(path: str | Path) -> bytes:
    return parse_key(Path(path).read_text().strip())


def parse_key(text: str) -> bytes:
    """Accept a 32-byte key written as 64 hex digits or as base64."""
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("model key must be 64 hex digits or base64 of 32 bytes") from None
    if len(key) != 32:
        raise ValueError(f"model key must be 32 bytes, got {len(key)}")
    return key
