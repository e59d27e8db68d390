"""Activations and losses beyond ReLU/sigmoid: forward, input gradient and one optimizer step of a
small network, under MPC against plaintext torch, within each one's documented error bound
(veil/mpc/_ops/activation_ops.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil.mpc as mpc
from veil.mpc.errors import ProtocolError
from veil.mpc.nn import reveal_module, share_module

from .conftest import sgd_step_both

# (module, bound on outputs and gradients): exact ones to fixed-point rounding, approximations
# to their documented bound
CASES = {
    "leaky_relu": (nn.LeakyReLU(0.1), 2e-3),
    "relu6": (nn.ReLU6(), 2e-3),
    "hardtanh": (nn.Hardtanh(-0.5, 0.7), 2e-3),
    "tanh": (nn.Tanh(), 0.03),
    "silu": (nn.SiLU(), 0.03),
    "gelu": (nn.GELU(), 0.05),
    "softplus": (nn.Softplus(), 0.06),
    "elu": (nn.ELU(0.8), 0.02),
}


# elementwise bounds (forward, derivative) on x in [-6, 6]; measured errors are 2-4x smaller
POINTWISE = {
    "leaky_relu": (1e-3, 1e-3),
    "relu6": (1e-3, 1e-3),
    "hardtanh": (1e-3, 1e-3),
    "tanh": (0.01, 0.01),
    "silu": (0.01, 0.01),
    "gelu": (0.025, 0.04),
    "softplus": (0.01, 0.01),
    "elu": (0.01, 0.01),
}


@pytest.mark.parametrize("name", list(POINTWISE))
def test_activation_pointwise_values_and_derivatives(name):
    act = CASES[name][0]
    fwd_bound, bwd_bound = POINTWISE[name]
    x = torch.linspace(-6, 6, 601) + 0.0031  # no grid point on a breakpoint (0, -0.5, 0.7, 6)
    xr = x.clone().requires_grad_(True)
    y = act(xr)
    y.sum().backward()

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape, requires_grad=True)
        ys = act(xs)
        ys.sum().backward()
        return ys.reveal(0), xs.grad.reveal(0)

    yo, go = mpc.run_local(prog)[0]
    assert (yo - y.detach()).abs().max() <= fwd_bound
    assert (go - xr.grad).abs().max() <= bwd_bound


def test_hardtanh_gradient_is_zero_at_both_ends_as_in_torch():
    x = torch.tensor([-0.5, 0.7, 0.0, -2.0, 2.0])

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape, requires_grad=True)
        nn.Hardtanh(-0.5, 0.7)(xs).sum().backward()
        return xs.grad.reveal(0)

    assert torch.equal(mpc.run_local(prog)[0], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))


def _run(act: nn.Module, bound: float, loss_fn=None, n_out: int = 3):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), act, nn.Linear(8, n_out))
    x = torch.randn(16, 5) * 2
    t = torch.randn(16, n_out) if loss_fn is None else torch.rand(16, n_out).round()
    loss_fn = loss_fn or F.mse_loss

    (out, loss, xgrad, ref_state), (o, lo, gx, state) = sgd_step_both(net, x, t, loss_fn)
    scale = 1 + float(out.abs().max())
    assert (o - out).abs().max() <= bound * scale, "forward"
    assert abs(float(lo) - float(loss)) <= bound * (1 + abs(float(loss))), "loss"
    assert (gx - xgrad).abs().max() <= bound * (1 + float(xgrad.abs().max())), "input gradient"
    for k, v in ref_state.items():
        assert (state[k] - v).abs().max() <= bound, f"step: {k}"


@pytest.mark.parametrize("name", list(CASES))
def test_activation_forward_backward_step(name):
    act, bound = CASES[name]
    _run(act, bound)


def test_l1_loss():
    _run(nn.ReLU(), 2e-3, loss_fn=F.l1_loss)


def test_bce_with_logits_loss():
    _run(nn.Tanh(), 0.06, loss_fn=F.binary_cross_entropy_with_logits)


def test_unsupported_ops_name_themselves():
    def conv3d():
        rt = mpc.current()
        m = share_module(nn.Conv3d(2, 3, 3), 0)
        m(mpc.share(torch.randn(1, 2, 4, 4, 4) if rt.rank == 0 else None, 0, shape=(1, 2, 4, 4, 4)))

    with pytest.raises(ProtocolError, match="3-d convolution"):
        mpc.run_local(conv3d)

    def selu():
        rt = mpc.current()
        nn.SELU()(mpc.share(torch.randn(4) if rt.rank == 0 else None, 0, shape=(4,)))

    with pytest.raises(ProtocolError, match="SELU"):
        mpc.run_local(selu)

    def equality():
        rt = mpc.current()
        x = mpc.share(torch.randn(4) if rt.rank == 0 else None, 0, shape=(4,))
        return x == 0.5

    with pytest.raises(ProtocolError, match=r"aten\.eq"):
        mpc.run_local(equality)


def test_bce_loss_on_probabilities():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2), nn.Sigmoid())
    x, t = torch.randn(16, 5), torch.rand(16, 2).round()
    ref = copy.deepcopy(net)
    loss = F.binary_cross_entropy(ref(x), t)
    loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()

    def prog():
        rt = mpc.current()
        m = share_module(copy.deepcopy(net), 0)
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape)
        ts = mpc.share(t if rt.rank == 1 else None, 1, shape=t.shape)
        lo = F.binary_cross_entropy(m(xs), ts)
        lo.backward()
        torch.optim.SGD(m.parameters(), lr=0.5).step()
        return lo.reveal(0), reveal_module(m, 0)

    lo, state = mpc.run_local(prog)[0]
    assert abs(float(lo) - float(loss)) <= 0.1
    for k, v in ref.state_dict().items():
        assert (state[k] - v).abs().max() <= 0.02, k


class Clamp(nn.Module):
    def __init__(self, lo, hi) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return torch.clamp(x, self.lo, self.hi)


@pytest.mark.parametrize("bounds", [(-0.5, 0.7), (0.1, None), (None, 0.3)])
def test_clamp_forward_backward_step(bounds):
    _run(Clamp(*bounds), 2e-3)
    x = torch.linspace(-2, 2, 201) + 0.0031
    xr = x.clone().requires_grad_(True)
    torch.clamp(xr, *bounds).sum().backward()

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape, requires_grad=True)
        y = torch.clamp(xs, *bounds)
        y.sum().backward()
        return y.reveal(0), xs.grad.reveal(0)

    y, g = mpc.run_local(prog)[0]
    assert (y - torch.clamp(x, *bounds)).abs().max() <= 1e-3
    assert torch.equal(g, xr.grad)


def test_comparisons_are_secret_booleans():
    x = torch.tensor([-1.0, 0.5, 0.75, 2.0, 3.0])

    def prog():
        rt = mpc.current()
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape)
        inside = (xs > 0.5) & (xs <= 2.0)
        picked = torch.where(inside, xs, torch.zeros(5))
        either = (xs < 0) | (xs >= 3.0)
        assert inside.dtype == torch.bool
        with pytest.raises(ProtocolError):
            bool((xs > 0).any())
        return inside.float().reveal(0), picked.reveal(0), (~either).float().reveal(0)

    inside, picked, neither = mpc.run_local(prog)[0]
    assert torch.equal(inside, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(picked, torch.tensor([0.0, 0.0, 0.75, 2.0, 0.0]), atol=1e-4)
    assert torch.equal(neither, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
