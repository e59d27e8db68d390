"""Ring Z_2^64 arithmetic, fixed-point encoding and cryptographically secure randomness.

Every secret value is an int64 tensor whose operations wrap modulo 2^64 (torch integer
arithmetic is two's complement). Reals are encoded in fixed point with ``frac_bits``
fractional bits: ``x -> round(x * 2^f)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from veil.mpc.errors import ProtocolError

DEFAULT_FRAC_BITS = 16


def encode(x: torch.Tensor | float, frac_bits: int) -> torch.Tensor:
    """Fixed-point encode reals into the ring; rejects values that do not fit in 62 bits."""
    t = torch.as_tensor(x, dtype=torch.float64) * float(2**frac_bits)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ProtocolError("cannot encode non-finite values")
    if t.numel() and float(t.abs().max()) >= 2.0**62:
        raise ProtocolError(f"value too large for the ring with {frac_bits} fractional bits")
    return t.round().to(torch.int64)


def decode(v: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Decode ring elements (read as signed) back to float32 reals."""
    return (v.to(torch.float64) / float(2**frac_bits)).to(torch.float32)


STREAM_BLOCKS = 1 << 64  # AES blocks one stream may use: its 64-bit block counter never wraps


class PRG:
    """One AES-256-CTR keystream (the `cryptography` package) turned into uniform int64 tensors.

    The 128-bit initial counter block is ``stream_id`` (64 bits, big-endian) followed by a 64-bit
    block counter that starts at zero. Two streams of the same key therefore never share a
    keystream block: stream ``s`` uses exactly the counter blocks ``s * 2^64 + j`` for
    ``j < 2^64``, and `random` refuses to run past the end of its stream. A fresh key (from
    ``os.urandom``, the default) is used for a single stream; a key given by the dealer is
    expanded into one stream per request, each with its own ``stream_id`` (`stream`).
    """

    def __init__(self, key: bytes | None = None, stream_id: int = 0) -> None:
        self.key = key if key is not None else os.urandom(32)
        if len(self.key) != 32:
            raise ProtocolError("PRG keys are 32 bytes (AES-256)")
        if not 0 <= stream_id < 1 << 64:
            raise ProtocolError("stream ids are 64-bit unsigned integers")
        self.stream_id = stream_id
        self.bytes_used = 0
        self._enc = Cipher(algorithms.AES(self.key), modes.CTR(self.counter_block(stream_id))).encryptor()

    @staticmethod
    def counter_block(stream_id: int) -> bytes:
        """The initial counter block of a stream: stream id, then a zero 64-bit block counter."""
        return stream_id.to_bytes(8, "big") + bytes(8)

    @classmethod
    def stream(cls, key: bytes, stream_id: int) -> PRG:
        """Stream number ``stream_id`` of ``key`` (independent of every other stream of that key)."""
        return cls(key, stream_id)

    def random(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform elements of Z_2^64 with the given shape (the next 8 bytes each of the stream)."""
        n = 1
        for s in shape:
            n *= int(s)
        if n == 0:
            return torch.zeros(tuple(shape), dtype=torch.int64)
        self.bytes_used += 8 * n
        if (self.bytes_used + 15) // 16 > STREAM_BLOCKS:
            raise ProtocolError("PRG stream exhausted (2^64 blocks): use a new stream")
        buf = bytearray(self._enc.update(bytes(8 * n)))
        return torch.frombuffer(buf, dtype=torch.int64).reshape(tuple(shape))


# ---- bilinear maps over the ring, used by Beaver triples -----------------------------------


def _unfold(x: torch.Tensor, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int]):
    """im2col for int64 tensors: (N,C,H,W) -> (N, OH*OW, C*kh*kw)."""
    ph, pw = padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    p = x.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])
    n, c, oh, ow = p.shape[:4]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(n, oh * ow, c * kh * kw), oh, ow


def fold(cols: torch.Tensor, input_shape, kh: int, kw: int, stride, padding) -> torch.Tensor:
    """col2im (adjoint of `_unfold`): cols (N, OH, OW, C, kh, kw) summed into (N,C,H,W)."""
    n, c, h, w = input_shape
    ph, pw = padding
    sh, sw = stride
    oh, ow = cols.shape[1], cols.shape[2]
    out = torch.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] += cols[
                :, :, :, :, i, j
            ].permute(0, 3, 1, 2)
    return out[:, :, ph : ph + h, pw : pw + w]


def conv2d(x: torch.Tensor, w: torch.Tensor, stride=(1, 1), padding=(0, 0)) -> torch.Tensor:
    """2-D convolution (groups=1, dilation=1) over the ring."""
    o, _, kh, kw = w.shape
    cols, oh, ow = _unfold(x, kh, kw, tuple(stride), tuple(padding))
    out = torch.matmul(cols, w.reshape(o, -1).t())
    return out.permute(0, 2, 1).reshape(x.shape[0], o, oh, ow)


def conv2d_grad_input(g: torch.Tensor, w: torch.Tensor, input_shape, stride=(1, 1), padding=(0, 0)):
    """Gradient of `conv2d` with respect to its input (bilinear in g and w)."""
    o, c, kh, kw = w.shape
    n, _, oh, ow = g.shape
    cols = torch.matmul(g.reshape(n, o, oh * ow).transpose(1, 2), w.reshape(o, -1))
    return fold(cols.reshape(n, oh, ow, c, kh, kw), input_shape, kh, kw, tuple(stride), tuple(padding))


def conv2d_grad_weight(x: torch.Tensor, g: torch.Tensor, weight_shape, stride=(1, 1), padding=(0, 0)):
    """Gradient of `conv2d` with respect to its weight (bilinear in x and g)."""
    o, c, kh, kw = weight_shape
    cols, oh, ow = _unfold(x, kh, kw, tuple(stride), tuple(padding))
    n = x.shape[0]
    gm = g.reshape(n, o, oh * ow).permute(1, 0, 2).reshape(o, n * oh * ow)
    return torch.matmul(gm, cols.reshape(n * oh * ow, c * kh * kw)).reshape(o, c, kh, kw)


def bilinear(op: str, x: torch.Tensor, y: torch.Tensor, params: dict) -> torch.Tensor:
    """Evaluate the named bilinear map over the ring (shared by parties and the dealer)."""
    if op == "mul":
        return x * y
    if op == "matmul":
        return torch.matmul(x, y)
    if op == "conv2d":
        return conv2d(x, y, params["stride"], params["padding"])
    if op == "conv2d_gi":
        return conv2d_grad_input(x, y, params["input_shape"], params["stride"], params["padding"])
    if op == "conv2d_gw":
        return conv2d_grad_weight(x, y, params["weight_shape"], params["stride"], params["padding"])
    raise ProtocolError(f"unknown bilinear op {op!r}")


def bilinear_shape(op: str, xs: tuple, ys: tuple, params: dict) -> tuple[int, ...]:
    """Output shape of `bilinear` without computing it."""
    a = torch.empty(xs, dtype=torch.int64, device="meta")
    b = torch.empty(ys, dtype=torch.int64, device="meta")
    if op == "mul":
        return tuple(torch.broadcast_shapes(a.shape, b.shape))
    if op == "matmul":
        return tuple(torch.matmul(a, b).shape)
    if op == "conv2d":
        n, _, h, w = xs
        o, _, kh, kw = ys
        (sh, sw), (ph, pw) = params["stride"], params["padding"]
        return (n, o, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    if op == "conv2d_gi":
        return tuple(params["input_shape"])
    if op == "conv2d_gw":
        return tuple(params["weight_shape"])
    raise ProtocolError(f"unknown bilinear op {op!r}")
