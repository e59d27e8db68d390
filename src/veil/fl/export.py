"""From a federated result to encrypted inference: a compiled `veil.ml` model, saved and deployed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from veil import ml
from veil.fl.config import FLResult

EncryptedModel = ml.EncryptedLinearModel | ml.MLPClassifier | ml.MLPRegressor


def to_veil_model(result: FLResult, X_calibration: np.ndarray) -> EncryptedModel:
    """The global model as a compiled `veil.ml` estimator that takes raw features: a linear model,
    or for torch-mlp an `MLPClassifier` / `MLPRegressor` evaluating the very network that was
    trained (its activation is a polynomial from the first round, so nothing is approximated here).

    The federated scaler, when the run had one, is folded into the weights (as `from_sklearn_model` does
    for a scaler Pipeline), so an encrypted client sends raw features. `X_calibration` (raw) is data the
    server may see (its held-out set or public samples); it only sets the CKKS scales."""
    scaler = None if result.scaler is None else result.scaler.sklearn()
    model = result.learner().to_veil(scaler)
    return model.compile(np.asarray(X_calibration, dtype=np.float64))


def encrypted_check(result: FLResult, model: EncryptedModel, X: np.ndarray,
                    y: np.ndarray | None = None) -> dict[str, float]:
    """Encrypted predictions of the exported model on raw `X` against the plaintext federated model:
    agreement (fraction equal) and, for a classifier with labels `y`, both accuracies."""
    encrypted = model.predict(X, fhe="execute")
    plain = result.predict(X)
    if result.classes is None:
        scale = max(float(np.abs(plain).max()), 1e-12)
        out = {"encrypted_agreement": float(np.mean(np.abs(encrypted - plain) <= 1e-3 * scale))}
        return out
    out = {"encrypted_agreement": float(np.mean(encrypted == plain))}
    if y is not None:
        out["encrypted_accuracy"] = float(np.mean(encrypted == y))
        out["plaintext_accuracy"] = float(np.mean(plain == y))
    return out


def deploy(model_dir: str | Path, url: str, token: str, name: str, verify: bool | str = True) -> dict:
    """Upload a saved model to a running `veil serve` (admin token); returns the server's answer."""
    from veil.serve.client import Client

    with Client(url, token, verify=verify) as client:
        return client.deploy(model_dir, name)
