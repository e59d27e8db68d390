"""Flower, Ray and uv write under a temporary directory; no telemetry or update checks."""

import os

import pytest

from veil.fl.simulation import offline_env


@pytest.fixture(scope="session", autouse=True)
def _flower_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    saved = dict(os.environ)
    os.environ.update(offline_env(home))
    yield home
    os.environ.clear()
    os.environ.update(saved)
