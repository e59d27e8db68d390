"""Serving: FastAPI server, client SDK, the serving commands (`veil.serve.cli`) and the serving
backends (`veil.serve.backends`: the key and model registries and where predictions run, ``local``
on SQLite in-process or ``redis`` with `veil worker` processes).

The names below are imported on first use, so `veil`'s command line can read option helpers of
submodules (`veil.serve.cli`, `veil.serve.auth`, `veil.serve.tee_setup`) without loading the server.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"Client": "veil.serve.client", "RequestError": "veil.serve.client", "ServerConfig": "veil.serve.server",
            "build": "veil.serve.server", "create_app": "veil.serve.app", "serve": "veil.serve.server"}
__all__ = ["Client", "RequestError", "ServerConfig", "build", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'veil.serve' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
