"""Encrypted tree ensembles: decision trees, random forests, gradient boosting and XGBoost.

The comparisons are the design question (a CKKS circuit only adds and multiplies). veil takes
them out of the circuit: the client encodes each feature over a public grid of edges
(`veil.program.encoding.ThermometerEncoding`, bits beta[f, k] = [x_f > e_f[k]]), so every node
test `x_f <= e_f[k]` is the encrypted bit 1 - beta[f, k], and every root-to-leaf path is a product
of such bits. The alternative, a polynomial approximation of sign on encrypted values, was
measured slower and inexact (see `benchmarks/he_trees.py` and docs/inference.md): a composite sign of
useful precision costs 8 to 12 levels per comparison and relinearization keys, against no level
and no key here.

Compilation into the program layer (`veil.program.ir`), per leaf L reached by the literals
l_1 ... l_m (one per distinct feature on its path: an interval e_f[a] < x_f <= e_f[b] is the single
0/1 literal beta[f, a] - beta[f, b]):

1. pad the literals to 2^R with the constant 1, R = ceil(log2(max m)) over the whole model;
2. R times: pair neighbours, s = a + b (a `Linear`), then p(s) = s^2 - s (a `Poly`): on
   s in {0, 1, 2} this is 0, 0, 2, twice [s == 2] = 2 a b, so pairs of bits become their product
   (up to a known unit, see `ensemble_program`); identical pairs (shared path prefixes) are
   computed once;
3. a last `Linear` sums leaf values times leaf indicators per output, plus the model's constant.

A depth-4 tree costs two squares, depth 5 to 8 three; the pairing Linears have weights +-1 and
cost no level in the batch layout, so a depth-4 ensemble uses 3 levels (N=8192). The result is
the model's raw output (class probabilities, log-odds or the regression value): the client
learns exactly what the plaintext model would return, not which leaf any tree reached. The server
sees ciphertexts only; the client's specification holds the grid, the output size and the
encryption parameters (which reveal the program's depth, hence the trees' depth class), never
thresholds, tree shapes or leaf values.

`fhe="disable"` runs the same program on the encoded plaintext: the model as the grid sees it.
`fit` trains the wrapped library model on the grid cells (as Concrete ML trains on quantized
inputs), so its thresholds fall on grid edges and the encrypted model is that library model
exactly; `from_sklearn_model` snaps the thresholds of a model trained on raw features to the
nearest edge, and `quantization_agreement_` / `quantization_error_` state what that costs.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from sklearn import ensemble, tree
from sklearn.base import BaseEstimator
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from veil.errors import ShapeError
from veil.ml.base import EncryptedClassifierMixin, EncryptedModelMixin, EncryptedRegressorMixin, library_init
from veil.program import ProductSum, compile_product_sum
from veil.program.encoding import MAX_EDGES, ThermometerEncoding
from veil.program.outputs import OutputSpec
from veil.program.planner import DEFAULT_HEADROOM
from veil.program.products import MAX_FACTORS, Literal

GRIDS = ("uniform", "quantile")
DEFAULT_N_BITS = 4
MAX_N_BITS = 8



# --- grid -------------------------------------------------------------------------------------
def make_grid(X: np.ndarray, n_bits: int, grid: str) -> ThermometerEncoding:
    """Public edges per feature: 2^n_bits - 1 of them, uniform over the calibration range or at
    its quantiles (duplicates merged; a constant feature gets one edge at its value)."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, int | np.integer) or not 1 <= n_bits <= MAX_N_BITS:
        raise ValueError(f"n_bits must be an integer from 1 to {MAX_N_BITS}, got {n_bits!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    cells = 1 << int(n_bits)
    edges = []
    for col in np.asarray(X, dtype=np.float64).T:
        lo, hi = float(col.min()), float(col.max())
        if hi <= lo:
            edges.append([lo])
            continue
        if grid == "uniform":
            e = lo + (hi - lo) * np.arange(1, cells) / cells
        else:
            e = np.quantile(col, np.arange(1, cells) / cells)
        e = np.unique(e)
        edges.append(e[: MAX_EDGES].tolist())
    return ThermometerEncoding(edges)


def cell_index(encoding: ThermometerEncoding, X: np.ndarray) -> np.ndarray:
    """q_f = number of edges below x_f (0 .. n_edges): the grid cell each feature falls in."""
    bits = encoding.encode(X)
    return np.stack([bits[:, encoding.offsets[f]:encoding.offsets[f + 1]].sum(axis=1)
                     for f in range(encoding.n_features)], axis=1)


# --- trees in one form --------------------------------------------------------------------------
@dataclass
class _Tree:
    """A binary tree: node i tests feature[i] against edge[i] (go left iff q_f <= edge[i], with
    edge -1 meaning never and n_edges always); leaves (left == -1) hold `value` (n_outputs).
    `threshold` and `strict` keep the library's own test (x <= t, or x < t when strict), to check
    the extraction against the library model."""

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    edge: np.ndarray
    value: np.ndarray
    threshold: np.ndarray
    strict: bool

    def leaves(self, encoding: ThermometerEncoding) -> list[tuple[list[Literal], np.ndarray]]:
        """(literals, value) of every reachable leaf; literals are one interval per feature."""
        out = []
        stack: list[tuple[int, dict[int, tuple[int, int]]]] = [(0, {})]
        while stack:
            node, box = stack.pop()
            if self.left[node] < 0:
                out.append((_literals(box, encoding), self.value[node]))
                continue
            f, k = int(self.feature[node]), int(self.edge[node])
            n_e = len(encoding.edges[f])
            lo, hi = box.get(f, (-1, n_e))
            if min(hi, k) > lo:  # q <= k still possible
                stack.append((int(self.left[node]), {**box, f: (lo, min(hi, k))}))
            if hi > max(lo, k):  # q > k still possible
                stack.append((int(self.right[node]), {**box, f: (max(lo, k), hi)}))
        return out

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        """Leaf values on the library's own inputs and thresholds (the extraction check). Both
        libraries compare float32 features (scikit-learn against float64 thresholds, xgboost
        against float32 ones), so the features are rounded to float32 first, as theirs are."""
        X = np.asarray(X, dtype=np.float32).astype(np.float64)
        node = np.zeros(len(X), dtype=np.int64)
        active = self.left[node] >= 0
        while active.any():
            x = X[np.arange(len(X)), np.maximum(self.feature[node], 0)]
            t = self.threshold[node]
            go_left = x < t if self.strict else x <= t
            nxt = np.where(go_left, self.left[node], self.right[node])
            node = np.where(active, nxt, node)
            active = self.left[node] >= 0
        return self.value[node]


def _literals(box: dict[int, tuple[int, int]], encoding: ThermometerEncoding) -> list[Literal]:
    lits: list[Literal] = []
    for f, (lo, hi) in sorted(box.items()):
        n_e = len(encoding.edges[f])
        terms, const = [], 0.0
        if lo >= 0:
            terms.append((encoding.bit(f, lo), 1.0))
        else:
            const = 1.0
        if hi < n_e:
            terms.append((encoding.bit(f, hi), -1.0))
        if terms:
            lits.append((const, tuple(terms)))
    return lits


@dataclass
class _Ensemble:
    """Trees, the output each tree adds to, a weight per tree and a constant per output."""

    trees: list[_Tree] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    base: np.ndarray = field(default_factory=lambda: np.zeros(1))

    def evaluate(self, X: np.ndarray) -> np.ndarray:
        """Raw outputs with the library's own thresholds, on the library's inputs."""
        raw = np.tile(self.base, (len(X), 1)).astype(np.float64)
        for t, cols, w in zip(self.trees, self.outputs, self.weights, strict=True):
            raw[:, cols] += w * t.evaluate(X)
        return raw


def _sklearn_tree(est: Any, snap: Any) -> _Tree:
    t = est.tree_
    feat = np.where(t.children_left >= 0, t.feature, -1)
    edge = np.array([snap(int(f), float(th), False) if f >= 0 else 0 for f, th in zip(feat, t.threshold, strict=True)])
    value = t.value[:, :, 0].copy() if t.value.shape[2] == 1 else t.value[:, 0, :].copy()
    return _Tree(t.children_left.copy(), t.children_right.copy(), feat, edge, value, t.threshold.copy(), False)


def _xgb_trees(model: Any, snap: Any) -> list[_Tree]:
    booster = model.get_booster()
    config = json.loads(booster.save_config())
    if int(config["learner"]["gradient_booster"].get("gbtree_model_param", {}).get("num_parallel_tree", 1)) != 1:
        raise TypeError("XGBoost models with num_parallel_tree > 1 are not supported")
    if config["learner"]["gradient_booster"]["name"] != "gbtree":
        raise TypeError("only XGBoost tree boosters (booster='gbtree') can be encrypted")
    trees = []
    for dump in booster.get_dump(dump_format="json"):
        nodes: dict[int, dict] = {}
        todo = [json.loads(dump)]
        while todo:
            n = todo.pop()
            nodes[int(n["nodeid"])] = n
            todo.extend(n.get("children", []))
        size = max(nodes) + 1
        left, right = np.full(size, -1), np.full(size, -1)
        feature, edge, value = np.full(size, -1), np.zeros(size, dtype=np.int64), np.zeros((size, 1))
        threshold = np.zeros(size)
        for i, n in nodes.items():
            if "leaf" in n:
                value[i, 0] = float(n["leaf"])
                continue
            f = int(str(n["split"]).lstrip("f"))
            left[i], right[i], feature[i] = int(n["yes"]), int(n["no"]), f
            threshold[i] = float(np.float32(n["split_condition"]))
            edge[i] = snap(f, threshold[i], True)
        trees.append(_Tree(left, right, feature, edge, value, threshold, True))
    return trees


def _snapper(encoding: ThermometerEncoding, cells: bool) -> Any:
    """Threshold -> edge index. On grid cells (models fit by veil) a test q <= t (or q < t) is
    exact: edge floor(t) (or ceil(t) - 1). On raw features, the nearest edge (an approximation
    whose cost `from_sklearn_model` measures)."""
    def snap(f: int, t: float, strict: bool) -> int:
        n_e = len(encoding.edges[f])
        if cells:
            k = math.ceil(t) - 1 if strict else math.floor(t)
        else:
            k = int(np.argmin(np.abs(encoding.edges[f] - t)))
        return int(min(max(k, -1), n_e))
    return snap


# --- compilation into a product sum ----------------------------------------------------------------
def ensemble_products(ens: _Ensemble, encoding: ThermometerEncoding, n_outputs: int) -> ProductSum:
    """The ensemble as a `ProductSum`: a term per reachable leaf (its literals padded with the
    constant 1 to 2^R, R = ceil(log2) of the most literals on a path, at least 1), the leaf value
    times the tree's weight, the tree's output; a tree that is a single leaf adds to the base."""
    base = np.array(ens.base, dtype=np.float64).reshape(-1).copy()
    literal_ids: dict[Literal, int] = {}
    paths, values, outputs, groups = [], [], [], []
    for tree_id, (t, cols, w) in enumerate(zip(ens.trees, ens.outputs, ens.weights, strict=True)):
        for lits, value in t.leaves(encoding):
            contribution = w * np.asarray(value, dtype=np.float64).reshape(-1)[: len(cols)]
            if not lits:
                base[cols] += contribution
                continue
            ids = [literal_ids.setdefault(lit, len(literal_ids)) for lit in lits]
            for c, v in zip(cols, contribution, strict=True):
                paths.append(ids)
                values.append(v)
                outputs.append(int(c))
                groups.append(tree_id)
    if not paths:
        # a constant model (every tree one leaf): the term b (1 - b), always 0, keeps the circuit
        # uniform (b and 1 - b in two pairs: paired together their sum is the constant 1, no ciphertext)
        literal_ids = {(0.0, ((0, 1.0),)): 0, (1.0, ((0, -1.0),)): 1}
        paths, values, outputs, groups = [[0, -1, 1, -1]], [1.0], [0], [0]
    width = 1 << max(1, math.ceil(math.log2(max(len(p) for p in paths))))
    if width > MAX_FACTORS:
        raise ShapeError(f"paths test up to {max(len(p) for p in paths)} features; at most {MAX_FACTORS} "
                         "are supported: limit max_depth")
    factors = np.full((len(paths), width), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        factors[i, :len(p)] = p
    # a tree's leaves partition the inputs: one term per tree is non-zero (the output bound's groups)
    _, group_ids = np.unique(groups, return_inverse=True)
    return ProductSum(encoding.width, list(literal_ids), factors, np.asarray(values), np.asarray(outputs), base,
                      group_ids)


# --- estimators -------------------------------------------------------------------------------
class _EncryptedTreeModel(EncryptedModelMixin, BaseEstimator):
    """Shared fitting, compilation and conversion; each subclass names its library class and how
    its fitted trees become an `_Ensemble`. Constructor parameters are the library's, plus
    `n_bits` (2^n_bits - 1 public edges per feature) and `grid` ("uniform" or "quantile")."""

    _library: type
    _classifier = False
    _defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_library" in cls.__dict__:
            cls.__init__ = library_init(cls._library, cls._defaults,  # type: ignore[method-assign]
                                        {"n_bits": DEFAULT_N_BITS, "grid": "uniform"})

    def _library_params(self) -> dict[str, Any]:
        params = self.get_params(deep=False)
        params.pop("n_bits")
        params.pop("grid")
        return params

    # hooks ------------------------------------------------------------------------------------
    def _ensemble(self, model: Any, snap: Any) -> _Ensemble:
        raise NotImplementedError

    def _library_raw(self, model: Any, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _outputs(self) -> tuple[int, OutputSpec]:
        raise NotImplementedError

    # fitting ----------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, **fit_params: Any) -> _EncryptedTreeModel:
        """Build the public grid from X, train the library model on the grid cells; returns self."""
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=not self._classifier)
        y = self._targets(y)
        encoding = make_grid(X, self.n_bits, self.grid)
        model = self._library(**self._library_params())
        model.fit(cell_index(encoding, X), y, **fit_params)
        self._absorb(model, encoding, cells=True, X=X)
        return self

    def _targets(self, y: Any) -> np.ndarray:
        if not self._classifier:
            return np.asarray(y, dtype=np.float64)
        y = np.asarray(y)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two classes; got one class")
        return codes

    def _absorb(self, model: Any, encoding: ThermometerEncoding, cells: bool, X: np.ndarray) -> None:
        self.model_ = model
        self.encoding_ = encoding
        ens = self._ensemble(model, _snapper(encoding, cells))
        n_outputs, self.output_spec_ = self._outputs()
        self.n_outputs_ = n_outputs
        sample = X[:512]
        inputs = cell_index(encoding, sample) if cells else sample
        offset = self._library_raw(model, inputs) - ens.evaluate(inputs)
        spread = float(np.max(np.abs(offset - offset.mean(axis=0))))
        if spread > 1e-4 * max(1.0, float(np.max(np.abs(offset)))):
            raise ShapeError(f"could not read this {type(model).__name__}'s trees exactly (its outputs differ "
                             f"from the extracted trees by up to {spread:.3g})")
        ens.base = np.asarray(ens.base, dtype=np.float64) + offset.mean(axis=0)
        self.program_ = ensemble_products(ens, encoding, n_outputs)
        if not cells:
            plain = self._library_raw(model, X)
            snapped = self.program_.evaluate(encoding.encode(X))
            self.quantization_error_ = float(np.max(np.abs(plain - snapped)))
            if self._classifier:
                self.quantization_agreement_ = float(np.mean(self.output_spec_.predict(plain)
                                                             == self.output_spec_.predict(snapped)))
        self._forget_circuit()

    @classmethod
    def from_sklearn_model(cls, sklearn_model: Any, X: Any = None, n_bits: int = DEFAULT_N_BITS,
                           grid: str = "uniform") -> _EncryptedTreeModel:
        """Wrap a fitted library model trained on raw features: the grid comes from `X` (required:
        the calibration data the public edges are drawn from), thresholds snap to the nearest
        edge, and the model is compiled on X. Concrete ML's signature."""
        if not isinstance(sklearn_model, cls._library):
            raise TypeError(f"{cls.__name__} wraps {cls._library.__name__}, got {type(sklearn_model).__name__}")
        if X is None:
            raise ValueError("tree models need calibration data X: the public grid of edges is drawn from it")
        check_is_fitted(sklearn_model)
        est = cls(**{k: v for k, v in sklearn_model.get_params(deep=False).items()
                     if k in inspect.signature(cls.__init__).parameters}, n_bits=n_bits, grid=grid)
        X = validate_data(est, X, dtype=np.float64)
        if X.shape[1] != sklearn_model.n_features_in_:
            raise ShapeError(f"X has {X.shape[1]} features, the model was fit on {sklearn_model.n_features_in_}")
        if est._classifier:
            est.classes_ = np.asarray(sklearn_model.classes_)
        est._absorb(sklearn_model, make_grid(X, n_bits, grid), cells=False, X=X)
        return est.compile(X)

    # compilation and prediction ------------------------------------------------------------------
    def compile(self, X: Any, headroom: float = DEFAULT_HEADROOM) -> _EncryptedTreeModel:
        """Plan CKKS parameters (the encoded inputs are bits, so X only needs the right shape and
        finite values; the grid stays the one `fit` drew); returns self."""
        X = self._check_X(X)
        self._set_circuit(compile_product_sum(self.program_, X, self.encoding_, headroom))
        return self

    def _plain_raw(self, X: np.ndarray) -> np.ndarray:
        return self.program_.evaluate(self.encoding_.encode(X))


class _TreeClassifierMixin(EncryptedClassifierMixin):
    _classifier = True

    def _outputs(self: Any) -> tuple[int, OutputSpec]:
        n = 1 if len(self.classes_) == 2 else len(self.classes_)
        return n, OutputSpec("classifier", classes=tuple(self.classes_.tolist()), proba=self._proba)


class _TreeRegressorMixin(EncryptedRegressorMixin):
    def _outputs(self: Any) -> tuple[int, OutputSpec]:
        return 1, OutputSpec("regressor")


class _ForestMixin:
    """Trees whose leaves hold class fractions (classifiers) or values, averaged (a forest) or not
    (a single tree). A binary classifier keeps one output, p1 - p0, whose sign is the class."""

    _proba = "probability"

    def _members(self: Any, model: Any) -> list:
        return list(model.estimators_) if hasattr(model, "estimators_") else [model]

    def _ensemble(self: Any, model: Any, snap: Any) -> _Ensemble:
        members = self._members(model)
        ens = _Ensemble(base=np.zeros(self._outputs()[0]))
        for est in members:
            t = _sklearn_tree(est, snap)
            if self._classifier:
                v = t.value / np.maximum(t.value.sum(axis=1, keepdims=True), 1e-300)
                if v.shape[1] != len(self.classes_):
                    raise ShapeError("a tree of this forest did not see every class; refit with all classes present")
                t.value = v[:, 1:2] - v[:, 0:1] if v.shape[1] == 2 else v
            ens.trees.append(t)
            ens.outputs.append(np.arange(t.value.shape[1]))
            ens.weights.append(1.0 / len(members))
        return ens

    def _library_raw(self: Any, model: Any, X: np.ndarray) -> np.ndarray:
        if not self._classifier:
            return np.asarray(model.predict(X), dtype=np.float64).reshape(len(X), -1)
        p = model.predict_proba(X)
        return p[:, 1:2] - p[:, 0:1] if p.shape[1] == 2 else p


class _BoostingMixin:
    """scikit-learn gradient boosting: raw = init + learning_rate * sum of regression trees."""

    _proba = "softmax"

    def _ensemble(self: Any, model: Any, snap: Any) -> _Ensemble:
        ens = _Ensemble(base=np.zeros(self._outputs()[0]))
        for stage in model.estimators_:
            for k, est in enumerate(stage):
                ens.trees.append(_sklearn_tree(est, snap))
                ens.outputs.append(np.array([k]))
                ens.weights.append(float(model.learning_rate))
        return ens

    def _library_raw(self: Any, model: Any, X: np.ndarray) -> np.ndarray:
        raw = model.decision_function(X) if self._classifier else model.predict(X)
        return np.asarray(raw, dtype=np.float64).reshape(len(X), -1)


class _XGBMixin:
    """XGBoost (`xgboost-cpu`): raw = base margin + sum of leaf values, tree i adding to class
    i mod K for K > 2 classes."""

    _proba = "softmax"

    def _ensemble(self: Any, model: Any, snap: Any) -> _Ensemble:
        n_out = self._outputs()[0]
        trees = _xgb_trees(model, snap)
        return _Ensemble(trees=trees, outputs=[np.array([i % n_out]) for i in range(len(trees))],
                         weights=[1.0] * len(trees), base=np.zeros(n_out))

    def _library_raw(self: Any, model: Any, X: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(X, output_margin=True), dtype=np.float64).reshape(len(X), -1)


def _xgb(name: str) -> type:
    try:
        import xgboost
    except ImportError:  # pragma: no cover - xgboost-cpu is a dependency
        return type(name, (), {})
    return getattr(xgboost, name)


class DecisionTreeClassifier(_TreeClassifierMixin, _ForestMixin, _EncryptedTreeModel):
    """scikit-learn's DecisionTreeClassifier for encrypted inference (max_depth defaults to 5)."""

    _library = tree.DecisionTreeClassifier
    _defaults: ClassVar[dict[str, Any]] = {"max_depth": 5}


class DecisionTreeRegressor(_TreeRegressorMixin, _ForestMixin, _EncryptedTreeModel):
    """scikit-learn's DecisionTreeRegressor for encrypted inference (max_depth defaults to 5)."""

    _library = tree.DecisionTreeRegressor
    _defaults: ClassVar[dict[str, Any]] = {"max_depth": 5}


class RandomForestClassifier(_TreeClassifierMixin, _ForestMixin, _EncryptedTreeModel):
    """scikit-learn's RandomForestClassifier (50 trees of depth at most 5 by default)."""

    _library = ensemble.RandomForestClassifier
    _defaults: ClassVar[dict[str, Any]] = {"max_depth": 5, "n_estimators": 50}


class RandomForestRegressor(_TreeRegressorMixin, _ForestMixin, _EncryptedTreeModel):
    """scikit-learn's RandomForestRegressor (50 trees of depth at most 5 by default)."""

    _library = ensemble.RandomForestRegressor
    _defaults: ClassVar[dict[str, Any]] = {"max_depth": 5, "n_estimators": 50}


class GradientBoostingClassifier(_TreeClassifierMixin, _BoostingMixin, _EncryptedTreeModel):
    """scikit-learn's GradientBoostingClassifier (library defaults: 100 trees of depth 3)."""

    _library = ensemble.GradientBoostingClassifier


class GradientBoostingRegressor(_TreeRegressorMixin, _BoostingMixin, _EncryptedTreeModel):
    """scikit-learn's GradientBoostingRegressor (library defaults: 100 trees of depth 3)."""

    _library = ensemble.GradientBoostingRegressor


class XGBClassifier(_TreeClassifierMixin, _XGBMixin, _EncryptedTreeModel):
    """xgboost's XGBClassifier (100 trees of depth at most 4 by default)."""

    _library = _xgb("XGBClassifier")
    _defaults: ClassVar[dict[str, Any]] = {"max_depth": 4, "n_estimators": 100, "n_jobs": 1}


class XGBRegressor(_TreeRegressorMixin, _XGBMixin, _EncryptedTreeModel):
    """xgboost's XGBRegressor (100 trees of depth at most 4 by default)."""

    _library = _xgb("XGBRegressor")
    _defaults: ClassVar[dict[str, Any]] = {"max_depth": 4, "n_estimators": 100, "n_jobs": 1}


TREE_ESTIMATORS: tuple[type, ...] = (
    DecisionTreeClassifier, DecisionTreeRegressor, RandomForestClassifier, RandomForestRegressor,
    GradientBoostingClassifier, GradientBoostingRegressor, XGBClassifier, XGBRegressor,
)

__all__ = [cls.__name__ for cls in TREE_ESTIMATORS] + ["TREE_ESTIMATORS", "make_grid"]
