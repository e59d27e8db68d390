"""Normalisation layers in training mode: forward, input gradient, one SGD step and the running
statistics, under MPC against plaintext torch. 1/sqrt(var + eps) is approximated (relative error
<= 1%, veil/mpc/_ops/norm_ops.py), so outputs and gradients are bounded at 0.03 for unit-scale
data."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil.mpc as mpc

from .conftest import sgd_step_both

BOUND = 0.03


class Net(nn.Module):
    def __init__(self, norm: nn.Module, conv: bool) -> None:
        super().__init__()
        self.pre = nn.Conv2d(2, 4, 3, padding=1) if conv else nn.Linear(6, 4)
        self.norm = norm
        self.fc = nn.Linear(4 * 16 if conv else 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.norm(self.pre(x)), 1))


NORMS = {
    "batchnorm2d": (lambda: nn.BatchNorm2d(4), True),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4), False),
    "layernorm": (lambda: nn.LayerNorm(4), False),
    "layernorm2d": (lambda: nn.LayerNorm([4, 4, 4]), True),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), True),
    "instancenorm": (lambda: nn.InstanceNorm2d(4, affine=True), True),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_forward_backward_step_and_running_stats(name):
    make, conv = NORMS[name]
    torch.manual_seed(1)
    net = Net(make(), conv)
    x = torch.randn(8, 2, 4, 4) if conv else torch.randn(8, 6)
    t = torch.randn(8, 3)
    net.train()
    (out, _, xgrad, ref_state), (o, _, gx, state) = sgd_step_both(net, x, t, F.mse_loss)
    assert (o - out).abs().max() <= BOUND * (1 + float(out.abs().max()))
    assert (gx - xgrad).abs().max() <= BOUND * (1 + float(xgrad.abs().max()))
    for k, v in ref_state.items():
        if "running" in k:  # exact statistics (no approximation): rounding only
            assert (state[k] - v).abs().max() <= 2e-3, k
        elif v.is_floating_point():  # weights after the step
            assert (state[k] - v).abs().max() <= BOUND * (1 + float(v.abs().max())), k


def test_batchnorm_eval_backward():
    torch.manual_seed(2)
    bn = nn.BatchNorm1d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(5, 3)
    xr = x.clone().requires_grad_(True)
    (bn(xr) * torch.arange(3.0)).sum().backward()

    def prog():
        rt = mpc.current()
        m = copy.deepcopy(bn)  # public statistics and weights, secret input
        xs = mpc.share(x if rt.rank == 0 else None, 0, shape=x.shape, requires_grad=True)
        (m(xs) * torch.arange(3.0)).sum().backward()
        return xs.grad.reveal(0)

    assert (mpc.run_local(prog)[0] - xr.grad).abs().max() <= 1e-3
