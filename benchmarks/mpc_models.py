"""Experiment models, data and party programs for the MPC benchmark and tests (run by
`veil.mpc.launch` in every party).

The setting of the PySyft encrypted-training tutorial: data owners each secret-share their own rows, the model owner
(party 0) shares its weights, the parties train with ordinary torch code on shares, and the
trained weights are revealed to the model owner only.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from veil.mpc import primitives as P
from veil.mpc.nn import reveal_module, share_module, share_rows
from veil.mpc.tensor import MPCTensor, share


class MLP(nn.Module):
    """The tutorial's network: 784-128-64-10 with ReLU."""

    def __init__(self, square: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)
        self.square = square

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU, or x^2 (the cheaper square activation) if configured."""
        return x * x if self.square else F.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = x.reshape(-1, 28 * 28)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Residual block: conv-relu-conv plus identity, then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + conv(relu(conv(x))), then ReLU."""
        return F.relu(x + self.c2(F.relu(self.c1(x))))


class SmallResNet(nn.Module):
    """ResNet-style CNN for 8x8 digits: conv (optionally BatchNorm), residual block, avg-pool,
    max-pool, linear."""

    def __init__(self, c: int = 8, size: int = 8, batch_norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c) if batch_norm else nn.Identity()
        self.block = Block(c)
        self.avg = nn.AvgPool2d(2)
        self.max = nn.MaxPool2d(2)
        self.fc = nn.Linear(c * (size // 4) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = self.block(F.relu(self.bn(self.stem(x))))
        x = self.max(self.avg(x))
        return self.fc(torch.flatten(x, 1))


def make_model(name: str) -> nn.Module:
    """Model by name: "mlp", "mlp_square", "resnet" or "resnet_bn" (BatchNorm after the stem)."""
    if name == "mlp":
        return MLP()
    if name == "mlp_square":
        return MLP(square=True)
    if name == "resnet":
        return SmallResNet()
    if name == "resnet_bn":
        return SmallResNet(batch_norm=True)
    raise ValueError(name)


def batch_loss(out: torch.Tensor, target: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The tutorial's loss by default: squared error summed over classes, averaged over the batch
    (10x the gradient of `F.mse_loss`, which also averages over classes); "mse" for the latter."""
    if cfg.get("loss", "seed") == "mse":
        return F.mse_loss(out, target)
    return ((out - target) ** 2).sum() / out.shape[0]


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """SGD (optionally with momentum) or Adam, as configured."""
    if cfg.get("optim", "sgd") == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"])
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0))


def epoch_orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Public per-epoch permutations of the training rows (same for plaintext and MPC)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g) for _ in range(epochs)]


def plain_train(cfg: dict, state: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The same training in plaintext torch (one thread), for side-by-side comparison."""
    model = make_model(cfg["model"])
    model.load_state_dict(state)
    model.train()
    opt = make_optimizer(model.parameters(), cfg)
    target = F.one_hot(y, 10).float()
    times = []
    for order in epoch_orders(len(x), cfg["epochs"], cfg["seed"]):
        for i in range(0, len(x), cfg["batch"]):
            idx = order[i : i + cfg["batch"]]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = batch_loss(model(x[idx]), target[idx], cfg)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return {"state": model.state_dict(), "batch_times": times}


def party_train(cfg: dict, counts: list[int], feat: tuple[int, ...], mine: tuple[torch.Tensor, torch.Tensor] | None,
                state: dict | None = None, test_x: torch.Tensor | None = None) -> dict[str, Any]:
    """One party's program: share model and rows, train on shares, reveal weights to party 0.

    Public (every party): ``cfg``, the owners' row ``counts`` (owners are parties 0..k-1) and the
    feature shape. Private to this party: ``mine``, its own (images, labels) if it owns rows;
    for party 0 (the model owner, who also gets the encrypted inference's logits) ``state`` and
    ``test_x``. Returns this party's per-batch timing and traffic.
    """
    rt = P.current()
    model = make_model(cfg["model"])
    if rt.rank == 0:
        model.load_state_dict(state)
    share_module(model, 0)
    model.train()
    owners = list(range(len(counts)))
    width = 1
    for s in feat:
        width *= s
    xs = share_rows(None if mine is None else mine[0].reshape(len(mine[0]), -1), owners, counts, width)
    ys = share_rows(None if mine is None else F.one_hot(mine[1], 10).float(), owners, counts, 10)
    xs = MPCTensor(xs._share.reshape(-1, *feat))
    opt = make_optimizer(model.parameters(), cfg)
    times, traffic = [], []
    n = xs.shape[0]
    for order in epoch_orders(n, cfg["epochs"], cfg["seed"]):
        for i in range(0, n, cfg["batch"]):
            idx = order[i : i + cfg["batch"]]
            before = rt.comm.stats.snapshot()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = batch_loss(model(xs[idx]), ys[idx], cfg)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            after = rt.comm.stats.snapshot()
            traffic.append({k: after[k] - before[k] for k in after})
    weights = reveal_module(model, 0)
    out: dict[str, Any] = {"rank": rt.rank, "batch_times": times, "traffic": traffic, "weights": weights}
    if cfg.get("encrypted_test"):
        model.eval()
        shape = (cfg["n_test"], *feat)
        tx = share(None if rt.rank != 0 else test_x, 0, shape=shape)
        t0 = time.perf_counter()
        before = rt.comm.stats.snapshot()
        with torch.no_grad():
            logits = [model(tx[i : i + cfg["batch"]]).reveal(0) for i in range(0, shape[0], cfg["batch"])]
        out["infer_time"] = time.perf_counter() - t0
        after = rt.comm.stats.snapshot()
        out["infer_traffic"] = {k: after[k] - before[k] for k in after}
        out["test_logits"] = torch.cat(logits) if rt.rank == 0 else None
    return out


def load_digits(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as (N, 1, size, size) floats in [0, 1] and int64 labels.

    Upsampled with bilinear interpolation (MNIST cannot be downloaded here).
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.int64)
