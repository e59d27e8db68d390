"""`veil.he.linear.WeightedSum` is bit-identical to SEAL's own multiply_plain / add_inplace /
add_plain chain, on random ciphertexts and weights, at several rings, primes and levels, for 2- and
3-component ciphertexts, dense and sparse weights, negative and zero weights and biases."""

import numpy as np
import pytest
import seal

from veil.errors import ScaleMismatchError, ShapeError, WireFormatError
from veil.he import HEContext, SecretKeys
from veil.he.linear import DATA_OFFSET, WeightedSum, encoded_integer, seal_round, write_ciphertext
from veil.he.params import CKKSParameters

PARAMS = {
    "n4096": CKKSParameters(4096, (36, 24, 24, 25)),
    "n8192-28": CKKSParameters(8192, (48, 28, 28, 28, 28)),
    "n8192-60": CKKSParameters(8192, (60, 40, 40, 60)),
}


@pytest.fixture(scope="module", params=sorted(PARAMS))
def keys(request):
    return SecretKeys.generate(HEContext(PARAMS[request.param]), relin=True)


def _inputs(keys, n_in, rng, size, drop):
    """n_in ciphertexts of random slots, squared (3 components) if size == 3, `drop` levels down."""
    ctx, ev = keys.context, keys.context.evaluator
    scale = 2.0 ** ctx.params.coeff_modulus_bits[1]
    cts = [keys.encrypt(rng.uniform(-1, 1, ctx.slot_count), scale) for _ in range(n_in)]
    if size == 3:
        cts = [ev.square(c) for c in cts]
    for _ in range(drop):
        cts = [ev.rescale_to_next(c) for c in cts]
    return cts


def seal_chain(ctx: HEContext, cts, W, bias, weight_scale):
    """The reference: one multiply_plain and add_inplace per weight whose encoding is non-zero,
    and add_plain of the bias at the product scale (SEAL's own arithmetic)."""
    ev, pid = ctx.evaluator, cts[0].parms_id()
    out = []
    for row, b in zip(W, bias, strict=True):
        acc = None
        for i in np.flatnonzero(row):
            plain = ctx.encode_at(float(row[i]), weight_scale, pid)
            if plain.is_zero():
                continue
            term = ev.multiply_plain(cts[i], plain)
            acc = term if acc is None else ev.add(acc, term)
        if b != 0.0:
            ev.add_plain_inplace(acc, ctx.encode_at(float(b), cts[0].scale() * weight_scale, pid))
        out.append(acc)
    return out


@pytest.mark.parametrize(("size", "drop", "density"), [(2, 0, 1.0), (3, 0, 0.08), (2, 1, 0.08), (3, 1, 0.6)])
def test_bit_identical_to_the_seal_chain(keys, size, drop, density):
    rng = np.random.default_rng(size * 10 + drop)
    ctx = keys.context
    n_in, n_out = 40, 7
    cts = _inputs(keys, n_in, rng, size, drop)
    level = ctx.level_of(cts[0].parms_id())
    W = rng.normal(size=(n_out, n_in)) * rng.choice([0.01, 1.0, 20.0], size=(n_out, 1))
    W[rng.random(W.shape) > density] = 0.0
    W[np.arange(n_out), rng.integers(0, n_in, n_out)] = rng.normal(size=n_out)  # no empty row
    W[0, :3] = [0.5, -0.5, 1.5 / 2.0**20]  # exact halves after scaling round away from zero (SEAL's rounding)
    bias = rng.normal(size=n_out) * 3
    bias[1] = 0.0
    q = float(ctx.prime_at(level))
    kernel = WeightedSum(ctx, W, bias, q, level)
    assert kernel.sparse == (np.count_nonzero(kernel.W) < 0.125 * kernel.W.size)
    got = kernel(cts)
    ref = seal_chain(ctx, cts, W, bias, q)
    assert [c.to_string() for c in got] == [c.to_string() for c in ref]
    assert all(c.size() == size and c.scale() == ref[0].scale() for c in got)
    keys.decrypt(got[0])  # SEAL loaded and decrypts the result


def test_mixed_sizes_are_sealed_add_of_mixed_sizes(keys):
    """Squares left unrelinearized (3 components) beside values carried at the same scale by a
    product with 1 (2 components), as a skip connection past a layer of squares gives: the same
    bits as SEAL's chain, whose add_inplace takes a shorter ciphertext as zero-padded."""
    rng = np.random.default_rng(11)
    ctx, ev = keys.context, keys.context.evaluator
    fresh = _inputs(keys, 10, rng, 2, 0)
    pid, scale = fresh[0].parms_id(), fresh[0].scale()
    cts = [ev.square(c) if i % 3 else ev.multiply_plain(c, ctx.encode_at(1.0, scale, pid))
           for i, c in enumerate(fresh)]
    assert {c.size() for c in cts} == {2, 3} and len({c.scale() for c in cts}) == 1
    W = rng.normal(size=(4, 10))
    W[3] = [1.0 if i % 3 == 0 else 0.0 for i in range(10)]  # only carried inputs: 2 components in SEAL
    bias, level = rng.normal(size=4), ctx.top_level
    got = WeightedSum(ctx, W, bias, float(ctx.prime_at(level)), level)(cts)
    ref = seal_chain(ctx, cts, W, bias, float(ctx.prime_at(level)))
    assert [c.size() for c in got] == [3, 3, 3, 3] and [c.size() for c in ref] == [3, 3, 3, 2]
    assert [c.to_string() for c in got[:3]] == [c.to_string() for c in ref[:3]]
    ours, seals = got[3].to_string()[DATA_OFFSET:], ref[3].to_string()[DATA_OFFSET:]
    assert ours[:len(seals)] == seals and not any(ours[len(seals):])  # SEAL's, and a zero third component
    assert got[3].scale() == ref[3].scale()
    np.testing.assert_array_equal(keys.decrypt(got[3]), keys.decrypt(ref[3]))


def test_integer_weights_at_unit_scale_and_wide_biases(keys):
    """Weights at scale 1 (sums and differences, as exact Linear stages compute) and biases whose
    encoding exceeds 64 bits (SEAL's multi-word path)."""
    rng = np.random.default_rng(7)
    ctx = keys.context
    cts = _inputs(keys, 12, rng, 3, 0)
    level = ctx.top_level
    W = rng.integers(-3, 4, size=(5, 12)).astype(float)
    W[:, 0] = 1.0
    for scale in (1.0, float(ctx.prime_at(level))):
        room = ctx.modulus_bits_at(level) - np.log2(cts[0].scale() * scale) - 3
        bias = np.array([1.0, -2.5, 0.0, 0.9 * 2.0**room, -0.7 * 2.0**room])
        got = WeightedSum(ctx, W, bias, scale, level)(cts)
        assert [c.to_string() for c in got] == [c.to_string() for c in seal_chain(ctx, cts, W, bias, scale)]


def test_rounding_is_seals(keys):
    """encoded_integer reduced mod each prime equals the coefficients of SEAL's scalar encoding,
    including exact halves, negatives and values beyond 2^64."""
    ctx = keys.context
    primes = [m.value() for m in ctx.seal.first_context_data().parms().coeff_modulus()]
    n = ctx.params.poly_modulus_degree
    for value, scale in [(2.5, 1.0), (-2.5, 1.0), (0.5, 1.0), (-0.49999999999999994, 1.0), (0.3, 2.0**28),
                         (-1.7, 2.0**40), (3.25, 2.0**70), (-0.1, 2.0**90)]:
        if np.log2(scale * abs(value)) + 2 >= ctx.modulus_bits_at(ctx.top_level):
            continue  # SEAL refuses to encode it ("encoded value is too large")
        blob = ctx.encode(value, scale).to_bytes()
        coeffs = np.frombuffer(blob[-8 * n * len(primes):], dtype="<u8").reshape(len(primes), n)
        assert list(coeffs[:, 0]) == [encoded_integer(value, scale) % q for q in primes]
    np.testing.assert_array_equal(seal_round(np.array([0.5, -0.5, 1.5, 2.4999, -2.5])), [1, -1, 2, 2, -3])


def test_refuses_what_seal_would_not_compute(keys):
    rng = np.random.default_rng(8)
    ctx = keys.context
    cts = _inputs(keys, 4, rng, 2, 0)
    level, q = ctx.top_level, float(ctx.prime_at(ctx.top_level))
    with pytest.raises(ShapeError, match="transparent"):
        WeightedSum(ctx, [[1.0, 0, 0, 0], [1e-30, 0, 0, 0]], None, q, level)
    kernel = WeightedSum(ctx, np.ones((2, 4)), None, q, level)
    with pytest.raises(ShapeError, match="4 ciphertexts"):
        kernel(cts[:3])
    lower = [ctx.evaluator.rescale_to_next(c) for c in cts]
    with pytest.raises(ScaleMismatchError, match="level"):
        kernel(lower)
    mixed = [*cts[:3], ctx.evaluator.square(cts[3])]
    with pytest.raises(ScaleMismatchError, match="share"):
        kernel(mixed)
    bottom = [ctx.evaluator.mod_switch_to(c, ctx.parms_id_at(0)) for c in cts]
    with pytest.raises(ScaleMismatchError, match="does not fit"):
        WeightedSum(ctx, np.ones((1, 4)), None, 2.0**30, 0)(bottom)  # SEAL: "scale out of bounds"
    with pytest.raises(ShapeError, match="2\\^62"):
        WeightedSum(ctx, np.ones((1, 4)), None, 2.0**62, level)


def test_seal_validates_every_written_ciphertext(keys):
    """A coefficient at or above its prime is refused by SEAL's own validation when loading."""
    rng = np.random.default_rng(9)
    ctx = keys.context
    ct = _inputs(keys, 1, rng, 2, 0)[0]
    blob = ct.to_string()
    size, n, primes = ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size()
    data = np.frombuffer(blob[DATA_OFFSET:], dtype="<u8").reshape(size, primes, n).copy()
    same = write_ciphertext(ctx, blob[:DATA_OFFSET], data, ct.scale())
    assert isinstance(same, seal.Ciphertext) and same.to_string() == blob
    data[0, 0, 0] = ctx.seal.first_context_data().parms().coeff_modulus()[0].value()
    with pytest.raises(WireFormatError, match="SEAL refused"):
        write_ciphertext(ctx, blob[:DATA_OFFSET], data, ct.scale())


def test_blocks_of_rows_and_columns_give_the_same_bytes(keys, monkeypatch):
    """Outputs computed in several blocks of rows (bounded memory) and of coefficients (bounded
    working set) are the same bytes as SEAL's chain, bias included."""
    import veil.he.linear as linear

    rng = np.random.default_rng(10)
    ctx = keys.context
    cts = _inputs(keys, 20, rng, 2, 0)
    level = ctx.top_level
    ct_bytes = 2 * (level + 1) * ctx.params.poly_modulus_degree * 8
    monkeypatch.setattr(linear, "OUTPUT_BLOCK_BYTES", 3 * ct_bytes)
    monkeypatch.setattr(linear, "WORKING_BYTES", 8 * 20 * 64 * 4)
    W, bias = rng.normal(size=(8, 20)), rng.normal(size=8)
    q = float(ctx.prime_at(level))
    kernel = WeightedSum(ctx, W, bias, q, level)
    assert len(kernel._blocks) == 3
    got = kernel(cts)
    assert [c.to_string() for c in got] == [c.to_string() for c in seal_chain(ctx, cts, W, bias, q)]


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_give_the_same_bytes(keys, monkeypatch, threads):
    """The (prime, component) products of each block of rows split over a pool of threads (each
    with its own slab) give SEAL's bytes, with several row blocks, column steps, mixed sizes and a
    bias; with one thread no pool is started."""
    import veil.he.linear as linear

    rng = np.random.default_rng(11)
    ctx, ev = keys.context, keys.context.evaluator
    fresh = _inputs(keys, 20, rng, 2, 0)
    pid, scale = fresh[0].parms_id(), fresh[0].scale()
    cts = [ev.square(c) if i % 3 else ev.multiply_plain(c, ctx.encode_at(1.0, scale, pid))
           for i, c in enumerate(fresh)]
    ct_bytes = 2 * (ctx.top_level + 1) * ctx.params.poly_modulus_degree * 8
    monkeypatch.setattr(linear, "OUTPUT_BLOCK_BYTES", 2 * ct_bytes)
    monkeypatch.setattr(linear, "WORKING_BYTES", 8 * 20 * 64 * 4)
    monkeypatch.setattr(linear, "MAX_THREADS", threads)
    pools = []
    real_pool = linear.ThreadPoolExecutor
    monkeypatch.setattr(linear, "ThreadPoolExecutor", lambda *a, **k: pools.append(a) or real_pool(*a, **k))
    W, bias = rng.normal(size=(5, 20)), rng.normal(size=5)
    q = float(ctx.prime_at(ctx.top_level))
    kernel = WeightedSum(ctx, W, bias, q, ctx.top_level)
    assert len(kernel._blocks) == 3 and linear.threads() == threads
    got = kernel(cts)
    assert [c.to_string() for c in got] == [c.to_string() for c in seal_chain(ctx, cts, W, bias, q)]
    assert len(pools) == (0 if threads == 1 else 1)


def test_threads_are_bounded_by_their_slabs(keys, monkeypatch):
    """Threads beyond what `SLAB_BYTES` holds (one n_in x N slab each) are not started, whatever
    the cores: memory stays bounded on many cores; the bytes stay SEAL's."""
    import veil.he.linear as linear

    rng = np.random.default_rng(12)
    ctx = keys.context
    cts = _inputs(keys, 6, rng, 2, 0)
    slab = 8 * 6 * ctx.params.poly_modulus_degree
    monkeypatch.setattr(linear, "MAX_THREADS", 64)
    monkeypatch.setattr(linear, "SLAB_BYTES", 2 * slab + slab // 2)
    pools = []
    real_pool = linear.ThreadPoolExecutor
    monkeypatch.setattr(linear, "ThreadPoolExecutor", lambda *a, **k: pools.append(a) or real_pool(*a, **k))
    W, bias = rng.normal(size=(3, 6)), rng.normal(size=3)
    q = float(ctx.prime_at(ctx.top_level))
    got = WeightedSum(ctx, W, bias, q, ctx.top_level)(cts)
    assert pools == [(2,)]
    assert [c.to_string() for c in got] == [c.to_string() for c in seal_chain(ctx, cts, W, bias, q)]
