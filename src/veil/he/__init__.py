"""CKKS on Microsoft SEAL (seal-python): parameters, keys split by owner, ciphertext values, wire format."""

from veil.he.context import HEContext
from veil.he.keys import PublicBundle, SecretKeys
from veil.he.params import PRESETS, CKKSParameters, preset, preset_for

__all__ = [
    "PRESETS",
    "CKKSParameters",
    "HEContext",
    "PublicBundle",
    "SecretKeys",
    "preset",
    "preset_for",
]
