"""The family registry (`veil.ml.families`): one list behind veil.ml's names, its lazy imports,
`from_sklearn_model` and the documentation's table of estimators."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression as SkLogistic
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier as SkTree

from veil import ml
from veil.ml.families import FAMILIES, estimator_class, family_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_registered_estimator_is_a_veil_ml_name_wrapping_its_namesake(family):
    for name in family.estimators:
        cls = getattr(ml, name)
        assert cls is estimator_class(name) and family_of(name) is family
        assert cls.__module__ == family.module
        if family.converts:
            assert cls._library.__name__ == name
        assert callable(cls.predict) and callable(cls.score)
    for name in family.extras:
        assert getattr(ml, name) is not None


def test_importing_veil_ml_loads_no_lazy_family():
    code = "import sys, veil.ml; print(sorted(m for m in ('torch', 'xgboost') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_documentation_names_every_estimator():
    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    missing = [n for f in FAMILIES for n in f.estimators if f"`{n}`" not in text and f"{n}," not in text
               and f"{n} " not in text]
    assert missing == []


def test_from_sklearn_model_dispatches_and_refuses_clearly():
    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), SkLogistic(max_iter=500)).fit(X, y)
    lin = ml.from_sklearn_model(pipe)
    assert type(lin) is ml.LogisticRegression
    assert np.array_equal(lin.predict(X), pipe.predict(X))
    tree = ml.from_sklearn_model(SkTree(max_depth=3, random_state=0).fit(X, y), X)
    assert type(tree) is ml.DecisionTreeClassifier
    with pytest.raises(TypeError, match="not a Pipeline"):
        ml.from_sklearn_model(make_pipeline(StandardScaler(), SkTree(max_depth=2)).fit(X, y), X)
    with pytest.raises(TypeError, match="not polynomials"):
        ml.from_sklearn_model(SkMLP(max_iter=20).fit(X, y))
    with pytest.raises(TypeError, match="no encrypted equivalent for KMeans; supported: LogisticRegression"):
        ml.from_sklearn_model(KMeans(n_clusters=2, n_init=1).fit(X))
