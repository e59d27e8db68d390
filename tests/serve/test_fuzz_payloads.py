"""Property-based fuzzing of what the serving layer parses: ciphertext messages evaluated by a
deployed model (forged headers, bit flips) and model artefacts given to deploy (any JSON value at
any place). Only veil errors, which the server answers as 4xx, may come out."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_iris

from veil import ml
from veil.errors import VeilError
from veil.he import wire
from veil.serve.auth import Principal
from veil.serve.backends.local import SQLiteStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.errors import ServeError, error_fields
from veil.serve.service import Service

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=120, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                max_size=3),
                    max_leaves=8)
ADMIN = Principal("admin", "admin")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-payloads")
    X, y = load_iris(return_X_y=True)
    path = ml.LogisticRegression(max_iter=500).fit(X, y).compile(X).save(root / "iris")
    server = ml.ModelServer.load(path)
    client = ml.ModelClient.load(path)
    requests = {layout: client.encrypt(X[:3], layout)[1] for layout in ("batch", "row")}
    bundles = {layout: server.load_bundle(client.public_bundle_bytes(layout)) for layout in ("batch", "row")}
    artefacts = {kind: json.loads((path / f"{kind}.json").read_text()) for kind in ("server", "client")}
    mlp = ml.MLPClassifier(hidden_layer_sizes=(3,), max_iter=5, random_state=0).fit(X, y).compile(X)
    mlp_path = mlp.save(root / "iris-mlp")
    leveled = {kind: json.loads((mlp_path / f"{kind}.json").read_text()) for kind in ("server", "client")}
    service = Service(SQLiteStore(root / "data"), ArtefactCipher(ArtefactCipher.generate_key()))
    return {"server": server, "requests": requests, "bundles": bundles, "artefacts": artefacts, "service": service,
            "leveled": leveled}


def evaluates_or_refuses(server: ml.ModelServer, request: bytes, bundle) -> bytes | None:
    """The answer, or None if refused with a 4xx veil error; anything else fails the test."""
    try:
        return server.run(request, bundle)
    except VeilError as exc:
        assert error_fields(exc)[0] < 500, exc
        return None


@FUZZ
@given(st.sampled_from(["batch", "row"]),
       st.dictionaries(st.sampled_from(["layout", "n_samples", "n_features", "params"]), JSON, min_size=1))
def test_forged_ciphertext_headers_answer_4xx(deployed, layout, changes):
    msg = wire.decode(deployed["requests"][layout])
    forged = wire.Message(msg.kind, dict(msg.header, **changes), msg.blobs).to_bytes()
    answer = evaluates_or_refuses(deployed["server"], forged, deployed["bundles"][layout])
    assert answer is None or wire.decode(answer, wire.Kind.CIPHERTEXTS).header["n_outputs"] == 3


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["batch", "row"]), st.lists(st.integers(0, 2**22), min_size=1, max_size=3),
       st.booleans())
def test_bit_flipped_ciphertexts_answer_4xx(deployed, layout, positions, in_header):
    data = bytearray(deployed["requests"][layout])
    span = 200 * 8 if in_header else len(data) * 8
    for p in positions:
        data[(p % span) // 8] ^= 1 << (p % 8)
    answer = evaluates_or_refuses(deployed["server"], bytes(data), deployed["bundles"][layout])
    assert answer is None or answer.startswith(wire.MAGIC)


def _paths(tree, prefix=()):
    """Every (path, value) in a JSON tree, so a fuzzed value can replace any of them."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list) and len(tree) <= 4:
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _replace(tree, path, value):
    if not path:
        return value
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


@FUZZ
@given(st.sampled_from(["server", "client"]), st.data(), JSON)
def test_deploying_artefacts_with_any_value_anywhere_answers_4xx(deployed, kind, data, value):
    _deploy_fuzzed(deployed, deployed["artefacts"], kind, data, value)


@FUZZ
@given(st.sampled_from(["server", "client"]), st.data(), JSON)
def test_deploying_leveled_artefacts_with_any_value_anywhere_answers_4xx(deployed, kind, data, value):
    """The same for a network (program stages, per-layout plans with keys and modulus chains)."""
    _deploy_fuzzed(deployed, deployed["leveled"], kind, data, value)


def _deploy_fuzzed(deployed, artefacts, kind, data, value):
    paths = sorted(set(_paths(artefacts[kind])), key=str)
    path = data.draw(st.sampled_from(paths))
    changed = dict(artefacts, **{kind: _replace(artefacts[kind], path, value)})
    if not isinstance(changed[kind], dict):
        return  # the HTTP schema refuses a non-object artefact before the service sees it
    try:
        record = deployed["service"].deploy(ADMIN, "fuzzed", changed["server"], changed["client"])
    except ServeError as exc:
        assert exc.status < 500 and ("invalid" in str(exc) or "different models" in str(exc)), exc
        return
    assert record.name == "fuzzed" and record.version >= 1
