"""Flower, Ray and uv write under a temporary directory; no telemetry or update checks.

The environment is set for each test module of this package and restored after it, so that
Flower's settings (OMP_NUM_THREADS=1, RAY_TMPDIR, ...) do not reach the modules of other packages
that the same pytest-xdist worker runs later."""

import os

import pytest

from veil.fl.simulation import offline_env


@pytest.fixture(scope="module", autouse=True)
def _flower_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    saved = dict(os.environ)
    os.environ.update(offline_env(home))
    yield home
    os.environ.clear()
    os.environ.update(saved)
