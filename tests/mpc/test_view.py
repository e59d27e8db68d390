"""A semi-honest party's whole view across a run reveals nothing about the other parties' inputs.

The landed code used the request number as the whole AES-CTR counter block, so request c+1's
masks were request c's shifted by one block (two ring elements): from two products ``x*y`` then
``x*x`` party 0 learned every ``x[i+2] - x[i]``. Each message alone was uniform, which is all the
per-message tests in test_security.py checked. Here a party records everything it learns during
a run of many requests (every opened value, every message it receives) and the tests look for
what such a flaw produces: linear or XOR relations between any two openings at small shifts, and
a dependence of the view's distribution on the secret inputs.
"""

import itertools

import pytest
import torch
from scipy import stats

import veil.mpc as mpc
from veil.mpc import primitives as P
from veil.mpc import ring
from veil.mpc.comm import InProcessComm

N = 2048
MIN_ELEMENTS = 1000


def _program(x: torch.Tensor, y: torch.Tensor):
    def prog():
        rt = mpc.current()
        xs = P.share_ring(rt, ring.encode(x, 16) if rt.rank == 0 else None, 0, shape=x.shape)
        ys = P.share_ring(rt, ring.encode(y, 16) if rt.rank == 1 else None, 1, shape=y.shape)
        for _ in range(2):  # the same sequence of requests again, as training does
            P.mul(rt, xs, ys)
            P.mul(rt, xs, xs)
            P.truncate(rt, P.square(rt, xs))
            P.relu(rt, xs - ys)
            P.matmul(rt, xs.reshape(32, 64), ys.reshape(64, 32))
            P.div_public(rt, xs, 3)
        return True

    return prog


def _record_view(monkeypatch, prog, n_parties: int, rank: int) -> list[torch.Tensor]:
    """Everything party ``rank`` learns: opened values (arithmetic and XOR) and received messages."""
    view: list[torch.Tensor] = []
    open_ring, open_xor, recv = P.open_ring, P.open_xor, InProcessComm._recv

    def spy(orig):
        def opened(rt, x):
            out = orig(rt, x)
            if rt.rank == rank:
                view.append(out.reshape(-1).clone())
            return out

        return opened

    def received(self, shape, dtype, src):
        t = recv(self, shape, dtype, src)
        if self.rank == rank and dtype == torch.int64:
            view.append(t.reshape(-1).clone())
        return t

    monkeypatch.setattr(P, "open_ring", spy(open_ring))
    monkeypatch.setattr(P, "open_xor", spy(open_xor))
    monkeypatch.setattr(InProcessComm, "_recv", received)
    mpc.run_local(prog, n_parties=n_parties)
    monkeypatch.undo()
    return [v for v in view if v.numel() >= MIN_ELEMENTS]


def _related(a: torch.Tensor, b: torch.Tensor, shift: int) -> bool:
    """Whether a[shift + i] - b[i] or a[shift + i] ^ b[i] is (mostly) constant: a relation.

    With constant secrets every linear or XOR relation between masked values collapses to a
    constant difference; for uniform independent values two equal neighbours have probability
    2^-64 each.
    """
    n = min(a.numel() - shift, b.numel())
    if n < MIN_ELEMENTS:
        return False
    u, v = a[shift : shift + n], b[:n]
    for d in (u - v, u ^ v):
        if float((d[1:] == d[:-1]).double().mean()) > 0.01 or float((d == d[n // 2]).double().mean()) > 0.01:
            return True
    return False


@pytest.mark.parametrize("n_parties", [2, 3])
def test_no_relation_between_any_two_things_a_party_learns(monkeypatch, n_parties):
    """Constant secrets: any linear/XOR relation between two openings would show as a constant difference."""
    x, y = torch.full((N,), 3.5), torch.full((N,), -1.25)
    for rank in (0, n_parties - 1):  # a party that receives no dealer corrections and the one that does
        view = _record_view(monkeypatch, _program(x, y), n_parties, rank)
        assert len(view) >= 20, len(view)
        for (i, a), (j, b) in itertools.combinations(enumerate(view), 2):
            for shift in range(5):
                assert not _related(a, b, shift), (rank, i, j, shift)
                assert not _related(b, a, shift), (rank, j, i, shift)
        for i, a in enumerate(view):
            for shift in range(1, 5):
                assert not _related(a, a, shift), (rank, i, shift)


def test_view_distribution_does_not_depend_on_the_secrets(monkeypatch):
    """Two runs on different secrets: the whole view of party 1 has the same (uniform) distribution."""
    runs = []
    for x, y in ((torch.zeros(N), torch.zeros(N)), (torch.linspace(-50, 50, N), torch.linspace(7, -3, N))):
        view = _record_view(monkeypatch, _program(x, y), 2, 1)
        runs.append(torch.cat([(v >> 32).double() for v in view]).numpy())
    assert stats.ks_2samp(runs[0], runs[1]).pvalue > 1e-4
    for r in runs:
        assert stats.kstest((r + 2**31) / 2**32, "uniform").pvalue > 1e-4
