"""Exact public scaling and torch view semantics on secret-shared tensors.

Both were silent wrong answers in the landed code: ``mean`` multiplied by 1/n encoded with 16
fractional bits (the mean of n ones was 0.9961 for n=640, 1.068 for 10^4 and 0.0 for 2*10^5),
and an in-place op on a view (``w[0].zero_()``) never reached its base.
"""

import pytest
import torch
import torch.nn.functional as F

import veil.mpc as mpc
from veil.mpc import primitives as P
from veil.mpc.errors import ProtocolError

LSB = 2.0**-16


def _on_shares(fn, x: torch.Tensor, n_parties: int = 2):
    """Share x from party 0, apply fn to the MPCTensor, reveal to everyone."""

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=tuple(x.shape))
        return fn(xs).reveal()

    return mpc.run_local(prog, n_parties=n_parties, timeout=120)[0]


@pytest.mark.parametrize("n", [640, 10_000, 200_000, 1_000_000])
def test_mean_of_ones_is_one_for_any_n(n, n_parties):
    out = _on_shares(lambda t: t.mean(), torch.ones(n), n_parties)
    assert abs(float(out) - 1.0) <= LSB, (n, float(out))


def test_mean_and_loss_reductions_match_plaintext_at_1e6():
    x = torch.linspace(-3.0, 5.0, 1_000_000)
    t = torch.linspace(1.0, -1.0, 1_000_000)

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape)
        ts = mpc.share(t if rt.rank == 1 else None, 1, shape=t.shape)
        return xs.mean().reveal(), F.mse_loss(xs, ts).reveal(), xs.reshape(1000, 1000).mean(1).reveal()

    mean, mse, rows = mpc.run_local(prog, timeout=120)[0]
    xd, td = x.double(), t.double()
    assert abs(float(mean) - float(xd.mean())) <= 2 * LSB
    # each squared difference carries one truncation (<= 1 LSB) and encoding error: 4 LSB is ample
    assert abs(float(mse) - float(((xd - td) ** 2).mean())) <= 4 * LSB
    assert (rows.double() - xd.reshape(1000, 1000).mean(1)).abs().max() <= 2 * LSB


def test_public_division_exact_for_large_divisors(n_parties):
    for d in (3, 7, 1000, 65_537, 2**31):

        def prog(d=d):
            rt = mpc.current()
            v = torch.full((50,), float(d) * 1.5)
            xs = mpc.share(v if rt.rank == 0 else None, 0, shape=(50,))
            return (xs / d).reveal(), (xs * (1.0 / d)).reveal()

        div, mul_inv = mpc.run_local(prog, n_parties=n_parties)[0]
        assert (div - 1.5).abs().max() <= LSB, d
        assert (mul_inv - 1.5).abs().max() <= LSB, d


def test_div_public_error_is_floor_or_floor_plus_one(n_parties):
    raw = torch.randint(-(2**40), 2**40, (5000,), generator=torch.Generator().manual_seed(3))
    for d in (3, 10, 12345):

        def prog(d=d):
            rt = mpc.current()
            xs = P.share_ring(rt, raw if rt.rank == 0 else None, 0, shape=raw.shape)
            return P.open_ring(rt, P.div_public(rt, xs, d))

        out = mpc.run_local(prog, n_parties=n_parties)[0]
        floor = torch.div(raw, d, rounding_mode="floor")
        assert bool(((out - floor >= 0) & (out - floor <= 1)).all()), d
    with pytest.raises(ProtocolError):
        mpc.run_local(lambda: P.div_public(mpc.current(), torch.zeros(2, dtype=torch.int64), 0))


def test_average_pooling_large_window_is_exact():
    x = torch.full((1, 1, 64, 64), 2.0)
    out = _on_shares(lambda t: F.avg_pool2d(t, 64), x)
    assert abs(float(out.reshape(())) - 2.0) <= LSB
    out = _on_shares(lambda t: F.adaptive_avg_pool2d(t, 1), x)
    assert abs(float(out.reshape(())) - 2.0) <= LSB


# ---- views alias their base ----------------------------------------------------------------


def test_inplace_on_views_reaches_the_base(n_parties):
    w = torch.arange(12.0).reshape(3, 4)

    def prog():
        rt = mpc.current()
        ws = mpc.share(w if rt.rank == 0 else None, 0, shape=w.shape)
        with torch.no_grad():
            ws[0].zero_()  # select view, in-place
            ws[:, 1] = 7.0  # slice assignment (fill_ on a view)
            ws[2, 2:] += 1.0  # in-place add on a slice
            ws.view(-1)[5].mul_(2.0)  # view of a view
            ws.t()[3].copy_(torch.tensor([-1.0, -2.0, -3.0]))  # transposed view, copy_
        return ws.reveal()

    got = mpc.run_local(prog, n_parties=n_parties)[0]
    ref = w.clone()
    ref[0].zero_()
    ref[:, 1] = 7.0
    ref[2, 2:] += 1.0
    ref.view(-1)[5].mul_(2.0)
    ref.t()[3].copy_(torch.tensor([-1.0, -2.0, -3.0]))
    assert torch.allclose(got, ref, atol=1e-4), (got, ref)


def test_writes_to_the_base_show_in_views_and_index_put():
    w = torch.arange(10.0)
    secret = torch.full((3,), 5.5)

    def prog():
        rt = mpc.current()
        ws = mpc.share(w if rt.rank == 0 else None, 0, shape=w.shape)
        s = mpc.share(secret if rt.rank == 1 else None, 1, shape=secret.shape)
        view = ws[2:6]
        with torch.no_grad():
            ws.add_(1.0)
            idx = torch.tensor([0, 9, 4])
            ws[idx] = s  # index_put_ with secret values
            ws.index_put_((torch.tensor([1]),), torch.tensor(100.0), accumulate=True)
            ws[torch.tensor([False] * 8 + [True, False])] = 0.0  # boolean mask
        return ws.reveal(), view.reveal()

    full, view = mpc.run_local(prog)[0]
    ref = w + 1.0
    ref[torch.tensor([0, 9, 4])] = 5.5
    ref[1] += 100.0
    ref[8] = 0.0
    assert torch.allclose(full, ref, atol=1e-4)
    assert torch.allclose(view, ref[2:6], atol=1e-4)


def test_public_value_cache_is_dropped_when_a_view_is_written():
    """A tensor known to be public (zeros) stops being treated as public once a view is overwritten."""
    secret = torch.tensor([3.0, -2.0, 4.0])

    def prog():
        rt = mpc.current()
        s = mpc.share(secret if rt.rank == 1 else None, 1, shape=(3,))
        z = torch.zeros_like(s)  # public zeros
        with torch.no_grad():
            z[1:].copy_(s[1:])  # secret values written through a view
        return (z * s).reveal(), z.reveal()

    prod, z = mpc.run_local(prog)[0]
    assert torch.allclose(z, torch.tensor([0.0, -2.0, 4.0]), atol=1e-4)
    assert torch.allclose(prod, torch.tensor([0.0, 4.0, 16.0]), atol=1e-3)


def test_secret_indices_are_refused():
    def prog():
        rt = mpc.current()
        w = mpc.share(torch.zeros(4) if rt.rank == 0 else None, 0, shape=(4,))
        m = mpc.share(torch.ones(4) if rt.rank == 0 else None, 0, shape=(4,))
        w.masked_fill_(m.to(torch.bool), 1.0)

    with pytest.raises(ProtocolError):
        mpc.run_local(prog)


# ---- found by the attack review ------------------------------------------------------------------


def test_division_by_public_values_beyond_2_31_and_small_reals(n_parties):
    x = torch.tensor([1e12, 3e11, -5e11], dtype=torch.float64)  # 2^56 raw at most: inside the ring
    y = torch.full((3,), 130.0)

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=(3,))
        ys = mpc.share(y if rt.rank == 0 else None, 0, shape=(3,))
        return [t.reveal() for t in (xs / 3e9, xs / 2**32, ys / 100000.5, ys * 1.3e-5,
                                     ys * 2.9e-5, ys * 0.3, ys * 123.456)]

    got = mpc.run_local(prog, n_parties=n_parties)[0]
    xd, yd = x, y.double()
    want = [xd / 3e9, xd / 2**32, yd / 100000.5, yd * 1.3e-5, yd * 2.9e-5, yd * 0.3, yd * 123.456]
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=2 * LSB), (g, w)


def test_setting_data_replaces_the_shares():
    def prog():
        rt = mpc.current()
        lin = torch.nn.Linear(3, 1)
        from veil.mpc.nn import share_module

        share_module(lin, 0)
        lin.weight.data = mpc.share(torch.tensor([[1.0, 2.0, 3.0]]) if rt.rank == 0 else None, 0, shape=(1, 3))
        lin.bias.data = torch.tensor([0.5])  # a public value
        vec = torch.nn.utils.parameters_to_vector(lin.parameters())
        torch.nn.utils.vector_to_parameters(vec * 2.0, lin.parameters())
        return lin.weight.reveal(), lin.bias.reveal()

    w, b = mpc.run_local(prog)[0]
    assert torch.allclose(w, torch.tensor([[2.0, 4.0, 6.0]]), atol=1e-4)
    assert torch.allclose(b, torch.tensor([1.0]), atol=1e-4)


def test_tied_weights_stay_tied():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    net = torch.nn.Sequential(a, torch.nn.Identity(), b)
    x, t = torch.randn(8, 4), torch.randn(8, 4)

    import copy

    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(ref(x), t).backward()
        opt.step()

    def prog():
        rt = mpc.current()
        from veil.mpc.nn import reveal_module, share_module

        m = share_module(copy.deepcopy(net), 0)
        assert len(list(m.parameters())) == 1
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape)
        ts = mpc.share(t if rt.rank == 0 else None, 0, shape=t.shape)
        o = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(3):
            o.zero_grad()
            F.mse_loss(m(xs), ts).backward()
            o.step()
        return reveal_module(m, 0)

    state = mpc.run_local(prog)[0]
    assert torch.allclose(state["0.weight"], ref[0].weight.detach(), atol=2e-3)
    assert torch.equal(state["0.weight"], state["2.weight"])


def test_inplace_on_an_expanded_tensor_is_refused_as_in_torch():
    def prog():
        rt = mpc.current()
        e = mpc.share(torch.ones(3) if rt.rank == 0 else None, 0, shape=(3,))
        with torch.no_grad():
            e.expand(2, 3).add_(1.0)

    with pytest.raises((ProtocolError, RuntimeError)):
        torch.ones(3).expand(2, 3).add_(1.0)
        mpc.run_local(prog)
    with pytest.raises(ProtocolError):
        mpc.run_local(prog)
