"""Local training of one data owner's model: scikit-learn linear estimators and PyTorch modules.

A learner exchanges its model as a list of float arrays with the federation; the scikit-learn
learner always uses [coef (n_outputs, n_features), intercept (n_outputs,)]. Initial weights are
zeros (scikit-learn) or seeded torch initialisation: experiment design, not key material.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn import base as skbase
from sklearn import linear_model
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, r2_score

from veil import ml
from veil.errors import FederatedConfigError
from veil.fl.names import FL_MODELS

SGD = (linear_model.SGDClassifier, linear_model.SGDRegressor)


def _sklearn_of(estimator: Any) -> Any:
    """An unfitted scikit-learn estimator from a `veil.ml` estimator or a scikit-learn one."""
    if isinstance(estimator, ml.EncryptedLinearModel):
        return estimator._make_sklearn()
    return skbase.clone(estimator)


def _with_scaler(model: Any, scaler: Any) -> Any:
    """`model`, or a Pipeline of `scaler` then `model` (which `veil.ml.from_sklearn_model` folds)."""
    if scaler is None:
        return model
    from sklearn.pipeline import Pipeline

    return Pipeline([("scale", scaler), ("model", model)])


class SklearnLearner:
    """Federated wrapper of a linear scikit-learn (or `veil.ml`) estimator.

    Each round the owner starts from the global weights (warm start, or `coef_init` for SGD models)
    and runs the estimator's own solver for `max_iter` iterations on its rows."""

    def __init__(self, estimator: Any, n_features: int, classes: np.ndarray | None = None) -> None:
        self.model = _sklearn_of(estimator)
        self.classifier = skbase.is_classifier(self.model)
        if self.classifier and classes is None:
            raise FederatedConfigError("a classifier needs the full list of classes (owners may miss some)")
        self.classes = None if classes is None else np.asarray(classes)
        self.n_features = n_features
        n_out = 1 if not self.classifier or len(self.classes) == 2 else len(self.classes)
        self.coef = np.zeros((n_out, n_features))
        self.intercept = np.zeros(n_out)
        if "warm_start" in self.model.get_params():
            self.model.set_params(warm_start=True)

    def get_weights(self) -> list[np.ndarray]:
        return [self.coef.copy(), self.intercept.copy()]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        coef, intercept = (np.asarray(w, dtype=np.float64) for w in weights)
        if coef.shape != self.coef.shape or intercept.shape != self.intercept.shape:
            raise FederatedConfigError(f"expected shapes {self.coef.shape}, {self.intercept.shape}; "
                             f"got {coef.shape}, {intercept.shape}")
        self.coef, self.intercept = coef.copy(), intercept.copy()

    def _load(self, model: Any) -> Any:
        """Write the current weights into a scikit-learn estimator so it predicts (or warm-starts)."""
        coef = self.coef if self.classifier else self.coef[0]
        model.coef_ = coef.copy()
        model.intercept_ = self.intercept.copy() if self.classifier else float(self.intercept[0])
        if isinstance(model, linear_model.LinearRegression | linear_model.Ridge):
            model.intercept_ = float(self.intercept[0])
        if self.classifier:
            model.classes_ = self.classes
        model.n_features_in_ = self.n_features
        return model

    def _share_of(self, n_rows: int, config: dict | None) -> Any:
        """The estimator with its penalty rescaled to this owner's share of all rows.

        scikit-learn's penalties are not averaged over rows (LogisticRegression: C * sum of losses +
        ||w||^2 / 2; Ridge: squared error sum + alpha ||w||^2), so an owner holding n of N rows that used
        the central C would regularise N / n times harder than central training. When the server sends
        the federation's row count `veil-total` (from the statistics round) the local objective becomes
        n / N of the central one: C * N / n, alpha * n / N."""
        model = self.model
        total = int((config or {}).get("veil-total", 0))
        if total <= 0 or n_rows <= 0:
            return model
        model = skbase.clone(model)
        params = model.get_params()
        if "C" in params and not isinstance(model, SGD):
            model.set_params(C=params["C"] * total / n_rows)
        elif isinstance(model, linear_model.Ridge):
            model.set_params(alpha=params["alpha"] * n_rows / total)
        return model

    def fit(self, X: np.ndarray, y: np.ndarray, config: dict | None = None) -> int:
        """Train locally from the current weights; returns the number of examples used."""
        n_rows = len(y)
        weight = np.ones(len(y))
        if self.classifier:
            missing = np.setdiff1d(self.classes, y)
            if len(missing):
                # zero-weight rows make the solver see every class without changing its loss
                X = np.vstack([X, np.zeros((len(missing), X.shape[1]))])
                y = np.concatenate([y, missing])
                weight = np.concatenate([weight, np.zeros(len(missing))])
        model = self._share_of(n_rows, config)
        with warnings.catch_warnings():
            # a local round deliberately stops the solver early
            warnings.simplefilter("ignore", ConvergenceWarning)
            if isinstance(model, SGD):
                init = {"coef_init": self.coef if self.classifier else self.coef[0],
                        "intercept_init": self.intercept}
                model.fit(X, y, sample_weight=weight, **init)
            else:
                if model.get_params().get("warm_start"):
                    self._load(model)
                model.fit(X, y, sample_weight=weight)
        self.coef = np.atleast_2d(np.asarray(model.coef_, dtype=np.float64)).reshape(self.coef.shape).copy()
        self.intercept = np.atleast_1d(np.asarray(model.intercept_, dtype=np.float64)).reshape(
            self.intercept.shape).copy()
        return int(len(weight) - (weight == 0).sum())

    def sklearn_model(self) -> Any:
        """A scikit-learn estimator holding the current weights, usable for plaintext predictions."""
        return self._load(skbase.clone(self.model))

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
        """(loss, metrics): log-loss and accuracy for classifiers, MSE and R^2 for regressors."""
        model = self.sklearn_model()
        pred = model.predict(X)
        if not self.classifier:
            return float(mean_squared_error(y, pred)), {"r2": float(r2_score(y, pred))}
        loss = float("nan")
        if hasattr(model, "predict_proba"):
            try:
                loss = float(log_loss(y, model.predict_proba(X), labels=self.classes))
            except (AttributeError, ValueError):
                loss = float("nan")
        return loss, {"accuracy": float(accuracy_score(y, pred))}

    def to_veil(self, scaler: Any = None) -> ml.EncryptedLinearModel:
        """The global model as a `veil.ml` estimator (compile it before encrypted inference).

        A fitted `scaler` (the federated one) is folded into the weights, so the model takes raw features."""
        return ml.from_sklearn_model(_with_scaler(self.sklearn_model(), scaler))


class TorchLearner:
    """Federated wrapper of a PyTorch module trained with SGD on local data.

    `task` is "classification" (cross-entropy, integer labels) or "regression" (MSE). When the server
    sends `proximal_mu` > 0 (FedProx) the proximal term mu/2 ||w - w_global||^2 is added to the loss."""

    def __init__(self, model_fn: Callable[[], Any], task: str = "classification", epochs: int = 1,
                 lr: float = 0.05, batch_size: int = 32, seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        self.model = model_fn()
        self.task, self.epochs, self.lr, self.batch_size, self.seed = task, epochs, lr, batch_size, seed
        self.classes: np.ndarray | None = None

    def _trainable(self) -> dict[str, Any]:
        """The parameters exchanged with the federation, by name. Buffers (such as a polynomial
        activation's fixed coefficients) are part of the architecture, not of the update, so no
        averaging, clipping or DP noise ever touches them."""
        names = {name for name, _ in self.model.named_parameters()}
        return {name: v for name, v in self.model.state_dict().items() if name in names}

    def get_weights(self) -> list[np.ndarray]:
        return [v.detach().cpu().numpy().astype(np.float64) for v in self._trainable().values()]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        state = self._trainable()
        if len(weights) != len(state):
            raise FederatedConfigError(f"expected {len(state)} arrays, got {len(weights)}")
        new = {}
        for (name, ref), w in zip(state.items(), weights, strict=True):
            if tuple(np.shape(w)) != tuple(ref.shape):
                raise FederatedConfigError(f"{name}: expected shape {tuple(ref.shape)}, got {np.shape(w)}")
            new[name] = self.torch.as_tensor(np.asarray(w), dtype=ref.dtype)
        self.model.load_state_dict(new, strict=False)

    def _target(self, y: np.ndarray) -> Any:
        if self.task == "classification":
            index = np.searchsorted(self.classes, y) if self.classes is not None else np.asarray(y)
            return self.torch.as_tensor(index, dtype=self.torch.long)
        return self.torch.as_tensor(np.asarray(y, dtype=np.float32)).reshape(len(y), -1)

    def _loss(self, out: Any, target: Any) -> Any:
        nn = self.torch.nn.functional
        return nn.cross_entropy(out, target) if self.task == "classification" else nn.mse_loss(out, target)

    def fit(self, X: np.ndarray, y: np.ndarray, config: dict | None = None) -> int:
        """Run `epochs` of minibatch SGD from the current weights; returns the number of examples."""
        torch = self.torch
        mu = float((config or {}).get("proximal_mu", 0.0))
        anchor = [p.detach().clone() for p in self.model.parameters()]
        Xt, yt = torch.as_tensor(np.asarray(X, dtype=np.float32)), self._target(y)
        gen = torch.Generator().manual_seed(self.seed + int((config or {}).get("server_round", 0)))
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr)
        self.model.train()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(Xt), generator=gen).split(self.batch_size):
                opt.zero_grad()
                loss = self._loss(self.model(Xt[idx]), yt[idx])
                if mu > 0:
                    loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in
                                               zip(self.model.parameters(), anchor, strict=True))
                loss.backward()
                opt.step()
        return len(Xt)

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            out = self.model(torch.as_tensor(np.asarray(X, dtype=np.float32)))
            loss = float(self._loss(out, self._target(y)))
        if self.task != "classification":
            pred = out.numpy().reshape(len(y), -1)[:, 0]
            return loss, {"r2": float(r2_score(y, pred))}
        labels = self.classes if self.classes is not None else np.arange(out.shape[1])
        return loss, {"accuracy": float(accuracy_score(y, labels[out.argmax(1).numpy()]))}

    def to_veil(self, scaler: Any = None) -> ml.EncryptedLinearModel | ml.MLPClassifier | ml.MLPRegressor:
        """The global model as a `veil.ml` estimator taking raw features (a fitted `scaler` is folded
        into the first layer); compile it before encrypted inference.

        A single-`Linear` classifier becomes a `veil.ml.LogisticRegression` (argmax over logits is
        kept); a network whose activations are polynomials (torch-mlp) becomes a fitted
        `veil.ml.MLPClassifier` / `MLPRegressor` evaluating exactly the trained network."""
        torch = self.torch
        layers = [m for m in self.model.modules() if not list(m.children())]
        if len(layers) > 1:
            return ml.mlp_from_torch(self.model, self.classes if self.task == "classification" else None,
                                     scaler)
        if self.task != "classification" or not isinstance(layers[0], torch.nn.Linear):
            raise TypeError("only a torch nn.Linear classifier or a network of nn.Linear layers and "
                            "polynomial activations converts to veil.ml")
        W = layers[0].weight.detach().numpy().astype(np.float64)
        b = layers[0].bias.detach().numpy().astype(np.float64)
        classes = self.classes if self.classes is not None else np.arange(W.shape[0])
        if W.shape[0] == 2:
            W, b = W[1:] - W[:1], b[1:] - b[:1]
        sk = linear_model.LogisticRegression()
        sk.coef_, sk.intercept_, sk.classes_ = W, b, np.asarray(classes)
        sk.n_features_in_, sk.n_iter_ = W.shape[1], np.array([0])
        return ml.from_sklearn_model(_with_scaler(sk, scaler))


def make_learner(model: str | Any, n_features: int, classes: np.ndarray | None, max_iter: int = 1,
                 epochs: int = 1, lr: float = 0.05, seed: int = 0) -> SklearnLearner | TorchLearner:
    """A learner by name (see FL_MODELS) or for a given scikit-learn / `veil.ml` estimator."""
    if not isinstance(model, str):
        return SklearnLearner(model, n_features, classes)
    estimators = {
        "logreg": lambda: ml.LogisticRegression(max_iter=max_iter),
        "sgd": lambda: ml.SGDClassifier(loss="log_loss", max_iter=max_iter, tol=None, random_state=seed),
        "linreg": lambda: ml.LinearRegression(),
        "ridge": lambda: ml.Ridge(),
        "sgdreg": lambda: ml.SGDRegressor(max_iter=max_iter, tol=None, random_state=seed),
    }
    if model in estimators:
        return SklearnLearner(estimators[model](), n_features, classes)
    if model in ("torch-linear", "torch-mlp"):
        import torch

        n_out = len(classes) if classes is not None else 1
        task = "classification" if classes is not None else "regression"

        def build() -> Any:
            if model == "torch-linear":
                return torch.nn.Linear(n_features, n_out)
            # a polynomial activation (the quadratic closest to ReLU on [-4, 4]) from the start, so the
            # trained network is exactly the one evaluated on ciphertexts (ReLU is not a polynomial)
            return torch.nn.Sequential(torch.nn.Linear(n_features, 64), ml.relu_polynomial().float(),
                                       torch.nn.Linear(64, n_out))

        learner = TorchLearner(build, task, epochs=epochs, lr=lr, seed=seed)
        learner.classes = classes
        return learner
    raise FederatedConfigError(f"unknown model {model!r}; choose one of {FL_MODELS}")
