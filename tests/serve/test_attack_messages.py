"""Error details a user reads: a model that is not deployed says so (was "model 'x' has no any
version deployed"); a damaged model directory given to deploy is named."""

from __future__ import annotations

import json

import pytest

from veil import cli
from veil.errors import VeilError, WireFormatError
from veil.serve import Client
from veil.serve.backends.local import SQLiteStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.service import Service


def test_a_model_that_is_not_deployed_says_so(tmp_path):
    service = Service(SQLiteStore(tmp_path), ArtefactCipher(ArtefactCipher.generate_key()))
    with pytest.raises(VeilError, match=r"^model 'nope' is not deployed$"):
        service.record("nope")
    with pytest.raises(VeilError, match=r"^model 'nope' has no version 3 deployed$"):
        service.record("nope", 3)


@pytest.mark.parametrize("damage", ["garbage", "missing", "not-an-artefact", "not-a-directory"])
def test_deploying_a_damaged_model_directory_names_the_file(tmp_path, capsys, damage):
    """The client reads the artefact before connecting: the error names the file, the CLI prints
    one line (was json's bare "Expecting value: line 1 column 1")."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "client.json").write_text(json.dumps({"format": "veil-model/1"}))
    (model / "server.json").write_text({"garbage": "{not json", "missing": "{}",
                                        "not-an-artefact": json.dumps({"format": "other"}),
                                        "not-a-directory": "{}"}[damage])
    if damage == "missing":
        (model / "server.json").unlink()
    target, named = (model, str(model / "server.json")) if damage != "not-a-directory" else \
        (model / "server.json", str(model / "server.json"))
    with Client("http://127.0.0.1:9", "token") as client, pytest.raises(WireFormatError) as exc:
        client.deploy(target, "m")
    assert named in str(exc.value)
    assert cli.main(["deploy", str(target), "--name", "m", "--server", "http://127.0.0.1:9", "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
