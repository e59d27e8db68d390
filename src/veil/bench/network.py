"""The torch network and training schedule that `veil bench` runs under MPC and, as its twin, in plaintext.

One definition serves both sides, so the MPC row compares like with like: the same architecture, the
same initial weights, the same public batch order, the same loss and optimizer. Only the arithmetic
differs (fixed-point shares over Z_2^64 against float32).

The loss is the mean squared error on one-hot targets: under MPC it is exact up to fixed-point
rounding, whereas cross-entropy needs an approximate softmax. The activation of the MLP is x^2, the one
`veil.ml.MLPClassifier(activation="square")` uses, so the network is also one CKKS can evaluate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from veil.bench.timing import best_of
from veil.ml import Square


@dataclass(frozen=True)
class TrainSpec:
    """Public description of the training run: every party (and the plaintext twin) gets it.

    Parameters
    ----------
    model : str
        "logreg" (one linear layer) or "mlp" (linear, square, linear).
    n_features, n_classes, hidden : int
        Shapes of the network.
    epochs, batch : int
        Passes over the training rows and rows per SGD step.
    lr, momentum : float
        SGD settings (public hyper-parameters).
    seed : int
        Seed of the initial weights and of the public per-epoch batch order.
    """

    model: str
    n_features: int
    n_classes: int
    hidden: int
    epochs: int
    batch: int
    lr: float
    momentum: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for the report and for `torch.save` to the party processes."""
        return asdict(self)


def build_network(spec: TrainSpec) -> nn.Module:
    """The network of `spec`, with weights drawn from `spec.seed` (identical in every process)."""
    torch.manual_seed(spec.seed)
    if spec.model == "logreg":
        return nn.Linear(spec.n_features, spec.n_classes)
    return nn.Sequential(nn.Linear(spec.n_features, spec.hidden), Square(), nn.Linear(spec.hidden, spec.n_classes))


def epoch_orders(n_rows: int, spec: TrainSpec) -> list[torch.Tensor]:
    """Public permutation of the training rows for each epoch (same for the MPC parties and the twin)."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    return [torch.randperm(n_rows, generator=gen) for _ in range(spec.epochs)]


def batch_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error against one-hot targets (exact under MPC)."""
    return F.mse_loss(out, target)


def train_epochs(model: nn.Module, X: Any, Y: Any, spec: TrainSpec, on_step: Any = None) -> list[float]:
    """Train `model` in place with SGD over `spec.epochs` epochs; returns the seconds of each epoch.

    `X` and `Y` are float rows and one-hot targets, plaintext tensors or `MPCTensor` shares alike
    (the code is the same torch code on both). `on_step`, if given, is called after every step."""
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    seconds = []
    for order in epoch_orders(X.shape[0], spec):
        t0 = time.perf_counter()
        for i in range(0, X.shape[0], spec.batch):
            idx = order[i:i + spec.batch]
            opt.zero_grad()
            batch_loss(model(X[idx]), Y[idx]).backward()
            opt.step()
            if on_step is not None:
                on_step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def plain_twin(spec: TrainSpec, X: torch.Tensor, y: torch.Tensor, X_test: torch.Tensor) -> dict[str, Any]:
    """The MPC run's training and inference in plaintext torch on one thread: seconds per epoch, seconds
    to evaluate the test set (in the MPC run's batches, best of a few calls) and the test logits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_network(spec)
        seconds = train_epochs(model, X, F.one_hot(y, spec.n_classes).float(), spec)
        model.eval()

        def infer_all() -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([model(X_test[i:i + spec.batch]) for i in range(0, len(X_test), spec.batch)])

        logits = infer_all()
        infer = best_of(infer_all)
    finally:
        torch.set_num_threads(threads)
    return {"epoch_seconds": seconds, "infer_seconds": infer, "logits": logits, "state": model.state_dict()}
