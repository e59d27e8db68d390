"""The affine batch layout's server computes its weighted sums over RNS coefficients, block by block
(`weight_blocks`): the answer must be the very bytes SEAL's own chain gives (a multiply_plain by
each scalar-encoded non-zero weight, their sum, the bias added), for a convolution-like sparse map
and a dense one, over more than one batch of samples; and the blocks must partition the rows and
hold every non-zero weight."""

import numpy as np
import pytest

from veil.he import wire
from veil.program import LinearCircuit, load_client
from veil.program.affine import BLOCK_DENSITY, weight_blocks


def _conv_like(rng: np.random.Generator) -> np.ndarray:
    """A 1-D convolution of 3 channels, width 5, over 30 inputs, unrolled: 78 rows, 5 non-zeros each."""
    W = np.zeros((3 * 26, 30))
    for c in range(3):
        kernel = rng.normal(size=5)
        for x in range(26):
            W[c * 26 + x, x:x + 5] = kernel
    return W


def _seal_chain(circuit: LinearCircuit, request: bytes) -> list[bytes]:
    """The reference: SEAL's multiply_plain / add_many / add_plain per output and batch."""
    ctx, s = circuit.context("batch"), circuit.scales["batch"]
    ev = ctx.evaluator
    _, cts = ctx.unpack(wire.decode(request, wire.Kind.CIPHERTEXTS))
    Wq, scale_w = circuit.quantized(s.weight_bits), 2.0**s.weight_bits
    F, out = circuit.n_features, []
    for b in range(len(cts) // F):
        for c in range(circuit.n_outputs):
            terms = [ev.multiply_plain(cts[b * F + f], ctx.encode(float(Wq[c, f]), scale_w))
                     for f in np.flatnonzero(Wq[c])]
            acc = terms[0] if len(terms) == 1 else ev.add_many(terms)
            ev.add_plain_inplace(acc, ctx.encode(complex(circuit.bias[c], circuit.bias[c]),
                                                 2.0 ** (s.input_bits + s.weight_bits)))
            out.append(acc.to_string())
    return out


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_batch_layout_is_bit_identical_to_the_seal_chain(kind):
    rng = np.random.default_rng(3)
    W = _conv_like(rng) if kind == "conv" else rng.normal(size=(7, 30))
    b = rng.normal(size=len(W))
    X = rng.normal(size=(200, 30))
    circuit = LinearCircuit.calibrate(W, b, X, presets={"row": None})
    client = load_client(circuit.client_spec())
    if kind == "conv":
        assert len(circuit.batch_kernels()) > 1  # the sparse map really is split into blocks
    n = 2 * client.params["batch"].slot_count * 2 + 5  # three batches of samples, the last one partial
    Z = rng.normal(size=(n, 30))
    request = client.encrypt(Z, "batch")
    response = circuit.run(request, client.public_bundle("batch"))
    assert wire.decode(response, wire.Kind.CIPHERTEXTS).blobs == _seal_chain(circuit, request)
    assert np.max(np.abs(client.decrypt(response) - (Z @ W.T + b))) < 1e-3


def test_weight_blocks_partition_the_rows_and_cover_the_weights():
    rng = np.random.default_rng(4)
    mask = _conv_like(rng) != 0
    mask[5, 29] = True  # an output reading far away
    blocks = weight_blocks(mask)
    rows = np.concatenate([r for r, _ in blocks])
    assert sorted(rows.tolist()) == list(range(len(mask)))
    covered = np.zeros_like(mask)
    for r, c in blocks:
        covered[np.ix_(r, c)] = True
        assert len(r) == 1 or mask[np.ix_(r, c)].mean() >= BLOCK_DENSITY
    assert not np.any(mask & ~covered)
    assert len(weight_blocks(np.ones((6, 9), dtype=bool))) == 1
