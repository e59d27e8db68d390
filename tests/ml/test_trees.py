"""Encrypted tree ensembles: every model family on every claimed dataset, encrypted against
plaintext (the model as the grid sees it) and against the unencrypted library model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_score, train_test_split

from veil import ml
from veil.errors import NotCompiledError, ShapeError, VeilError
from veil.he import CKKSParameters
from veil.ml import trees
from veil.program import load_client, load_server
from veil.program.common import local_transport
from veil.program.encoding import ThermometerEncoding
from veil.program.products.planner import ERROR_SIGMAS, row_error_bound, row_noise

from .datasets import CLASSIFICATION, REGRESSION, load

pytestmark = pytest.mark.timeout(600)
SMALL = {"DecisionTreeClassifier": {}, "RandomForestClassifier": {"n_estimators": 20},
         "GradientBoostingClassifier": {"n_estimators": 20}, "XGBClassifier": {"n_estimators": 30}}
SMALL_REG = {"DecisionTreeRegressor": {}, "RandomForestRegressor": {"n_estimators": 10},
             "GradientBoostingRegressor": {"n_estimators": 30}, "XGBRegressor": {"n_estimators": 30}}


def _split(name: str):
    X, y = load(name, scaled=False)
    strat = y if name in CLASSIFICATION else None
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=strat)


def _library(model: trees._EncryptedTreeModel):
    """The unencrypted library model with the same parameters, trained on raw features."""
    return model._library(**model._library_params())


@pytest.mark.parametrize("dataset", CLASSIFICATION)
@pytest.mark.parametrize("name", list(SMALL))
def test_classifier_encrypted_matches_plaintext_and_library(name, dataset):
    Xtr, Xte, ytr, yte = _split(dataset)
    model = getattr(ml, name)(random_state=0, **SMALL[name]).fit(Xtr, ytr)
    assert model.compile(Xtr) is model
    raw_plain, raw_enc = model._raw(Xte, "disable"), model._raw(Xte, "execute")  # one encrypted run
    np.testing.assert_allclose(raw_enc, raw_plain, atol=1e-3)
    spec = model.output_spec_
    enc, plain = spec.predict(raw_enc), model.predict(Xte)
    assert np.mean(enc == plain) >= 0.99
    assert abs(np.mean(enc == yte) - np.mean(plain == yte)) <= 0.01
    proba = spec.predict_proba(raw_enc)
    assert proba.shape == (len(Xte), len(model.classes_))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(proba, model.predict_proba(Xte), atol=2e-3)
    # accuracy against the library model with the same parameters on raw features, over 5 folds
    # of the whole dataset (a 45-sample split of iris moves 2.2 points per sample): the grid costs
    # at most 2 points, and the encrypted model is the grid model (above)
    X, y = load(dataset, scaled=False)
    codes = np.searchsorted(model.classes_, y)
    ours = cross_val_score(clone(model), X, y, cv=5).mean()
    theirs = cross_val_score(_library(model), X, codes, cv=5).mean()
    assert ours >= theirs - 0.02, (ours, theirs)


@pytest.mark.parametrize("dataset", REGRESSION)
@pytest.mark.parametrize("name", list(SMALL_REG))
def test_regressor_encrypted_matches_plaintext_and_library(name, dataset):
    Xtr, Xte, ytr, yte = _split(dataset)
    model = getattr(ml, name)(random_state=0, **SMALL_REG[name]).fit(Xtr, ytr).compile(Xtr)
    plain, enc = model.predict(Xte), model.predict(Xte, fhe="execute")
    assert enc.shape == (len(Xte),)
    np.testing.assert_allclose(enc, plain, rtol=1e-3)
    # R^2 against the library model with the same parameters on raw features, over 5 folds
    X, y = load(dataset, scaled=False)
    folds = KFold(5, shuffle=True, random_state=0)
    ours = cross_val_score(clone(model), X, y, cv=folds).mean()
    theirs = cross_val_score(_library(model), X, y, cv=folds).mean()
    assert ours >= theirs - 0.02, (ours, theirs)
    assert r2_score(yte, enc) == pytest.approx(r2_score(yte, plain), abs=1e-4)


@pytest.mark.parametrize("name", list(SMALL) + list(SMALL_REG))
def test_disable_is_the_library_model_on_grid_cells_exactly(name):
    """`fit` trains the library model on the grid cells, so the program is that model exactly:
    the extraction (thresholds, leaf values, base scores, class order) loses nothing."""
    Xtr, Xte, ytr, _ = _split("wine" if name in SMALL else "diabetes")
    model = getattr(ml, name)(random_state=0, **{**SMALL, **SMALL_REG}[name]).fit(Xtr, ytr)
    cells = trees.cell_index(model.encoding_, Xte)
    # xgboost sums its leaves in float32
    atol = 1e-5 if name.startswith("XGB") else 1e-9
    np.testing.assert_allclose(model._plain_raw(Xte), model._library_raw(model.model_, cells), rtol=1e-6, atol=atol)
    if name in SMALL:
        assert np.array_equal(model.predict(Xte), model.classes_[model.model_.predict(cells)])
        np.testing.assert_allclose(model.predict_proba(Xte), model.model_.predict_proba(cells), atol=atol)
    else:
        np.testing.assert_allclose(model.predict(Xte), model.model_.predict(cells), rtol=1e-6, atol=atol)


@pytest.mark.parametrize("name", list(SMALL))
def test_from_fitted_library_model_snaps_thresholds_and_reports_the_cost(name):
    Xtr, Xte, ytr, yte = _split("breast_cancer")
    library = _library(getattr(ml, name)(random_state=0, **SMALL[name])).fit(Xtr, ytr)
    model = ml.from_sklearn_model(library, Xtr, n_bits=5)
    assert type(model).__name__ == name and model.n_bits == 5
    assert model.quantization_agreement_ >= 0.9
    assert np.mean(model.predict(Xtr) == library.predict(Xtr)) == pytest.approx(model.quantization_agreement_)
    enc = model.predict(Xte, fhe="execute")
    assert np.mean(enc == model.predict(Xte)) >= 0.99
    assert abs(np.mean(enc == yte) - library.score(Xte, yte)) <= 0.03
    with pytest.raises(ValueError, match="calibration data"):
        type(model).from_sklearn_model(library)


def test_simulation_and_both_layouts_agree_with_plaintext():
    Xtr, Xte, ytr, _ = _split("iris")
    model = ml.DecisionTreeClassifier(max_depth=3, random_state=0).fit(Xtr, ytr).compile(Xtr)
    plain = model._raw(Xte, "disable")
    assert set(model.circuit_.plans) == {"batch", "row"}
    for layout in ("batch", "row"):
        np.testing.assert_allclose(model._raw(Xte[:5], "execute", layout=layout), plain[:5], atol=1e-3)
    np.testing.assert_allclose(model._raw(Xte, "simulate"), plain, atol=1e-3)


def test_levels_and_keys_of_both_layouts():
    """A depth-4 ensemble (R = 2 rounds): in the batch layout 2 squares and the last Linear use
    levels and the +-1 pairing Linears are additions (exact), so the chain has 3 data primes and
    no Galois key; the row layout uses selection, 2 squares and the values (4), two BSGS keys,
    the partner offset and the rotate-and-sum steps."""
    Xtr, Xte, ytr, _ = _split("breast_cancer")
    model = ml.XGBClassifier(n_estimators=10, max_depth=4, random_state=0).fit(Xtr, ytr).compile(Xtr)
    circuit = model.circuit_
    assert len(circuit.stages) == 5 and circuit.products.rounds == 2
    batch, row = circuit.plans["batch"], circuit.plans["row"]
    assert len(batch.params.coeff_modulus_bits) == 3 + 2 and batch.rotation_steps == ()
    assert len(row.params.coeff_modulus_bits) == 4 + 2 and row.relin
    geometry = circuit.slot_circuit().geometry
    assert row.rotation_steps == geometry.rotation_steps
    assert {1, geometry.baby, *geometry.offsets} <= set(row.rotation_steps)
    assert batch.params.poly_modulus_degree == row.params.poly_modulus_degree == 8192
    client = load_client(circuit.client_spec())
    assert client.choose_layout(1) == "row" and client.choose_layout(4000) == "batch"
    np.testing.assert_allclose(model._raw(Xte[:3], "execute", layout="row"), model._raw(Xte[:3], "disable"),
                               atol=1e-3)


def test_row_plan_bounds_its_error_on_several_keys():
    """XGBoost on breast cancer (20 trees, 161 terms, R = 2): the row plan's error bound counts
    every key switch (the sum of all slots rotates 12 times with one data prime left), so the
    planner gives the special prime the spare bits, and on 5 fresh sets of keys the encrypted raw
    outputs stay within that bound, itself within the 1e-3 the served tests ask. With a special
    prime as large as the first prime (the chain planned before), the estimate alone exceeds it."""
    Xc, yc = load_breast_cancer(return_X_y=True)
    clf = ml.XGBClassifier(n_estimators=20, random_state=0).fit(Xc[:400], yc[:400]).compile(Xc[:400])
    circuit = clf.circuit_
    plan = circuit.plans["row"]
    bits = plan.params.coeff_modulus_bits
    assert plan.params.poly_modulus_degree == 8192 and len(circuit.products.values) == 161
    assert bits[-1] > bits[0], "the spare bits go to the special prime"
    bound = row_error_bound(circuit.evaluated, plan) / 2.0**circuit.shift
    assert bound <= 1e-3
    same = CKKSParameters(8192, (*bits[:-1], bits[0]))
    geometry = circuit.slot_circuit().geometry
    assert ERROR_SIGMAS * row_noise(circuit.evaluated, geometry, same, plan.scale_bits) / 2.0**circuit.shift > 1e-3
    X = Xc[400:402]
    ref = clf._raw(X, "disable")
    for _ in range(5):
        client = load_client(circuit.client_spec())  # fresh keys
        out = client.infer(X, "row", local_transport(circuit, client))
        assert 0 < np.max(np.abs(out - ref)) <= bound


def test_client_learns_the_grid_but_no_thresholds_or_leaves():
    Xtr, _, ytr, _ = _split("breast_cancer")
    model = ml.GradientBoostingClassifier(n_estimators=5, random_state=0).fit(Xtr, ytr).compile(Xtr)
    spec = model.circuit_.client_spec()
    assert "program" not in spec and "stages" not in str(spec)
    assert spec["encoding"] == model.encoding_.to_dict()
    leaf_values = {round(float(v), 6) for est in model.model_.estimators_.ravel() for v in est.tree_.value.ravel()}
    text = str(spec)
    assert not any(str(v) in text for v in leaf_values if abs(v) > 1e-3)


def test_artefact_round_trip_and_tampered_encodings_are_refused():
    Xtr, Xte, ytr, _ = _split("iris")
    model = ml.RandomForestClassifier(n_estimators=5, random_state=0).fit(Xtr, ytr).compile(Xtr)
    server, client = load_server(model.circuit_.to_dict()), load_client(model.circuit_.client_spec())
    assert (server.n_features, client.n_features) == (4, 4)
    request = client.encrypt(Xte, "batch")
    raw = client.decrypt(server.run(request, client.public_bundle("batch")), len(Xte))
    np.testing.assert_allclose(raw, model._raw(Xte, "disable"), atol=1e-3)
    spec = model.circuit_.client_spec()
    spec["encoding"] = {"kind": "thermometer", "edges": spec["encoding"]["edges"][:-1]}
    with pytest.raises(ShapeError):
        load_client(spec)
    bad = model.circuit_.to_dict()
    bad["encoding"]["edges"][0] = [3.0, 1.0]
    with pytest.raises(ShapeError, match="increasing"):
        load_server(bad)


def test_estimator_contract():
    params = ml.XGBClassifier().get_params()
    assert {"max_depth", "n_estimators", "learning_rate", "n_bits", "grid"} <= set(params)
    assert params["max_depth"] == 4
    assert ml.RandomForestRegressor().get_params()["n_estimators"] == 50
    model = ml.DecisionTreeRegressor(max_depth=2, n_bits=3)
    assert clone(model).get_params() == model.get_params()
    with pytest.raises(TypeError, match="unexpected"):
        ml.DecisionTreeClassifier(depth=3)
    X, y = load("iris", scaled=False)
    with pytest.raises(ValueError, match="n_bits"):
        ml.DecisionTreeClassifier(n_bits=0).fit(X, y)
    with pytest.raises(ValueError, match="grid"):
        ml.DecisionTreeClassifier(grid="log").fit(X, y)
    fitted = ml.DecisionTreeClassifier(max_depth=2).fit(X, y)
    with pytest.raises(NotCompiledError):
        fitted.predict(X, fhe="execute")
    with pytest.raises(ValueError):
        fitted.predict(X[:, :3])
    fitted.compile(X)
    bad = X[:2].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        fitted.predict(bad, fhe="execute")


def test_quantile_grid_and_constant_features():
    X, y = load("digits", scaled=False)
    model = ml.DecisionTreeClassifier(max_depth=4, grid="quantile", n_bits=3).fit(X[:600], y[:600])
    assert all(len(e) >= 1 for e in model.encoding_.edges)
    assert len(model.encoding_.edges[0]) == 1  # digits' first pixel is always 0
    model.compile(X[:600])
    assert np.mean(model.predict(X[600:700], fhe="execute") == model.predict(X[600:700])) >= 0.99


def test_encoding_parses_untrusted_json_strictly():
    enc = ThermometerEncoding([[0.0, 1.0], [5.0]])
    assert enc.width == 3 and enc.encode(np.array([[0.5, 6.0]])).tolist() == [[1.0, 0.0, 1.0]]
    assert ThermometerEncoding.from_dict(enc.to_dict()).to_dict() == enc.to_dict()
    for bad in (None, {}, {"kind": "thermometer"}, {"kind": "x", "edges": [[1.0]]},
                {"kind": "thermometer", "edges": []}, {"kind": "thermometer", "edges": [["a"]]},
                {"kind": "thermometer", "edges": [[1.0, float("nan")]]},
                {"kind": "thermometer", "edges": [[[1.0]]]}, {"kind": "thermometer", "edges": [list(range(300))]}):
        with pytest.raises(VeilError):
            ThermometerEncoding.from_dict(bad)



def test_a_constant_model_still_runs_encrypted():
    """Every tree a single leaf (constant targets): one zero-valued term keeps the circuit uniform."""
    X, _ = load("iris", scaled=False)
    y = np.full(len(X), 3.25)
    model = ml.GradientBoostingRegressor(n_estimators=3, random_state=0).fit(X, y).compile(X)
    for layout in ("batch", "row"):
        np.testing.assert_allclose(model.predict(X[:4], fhe="execute", layout=layout), 3.25, rtol=1e-3)
