"""A hand-edited tokens file that is JSON but not a list of token rows.

Before: a running server that reloaded a file with a row lacking its sha256, or with a row that is
not an object, raised KeyError/AttributeError from `TokenStore.authenticate` (outside the app, so
every request answered 500 until the file was fixed) instead of keeping the previous tokens as it
does for unparsable JSON; `veil serve` on such a file died with a traceback, and `veil token
add|revoke|list` crashed with TypeError/AttributeError (or wrote a token beside the broken row)."""

from __future__ import annotations

import json
import os

import pytest

from veil.serve.auth import TokenStore, add_token_to_file, list_tokens, revoke_tokens

BROKEN = {
    "a row without its digest": {"tokens": [{"name": "x", "role": "client"}]},
    "a row that is not an object": {"tokens": [1]},
    "tokens that are not a list": {"tokens": 5},
    "a list instead of an object": [1, 2],
}


def _rewrite(path, data) -> None:
    """Replace the file with another inode and size, so the store's next look sees a change."""
    tmp = path.with_name("tokens.tmp")
    tmp.write_text(json.dumps(data) + " " * 7)
    os.replace(tmp, path)


@pytest.mark.parametrize("case", BROKEN)
def test_a_running_server_keeps_its_tokens_when_the_file_is_edited_into_nonsense(tmp_path, case):
    path = tmp_path / "tokens.json"
    token = add_token_to_file(path, "alice", "client")
    store = TokenStore.load(path)
    assert store.authenticate(f"Bearer {token}").name == "alice"
    _rewrite(path, BROKEN[case])
    store.refresh(force=True)
    assert store.authenticate(f"Bearer {token}").name == "alice"


@pytest.mark.parametrize("case", BROKEN)
def test_the_token_commands_and_the_server_name_the_broken_file(tmp_path, case):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(BROKEN[case]))
    for action in (lambda: add_token_to_file(path, "bob", "client"), lambda: revoke_tokens(path, "bob"),
                   lambda: list_tokens(path), lambda: TokenStore.load(path)):
        with pytest.raises(ValueError, match=r"tokens\.json"):
            action()
    assert json.loads(path.read_text()) == BROKEN[case]  # nothing was written beside the broken rows


def test_a_file_without_a_tokens_member_holds_no_tokens(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text("{}")
    assert list_tokens(path) == []
    token = add_token_to_file(path, "carol", "admin")
    assert TokenStore.load(path).authenticate(f"Bearer {token}").role == "admin"
