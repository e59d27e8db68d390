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
