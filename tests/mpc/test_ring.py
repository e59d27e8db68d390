"""Ring arithmetic, encoding, randomness and the data loaders."""

import gzip

import pytest
import torch
from benchmarks.mpc_models import load_digits

from veil.mpc import ring
from veil.mpc.errors import ProtocolError
from veil.mpc.idx import DataFormatError, load_mnist, read_idx, write_idx


def test_encode_decode_roundtrip_within_half_lsb():
    x = torch.randn(1000) * 1000
    err = (ring.decode(ring.encode(x, 16), 16).double() - x.double()).abs().max()
    assert err <= 2**-17 + 1e-4 * 2**-16 * 1000


def test_encode_rejects_overflow_and_nan():
    with pytest.raises(ProtocolError):
        ring.encode(torch.tensor([2.0**50]), 16)
    with pytest.raises(ProtocolError):
        ring.encode(torch.tensor([float("nan")]), 16)


def test_int64_matmul_wraps_modulo_2_64():
    prg = ring.PRG()
    a, b = prg.random((7, 9)), prg.random((9, 5))
    c = a @ b
    m = 2**64
    for i in range(7):
        for j in range(5):
            want = sum(int(a[i, k]) * int(b[k, j]) for k in range(9)) % m
            assert int(c[i, j]) % m == want


@pytest.mark.parametrize(("stride", "padding"), [((1, 1), (1, 1)), ((2, 2), (0, 0)), ((2, 1), (1, 0))])
def test_ring_conv_and_its_gradients_match_float_conv(stride, padding):
    x = torch.randint(-(2**15), 2**15, (2, 3, 7, 6))
    w = torch.randint(-(2**15), 2**15, (4, 3, 3, 3))
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    out = torch.nn.functional.conv2d(xd, wd, stride=stride, padding=padding)
    assert torch.equal(ring.conv2d(x, w, stride, padding), out.round().long())
    g = torch.randint(-(2**10), 2**10, out.shape)
    out.backward(g.double())
    assert torch.equal(ring.conv2d_grad_input(g, w, x.shape, stride, padding), xd.grad.round().long())
    assert torch.equal(ring.conv2d_grad_weight(x, g, w.shape, stride, padding), wd.grad.round().long())


def test_prg_bits_are_balanced_and_streams_differ():
    a = ring.PRG().random((20000,))
    bits = torch.stack([(a >> i) & 1 for i in range(64)])
    frac = bits.double().mean(1)
    # 20000 samples per bit: 6 sigma = 6 * 0.5 / sqrt(20000) ~ 0.021
    assert (frac - 0.5).abs().max() < 0.021
    assert not torch.equal(ring.PRG().random((4,)), ring.PRG().random((4,)))
    k = b"k" * 32
    assert torch.equal(ring.PRG.stream(k, 7).random((5,)), ring.PRG.stream(k, 7).random((5,)))
    assert not torch.equal(ring.PRG.stream(k, 7).random((5,)), ring.PRG.stream(k, 8).random((5,)))


def _blocks(t: torch.Tensor) -> list[bytes]:
    raw = t.numpy().tobytes()
    return [raw[i : i + 16] for i in range(0, len(raw), 16)]


def test_no_two_request_streams_share_a_keystream_block():
    """The leak of the landed code: request c+1's stream was request c's shifted by one block."""
    from veil.mpc.provider import request_prg

    key = ring.PRG().key
    seen: dict[bytes, int] = {}
    for c in range(300):
        for blk in _blocks(request_prg(key, c).random((128,))):  # 64 blocks per request
            assert blk not in seen, f"request {c} reuses a keystream block of request {seen[blk]}"
            seen[blk] = c
    assert len(seen) == 300 * 64


def test_streams_start_at_block_zero_of_their_own_counter_range():
    """Stream s is AES-CTR from the counter block (s, 0): checked against AES-ECB of the counters."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = ring.PRG().key
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    for s in (0, 1, 2**40 + 3, 2**64 - 1):
        counters = b"".join(s.to_bytes(8, "big") + j.to_bytes(8, "big") for j in range(4))
        assert ring.PRG.stream(key, s).random((8,)).numpy().tobytes() == ecb.update(counters)
    with pytest.raises(ProtocolError):
        ring.PRG.stream(key, 2**64)
    with pytest.raises(ProtocolError):
        ring.PRG(b"short", 0)


def test_digits_upsampled_to_28x28():
    x, y = load_digits(28)
    assert x.shape == (1797, 1, 28, 28) and y.shape == (1797,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_idx_roundtrip_plain_and_gzip(tmp_path):
    imgs = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    write_idx(imgs, tmp_path / "img")
    write_idx(labels, tmp_path / "lab")
    (tmp_path / "img.gz").write_bytes(gzip.compress((tmp_path / "img").read_bytes()))
    assert torch.equal(read_idx(tmp_path / "img.gz"), imgs)
    x, y = load_mnist(tmp_path / "img", tmp_path / "lab")
    assert x.shape == (5, 1, 4, 3) and torch.allclose(x[:, 0] * 255, imgs.float())
    assert y.tolist() == [3, 1, 4, 1, 5]


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataFormatError):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DataFormatError):
        read_idx(tmp_path / "short")


def test_bit_packing_roundtrip():
    from veil.mpc.primitives import pack_bits, unpack_bits

    bits = (ring.PRG().random((1000,)) & 1).to(torch.uint8)
    words = pack_bits(bits)
    assert words.dtype == torch.int64 and words.numel() == 16
    assert torch.equal(unpack_bits(words, 1000), bits)
