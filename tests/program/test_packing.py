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
