"""Servers, workers and the serving backends run circuits without the model libraries: loading them
imports no scikit-learn, torch or xgboost (artefacts are read by `veil.program.artefact`); the
serving command line and the backend registry load no server either."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("sklearn", "torch", "xgboost", "veil.ml")


SERVER_LIBRARIES = ("fastapi", "starlette", "uvicorn", "redis", "numpy")


def loaded(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` a fresh interpreter has loaded after importing `module`."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", ["veil.serve.worker", "veil.serve.server", "veil.serve.app",
                                    "veil.serve.cli", "veil.serve.backends", "veil.serve.backends.base",
                                    "veil.serve.backends.local", "veil.serve.backends.redis",
                                    "veil.program.artefact"])
def test_serving_modules_import_no_model_library(module):
    assert loaded(module, HEAVY) == []


@pytest.mark.parametrize("module", ["veil.serve.cli", "veil.serve.backends"])
def test_command_line_and_backend_registry_import_no_server(module):
    """`veil --help` and `veil token` read these: they load no web framework, Redis client or numpy."""
    assert loaded(module, SERVER_LIBRARIES) == []
