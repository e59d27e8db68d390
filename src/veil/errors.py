"""Typed exceptions shared by every layer, so callers can catch veil failures precisely."""


class VeilError(Exception):
    """Base class of every error veil raises on purpose."""


class InsecureParametersError(VeilError, ValueError):
    """Encryption parameters below 128-bit security, or otherwise invalid for SEAL."""


class WireFormatError(VeilError, ValueError):
    """Bytes that are not a valid veil message: bad magic, version, kind, length or payload."""


class ParameterMismatchError(WireFormatError):
    """A ciphertext or key made under other encryption parameters than the ones in use."""


class KeyMaterialError(VeilError, ValueError):
    """Missing, wrong or forbidden key material (e.g. a secret key where only public keys belong)."""


class ShapeError(VeilError, ValueError):
    """Inputs whose number of samples, features or ciphertexts does not match the model."""


class NotCompiledError(VeilError, RuntimeError):
    """An encrypted operation was requested before `compile` prepared the model."""


class PrecisionError(VeilError, ArithmeticError):
    """Values outside the range the encryption parameters were calibrated for."""


class FederationError(VeilError, RuntimeError):
    """A federated run did not complete (engine failure, missing nodes, too few clients, timeout)."""


class FederatedConfigError(VeilError, ValueError):
    """Federated-learning settings or data that cannot work (unknown names, impossible splits, bad shapes)."""


class FederatedStatisticsError(VeilError, ValueError):
    """An owner's feature statistics that cannot be aggregated (non-finite, or beyond the SecAgg+ range)."""


class ScaleMismatchError(VeilError, ValueError):
    """Ciphertext operands at different levels or scales, or an operation the level chain cannot hold."""


class ExecutorError(VeilError, RuntimeError):
    """A worker process of a parallel encrypted run died or could not start (killed, out of memory)."""
