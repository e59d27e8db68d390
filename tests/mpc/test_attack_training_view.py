"""The whole view of one party over a whole training run (autograd, a ReLU network, cross-entropy
with its exp/log/division approximations, SGD steps) holds no plaintext of the other party.

test_view.py records a fixed sequence of primitives and keeps only messages of at least 1000
elements, so every small message of a run escapes it (a leaked scalar such as the loss would).
Here party 1 records every message it receives, of every size and type, from party 0 and from
the dealer, while the network trains on party 0's features and weights (party 1 holds the
labels). Words of masked ring values are uniform over 2^64, so a received word below 2^40 in
magnitude (probability 2^-23 each) is a fixed-point plaintext of magnitude below 2^24 (|value|
< 256 at 16 fractional bits): none may be received, and no word may equal the encoding of one
of party 0's inputs or initial weights. The exceptions are messages of bits (the two-party
truncation's masked bits and XOR openings), packed 64 to a word: a tensor of fewer than 64 bits
is one word below 2^64, and they are told apart by the function that receives them."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil.mpc as mpc
from veil.mpc import primitives as P
from veil.mpc import ring
from veil.mpc.comm import InProcessComm
from veil.mpc.nn import reveal_module, share_module

OBSERVER = 1
STEPS = 2
FRAC_BITS = 16


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _program(x: torch.Tensor, y: torch.Tensor, net: nn.Module):
    def prog():
        rt = mpc.current()
        model = share_module(copy.deepcopy(net), 0)
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape)
        ys = mpc.share(y if rt.rank == OBSERVER else None, OBSERVER, shape=y.shape)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            opt.step()
        return reveal_module(model, 0), loss.reveal(0)  # both to party 0: the observer receives neither

    return prog


def _view(monkeypatch, x: torch.Tensor, y: torch.Tensor, net: nn.Module) -> tuple[list, tuple]:
    """Every message the observer receives during the run, as (source, is bits, tensor), and the
    results of party 0."""
    seen: list[tuple[int, bool, torch.Tensor]] = []
    recv = InProcessComm._recv
    bits = threading.local()

    def spy(self, shape, dtype, src):
        t = recv(self, shape, dtype, src)
        if self.rank == OBSERVER:
            seen.append((src, getattr(bits, "on", False), t.clone()))
        return t

    def receiving_bits(fn):
        def wrapped(*args, **kwargs):
            bits.on = True
            try:
                return fn(*args, **kwargs)
            finally:
                bits.on = False

        return wrapped

    monkeypatch.setattr(InProcessComm, "_recv", spy)
    for name in ("_recv_bits", "open_xor"):
        monkeypatch.setattr(P, name, receiving_bits(getattr(P, name)))
    out = mpc.run_local(_program(x, y, net), n_parties=2)
    monkeypatch.undo()
    return seen, out[0]


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 12, generator=g) * 3
    y = F.one_hot(torch.randint(0, 3, (64,), generator=g), 3).float()
    return x, y


@pytest.mark.timeout(300)
def test_no_message_of_a_training_run_holds_plaintext(monkeypatch):
    x, y = _data(0)
    net = _net(0)
    seen, (state, loss) = _view(monkeypatch, x, y, net)
    assert torch.isfinite(loss) and set(state) == set(net.state_dict())  # the run really trained
    assert {src for src, _, _ in seen} == {0, 2}  # from party 0 and from the dealer
    assert {t.dtype for _, _, t in seen} <= {torch.int64, torch.uint8}
    masked = [t.reshape(-1) for _, is_bits, t in seen if t.dtype == torch.int64 and not is_bits]
    assert sum(1 for _, is_bits, _ in seen if is_bits) > 0 and sum(t.numel() < 1000 for t in masked) > 10
    words = torch.cat(masked)
    assert words.numel() > 50_000
    plaintext_like = int((words.abs() < 2**40).sum())
    assert plaintext_like == 0, f"{plaintext_like} received words look like fixed-point plaintext"
    secrets = torch.cat([ring.encode(v.reshape(-1).double(), FRAC_BITS) for v in (x, *net.state_dict().values())])
    secrets = secrets[secrets != 0]
    hits = int((torch.isin(words, secrets) | torch.isin(words, -secrets)).sum())
    assert hits == 0, f"{hits} received words equal an encoded input or weight of party 0"
