"""MNIST IDX files (the format of MNIST and similar datasets): reader, writer and loader.

Used by ``veil mpc share`` for owners' data; gzip-compressed files are read as they are."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from veil.mpc.errors import MPCError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFormatError(MPCError, ValueError):
    """A file that is not a valid IDX file."""


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (MNIST format, optionally gzip-compressed) into a tensor."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path}: bad IDX magic")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX type 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise DataFormatError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dt = np.dtype(_IDX_DTYPES[code])
    n = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != n * dt.itemsize:
        raise DataFormatError(f"{path}: expected {n * dt.itemsize} data bytes, found {len(body)}")
    arr = np.frombuffer(body, dtype=dt).reshape(dims).astype(dt.newbyteorder("=") if dt.itemsize > 1 else dt)
    return torch.from_numpy(arr.copy())


def write_idx(t: torch.Tensor, path: str | Path) -> None:
    """Write a uint8 tensor as an IDX file (for tests and tools)."""
    arr = t.numpy().astype(np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    Path(path).write_bytes(head + arr.tobytes())


def load_mnist(images: str | Path, labels: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST IDX images/labels as (N, 1, H, W) floats in [0, 1] and int64 labels."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise DataFormatError("images must be (N, H, W) and labels (N,)")
    return x.unsqueeze(1).float() / 255.0, y.long()
