"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis), in-process
over ASGI, with every default check on, a fixed seed and few examples per operation.

The server holds three deployed models, a linear one (iris), a network (mlp: leveled program,
other parameters, 3-component responses) and a tree ensemble (trees: product-sum program over a
public input grid, relinearization keys), and a registered key for each; positive cases use them
half the time (chosen by the generated data, so runs are reproducible) to reach the deep paths,
not only 404s.
The trusted-execution endpoints are live: the app is a key broker (a policy trusting the test-only
attester of `tests.tee.fakeplatform`) and an attested enclave (that attester as its provider).
One deliberate setting: operations whose body is opaque to any schema (a CKKS ciphertext, a key
bundle, a model artefact, signed evidence) may answer 400 to schema-valid data, the evidence
endpoints also 403 (evidence refused), and plaintext prediction 422 (the feature count is the
model's, not the schema's). Nothing may answer 5xx.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.modes import GenerationMode
from sklearn.datasets import load_iris

from tests.tee.fakeplatform import PLATFORM, FakePlatform, FakeVerifier
from tests.tee.vectors import write_policy
from veil import ml
from veil.serve.app import create_app
from veil.serve.auth import Principal, TokenStore
from veil.serve.backends.local import SQLiteStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.service import Service
from veil.serve.tee import EnclaveAttester, TeeState
from veil.tee import KeyBroker

pytestmark = pytest.mark.timeout(300)
TOKENS = {"admin": "admin-token-for-fuzzing", "alice": "alice-token-for-fuzzing"}
OPAQUE_BODIES = ["POST /v1/keys", "POST /v1/keys/json", "POST /v1/models", "POST /v1/models/{name}/predict",
                 "POST /v1/models/{name}/predict/json"]
TEE_BODIES = ["POST /v1/tee/key-release", "POST /v1/tee/evidence", "POST /v1/models/{name}/predict/plain"]
CONFIG = f"""
seed = 13
[generation]
max-examples = 12
[phases.stateful]
enabled = false
[[operations]]
include-name = {json.dumps(OPAQUE_BODIES)}
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]
[[operations]]
include-name = {json.dumps(TEE_BODIES)}
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "422"]
"""


# The app exists from import (schemathesis binds operations to it when collecting); the fixture
# fills its registries. (schemathesis.pytest.from_fixture would defer all this, but fails under pytest 9.)
_DATA = tempfile.TemporaryDirectory(prefix="veil-fuzz-")
SERVICE = Service(SQLiteStore(_DATA.name), ArtefactCipher(ArtefactCipher.generate_key()))
_TOKENS = TokenStore()
for _name, _token in TOKENS.items():
    _TOKENS.add(_token, _name, "admin" if _name == "admin" else "client")
_MACHINE = FakePlatform()
_TEE = TeeState(broker=KeyBroker(write_policy(Path(_DATA.name), {PLATFORM: {"roots": [_MACHINE.root_pem],
                                                                         "measurements": [_MACHINE.measurement.hex()]}},
                                              plugins={PLATFORM: FakeVerifier}), bytes(32)),
                attester=EnclaveAttester(_MACHINE, b"the server's SubjectPublicKeyInfo"))
APP = create_app(SERVICE, _TOKENS, tee=_TEE)


def _schema_as(who: str) -> schemathesis.schemas.BaseSchema:
    """The schema the app serves, with schemathesis holding `who`'s bearer token (so its auth checks
    know which credential to remove or spoil)."""
    auth = f'[auth.openapi.HTTPBearer]\nbearer = "{TOKENS[who]}"\n'
    return schemathesis.openapi.from_asgi("/openapi.json", APP, config=SchemathesisConfig.from_str(CONFIG + auth))


as_client, as_admin = _schema_as("alice"), _schema_as("admin")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """Three deployed models (linear, network, trees) and alice's registered key for each."""
    root = tmp_path_factory.mktemp("fuzz")
    X, y = load_iris(return_X_y=True)
    models = {"iris": ml.LogisticRegression(max_iter=500).fit(X, y),
              "mlp": ml.MLPClassifier(hidden_layer_sizes=(4,), max_iter=20, random_state=0).fit(X, y),
              "trees": ml.DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, y)}
    keys = {}
    for name, model in models.items():
        path = model.compile(X).save(root / name)
        SERVICE.deploy(Principal("admin", "admin"), name, json.loads((path / "server.json").read_text()),
                       json.loads((path / "client.json").read_text()))
        bundle = ml.ModelClient.load(path).public_bundle_bytes("batch")
        keys[name] = SERVICE.register_key(Principal("alice", "client"), bundle).key_id
    yield keys
    _DATA.cleanup()


def _known_objects(case, api) -> None:
    """In positive cases, point about half of the requests at a deployed model and its registered key."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    params = case.path_parameters or {}
    model = "iris"
    if "name" in params and len(str(params["name"])) % 2 == 0:
        model = ("iris", "mlp", "trees")[len(str(params["name"])) % 3]
        params["name"] = model
    if "key_id" in params and case.method.upper() == "GET" and len(str(params["key_id"])) % 2 == 0:
        params["key_id"] = api[model]
    if case.headers and "x-veil-key-id" in case.headers:
        case.headers["x-veil-key-id"] = api[model]
    if isinstance(case.body, dict) and "key_id" in case.body:
        case.body["key_id"] = api[model]


@as_client.parametrize()
def test_api_as_client(case, api):
    _known_objects(case, api)
    case.call_and_validate()


@as_admin.parametrize()
def test_api_as_admin(case, api):
    _known_objects(case, api)
    case.call_and_validate()
