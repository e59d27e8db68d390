"""Circuit kinds: one registered object per kind of compiled artefact.

A kind names the artefact format (the `kind` field of a server dict and of a client
specification) and parses its two halves: the server circuit, which holds the weights and
evaluates requests, and the client, which holds no weights and encrypts, decrypts and checks.
Both halves answer the same questions through the interface of `veil.program.common` (their
layouts and parameters, the evaluation keys each layout needs, the depth, and `agreement()`: what
the two halves of one model must agree on), so `load_server`, `load_client`, `key_needs`,
`depth` and the serving layer's model description never ask which kind they hold. A new kind is
a server class, a client class and one `register` call beside them; its one-line description is
what the serving layer's OpenAPI schema publishes for it (`descriptions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from veil.errors import WireFormatError

LEGACY_KIND = "affine"
"""The kind of an artefact without a `kind` field (written before kinds were named)."""


@dataclass(frozen=True)
class CircuitKind:
    """A kind's name, the parsers of its two halves (untrusted dicts in, typed errors out) and
    what a client is told the kind computes (one line, published in the OpenAPI schema)."""

    name: str
    server: Callable[[dict], Any]
    client: Callable[[dict], Any]
    description: str


_KINDS: dict[str, CircuitKind] = {}


def register(kind: CircuitKind) -> CircuitKind:
    """Add a kind; a name can be registered once."""
    if kind.name in _KINDS:
        raise ValueError(f"circuit kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> tuple[str, ...]:
    """Names of the registered kinds."""
    return tuple(sorted(_KINDS))


def descriptions() -> dict[str, str]:
    """Each registered kind's description, by name (in `kinds()` order)."""
    return {name: _KINDS[name].description for name in kinds()}


def kind_of(data: Any, what: str) -> CircuitKind:
    """The kind an untrusted artefact dict names (`what` names the dict in errors)."""
    if not isinstance(data, dict):
        raise WireFormatError(f"{what} must be an object, got {type(data).__name__}")
    name = data.get("kind", LEGACY_KIND)
    if not isinstance(name, str) or name not in _KINDS:
        raise WireFormatError(f"unknown circuit kind {name!r}; known: {list(kinds())}")
    return _KINDS[name]


def load_server(data: Any) -> Any:
    """The server circuit of any artefact (`to_dict` output)."""
    return kind_of(data, "a circuit").server(data)


def load_client(spec: Any) -> Any:
    """The client of any artefact (`client_spec` output)."""
    return kind_of(spec, "a client specification").client(spec)


def key_needs(side: Any) -> dict[str, dict[str, Any]]:
    """Per layout, what a client's public bundle must hold for this program: the parameter
    fingerprint, whether relinearization keys are needed and the Galois rotation steps. Servers and
    clients of the same artefact answer alike, so a deploy can check the two halves agree and a
    model's description can tell a client which keys it will be asked for."""
    needs: dict[str, dict[str, Any]] = {}
    for name, params in sorted(side.layout_params().items()):
        relin, steps = side.evaluation_keys(name)
        needs[name] = {"params": params.fingerprint, "relin": relin, "rotation_steps": sorted(steps)}
    return needs


def depth(side: Any) -> int:
    """Multiplicative depth (rescales between the first and the special prime) of the program in
    its deepest layout: 0 for an affine model."""
    return side.depth


def describe(server: Any, client: Any) -> dict[str, Any]:
    """The public description of a model after checking that its two halves describe the same
    program: same kind, shapes, layouts, parameters, evaluation keys and `agreement()` (plans, input
    scales, encodings). A client built from a mismatched specification could only fail later, on
    every request, so a mismatch is a `WireFormatError` here."""
    if server.kind != client.kind:
        raise WireFormatError("server and client artefacts describe different models (kinds differ)")
    if (client.n_features, client.n_outputs) != (server.n_features, server.n_outputs):
        raise WireFormatError("server and client artefacts describe different models")
    needs = key_needs(server)
    if key_needs(client) != needs:
        raise WireFormatError("server and client artefacts describe different models (layouts, parameters or keys)")
    if server.agreement() != client.agreement():
        raise WireFormatError("server and client artefacts describe different models "
                              "(plans, input scales or encodings differ)")
    return {"kind": server.kind, "depth": server.depth, "n_features": server.n_features,
            "n_outputs": server.n_outputs, "layouts": sorted(needs), "keys": needs}
