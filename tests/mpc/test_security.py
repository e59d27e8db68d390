"""Statistical checks: shares and everything a party receives look uniformly random."""

import pytest
import torch
from scipy import stats

import veil.mpc as mpc
from veil.mpc import primitives as P
from veil.mpc import ring
from veil.mpc.comm import InProcessComm

N = 4000


def _bit_balance_ok(words: torch.Tensor, bits=range(64)) -> bool:
    """Every listed bit position is 1 in about half of the words (6 sigma)."""
    tol = 6 * 0.5 / len(words) ** 0.5
    return all(abs(float(((words >> b) & 1).double().mean()) - 0.5) < tol for b in bits)


@pytest.mark.parametrize("n_parties", [2, 3])
def test_each_share_is_uniform_and_independent_of_the_secret(n_parties):
    secrets = {"zeros": torch.zeros(N), "ones": torch.ones(N), "ramp": torch.linspace(-100, 100, N)}

    def prog():
        rt = mpc.current()
        return {k: mpc.share(v if rt.rank == 0 else None, 0)._share for k, v in secrets.items()}

    views = mpc.run_local(prog, n_parties=n_parties)
    for party in range(n_parties):
        for name in secrets:
            assert _bit_balance_ok(views[party][name]), (party, name)
        # a party's view for two different secrets has the same distribution (top 32 bits, KS test)
        a = (views[party]["zeros"] >> 32).double().numpy()
        b = (views[party]["ramp"] >> 32).double().numpy()
        assert stats.ks_2samp(a, b).pvalue > 1e-4
        # and the uniform distribution over the ring
        u = ((views[party]["ones"] >> 32).double().numpy() + 2**31) / 2**32
        assert stats.kstest(u, "uniform").pvalue > 1e-4
    # shares of fewer than all parties sum to something independent of the secret
    partial = sum(views[p]["ones"] for p in range(n_parties - 1))
    assert _bit_balance_ok(partial)
    total = sum(views[p]["ones"] for p in range(n_parties))
    assert torch.equal(total, ring.encode(secrets["ones"], 16))


def test_messages_received_during_relu_and_matmul_are_uniform(monkeypatch):
    received: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    orig = InProcessComm._recv

    def spy(self, shape, dtype, src):
        t = orig(self, shape, dtype, src)
        if self.rank in received and src < 2 and dtype == torch.int64:
            received[self.rank].append(t.reshape(-1))
        return t

    monkeypatch.setattr(InProcessComm, "_recv", spy)
    x = torch.full((N,), 3.5)  # a constant secret: any structure in messages would show
    w = torch.full((N // 50, 50), -1.25)

    def prog():
        rt = mpc.current()
        xs = P.share_ring(rt, ring.encode(x, 16) if rt.rank == 0 else None, 0, shape=(N,))
        ws = P.share_ring(rt, ring.encode(w, 16) if rt.rank == 0 else None, 0, shape=w.shape)
        P.relu(rt, xs)
        P.matmul(rt, ws, xs.reshape(50, N // 50))
        return True

    mpc.run_local(prog)
    for rank, msgs in received.items():
        assert msgs
        for m in msgs:
            if m.numel() < 1000:
                continue
            if bool(((m >= 0) & (m <= 1)).all()):
                # B2A opening b XOR s: one masked bit per word
                assert _bit_balance_ok(m, bits=[0]), rank
            else:
                assert _bit_balance_ok(m), rank
