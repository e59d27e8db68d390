"""Servers and workers run circuits without the model libraries: loading them imports no
scikit-learn, torch or xgboost (artefacts are read by `veil.program.artefact`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("sklearn", "torch", "xgboost", "veil.ml")


@pytest.mark.parametrize("module", ["veil.serve.worker", "veil.serve.server", "veil.serve.app",
                                    "veil.program.artefact"])
def test_serving_modules_import_no_model_library(module):
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
