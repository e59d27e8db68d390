"""The program every computing party runs for `veil bench`'s MPC row (started by `veil.mpc.launch`).

Setting, two data owners training one model together: parties 0 and 1 each own half of the training
rows; party 0 also owns the model (its initial weights) and the test rows, and is the only one that
learns results. Steps:

1. party 0 shares the initial weights, both owners share their rows and one-hot labels;
2. the parties train with ordinary torch code on the shares (`network.train_epochs`), recording the
   time and the traffic of each epoch;
3. the trained weights are revealed to party 0;
4. party 0 shares its test rows, the shared model evaluates them, and the logits are revealed to
   party 0 only (encrypted inference).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from veil.bench.network import TrainSpec, build_network, train_epochs
from veil.mpc import primitives as P
from veil.mpc.nn import reveal_module, share_module, share_rows
from veil.mpc.tensor import share

OWNERS = [0, 1]


def party_program(spec_dict: dict, counts: list[int], n_test: int, X: torch.Tensor, y: torch.Tensor,
                  X_test: torch.Tensor | None = None) -> dict[str, Any]:
    """One party's side of the MPC row.

    Parameters
    ----------
    spec_dict : dict
        Public `TrainSpec` as a dict.
    counts : list of int
        Public row counts of the owners (party 0 then party 1).
    n_test : int
        Public number of test rows.
    X, y : torch.Tensor
        This party's own training rows and labels (private).
    X_test : torch.Tensor, optional
        Party 0's test rows (private; None for party 1).

    Returns
    -------
    dict
        Seconds and traffic (this rank's counters) of training and inference and of the whole run;
        for party 0 also the revealed weights and test logits.
    """
    spec = TrainSpec(**spec_dict)
    rt = P.current()
    model = build_network(spec)
    share_module(model, 0)
    model.train()
    xs = share_rows(X.float(), OWNERS, counts, spec.n_features)
    ys = share_rows(F.one_hot(y, spec.n_classes).float(), OWNERS, counts, spec.n_classes)
    before = rt.comm.stats.snapshot()
    seconds = train_epochs(model, xs, ys, spec)
    train_traffic = _delta(before, rt.comm.stats.snapshot())
    weights = reveal_module(model, 0)
    model.eval()
    before = rt.comm.stats.snapshot()
    t0 = time.perf_counter()
    tx = share(X_test.float() if rt.rank == 0 else None, 0, shape=(n_test, spec.n_features))
    with torch.no_grad():
        logits = [model(tx[i:i + spec.batch]).reveal(0) for i in range(0, n_test, spec.batch)]
    infer_seconds = time.perf_counter() - t0
    return {"rank": rt.rank, "epoch_seconds": seconds, "train_traffic": train_traffic,
            "infer_seconds": infer_seconds, "infer_traffic": _delta(before, rt.comm.stats.snapshot()),
            "weights": weights, "logits": torch.cat(logits) if rt.rank == 0 else None,
            "total_traffic": rt.comm.stats.snapshot()}


def _delta(before: dict, after: dict) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}
