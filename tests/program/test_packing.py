import numpy as np
import pytest

from veil.errors import ShapeError
from veil.program.packing import BatchLayout, RowLayout, make_layout


def _plain_eval(layout, X, W, b):
    """Run the layout's slot arithmetic in plaintext, as the server does on ciphertexts."""
    vectors = layout.pack(X)
    if isinstance(layout, BatchLayout):
        out = []
        F = layout.n_features
        for bi in range(layout.n_batches(len(X))):
            feats = vectors[bi * F:(bi + 1) * F]
            for c in range(layout.n_outputs):
                out.append(sum(W[c, f] * feats[f] for f in range(F)) + b[c])
                out[-1] = np.pad(out[-1], (0, layout.slots - len(out[-1])))
        return layout.unpack(out, len(X))
    out = []
    for v in vectors:
        for wv, bv in layout.weight_vectors(W, b):
            acc = v * wv
            for step in layout.rotation_steps:
                acc = acc + np.roll(acc, -step)
            out.append(acc + bv)
    return layout.unpack(out, len(X))


@pytest.mark.parametrize("name", ["batch", "row"])
@pytest.mark.parametrize(("n", "F", "C"), [(1, 4, 3), (7, 64, 10), (40, 5, 1), (300, 13, 2), (9, 3, 40)])
def test_layouts_compute_the_affine_map(name, n, F, C):
    rng = np.random.default_rng(0)
    X, W, b = rng.normal(size=(n, F)), rng.normal(size=(C, F)), rng.normal(size=C)
    layout = make_layout(name, 128, F, C)
    assert len(layout.pack(X)) == layout.n_input_cts(n)
    np.testing.assert_allclose(_plain_eval(layout, X, W, b), X @ W.T + b, atol=1e-9)


def test_row_layout_geometry():
    lay = RowLayout(2048, 64, 10)
    assert (lay.block, lay.group, lay.n_groups, lay.samples_per_ct) == (64, 10, 1, 3)
    assert lay.rotation_steps == (1, 2, 4, 8, 16, 32)
    wide = RowLayout(128, 40, 10)
    assert wide.group == 2 and wide.n_groups == 5


def test_row_layout_refuses_too_many_features():
    with pytest.raises(ShapeError, match="batch layout"):
        RowLayout(64, 100, 2)
    with pytest.raises(ShapeError, match="unknown layout"):
        make_layout("diagonal", 64, 3, 2)


@pytest.mark.parametrize("n", [1, 127, 128, 129, 255, 256, 257, 600])
def test_two_samples_per_slot_round_trip(n):
    lay = BatchLayout(128, 3, 2, per_slot=2)
    X = np.arange(n * 3, dtype=np.float64).reshape(n, 3) + 0.5
    vectors = lay.pack(X)
    assert len(vectors) == lay.n_input_cts(n) == 3 * -(-n // 256)
    assert all(np.iscomplexobj(v) and v.shape == (128,) for v in vectors)
    Y = lay.unpack([v for b in range(lay.n_batches(n)) for v in vectors[3 * b:3 * b + 2]], n)
    np.testing.assert_array_equal(Y, X[:, :2])


def test_affine_batch_layout_holds_two_samples_per_slot_under_encryption():
    from sklearn.datasets import load_digits

    from veil import ml

    X, y = load_digits(return_X_y=True)
    model = ml.LogisticRegression(max_iter=500).fit(X, y).compile(X)
    big = np.vstack([X] * 5)[:8193]
    client = model.fhe_client
    assert client.layout("batch").n_input_cts(8193) == 2 * 64
    raw = model.decision_function(big, fhe="execute", layout="batch")
    ref = model.decision_function(big)
    np.testing.assert_allclose(raw, ref, atol=1e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(model.predict(big, fhe="execute", layout="batch"), model.predict(big))
    with pytest.raises(Exception, match="per_slot"):
        ml.ModelClient.from_dict({"format": "veil-model/1", "output": model.output_spec_.to_dict(),
                                  "circuit": {**client_spec_with(model, per_slot=3)}})


def client_spec_with(model, **batch):
    spec = model.circuit_.client_spec()
    spec["scales"]["batch"] = {**spec["scales"]["batch"], **batch}
    return spec
