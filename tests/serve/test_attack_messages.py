"""Error details a user reads: a model that is not deployed says so (was "model 'x' has no any
version deployed")."""

from __future__ import annotations

import pytest

from veil.errors import VeilError
from veil.serve.backends.local import SQLiteStore
from veil.serve.crypto import ArtefactCipher
from veil.serve.service import Service


def test_a_model_that_is_not_deployed_says_so(tmp_path):
    service = Service(SQLiteStore(tmp_path), ArtefactCipher(ArtefactCipher.generate_key()))
    with pytest.raises(VeilError, match=r"^model 'nope' is not deployed$"):
        service.record("nope")
    with pytest.raises(VeilError, match=r"^model 'nope' has no version 3 deployed$"):
        service.record("nope", 3)
