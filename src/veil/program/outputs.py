"""Client-side post-processing of decrypted linear outputs: classes, probabilities, inverse links.

Everything non-linear happens here, after decryption, so the server only evaluates W x + b.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import expit, softmax

from veil.errors import WireFormatError

PROBA_KINDS = (None, "softmax", "ovr_log", "modified_huber", "probability")
"""How decrypted scores become probabilities: softmax (logits; expit for one score), one-vs-rest
logistic, modified Huber, or `probability`: the scores are already class probabilities (tree
averages; for two classes the one score is p1 - p0), clipped against CKKS noise."""
LINKS = ("identity", "log")
TIE_TOLERANCE = 1e-5
"""Class probabilities of trees tie exactly (a leaf with half its samples in each of two classes);
scores within this of the best count as tied and go to the first class, in every mode, as
scikit-learn's argmax does in plaintext, so CKKS noise (about 1e-6) never decides a tie."""


@dataclass(frozen=True)
class OutputSpec:
    """How raw scores become predictions, as scikit-learn's estimator would compute them."""

    task: str
    classes: tuple | None = None
    proba: str | None = None
    link: str = "identity"
    tweedie_power: float | None = None
    ravel: bool = True

    def __post_init__(self) -> None:
        if self.task not in ("classifier", "regressor"):
            raise ValueError(f"unknown task {self.task!r}")
        if self.proba not in PROBA_KINDS or self.link not in LINKS:
            raise ValueError(f"unknown proba {self.proba!r} or link {self.link!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.classes is not None:
            d["classes"] = [c.item() if hasattr(c, "item") else c for c in self.classes]
        return d

    @classmethod
    def from_dict(cls, d: object) -> OutputSpec:
        """Parse untrusted JSON; anything malformed is a `WireFormatError`."""
        if not isinstance(d, dict) or not (d.get("classes") is None or isinstance(d["classes"], list)):
            raise WireFormatError("an output specification is an object (classes, if any, a list)")
        d = dict(d)
        if d.get("classes") is not None:
            d["classes"] = tuple(d["classes"])
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"invalid output specification: {exc}") from None

    def check_outputs(self, n_outputs: int) -> None:
        """Refuse classes that the model's outputs cannot index (one score for two classes, else one per class)."""
        if self.task == "classifier" and (self.classes is None
                                          or len(self.classes) != (2 if n_outputs == 1 else n_outputs)):
            raise WireFormatError(f"{n_outputs} outputs cannot name the classes {self.classes!r}")

    @property
    def classes_array(self) -> np.ndarray:
        return np.asarray(self.classes)

    def decision(self, raw: np.ndarray) -> np.ndarray:
        return raw[:, 0] if raw.shape[1] == 1 and self.ravel else raw

    def predict(self, raw: np.ndarray) -> np.ndarray:
        if self.task == "classifier":
            classes = self.classes_array
            tol = TIE_TOLERANCE if self.proba == "probability" else 0.0
            if raw.shape[1] == 1:
                return classes[(raw[:, 0] > tol).astype(int)]
            if tol:
                return classes[np.argmax(raw >= raw.max(axis=1, keepdims=True) - tol, axis=1)]
            return classes[np.argmax(raw, axis=1)]
        out = np.exp(raw) if self.link == "log" else raw
        return self.decision(out)

    def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        if self.proba is None:
            raise AttributeError("this model has no predict_proba")
        if self.proba == "softmax":
            if raw.shape[1] == 1:
                p = expit(raw[:, 0])
                return np.column_stack([1 - p, p])
            return softmax(raw, axis=1)
        if self.proba == "probability" and raw.shape[1] > 1:
            p = np.clip(raw, 0.0, 1.0)
        else:
            p = expit(raw) if self.proba == "ovr_log" else (np.clip(raw, -1, 1) + 1) / 2
        if raw.shape[1] == 1:
            return np.column_stack([1 - p[:, 0], p[:, 0]])
        total = p.sum(axis=1, keepdims=True)
        zero = total[:, 0] == 0
        p = np.divide(p, total, out=np.full_like(p, 1.0 / p.shape[1]), where=~zero[:, None])
        return p
