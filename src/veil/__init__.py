"""veil: privacy-preserving machine learning (encrypted inference, MPC training, federated learning)."""

from veil.errors import VeilError

__version__ = "0.1.0"
__all__ = ["VeilError", "__version__"]
