"""Layers beyond Linear/Conv2d/pooling: forward, input gradient and one SGD step of a small
network under MPC against plaintext torch. All of them are linear maps or comparisons, so the
only error is fixed-point rounding (a few 2^-16 per product): bound 2e-3."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil.mpc as mpc
from veil.mpc.nn import reveal_module, share_module

from .conftest import sgd_step_both

BOUND = 2e-3


class Head(nn.Module):
    """layer, then flatten and a linear map to 3 outputs (so every layer parameter gets a gradient)."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer = layer
        self.fc = nn.Linear(features, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.layer(x), 1))


LAYERS = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (4, 2, 9), 3 * 5),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5), 6 * 25),
    "conv2d_depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3), (2, 3, 6, 6), 3 * 16),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
                         (2, 2, 4, 4), 3 * 64),
    "conv_transpose2d_grouped": (lambda: nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2), (2, 4, 3, 3), 2 * 36),
    "adaptive_max_pool2d": (lambda: nn.AdaptiveMaxPool2d(2), (2, 2, 6, 6), 2 * 4),
    "upsample_nearest": (lambda: nn.Upsample(scale_factor=2, mode="nearest"), (2, 2, 3, 3), 2 * 36),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_backward_step(name):
    make, shape, features = LAYERS[name]
    torch.manual_seed(0)
    net = Head(make(), features)
    x, t = torch.randn(shape), torch.randn(shape[0], 3)
    (out, _, xgrad, ref_state), (o, _, gx, state) = sgd_step_both(net, x, t, F.mse_loss)
    assert (o - out).abs().max() <= BOUND
    assert (gx - xgrad).abs().max() <= BOUND
    for k, v in ref_state.items():
        assert (state[k] - v).abs().max() <= BOUND, k


def test_embedding_forward_backward_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 2))
    idx, t = torch.tensor([[1, 2, 0], [6, 1, 1]]), torch.randn(2, 2)
    ref = copy.deepcopy(net)
    F.mse_loss(ref(idx), t).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()

    def prog():
        rt = mpc.current()
        m = share_module(copy.deepcopy(net), 0)
        ts = mpc.share(t if rt.rank == 1 else None, 1, shape=t.shape)
        F.mse_loss(m(idx), ts).backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        return reveal_module(m, 0)

    state = mpc.run_local(prog)[0]
    for k, v in ref.state_dict().items():
        assert (state[k] - v).abs().max() <= BOUND, k
