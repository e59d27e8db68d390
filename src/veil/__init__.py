"""veil: privacy-preserving machine learning (encrypted inference, MPC training, federated learning)."""

from veil.errors import VeilError

__version__ = "0.1.0"
__all__ = ["Client", "VeilError", "__version__"]


def __getattr__(name: str) -> object:
    """`veil.Client` without importing the HTTP stack for users who only need `veil.ml`."""
    if name == "Client":
        from veil.serve.client import Client

        return Client
    raise AttributeError(f"module 'veil' has no attribute {name!r}")
