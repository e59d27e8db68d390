"""Helpers for the MPC tests: run a party program in-process and compare with plaintext."""

import pytest
import torch

import veil.mpc as mpc
from veil.mpc import primitives as P
from veil.mpc import ring


def run_on_shares(fn, *xs: torch.Tensor, n_parties: int = 2, frac_bits: int = 16):
    """Share each plaintext ``xs[i]`` from party i % n, apply ``fn(rt, *shares)``, open the result (ring)."""

    def prog():
        rt = mpc.current()
        shares = [
            P.share_ring(rt, ring.encode(x, frac_bits) if rt.rank == i % n_parties else None, i % n_parties)
            for i, x in enumerate(xs)
        ]
        out = fn(rt, *shares)
        return P.open_ring(rt, out)

    res = mpc.run_local(prog, n_parties=n_parties, frac_bits=frac_bits)
    assert all(torch.equal(r, res[0]) for r in res)
    return res[0]


@pytest.fixture(params=[2, 3], ids=["2parties", "3parties"])
def n_parties(request) -> int:
    """Run protocol tests with 2 and with 3 computing parties."""
    return request.param


def sgd_step_both(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, loss_fn, lr: float = 0.1):
    """One forward, backward and SGD step of ``net`` in plaintext and under MPC (x from party 0,
    t from party 1), from the same weights.

    Returns ``(plain, mpc)``, each (output, loss, input gradient, state dict after the step)."""
    import copy

    from veil.mpc.nn import reveal_module, share_module

    ref = copy.deepcopy(net)
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    loss = loss_fn(out, t)
    loss.backward()
    torch.optim.SGD(ref.parameters(), lr=lr).step()

    def prog():
        rt = mpc.current()
        m = share_module(copy.deepcopy(net), 0)
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape, requires_grad=True)
        ts = mpc.share(t if rt.rank == 1 else None, 1, shape=t.shape)
        o = m(xs)
        lo = loss_fn(o, ts)
        lo.backward()
        torch.optim.SGD(m.parameters(), lr=lr).step()
        return o.reveal(0), lo.reveal(0), xs.grad.reveal(0), reveal_module(m, 0)

    plain = (out.detach(), loss.detach(), xr.grad, ref.state_dict())
    return plain, mpc.run_local(prog)[0]
