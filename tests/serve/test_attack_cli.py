"""The client commands as a new user meets them: a server that is not there is one line naming it
(was an httpx.ConnectError traceback, exit status 1)."""

from __future__ import annotations

import pytest

from veil.cli import main
from veil.net import free_port


@pytest.mark.parametrize("command", [["deploy", "model-dir", "--name", "m"], ["keygen", "--model", "m"]])
def test_an_unreachable_server_is_one_line_naming_it(tmp_path, capsys, command):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "model-dir").mkdir()
    for name in ("server.json", "client.json"):
        (tmp_path / "model-dir" / name).write_text('{"format": "veil-model/1"}')  # read before connecting
    args = [a if a != "model-dir" else str(tmp_path / "model-dir") for a in command]
    out = ["--out", str(tmp_path / "keys")] if "keygen" in args else []
    assert main([*args, "--server", url, "--token", "t", *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"veil: error: cannot reach {url}: ConnectError") and "Traceback" not in err
