"""The dealer (crypto provider): correlated randomness for Beaver triples, truncation and comparison.

Seed expansion: at start-up the dealer sends each party i a fresh AES key (over its private
channel). Party i expands every share it needs from that key; the dealer expands the same
streams, so it knows the full random values. Only the *derived* parts (c = a*b of a triple,
the bits of a comparison mask, ...) cannot be expanded by the last party: for those the
dealer sends party n-1 one correcting share. The dealer never receives any input or share,
only the public shapes of the requested material.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from veil.mpc import ring
from veil.mpc.comm import Communicator
from veil.mpc.errors import PartyFailureError, ProtocolError

HEADER_BYTES = 4096
TREE_LEVELS = 6
INT63_MASK = (1 << 63) - 1
INT64_MIN = -(1 << 63)


def and_words(n: int) -> list[int]:
    """Bit-packed AND gates per level of the carry tree for n comparisons (int64 words).

    Level l combines 64 / 2^l groups per element pairwise: two ANDs per pair, one at the root.
    """
    out = []
    for lvl in range(TREE_LEVELS):
        pairs = 64 >> (lvl + 1)
        gates = n * pairs * (2 if lvl < TREE_LEVELS - 1 else 1)
        out.append((gates + 63) // 64)
    return out


@dataclass(frozen=True)
class Item:
    """One piece of correlated randomness: arithmetic ('A') or XOR ('B') shared, or a private
    random word of each party ('P': not a sharing; the dealer knows every party's word); derived
    (only 'A' or 'B') or not."""

    name: str
    shape: tuple[int, ...]
    domain: str
    derived: bool


class Request:
    """One kind of correlated randomness the dealer provides (as CrypTen's TupleProvider methods).

    `items` lists what every party and the dealer expand, in order, from the request's stream;
    `derive` computes, on the dealer only, the full values of the derived items (those the last
    party cannot expand: it receives a correcting share for them). ``kind`` names the request on
    the wire; ``spec`` holds only public shapes and parameters.
    """

    kind: str = ""

    def items(self, spec: dict) -> list[Item]:
        raise NotImplementedError

    def derive(self, spec: dict, full: dict[str, torch.Tensor], frac_bits: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def division_items(shape: tuple[int, ...], pair: bool) -> list[Item]:
    """The material of one exact division by a public d (`primitives.div_public`) of ``shape`` elements.

    Three or more parties (``pair`` false): a uniform r, and t0, t1 (the correction when the
    opened value's top bit is 0 or 1). Two parties: party 0's private random bit u (the low bit
    of its word "u"), party 1's private random word "v" and shares of w = u v, where v is party
    1's word, or only its low bit when d is a power of two (`division_derive`).
    """
    if pair:
        return [Item("u", shape, "P", False), Item("v", shape, "P", False), Item("w", shape, "A", True)]
    return [Item("r", shape, "A", False), Item("t0", shape, "A", True), Item("t1", shape, "A", True)]


def is_power_of_two(d: int) -> bool:
    """Whether the divisor d > 0 is a power of two (a truncation)."""
    return d & (d - 1) == 0


def division_derive(full: dict, d: int, pair: bool) -> dict[str, torch.Tensor]:
    """The derived items of `division_items`. Two parties: w = u v. Otherwise, with r_lo = r mod
    2^63, u0 = -floor(r_lo / d) and u1 = ceil((2^63 - r_lo) / d): t0 = u1 if r's top bit is set
    else u0, and t1 the other one."""
    if d <= 1:
        raise ProtocolError("division divisor must be at least 2")
    if pair:
        v = full["v"][1] & 1 if is_power_of_two(d) else full["v"][1]
        return {"w": (full["u"][0] & 1) * v}
    r = full["r"]
    r_lo = r & INT63_MASK
    u0 = -torch.div(r_lo, d, rounding_mode="floor")
    u1 = -torch.div(r_lo + INT64_MIN, d, rounding_mode="floor")  # r_lo - 2^63 fits in int64
    top = r < 0
    return {"t0": torch.where(top, u1, u0), "t1": torch.where(top, u0, u1)}


class _Product(Request):
    """The material of one product c = op(a, b) (`operands` and `product` say which) and, with ``d``
    in the spec, the material to divide c by d (`division_items`), so a fixed-point product is one
    request."""

    def operands(self, spec: dict) -> tuple[list[Item], tuple[int, ...]]:
        """The random operand items and the shape of c."""
        raise NotImplementedError

    def product(self, spec: dict, full: dict[str, torch.Tensor]) -> torch.Tensor:
        """c from the operands in the clear."""
        raise NotImplementedError

    def items(self, spec: dict) -> list[Item]:
        operands, shape = self.operands(spec)
        items = [*operands, Item("c", shape, "A", True)]
        return items + division_items(shape, bool(spec.get("pair"))) if spec.get("d") else items

    def derive(self, spec, full, frac_bits):
        out = {"c": self.product(spec, full)}
        if spec.get("d"):
            out.update(division_derive(full, int(spec["d"]), bool(spec.get("pair"))))
        return out


class BeaverTriple(_Product):
    """(a, b, c = op(a, b)) for a bilinear ``op`` (product, matmul, convolution and its gradients),
    with division material as `_Product`."""

    kind = "beaver"

    def operands(self, spec: dict) -> tuple[list[Item], tuple[int, ...]]:
        out = ring.bilinear_shape(spec["op"], tuple(spec["xs"]), tuple(spec["ys"]), spec["params"])
        return [Item("a", tuple(spec["xs"]), "A", False), Item("b", tuple(spec["ys"]), "A", False)], out

    def product(self, spec: dict, full: dict[str, torch.Tensor]) -> torch.Tensor:
        return ring.bilinear(spec["op"], full["a"], full["b"], spec["params"])


class SquarePair(_Product):
    """(a, c = a^2): one opening per square instead of two, with division material as `_Product`."""

    kind = "square"

    def operands(self, spec: dict) -> tuple[list[Item], tuple[int, ...]]:
        return [Item("a", tuple(spec["xs"]), "A", False)], tuple(spec["xs"])

    def product(self, spec: dict, full: dict[str, torch.Tensor]) -> torch.Tensor:
        return full["a"] * full["a"]


class DivisionPair(Request):
    """`division_items` for an exact division by a public integer d (default 2^frac_bits: truncation)."""

    kind = "trunc"

    def items(self, spec: dict) -> list[Item]:
        return division_items(tuple(spec["xs"]), bool(spec.get("pair")))

    def derive(self, spec, full, frac_bits):
        return division_derive(full, int(spec.get("d", 1 << frac_bits)), bool(spec.get("pair")))


class SignMask(Request):
    """A uniform r with its bits XOR-shared, AND triples for the carry tree and a random bit s
    shared both ways (B2A): everything `primitives._sign` needs for an exact comparison."""

    kind = "sign"
    relu = False

    def items(self, spec: dict) -> list[Item]:
        s = tuple(spec["xs"])
        items = [Item("r", s, "A", False), Item("rb", s, "B", True)]
        if self.relu:
            # pairs (alpha, alpha * s) for x * s (forward) and grad * s (backward)
            items += [Item("al", s, "A", False), Item("al2", s, "A", False)]
        for lvl, words in enumerate(and_words(_numel(s))):
            items += [
                Item(f"a{lvl}", (words,), "B", False),
                Item(f"b{lvl}", (words,), "B", False),
                Item(f"c{lvl}", (words,), "B", True),
            ]
        items += [Item("s", s, "B", False), Item("sa", s, "A", True)]
        if self.relu:
            items += [Item("ga", s, "A", True), Item("ga2", s, "A", True)]
        return items

    def derive(self, spec, full, frac_bits):
        out = {"rb": full["r"], "sa": full["s"] & 1}
        if self.relu:
            out["ga"] = full["al"] * out["sa"]
            out["ga2"] = full["al2"] * out["sa"]
        for lvl in range(len(and_words(_numel(tuple(spec["xs"]))))):
            out[f"c{lvl}"] = full[f"a{lvl}"] & full[f"b{lvl}"]
        return out


class ReluMaterial(SignMask):
    """`SignMask` plus the pairs that make ReLU's product with the comparison bit (forward and
    backward) cost no extra round."""

    kind = "relu"
    relu = True


REQUESTS: dict[str, Request] = {r.kind: r for r in (BeaverTriple(), SquarePair(), DivisionPair(), SignMask(),
                                                     ReluMaterial())}


def _request(kind: str) -> Request:
    try:
        return REQUESTS[kind]
    except KeyError:
        raise ProtocolError(f"unknown dealer request {kind!r}") from None


def plan(kind: str, spec: dict) -> list[Item]:
    """The items of a request, in the order every party and the dealer expand them."""
    return _request(kind).items(spec)


def derive(kind: str, spec: dict, full: dict[str, torch.Tensor], frac_bits: int) -> dict[str, torch.Tensor]:
    """Full values of the derived items from the full values of the expanded ones (dealer only)."""
    return _request(kind).derive(spec, full, frac_bits)


def _encode_header(kind: str, spec: dict) -> torch.Tensor:
    raw = json.dumps({"kind": kind, "spec": spec}).encode()
    if len(raw) + 4 > HEADER_BYTES:
        raise ProtocolError("dealer request too large")
    buf = bytearray(HEADER_BYTES)
    buf[:4] = len(raw).to_bytes(4, "little")
    buf[4 : 4 + len(raw)] = raw
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def _decode_header(t: torch.Tensor) -> tuple[str, dict]:
    raw = bytes(t.numpy().tobytes())
    n = int.from_bytes(raw[:4], "little")
    msg = json.loads(raw[4 : 4 + n].decode())
    return msg["kind"], msg["spec"]


class Bundle:
    """A party's shares of one request; derived items of the last party arrive lazily."""

    def __init__(self, values: dict[str, torch.Tensor], pending: list[Item], fetch) -> None:
        self._values = values
        self._pending = pending
        self._fetch = fetch

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._values:
            self._values.update(self._fetch(self._pending))
            self._pending = []
        return self._values[name]


class DealerClient:
    """Party side of the dealer protocol."""

    def __init__(self, comm: Communicator, key: bytes) -> None:
        self.comm = comm
        self.key = key
        self.requests = 0

    @property
    def is_last(self) -> bool:
        """Whether this party receives the correcting shares."""
        return self.comm.rank == self.comm.n_parties - 1

    def request(self, kind: str, spec: dict) -> Bundle:
        """Shares of fresh correlated randomness of the given kind (see `plan`)."""
        prg = request_prg(self.key, self.requests)
        self.requests += 1
        items = plan(kind, spec)
        if self.is_last:
            self.comm.send(_encode_header(kind, spec), self.comm.dealer)
        values: dict[str, torch.Tensor] = {}
        pending: list[Item] = []
        for it in items:
            if it.derived and self.is_last:
                pending.append(it)
            else:
                values[it.name] = prg.random(it.shape)

        def fetch(todo: list[Item]) -> dict[str, torch.Tensor]:
            total = sum(_numel(it.shape) for it in todo)
            flat = self.comm.recv((total,), torch.int64, self.comm.dealer)
            out, off = {}, 0
            for it in todo:
                k = _numel(it.shape)
                out[it.name] = flat[off : off + k].reshape(it.shape)
                off += k
            return out

        return Bundle(values, pending, fetch)

    def beaver(self, op: str, xs, ys, params: dict, d: int | None = None) -> Bundle:
        """Shares of a Beaver triple (a, b, op(a, b)) for operands of shapes xs and ys, with the
        material to divide the output by ``d`` if given."""
        return self.request(BeaverTriple.kind, {"op": op, "xs": list(xs), "ys": list(ys), "params": params,
                                                **self._division(d)})

    def square(self, xs, d: int | None = None) -> Bundle:
        """Shares of (a, a^2), with the material to divide the square by ``d`` if given."""
        return self.request(SquarePair.kind, {"xs": list(xs), **self._division(d)})

    def division(self, xs, d: int) -> Bundle:
        """Shares of the material of one exact division by d (`division_items`)."""
        return self.request(DivisionPair.kind, {"xs": list(xs), **self._division(d)})

    def _division(self, d: int | None) -> dict:
        """The spec entries asking for division material (the two-party kind with two parties)."""
        if not d:
            return {}
        return {"d": int(d), "pair": True} if self.comm.n_parties == 2 else {"d": int(d)}

    def sign(self, xs, relu: bool = False) -> Bundle:
        """Comparison material for ``xs`` elements (with ReLU's product pairs if ``relu``)."""
        return self.request((ReluMaterial if relu else SignMask).kind, {"xs": list(xs)})

    def stop(self) -> None:
        """Tell the dealer that the computation is over (last party only)."""
        if self.is_last:
            self.comm.send(_encode_header("stop", {}), self.comm.dealer)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def request_prg(key: bytes, counter: int) -> ring.PRG:
    """The AES-CTR stream of request number ``counter``: stream ``counter`` of the party's key.

    Each request has its own 64-bit stream id and a block counter starting at zero
    (`ring.PRG`), so the masks of different requests come from disjoint keystream blocks and
    are independent; a request never reuses another request's randomness, in any order.
    """
    return ring.PRG.stream(key, counter)


def _answer(keys: list[bytes], counter: int, kind: str, spec: dict, frac_bits: int) -> torch.Tensor:
    """The last party's correcting shares for one request (dealer side)."""
    n = len(keys)
    last = n - 1
    items = plan(kind, spec)
    full: dict[str, torch.Tensor] = {}
    partial: dict[str, torch.Tensor] = {}
    for p in range(n):
        prg = request_prg(keys[p], counter)
        for it in items:
            if it.derived and p == last:
                continue
            v = prg.random(it.shape)
            if it.domain == "P":  # a party's private word: the dealer keeps each party's own
                full.setdefault(it.name, []).append(v)
                continue
            tgt = partial if it.derived else full
            if it.name not in tgt:
                tgt[it.name] = v
            elif it.domain == "A":
                tgt[it.name] = tgt[it.name] + v
            else:
                tgt[it.name] = tgt[it.name] ^ v
    derived = derive(kind, spec, full, frac_bits)
    parts = []
    for it in items:
        if not it.derived:
            continue
        want = derived[it.name]
        have = partial.get(it.name)
        if have is None:
            corr = want
        else:
            corr = want - have if it.domain == "A" else want ^ have
        parts.append(corr.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def run_dealer(comm: Communicator, frac_bits: int) -> dict:
    """Dealer main loop: hand out keys, then answer requests of the last party until "stop".

    Training repeats the same sequence of requests every batch, so after answering a request
    the dealer precomputes the answer to the request that followed the same three requests last time (streams are
    per request, so a wrong guess costs only time) while the parties compute.
    """
    n = comm.n_parties
    keys = []
    for p in range(n):
        key = ring.PRG().key
        keys.append(key)
        comm.send(torch.frombuffer(bytearray(key), dtype=torch.uint8).clone(), p)
    last = n - 1
    follow: dict[tuple, bytes] = {}
    history: tuple = ()
    guess: tuple[bytes, torch.Tensor] | None = None
    counter = 0
    hits = 0
    while True:
        head = comm.recv((HEADER_BYTES,), torch.uint8, last)
        raw = bytes(head.numpy().tobytes())
        kind, spec = _decode_header(head)
        if kind == "stop":
            break
        if guess is not None and guess[0] == raw:
            answer = guess[1]
            hits += 1
        else:
            answer = _answer(keys, counter, kind, spec, frac_bits)
        comm.send(answer, last)
        if history:
            follow[history] = raw
        history = (*history[-2:], raw)  # context: the last three requests
        counter += 1
        nxt = follow.get(history)
        guess = None
        if nxt is not None:
            k2, s2 = _decode_header(torch.frombuffer(bytearray(nxt), dtype=torch.uint8))
            guess = (nxt, _answer(keys, counter, k2, s2, frac_bits))
    return {"requests": counter, "precomputed_hits": hits, **comm.stats.snapshot()}


def receive_key(comm: Communicator) -> bytes:
    """Party side of the key hand-out: the AES key shared with the dealer."""
    t = comm.recv((32,), torch.uint8, comm.dealer)
    raw = bytes(t.numpy().tobytes())
    if len(raw) != 32:
        raise PartyFailureError("bad key from dealer")
    return raw
