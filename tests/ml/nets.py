"""The issue-20 networks, trained once per test process on the MNIST subset: compiled with
`nonlinear="client"` and shared by the in-process tests (`tests/ml/test_interactive.py`) and the
HTTP tests (`tests/serve/test_interactive.py`), LeNet-5 with ReLU and MaxPool, a residual CNN with
BatchNorm, ReLU and a concatenation, and an MLP with GELU, Dropout and Softmax; and LeNet-5 with
square activations and AvgPool for the non-interactive tests (`tests/ml/test_deep_cnn.py`,
`tests/ml/test_lenet_square.py`). Also a server's answer to one
stage altered after it was computed (what a forging server or a man in the middle would send)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from tests.ml.datasets import mnist, train
from veil import ml
from veil.he import HEContext, wire

N_TRAIN = 1500
TEST_START = 4000


@cache
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test): the first 1,500 shuffled images and the last 1,000."""
    X, y = mnist()
    return X[:N_TRAIN], y[:N_TRAIN], X[TEST_START:], y[TEST_START:]


class ResidualCNN(nn.Module):
    """A ResNet-style block on a strided stem, its output concatenated with its input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        z = torch.cat([y, x], dim=1)
        return self.fc(torch.flatten(self.pool(z), 1))


@cache
def lenet5() -> tuple[nn.Module, Any]:
    """LeNet-5 with ReLU and MaxPool, trained 3 epochs, and its interactive model."""
    Xtr, ytr, _, _ = data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                        nn.Linear(84, 10))
    train(net, Xtr, ytr, epochs=3)
    return net, ml.compile_torch_model(net, Xtr[:1000], input_bounds=1.0, nonlinear="client")


def square_lenet5_net() -> nn.Module:
    """LeNet-5 on 28x28 with square activations and AvgPool (conv 6@5x5 pad 2, square, pool 2,
    conv 16@5x5, square, pool 2, fc 400-120, square, fc 120-84, square, fc 84-10), untrained."""
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), ml.Square(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5),
                         ml.Square(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(400, 120), ml.Square(),
                         nn.Linear(120, 84), ml.Square(), nn.Linear(84, 10))


@cache
def square_lenet5() -> tuple[nn.Module, float]:
    """The square LeNet-5 trained 3 epochs on the first 4,000 shuffled images (Adam, lr 1e-3, batches
    of 64: squares compound, so a larger rate diverges), and its accuracy on the last 1,000."""
    X, y = mnist()
    X = X.astype(np.float32)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = square_lenet5_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xt, yt = torch.tensor(X[:TEST_START]), torch.tensor(y[:TEST_START])
    for _ in range(3):
        for idx in torch.randperm(len(Xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    net.eval()
    return net, float((reference(net, X[TEST_START:]).argmax(1) == y[TEST_START:]).mean())


@cache
def residual_cnn() -> tuple[nn.Module, Any]:
    """The residual CNN trained 2 epochs, and its interactive model."""
    Xtr, ytr, _, _ = data()
    net = train(ResidualCNN(), Xtr, ytr, epochs=2)
    return net, ml.compile_torch_model(net, Xtr[:500], input_bounds=1.0, nonlinear="client")


@cache
def gelu_mlp() -> tuple[nn.Module, Any]:
    """A 784-32-16-10 MLP with both GELU forms, Dropout and a Softmax head, and its interactive model
    (input bounds from the data)."""
    Xtr, ytr, _, _ = data()
    body = train(nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16),
                               nn.GELU(approximate="tanh"), nn.Linear(16, 10)), Xtr, ytr, epochs=3)
    net = nn.Sequential(body, nn.Softmax(dim=1)).eval()
    return net, ml.compile_torch_model(net, Xtr, nonlinear="client")


NETWORKS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "lenet5": lenet5, "residual-cnn": residual_cnn, "gelu-mlp": gelu_mlp}


def reference(net: nn.Module, X: np.ndarray) -> np.ndarray:
    """The plaintext torch network's outputs."""
    with torch.no_grad():
        return net(torch.tensor(X, dtype=torch.float32)).numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of rows whose argmax agree."""
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def tampered(circuit: Any, response: bytes, stage: int, tamper: Callable[[Any, Any], None]) -> bytes:
    """`response` with `tamper(context, ciphertext)` applied to each ciphertext if it answers
    `stage` (other stages' answers are returned unchanged). `circuit` is either half of the model
    (server circuit or client): it only supplies the stage's public CKKS parameters."""
    msg = wire.decode(response)
    if msg.header["stage"] != stage:
        return response
    ctx = HEContext(circuit.stages[stage].layout_params()[msg.header["layout"]])
    header, cts = ctx.unpack(msg)
    for ct in cts:
        tamper(ctx, ct)
    return ctx.pack(cts, header)


def shift(ctx: Any, ct: Any) -> None:
    """Adds 100 to every slot: a forged intermediate far outside its planned range."""
    ctx.evaluator.add_plain_inplace(ct, ctx.encode(100.0, ct.scale()))


def wrap(ctx: Any, ct: Any) -> None:
    """Multiplies every slot by 2^20 without rescaling: values past the modulus, which decrypt to
    wrapped garbage."""
    ctx.evaluator.multiply_plain_inplace(ct, ctx.encode(2.0**20, 1.0))
