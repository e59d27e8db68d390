"""Protocols on raw shares (int64 tensors): opening, Beaver products, truncation, comparison.

Security (semi-honest parties, a dealer that never sees inputs): every value that is opened
is a secret masked by a fresh uniformly random ring element (``x - a``, ``x + r``) or a fresh
random bit (``b XOR s``, AND-gate openings), so the opened values are uniformly distributed and
independent of the secrets; a coalition of fewer than all parties holds uniform shares only.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from veil.mpc import ring
from veil.mpc.comm import Communicator
from veil.mpc.errors import AccessError, ProtocolError
from veil.mpc.provider import TREE_LEVELS, DealerClient, is_power_of_two

_local = threading.local()


class Runtime:
    """Per-party state: communicator, dealer client, fixed-point precision and private randomness."""

    def __init__(self, comm: Communicator, dealer: DealerClient, frac_bits: int, common: ring.PRG) -> None:
        self.comm = comm
        self.dealer = dealer
        self.frac_bits = frac_bits
        self.prg = ring.PRG()
        self.common = common
        self.truncations = 0
        self.checks = None  # pending range checks inside `veil.mpc.range_checks` (`checks.Pending`)

    @property
    def rank(self) -> int:
        """This party's rank (0..n-1)."""
        return self.comm.rank

    @property
    def n(self) -> int:
        """Number of computing parties."""
        return self.comm.n_parties

    @property
    def scale(self) -> int:
        """2 ** frac_bits."""
        return 1 << self.frac_bits

    def stats(self) -> dict:
        """Traffic counters of this party."""
        return {**self.comm.stats.snapshot(), "dealer_requests": self.dealer.requests}

    def __enter__(self) -> Runtime:
        self._prev = getattr(_local, "rt", None)
        _local.rt = self
        return self

    def __exit__(self, *exc) -> None:
        _local.rt = self._prev


def current() -> Runtime:
    """The runtime of the party running in this thread."""
    rt = getattr(_local, "rt", None)
    if rt is None:
        raise ProtocolError("no MPC runtime: run the code through veil.mpc.run_local or a party process")
    return rt


# ---- sharing and opening -----------------------------------------------------------------


def public(rt: Runtime, v: torch.Tensor) -> torch.Tensor:
    """Shares of a public ring value: party 0 holds it, the others hold zero."""
    return v.clone() if rt.rank == 0 else torch.zeros_like(v)


MAX_DIMS = 8


def share_ring(rt: Runtime, v: torch.Tensor | None, src: int, shape=None) -> torch.Tensor:
    """Party ``src`` splits ring tensor ``v`` into n uniformly random additive shares.

    If the receivers do not pass ``shape``, ``src`` first sends it (shapes are public).
    """
    if rt.rank == src:
        if v is None:
            raise ProtocolError("the source party must provide the value")
        if v.dim() > MAX_DIMS:
            raise ProtocolError(f"at most {MAX_DIMS} dimensions")
        hdr = torch.tensor([v.dim(), *v.shape] + [0] * (MAX_DIMS - v.dim()), dtype=torch.int64)
        mine = v.clone()
        for p in range(rt.n):
            if p == src:
                continue
            if shape is None:
                rt.comm.send(hdr, p)
            r = rt.prg.random(v.shape)
            rt.comm.send(r, p)
            mine = mine - r
        rt.comm.stats.rounds += 1
        return mine
    if shape is None:
        hdr = rt.comm.recv((MAX_DIMS + 1,), torch.int64, src)
        shape = tuple(int(d) for d in hdr[1 : 1 + int(hdr[0])])
    rt.comm.stats.rounds += 1
    return rt.comm.recv(tuple(shape), torch.int64, src)


def open_ring(rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """Reveal an arithmetic sharing to every party (one round)."""
    parts = rt.comm.exchange(x)
    out = parts[0].clone()
    for p in parts[1:]:
        out += p
    return out


def open_xor(rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """Reveal a XOR sharing to every party (one round)."""
    parts = rt.comm.exchange(x)
    out = parts[0].clone()
    for p in parts[1:]:
        out ^= p
    return out


def reveal_ring(rt: Runtime, x: torch.Tensor, to: int | None) -> torch.Tensor | None:
    """Reveal to party ``to`` only (others get None), or to all parties if ``to`` is None."""
    if to is None:
        return open_ring(rt, x)
    if not 0 <= to < rt.n:
        raise AccessError(f"no party {to}")
    parts = rt.comm.gather_to(x, to)
    if parts is None:
        return None
    out = parts[0].clone()
    for p in parts[1:]:
        out += p
    return out


def _open_many(rt: Runtime, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Open several arithmetic sharings in a single round."""
    flat = open_ring(rt, torch.cat([t.reshape(-1) for t in tensors]))
    out, off = [], 0
    for t in tensors:
        out.append(flat[off : off + t.numel()].reshape(t.shape))
        off += t.numel()
    return out


# ---- products ----------------------------------------------------------------------------


def _beaver_with(rt: Runtime, op: str, x: torch.Tensor, y: torch.Tensor, params: dict, t) -> torch.Tensor:
    """Shares of bilinear(op, x, y) from the triple (a, b, c) in bundle ``t`` (one round)."""
    a, b = t["a"], t["b"]
    e, f = _open_many(rt, [x - a, y - b])
    left = a + e if rt.rank == 0 else a
    return t["c"] + ring.bilinear(op, e, b, params) + ring.bilinear(op, left, f, params)


def beaver(rt: Runtime, op: str, x: torch.Tensor, y: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """Shares of bilinear(op, x, y) by a dealer Beaver triple (one round). No truncation."""
    params = params or {}
    return _beaver_with(rt, op, x, y, params, rt.dealer.beaver(op, x.shape, y.shape, params))


def _square_with(rt: Runtime, x: torch.Tensor, t) -> torch.Tensor:
    a = t["a"]
    e = open_ring(rt, x - a)
    z = t["c"] + 2 * e * a
    return z + e * e if rt.rank == 0 else z


def square(rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """Shares of x*x with a dealer pair (a, a^2); only x - a is opened. No truncation."""
    return _square_with(rt, x, rt.dealer.square(x.shape))


def truncate(rt: Runtime, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """Divide shares by 2^bits (default frac_bits) after a fixed-point product: `div_public` by 2^bits."""
    bits = rt.frac_bits if bits is None else bits
    rt.truncations += 1
    if bits == 0:
        return x
    return div_public(rt, x, 1 << bits)


MAX_DIVISOR = 1 << 62
TOP_BIT = 1 << 63


def division_range(d: int) -> tuple[int, int]:
    """The raw values x (read as signed) that `div_public` divides by d exactly: [-B, 2^63 - B)
    with B = d * floor(2^62 / d), which contains [-(2^62 - d), 2^62)."""
    bias = d * (MAX_DIVISOR // d)
    return -bias, TOP_BIT - bias


def div_public(rt: Runtime, x: torch.Tensor, d: int) -> torch.Tensor:
    """Shares of x / d for a public nonzero integer d (|d| <= 2^62), rounded to an integer.

    x is read as a signed 64-bit integer and B = d floor(2^62 / d) (a multiple of d), so that
    x' = x + B lies in [0, 2^63) for every x in `division_range` (party 0 adds B to its share).
    One round and one dealer request (`provider.division_items`; a product's own request when
    it is part of one: `product`). Protocol:

    - three or more parties: 1. the dealer deals a uniform r and shares of t0, t1; 2. the
      parties open z = x' + r (z is uniform, so it reveals nothing); 3. the carry c into bit 63
      of x' + (r mod 2^63) is the top bit of z XOR the top bit of r (x' has none), and x' =
      (z mod 2^63) - (r mod 2^63) + c 2^63. Each party takes t1 if z's top bit is set, else t0
      (that is its share of -floor((r mod 2^63) / d) if c = 0, of ceil((2^63 - (r mod 2^63)) /
      d) if c = 1); party 0 adds floor((z mod 2^63) / d) - B / d.
    - two parties (x' = x'0 + x'1 mod 2^64; a, b the top bits of the shares, l0, l1 their low 63
      bits): as x' has no top bit, x' = l0 + l1 - (a XOR b) 2^63. Party 1 computes both
      candidates P_a = ceil((l1 - (a XOR b) 2^63) / d) for a = 0, 1, Delta = P_1 - P_0, and the
      parties compute shares of a Delta (`_divide_pair`: party 0 sends one masked bit, party 1
      one masked bit if d is a power of two, else one masked word; the dealer sends party 1 one
      word); party 0 adds floor(l0 / d) - B / d, party 1 adds P_0.

    Error: the result is floor(x / d) or floor(x / d) + 1 (floor(alpha) + ceil(beta) for alpha +
    beta = x' / d), at most one unit in the last place (2^-frac_bits for a fixed-point x), with
    no failure probability, for every x in `division_range` (at least |x| < 2^62 - d). Outside
    that range (a value that wrapped around the ring) the result may be off by about 2^64 / d.
    A fixed-point product (2 frac_bits fractional bits, d = 2^frac_bits) is therefore exact while
    |x * y| < 2^(62 - 2 frac_bits) (2^30 for frac_bits = 16); beyond, the ring product itself has
    wrapped. For a mean over n elements, x / n is exact to the fixed-point resolution for every
    n <= 2^31 (tests/mpc/test_protocols.py checks n = 10^6), where multiplying by 1/n encoded
    with frac_bits fractional bits is not (1/n rounds to 0 for n > 2^(frac_bits + 1)).
    """
    d = int(d)
    if d == 0 or abs(d) > MAX_DIVISOR:
        raise ProtocolError(f"public divisor must be a nonzero integer of magnitude <= 2^62, got {d}")
    if d < 0:
        return div_public(rt, -x, -d)
    if d == 1:
        return x
    return _divide_with(rt, x, d, rt.dealer.division(x.shape, d))


LOW63 = TOP_BIT - 1


def _divide_with(rt: Runtime, x: torch.Tensor, d: int, t) -> torch.Tensor:
    """`div_public` of x by d > 1 with the division material in bundle ``t``."""
    low, _ = division_range(d)
    if rt.rank == 0:
        x = x - low
    if rt.n == 2:
        return _divide_pair(rt, x, d, t) + (low // d if rt.rank == 0 else 0)
    z = open_ring(rt, x + t["r"])
    out = torch.where(z < 0, t["t1"], t["t0"])
    if rt.rank == 0:
        out = out + torch.div(z & LOW63, d, rounding_mode="floor") + low // d
    return out


def _recv_bits(rt: Runtime, src: int, shape: torch.Size) -> torch.Tensor:
    """Receive bit-packed 0/1 integers of the given shape from party ``src``."""
    n = shape.numel()
    return unpack_bits(rt.comm.recv(((n + 63) // 64,), torch.int64, src), n).to(torch.int64).reshape(shape)


def _divide_pair(rt: Runtime, x: torch.Tensor, d: int, t) -> torch.Tensor:
    """Two-party step of `div_public` on shares of x' = x + B (see there): one round.

    Party 0 holds a (the top bit of its share), party 1 holds b; the product a Delta uses the
    dealer's u (party 0's random bit), v (party 1's) and shares of w = u v. When d is a power of
    two, Delta = q (2b - 1) with q = 2^63 / d, so a Delta = q (2ab - a), and the product ab of
    two bits needs bits only: party 0 sends e = a XOR u, party 1 sends f = b XOR v, and ab =
    a f + (1 - 2f) (e v + (1 - 2e) w). Otherwise party 1 sends the word f = Delta - v (v a
    uniform word) and a Delta = a f + e v + (1 - 2e) w.
    """
    rt.comm.stats.rounds += 1
    lo = x & LOW63
    mine = (x < 0).to(torch.int64)  # party 0: a, party 1: b
    pow2 = is_power_of_two(d)
    if rt.rank == 0:
        e = mine ^ (t["u"] & 1)
        rt.comm.send(pack_bits(e), 1)
        f = _recv_bits(rt, 1, x.shape) if pow2 else rt.comm.recv(x.shape, torch.int64, 1)
        base = torch.div(lo, d, rounding_mode="floor")
        if pow2:
            ab = mine * f + (1 - 2 * f) * (1 - 2 * e) * t["w"]
            return base + (TOP_BIT // d) * (2 * ab - mine)
        return base + mine * f + (1 - 2 * e) * t["w"]
    # candidates for x' / d - floor(l0 / d): P0 if a = 0 (then the carry is b), P1 if a = 1 (1 - b)
    c0 = -torch.div(-lo, d, rounding_mode="floor")  # ceil(l1 / d)
    c1 = torch.div(lo + (-TOP_BIT + d - 1), d, rounding_mode="floor")  # ceil((l1 - 2^63) / d)
    b = mine.bool()
    p0, p1 = torch.where(b, c1, c0), torch.where(b, c0, c1)
    if pow2:
        v = t["v"] & 1
        f = mine ^ v
        rt.comm.send(pack_bits(f), 0)
        e = _recv_bits(rt, 0, x.shape)
        return p0 + 2 * (TOP_BIT // d) * (1 - 2 * f) * (e * v + (1 - 2 * e) * t["w"])
    v = t["v"]
    rt.comm.send(p1 - p0 - v, 0)
    e = _recv_bits(rt, 0, x.shape)
    return p0 + e * v + (1 - 2 * e) * t["w"]


def product(rt: Runtime, op: str, x: torch.Tensor, y: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """Fixed-point bilinear map of shares: Beaver triple and exact truncation from one dealer
    request (2 rounds); exact while each output element satisfies |x * y| < 2^(62 - 2 frac_bits)."""
    params = params or {}
    rt.truncations += 1
    t = rt.dealer.beaver(op, x.shape, y.shape, params, d=rt.scale)
    return _divide_with(rt, _beaver_with(rt, op, x, y, params, t), rt.scale, t)


def square_divided(rt: Runtime, x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of x*x (exact, no truncation) and of x*x / d (`div_public`, d > 1), from one dealer
    request (2 rounds)."""
    t = rt.dealer.square(x.shape, d=d)
    s = _square_with(rt, x, t)
    return s, _divide_with(rt, s, d, t)


def square_fixed(rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """Fixed-point x*x: dealer square pair and exact truncation in one request (2 rounds); exact
    while |x| < 2^(31 - frac_bits)."""
    rt.truncations += 1
    return square_divided(rt, x, rt.scale)[1]


def mul(rt: Runtime, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fixed-point elementwise product (`product`)."""
    return product(rt, "mul", x, y)


def matmul(rt: Runtime, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fixed-point matrix product (`product`)."""
    return product(rt, "matmul", x, y)


# ---- comparison --------------------------------------------------------------------------


def _and(rt: Runtime, x: torch.Tensor, y: torch.Tensor, a, b, c) -> torch.Tensor:
    """Bitwise AND of XOR-shared words with a binary Beaver triple (one round)."""
    n = x.numel()
    ef = open_xor(rt, torch.cat([(x ^ a).reshape(-1), (y ^ b).reshape(-1)]))
    e, f = ef[:n].reshape(x.shape), ef[n:].reshape(x.shape)
    z = c ^ (e & b) ^ (f & a)
    return z ^ (e & f) if rt.rank == 0 else z


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat tensor of 0/1 values into int64 words, 64 bits per word (zero padded)."""
    arr = np.packbits(bits.reshape(-1).to(torch.uint8).numpy(), bitorder="little")
    pad = (-arr.size) % 8
    if pad:
        arr = np.concatenate([arr, np.zeros(pad, dtype=np.uint8)])
    return torch.from_numpy(arr.view(np.int64).copy())


def unpack_bits(words: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first m bits as a flat uint8 tensor of 0/1."""
    arr = np.unpackbits(words.contiguous().numpy().view(np.uint8), count=m, bitorder="little")
    return torch.from_numpy(arr)


def _and_bits(rt: Runtime, x: torch.Tensor, y: torch.Tensor, a, b, c) -> torch.Tensor:
    """AND of XOR-shared 0/1 tensors, bit-packed on the wire (one round)."""
    m = x.numel()
    return unpack_bits(_and(rt, pack_bits(x), pack_bits(y), a, b, c), m).reshape(x.shape)


def ge_zero(rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """Arithmetic shares (integers 0/1) of [x >= 0]; see `_sign` for the protocol."""
    return _sign(rt, x, None)[0]


def _sign(rt: Runtime, x: torch.Tensor, fused) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Arithmetic shares (integers 0/1, not fixed point) of [x >= 0], x read as signed 64-bit.

    Exact for every ring element (no error probability). Protocol: open z = x + r for a
    dealer-shared uniform r whose bits are also XOR-shared. Then x = z - r, and the sign bit of
    z + ~r + 1 is z_63 XOR ~r_63 XOR carry_63; the carry into bit 63 is computed by a binary tree
    of (generate, propagate) combinations over bits 0..62: 6 rounds of AND gates, bit-packed
    (about 4 words per comparison in total). Finally B2A with a dealer random bit s: open b XOR s
    (packed) and set [b] = c + [s] - 2c[s]. 8 rounds in total.

    With ``fused`` (ReLU), x - alpha is opened together with z, so that x * s = e [s] + [alpha s]
    is local; returns ([b], c, [s], dealer bundle, e * [s] + [alpha s]).
    """
    t = rt.dealer.sign(x.shape, relu=bool(fused))
    shape = x.shape
    if fused:
        z, e = _open_many(rt, [x + t["r"], x - t["al"]])
        z = z.reshape(-1)
    else:
        z = open_ring(rt, x + t["r"]).reshape(-1)
    nb = (~t["rb"] if rt.rank == 0 else t["rb"]).reshape(-1)
    n = z.numel()
    gw = nb & z
    pw = nb ^ z if rt.rank == 0 else nb
    g = unpack_bits(gw, 64 * n).reshape(n, 64)
    p = unpack_bits(pw, 64 * n).reshape(n, 64)
    g[:, 0] ^= p[:, 0]  # carry-in 1: g0 OR p0 (they are never both 1)
    # position 0 becomes a dummy least significant group (g=0, p=1 public), bits 0..62 move up
    G = torch.cat([torch.zeros((n, 1), dtype=torch.uint8), g[:, :63]], 1)
    Pr = torch.cat([torch.full((n, 1), 1 if rt.rank == 0 else 0, dtype=torch.uint8), p[:, :63]], 1)
    for lvl in range(TREE_LEVELS):
        g_lo, g_hi = G[:, 0::2], G[:, 1::2]
        p_lo, p_hi = Pr[:, 0::2], Pr[:, 1::2]
        args = (t[f"a{lvl}"], t[f"b{lvl}"], t[f"c{lvl}"])
        if lvl < TREE_LEVELS - 1:
            res = _and_bits(rt, torch.stack([p_hi, p_hi]), torch.stack([g_lo, p_lo]), *args)
            G = g_hi ^ res[0]
            Pr = res[1]
        else:
            G = g_hi ^ _and_bits(rt, p_hi, g_lo, *args)
    carry = G[:, 0].to(torch.int64)
    bit = (torch.bitwise_right_shift(nb, 63) & 1) ^ carry
    if rt.rank == 0:
        bit = bit ^ (torch.bitwise_right_shift(z, 63) & 1) ^ 1
    s = t["s"].reshape(-1) & 1
    c = unpack_bits(open_xor(rt, pack_bits(bit ^ s)), n).to(torch.int64)
    sa = t["sa"].reshape(-1)
    out = sa - 2 * c * sa
    b = (out + c if rt.rank == 0 else out).reshape(shape)
    if not fused:
        return b, c, sa, t
    return b, c.reshape(shape), t["sa"], t, e * t["sa"] + t["ga"]


class ReluMask:
    """What the backward pass of a ReLU needs: [b] = [x >= 0], the opened c = b XOR s, [s] and a
    dealer pair (alpha2, alpha2 * s), so grad * b = c grad + (1 - 2c) (grad * s) costs one
    opening of grad - alpha2 (one round, one word per element)."""

    def __init__(self, b: torch.Tensor, c: torch.Tensor, sa: torch.Tensor, al2: torch.Tensor, ga2: torch.Tensor):
        self.b, self.c, self.sa, self.al2, self.ga2 = b, c, sa, al2, ga2
        self.used = False

    def apply(self, rt: Runtime, g: torch.Tensor) -> torch.Tensor:
        """Shares of g * b (integer mask, no truncation)."""
        if self.used or g.shape != self.c.shape:
            return beaver(rt, "mul", g, self.b)
        self.used = True  # the pair (alpha2, alpha2 s) must mask only one value
        e = open_ring(rt, g - self.al2)
        gs = e * self.sa + self.ga2
        cg = self.c * g
        return cg + gs - 2 * self.c * gs


def relu(rt: Runtime, x: torch.Tensor) -> tuple[torch.Tensor, ReluMask]:
    """ReLU (8 rounds: the product with the comparison bit is fused into its B2A step) and the
    mask object for the backward pass. relu(x) = x * b = c x + (1 - 2c) (x * s)."""
    b, c, sa, t, xs = _sign(rt, x, True)
    out = c * x + xs - 2 * c * xs
    return out, ReluMask(b, c, sa, t["al2"], t["ga2"])


def max_last(rt: Runtime, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum over the last dimension and a one-hot (integer shares) of one maximal position.

    Tournament: log2(k) levels, each a comparison and one batched product.
    """
    k = x.shape[-1]
    vals = x
    onehot = public(rt, torch.eye(k, dtype=torch.int64).expand(*x.shape[:-1], k, k).contiguous())
    while vals.shape[-1] > 1:
        m = vals.shape[-1]
        h = m // 2
        a, b = vals[..., :h], vals[..., h : 2 * h]
        oa, ob = onehot[..., :h, :], onehot[..., h : 2 * h, :]
        bit = ge_zero(rt, a - b)
        d = a - b
        prod = beaver(
            rt,
            "mul",
            torch.cat([d.unsqueeze(-1), oa - ob], dim=-1),
            bit.unsqueeze(-1),
        )
        newv = b + prod[..., 0]
        newo = ob + prod[..., 1:]
        if m % 2:
            newv = torch.cat([newv, vals[..., -1:]], dim=-1)
            newo = torch.cat([newo, onehot[..., -1:, :]], dim=-2)
        vals, onehot = newv, newo
    return vals[..., 0], onehot[..., 0, :]
