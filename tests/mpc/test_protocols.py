"""Each protocol against plaintext torch within its stated bound, with 2 and 3 parties."""

import pytest
import torch

import veil.mpc as mpc
from veil.mpc import approx, ring
from veil.mpc import primitives as P
from veil.mpc.errors import AccessError

from .conftest import run_on_shares

F = 16
LSB = 2.0**-F


def dec(v: torch.Tensor) -> torch.Tensor:
    return v.double() / 2**F


def test_add_and_public_ops(n_parties):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, generator=g) * 10, torch.randn(50, generator=g) * 10
    out = run_on_shares(lambda rt, a, b: a + b - 3 * a, x, y, n_parties=n_parties)
    assert (dec(out) - (y - 2 * x).double()).abs().max() <= 4 * LSB


def test_mul_error_bound(n_parties):
    # error <= (|x| + |y|) * 2^-(F+1) (encoding) + 2^-F (truncation) + 2^-2F
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, generator=g) * 50, torch.randn(4000, generator=g) * 50
    out = dec(run_on_shares(P.mul, x, y, n_parties=n_parties))
    bound = (x.abs() + y.abs()).double() * 2 ** -(F + 1) + 2 * LSB
    assert ((out - x.double() * y.double()).abs() <= bound).all()


def test_square_matches(n_parties):
    x = torch.linspace(-100, 100, 1001)
    out = dec(run_on_shares(lambda rt, a: P.truncate(rt, P.square(rt, a)), x, n_parties=n_parties))
    assert ((out - x.double() ** 2).abs() <= x.abs().double() * LSB + 2 * LSB).all()


def test_matmul_error_bound(n_parties):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(33, 70, generator=g), torch.randn(70, 12, generator=g)
    out = dec(run_on_shares(P.matmul, x, y, n_parties=n_parties))
    ref = x.double() @ y.double()
    # each of the 70 products carries the encoding error of its factors, plus one truncation
    ones_l, ones_r = torch.ones(70, 12, dtype=torch.float64), torch.ones(33, 70, dtype=torch.float64)
    bound = x.abs().double() @ ones_l + ones_r @ y.abs().double()
    assert ((out - ref).abs() <= bound * 2 ** -(F + 1) + 2 * LSB).all()


def test_conv2d_beaver(n_parties):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    params = {"stride": [1, 1], "padding": [1, 1]}
    out = dec(run_on_shares(lambda rt, a, b: P.truncate(rt, P.beaver(rt, "conv2d", a, b, params)), x, w,
                            n_parties=n_parties))
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    assert (out - ref).abs().max() <= 27 * 2 * 3 * 2 ** -(F + 1) * 4 + 2 * LSB


def test_truncation_is_floor_or_floor_plus_one(n_parties):
    # Stated bound: |error| <= 1 LSB with no failure probability inside P.division_range (up to |x| ~ 2^62:
    # tests/mpc/test_range.py checks |x| < 2^61); here the magnitudes of ordinary products, |x| < 2^40.
    prg = ring.PRG()
    raw = prg.random((20000,)) >> 24
    assert raw.abs().max() < 2**40

    def prog():
        rt = mpc.current()
        s = P.share_ring(rt, raw if rt.rank == 0 else None, 0)
        return P.open_ring(rt, P.truncate(rt, s))

    out = mpc.run_local(prog, n_parties=n_parties)[0]
    diff = out - (raw >> F)
    assert set(diff.unique().tolist()) <= {0, 1}


def test_ge_zero_is_exact_on_the_whole_ring(n_parties):
    prg = ring.PRG()
    edge = torch.tensor([0, 1, -1, 2**62, -(2**62), 2**63 - 1, -(2**63), 12345, -12345], dtype=torch.int64)
    raw = torch.cat([edge, prg.random((3000,)), prg.random((3000,)) >> 40])

    def prog():
        rt = mpc.current()
        s = P.share_ring(rt, raw if rt.rank == 1 else None, 1)
        return P.open_ring(rt, P.ge_zero(rt, s))

    out = mpc.run_local(prog, n_parties=n_parties)[0]
    assert torch.equal(out, (raw >= 0).long())


def test_relu_and_mask(n_parties):
    x = torch.randn(500) * 20
    out = dec(run_on_shares(lambda rt, a: P.relu(rt, a)[0], x, n_parties=n_parties))
    assert (out - x.relu().double()).abs().max() <= LSB


def test_max_and_argmax_one_hot(n_parties):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 7, generator=g) * 5

    def fn(rt, a):
        v, oh = P.max_last(rt, a)
        return torch.cat([v, oh.reshape(-1)])

    out = run_on_shares(fn, x, n_parties=n_parties)
    v, oh = dec(out[:40]), out[40:].reshape(40, 7)
    assert (v - x.max(1).values.double()).abs().max() <= LSB
    assert torch.equal(oh.argmax(1), x.argmax(1)) and torch.equal(oh.sum(1), torch.ones(40, dtype=torch.int64))


APPROX = [
    # name, function, inputs, bound(result, reference, x) -> bool   (bounds of approx.py's docstring)
    ("exp", approx.exp, torch.linspace(-8, 4, 301),
     lambda r, e, x: (r - e).abs() <= e * (x * x / 400 + 0.01) + 1e-3),
    ("exp_tail", approx.exp, torch.linspace(-250, -8, 101), lambda r, e, x: (r - e).abs() <= 1e-3),
    ("reciprocal", approx.reciprocal, torch.linspace(0.5, 100, 301), lambda r, e, x: (r - e).abs() <= 0.01 * e),
    ("log", approx.log, torch.linspace(0.1, 100, 301), lambda r, e, x: (r - e).abs() <= 0.05),
    ("sqrt", approx.sqrt, torch.linspace(0.05, 50, 301), lambda r, e, x: (r - e).abs() <= 0.01 * e),
    ("inv_sqrt", approx.inv_sqrt, torch.linspace(0.05, 50, 301), lambda r, e, x: (r - e).abs() <= 0.01 * e),
    ("sigmoid", approx.sigmoid, torch.linspace(-250, 250, 301), lambda r, e, x: (r - e).abs() <= 0.01),
]
REF = {"exp": torch.exp, "exp_tail": torch.exp, "reciprocal": torch.reciprocal, "log": torch.log,
       "sqrt": torch.sqrt, "inv_sqrt": torch.rsqrt, "sigmoid": torch.sigmoid}


@pytest.mark.parametrize(("name", "fn", "x", "ok"), APPROX, ids=[a[0] for a in APPROX])
def test_approximation_within_documented_bound(name, fn, x, ok):
    r = dec(run_on_shares(fn, x))
    e = REF[name](x.double())
    assert ok(r, e, x.double()).all()


def test_softmax_within_bound():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 100, generator=g) * 3
    r = dec(run_on_shares(lambda rt, a: approx.softmax(rt, a, 1), x))
    assert (r - x.double().softmax(1)).abs().max() <= 0.02


def test_reveal_only_to_named_party(n_parties):
    x = torch.arange(6.0)

    def prog():
        rt = mpc.current()
        t = mpc.share(x if rt.rank == 0 else None, 0)
        got = t.reveal(to=n_parties - 1)
        with pytest.raises(AccessError):
            t.reveal(to=n_parties)
        return got

    out = mpc.run_local(prog, n_parties=n_parties)
    assert all(o is None for o in out[:-1])
    assert torch.equal(out[-1], x)


def test_dealer_speculation_survives_a_changed_request_pattern():
    # The dealer precomputes the answer to the request it expects next; a changed pattern
    # (different shapes and kinds after a repeated prefix) must still give correct results.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, generator=g)

    def fn(rt, a):
        outs = []
        for _ in range(4):
            outs.append(P.mul(rt, a, a))
            outs.append(P.relu(rt, a)[0])
        outs.append(P.relu(rt, a[:7])[0])  # pattern broken: other shape, then other kinds
        outs.append(P.mul(rt, a[:5], a[5:10]))
        outs.append(P.relu(rt, a)[0])
        return torch.cat(outs)

    out = dec(run_on_shares(fn, x, n_parties=3))
    want = torch.cat([x * x, x.relu()] * 4 + [x[:7].relu(), x[:5] * x[5:10], x.relu()]).double()
    assert (out - want).abs().max() <= 4 * LSB
