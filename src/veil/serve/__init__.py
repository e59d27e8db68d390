"""Serving: FastAPI server, client SDK, key and model registries, Redis cluster backend."""

from veil.serve.app import create_app
from veil.serve.client import Client, RequestError
from veil.serve.server import ServerConfig, build, serve

__all__ = ["Client", "RequestError", "ServerConfig", "build", "create_app", "serve"]
