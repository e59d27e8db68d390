"""Model artefacts, whatever the model family: a server evaluates ciphertexts with a public
bundle; a client owns the keys.

An artefact is a directory of two files, written by `write_artefact` (and `veil.ml`'s `save`):
`server.json` (the circuit, its weights, no secret) and `client.json` (parameters, input bounds
and the client-side post-processing `OutputSpec`, no weights). `ModelServer.load(dir)` reads the
first and `ModelClient.load(dir)` the second. This module imports no model library, so servers
and workers load any artefact without scikit-learn, torch or xgboost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import numpy as np

from veil.errors import WireFormatError
from veil.he import PublicBundle, SecretKeys
from veil.program.kinds import load_client, load_server
from veil.program.outputs import OutputSpec

SERVER_FILE = "server.json"
CLIENT_FILE = "client.json"
FORMAT = "veil-model/1"
READABLE_FORMATS = (FORMAT, "veil-linear/1")


def write_artefact(path: str | Path, model: str, circuit: Any, output: OutputSpec) -> Path:
    """Write `server.json` (the circuit, no client secrets) and `client.json` (parameters, input
    bounds and post-processing, no weights) into directory `path` for a model named `model`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    server = {"format": FORMAT, "model": model, "circuit": circuit.to_dict()}
    client = {"format": FORMAT, "model": model, "circuit": circuit.client_spec(), "output": output.to_dict()}
    (path / SERVER_FILE).write_text(json.dumps(server))
    (path / CLIENT_FILE).write_text(json.dumps(client))
    return path


def read_artefact_file(path: str | Path, name: str) -> dict:
    """The JSON object of one half (`name`: SERVER_FILE or CLIENT_FILE) of the artefact directory
    `path` (or of the file `path` itself); WireFormatError naming the file if it cannot be read or
    is not a veil artefact."""
    path = Path(path)
    file = path / name if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"cannot read model file {file}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
        raise WireFormatError(f"{file} is not a veil model artefact ({', '.join(READABLE_FORMATS)})")
    return data


class _ArtefactHalf:
    """One half of an artefact, read from its own file (`FILE`) of the artefact directory."""

    FILE: str

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read this half from an artefact directory (or the file itself)."""
        return cls.from_dict(read_artefact_file(path, cls.FILE))

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        """Build this half from an untrusted artefact object (WireFormatError if it is not one)."""
        if not isinstance(data, dict):
            raise WireFormatError("a model artefact must be an object")
        return cls._from_fields(data)

    @classmethod
    def _from_fields(cls, data: dict) -> Self:
        raise NotImplementedError


class ModelServer(_ArtefactHalf):
    """Evaluates encrypted requests; holds the weights and never any secret key."""

    FILE = SERVER_FILE

    def __init__(self, circuit: Any, model: str = "") -> None:
        self.circuit = circuit
        self.model = model

    @classmethod
    def _from_fields(cls, data: dict) -> ModelServer:
        return cls(load_server(data.get("circuit")).prepare(), str(data.get("model", "")))

    def load_bundle(self, data: bytes) -> PublicBundle:
        """Parse a client's public bundle (a secret key is refused with KeyMaterialError)."""
        return PublicBundle.from_bytes(data)

    def run(self, request: bytes, bundle: PublicBundle) -> bytes:
        return self.circuit.run(request, bundle)


class ModelClient(_ArtefactHalf):
    """Generates keys, encrypts inputs, decrypts outputs and applies the client-side post-processing."""

    FILE = CLIENT_FILE

    def __init__(self, spec: dict, output: OutputSpec, model: str = "") -> None:
        self.circuit = load_client(spec)
        output.check_outputs(self.circuit.n_outputs)
        self.output = output
        self.model = model

    @classmethod
    def _from_fields(cls, data: dict) -> ModelClient:
        return cls(data.get("circuit"), OutputSpec.from_dict(data.get("output")), str(data.get("model", "")))

    @property
    def n_features(self) -> int:
        return self.circuit.n_features

    def choose_layout(self, n_samples: int) -> str:
        return self.circuit.choose_layout(n_samples)

    def keys(self, layout: str) -> SecretKeys:
        return self.circuit.keys(layout)

    def public_bundle_bytes(self, layout: str) -> bytes:
        return self.circuit.public_bundle(layout).to_bytes()

    def encrypt(self, X: Any, layout: str = "auto") -> tuple[str, bytes]:
        """Encrypt X in the given (or automatically chosen) layout; returns (layout, request bytes)."""
        X = self.circuit.check_input(X)
        name = self.choose_layout(len(X)) if layout == "auto" else layout
        return name, self.circuit.encrypt(X, name)

    def decrypt(self, response: bytes, n_samples: int | None = None) -> np.ndarray:
        """Raw decrypted outputs, shape (n_samples, n_outputs); pass the request's row count as
        `n_samples` to refuse a response for any other number of rows."""
        return self.circuit.decrypt(response, n_samples)

    def predict(self, raw: np.ndarray) -> np.ndarray:
        return self.output.predict(raw)

    def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        return self.output.predict_proba(raw)
