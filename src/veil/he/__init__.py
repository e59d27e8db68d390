"""CKKS on Microsoft SEAL (seal-python): parameters, keys split by owner, packing, wire format."""

from veil.he.context import HEContext
from veil.he.keys import PublicBundle, SecretKeys
from veil.he.packing import BatchLayout, RowLayout, make_layout
from veil.he.params import PRESETS, CKKSParameters, preset, preset_for

__all__ = [
    "PRESETS",
    "BatchLayout",
    "CKKSParameters",
    "HEContext",
    "PublicBundle",
    "RowLayout",
    "SecretKeys",
    "make_layout",
    "preset",
    "preset_for",
]
