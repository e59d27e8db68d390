"""From a federated result to encrypted inference: a compiled `veil.ml` model, saved and deployed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from veil import ml
from veil.fl.federation import FLResult


def to_veil_model(result: FLResult, X_calibration: np.ndarray) -> ml.EncryptedLinearModel:
    """The global model as a compiled `veil.ml` estimator.

    `X_calibration` is data the server may see (its held-out set or public samples); it only sets the
    CKKS scales."""
    model = result.learner().to_veil()
    return model.compile(np.asarray(X_calibration, dtype=np.float64))


def save_model(model: ml.EncryptedLinearModel, out: str | Path) -> Path:
    """Write the `veil.ml` deployment files (`server.json`, `client.json`) into `out`."""
    return model.save(out)


def deploy(model_dir: str | Path, url: str, token: str, name: str, verify: bool | str = True) -> dict:
    """Upload a saved model to a running `veil serve` (admin token); returns the server's answer."""
    from veil.serve.client import Client

    with Client(url, token, verify=verify) as client:
        return client.deploy(model_dir, name)
