"""The one name rule (`veil.names`): model names in serve and dataset, result and owner names in
mpc accept and refuse the same strings, each layer with its own typed error."""

import pytest
from pydantic import ValidationError

from veil.mpc import certs, sharefile
from veil.mpc.errors import ProtocolError
from veil.names import NAME_PATTERN, is_name
from veil.serve import schemas, service
from veil.serve.errors import ServeError

GOOD = ["a", "digits", "Model_2", "lr-v1.2", "x" * 64, "0.party1"]
BAD = ["", ".hidden", "..", "-rf", "_x", "a/b", "a\\b", "a:b", "a b", "abc\n", "x" * 65, "é", None, 3, b"abc"]

CHECKS = [
    pytest.param(sharefile.check_name, ProtocolError, id="mpc-dataset"),
    pytest.param(certs.owner, ProtocolError, id="mpc-owner"),
    pytest.param(service.check_name, ServeError, id="serve-model"),
]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass_every_layer(name):
    assert is_name(name)
    assert sharefile.check_name(name) == name
    assert certs.owner(name).rank == name
    assert service.check_name(name) == name


@pytest.mark.parametrize("check, error", CHECKS)
@pytest.mark.parametrize("name", BAD, ids=repr)
def test_bad_names_are_refused_with_the_layers_typed_error(name, check, error):
    assert not is_name(name)
    with pytest.raises(error, match="letters, digits"):
        check(name)


def test_owner_uris_with_bad_names_name_no_identity():
    uri = f"{certs.URI_PREFIX}owner:"
    ids = certs.identities_of({"subjectAltName": [("URI", uri + "alice"), ("URI", uri + "-x"), ("URI", uri + "a:b")]})
    assert ids == [certs.Identity("owner", "alice")]


def test_the_api_schema_applies_the_same_rule():
    """The deploy body's pattern (pydantic's regex engine, also in the OpenAPI schema) agrees with `is_name`."""
    body = {"server": {}, "client": {}}
    assert schemas.DeployRequest.model_json_schema()["properties"]["name"]["pattern"] == NAME_PATTERN
    for name in GOOD:
        assert schemas.DeployRequest(name=name, **body).name == name
    for name in (n for n in BAD if isinstance(n, str)):  # pydantic's lax mode reads bytes as text
        with pytest.raises(ValidationError):
            schemas.DeployRequest(name=name, **body)
