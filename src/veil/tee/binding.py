"""What the 64 bytes of report data bind: a broker's nonce and a public key, hashed with a label.

Attested software chooses its report data; a verifier trusts it only as far as it can recompute it.
Both bindings are SHA-512 (64 bytes, the size of SNP/SGX/TDX report data) over length-prefixed
parts, so no two different (label, nonce, key, context) tuples give the same input:

- key release: ``SHA-512(label "veil-tee-key-release-v1" | nonce | worker's ephemeral X25519 key |
  context)``, so the evidence is fresh (the nonce is the broker's and single-use) and the released
  key can only be unwrapped by the key the attested software generated;
- TLS: ``SHA-512(label "veil-tee-tls-v1" | nonce | server's TLS SubjectPublicKeyInfo DER)``, so a
  client that verified the evidence knows the TLS peer is the attested enclave, not a relay.
"""

from __future__ import annotations

import hashlib
import hmac

from veil.tee.claims import Claims
from veil.tee.errors import BindingError

KEY_RELEASE_LABEL = b"veil-tee-key-release-v1"
TLS_LABEL = b"veil-tee-tls-v1"


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha512()
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def key_release_report_data(nonce: bytes, public_key: bytes, context: bytes) -> bytes:
    """The report data a worker asking for the model key must attest."""
    return _digest(KEY_RELEASE_LABEL, nonce, public_key, context)


def tls_report_data(nonce: bytes, spki_der: bytes) -> bytes:
    """The report data a server must attest for a client that trusts it instead of encrypting."""
    return _digest(TLS_LABEL, nonce, spki_der)


def check_binding(claims: Claims, expected: bytes, what: str) -> None:
    """`claims.report_data` equals `expected` (constant-time), else `BindingError` naming `what`."""
    if not hmac.compare_digest(claims.report_data, expected):
        raise BindingError(f"{claims.platform} evidence report data does not bind {what}")
