"""What the circuits of every kind and their clients share: layout lookup from untrusted headers,
a per-layout SEAL context cache, the input check, the checks on a response, the interface a
circuit kind answers on both halves (`veil.program.kinds`): `kind`, `depth`, `layout_params`,
`evaluation_keys` and `agreement`, and the client's protocol (`infer`) over a transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from veil.errors import KeyMaterialError, ShapeError, WireFormatError
from veil.he import HEContext, PublicBundle, wire
from veil.he.params import CKKSParameters

Send = Callable[[bytes, str], bytes]
"""A transport: (request, layout) -> response, the layout naming the public bundle to use."""


def local_transport(server: Any, client: Any) -> Send:
    """The transport to a server circuit in this process, with the client's own public bundles."""
    return lambda request, layout: server.run(request, client.public_bundle(layout))


def real_array(X: Any, what: str = "an array") -> np.ndarray:
    """X as a float64 array, else ShapeError ("inputs must be `what` of real numbers"): also for
    values that are not real numbers (strings, ragged rows, complex numbers, whose imaginary part a
    cast to float64 would silently drop)."""
    try:
        if np.iscomplexobj(X):
            raise TypeError("complex")
        return np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError):
        raise ShapeError(f"inputs must be {what} of real numbers") from None


def checked_rows(X: Any, n_features: int) -> np.ndarray:
    """X as a finite float64 array of shape (n > 0, n_features), else ShapeError (`real_array`)."""
    X = real_array(X, "a 2-D array")
    if X.ndim != 2 or X.shape[1] != n_features:
        raise ShapeError(f"expected an array of shape (n, {n_features}), got {X.shape}")
    if len(X) == 0:
        raise ShapeError("no samples to encrypt")
    if not np.all(np.isfinite(X)):
        raise ShapeError("inputs contain NaN or infinite values")
    return X


def count(value: object) -> bool:
    """A header count: a true positive integer (JSON `true` or `2.0` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def checked_layout(name: object, known: dict[str, Any]) -> str:
    """`name` if it is one of the layouts `known` (a value from an untrusted header)."""
    if not isinstance(name, str):
        raise WireFormatError(f"layout must be a string, got {type(name).__name__}")
    if name not in known:
        raise ShapeError(f"unknown layout {name!r}; this model supports {sorted(known)}")
    return name


class KindInterface:
    """What both halves of a model answer alike, whatever its kind (`veil.program.kinds`)."""

    kind: str

    @property
    def depth(self) -> int:
        """Rescales of the deepest layout (0 for a depth-0 program)."""
        raise NotImplementedError

    def layout_params(self) -> dict[str, CKKSParameters]:
        raise NotImplementedError

    def evaluation_keys(self, layout: str) -> tuple[bool, tuple[int, ...]]:
        """(relinearization keys needed, Galois rotation steps) of a layout."""
        raise NotImplementedError

    def agreement(self) -> dict[str, Any]:
        """What the server and the client of one model must agree on beyond shapes and keys
        (plans, input scales, encodings), as comparable plain values."""
        raise NotImplementedError


class ServerBase(KindInterface):
    """A SEAL context per layout, built on first use (from `layout_params`), and the checks every
    request passes before any evaluation; a circuit kind supplies `layout_params`, `layout` (its
    packing) and `input_scale`."""

    n_features: int
    _contexts: dict[str, HEContext]

    def layout(self, name: object) -> Any:
        raise NotImplementedError

    def input_scale(self, layout: str) -> float:
        raise NotImplementedError

    def context(self, layout: str) -> HEContext:
        if layout not in self._contexts:
            self._contexts[layout] = HEContext(self.layout_params()[layout])
        return self._contexts[layout]

    def open_request(self, request: bytes | wire.Message, bundle: PublicBundle
                     ) -> tuple[str, Any, HEContext, list, int]:
        """(layout, packing, context, ciphertexts, n_samples) of a request (bytes, or a message
        already decoded) whose header, bundle parameters, ciphertext count, level (fresh) and
        scale all match this model."""
        msg = request if isinstance(request, wire.Message) else wire.decode(request, wire.Kind.CIPHERTEXTS)
        name = msg.header.get("layout")
        packing = self.layout(name)
        ctx = self.context(name)
        if bundle.params != ctx.params:
            raise ShapeError(f"key bundle is for parameters {bundle.params.fingerprint}, "
                             f"the {name} layout needs {ctx.params.fingerprint}")
        header, cts = ctx.unpack(msg)
        n, f = header.get("n_samples"), header.get("n_features")
        if not count(n) or not count(f) or f != self.n_features:
            raise ShapeError(f"request declares {n} samples of {f} features; model expects "
                             f"{self.n_features} features")
        if len(cts) != packing.n_input_cts(n):
            raise ShapeError(f"{name} layout with {n} samples needs {packing.n_input_cts(n)} "
                             f"ciphertexts, got {len(cts)}")
        if any(ct.scale() != self.input_scale(name) for ct in cts):
            raise ShapeError("ciphertext scale does not match the model's input scale")
        fresh = tuple(ctx.parms_id_at(ctx.top_level))
        if any(tuple(ct.parms_id()) != fresh for ct in cts):
            raise ShapeError("ciphertexts must be fresh (at the top level of the modulus chain)")
        return name, packing, ctx, cts, n


class ClientBase(KindInterface):
    """Keys per layout, the input check and decryption with its checks; a circuit kind supplies
    `layout` (its packing), `keys` and, where a response may hold 3-component ciphertexts or two
    samples per slot, `response_max_size` and `_decryptor`; a kind that bounds its outputs
    overrides `check_outputs`."""

    n_features: int
    n_outputs: int
    params: dict[str, CKKSParameters]
    _keys: dict[str, Any]
    response_max_size = 2

    def layout_params(self) -> dict[str, CKKSParameters]:
        return dict(self.params)

    def layout(self, name: object) -> Any:
        raise NotImplementedError

    def keys(self, layout: str) -> Any:
        raise NotImplementedError

    def public_bundle(self, layout: str) -> PublicBundle:
        return self.keys(layout).public_bundle()

    def check_input(self, X: Any) -> np.ndarray:
        return checked_rows(X, self.n_features)

    def infer(self, X: Any, layout: str, send: Send) -> np.ndarray:
        """The whole protocol for rows X: encrypt, one round trip through `send`, decrypt."""
        return self.decrypt(send(self.encrypt(X, layout), layout), len(X))

    def _decryptor(self, layout: str, keys: Any) -> Any:
        return keys.decrypt

    def decrypt(self, response: bytes | wire.Message, n_samples: int | None = None) -> np.ndarray:
        """Outputs of a response (bytes, or a message already decoded); `n_samples`, when given,
        is the row count of the request it answers, and a response declaring any other count is
        refused (never silently reshaped)."""
        msg = response if isinstance(response, wire.Message) else wire.decode(response, wire.Kind.CIPHERTEXTS)
        layout = msg.header.get("layout")
        packing = self.layout(layout)
        if layout not in self._keys:
            raise KeyMaterialError(f"this client holds no {layout!r} keys: the response was not encrypted for it")
        keys = self._keys[layout]
        header, cts = keys.context.unpack(msg, max_size=self.response_max_size)
        n = header.get("n_samples")
        if not count(header.get("n_outputs")) or header.get("n_outputs") != self.n_outputs or not count(n):
            raise ShapeError("response does not match this model's outputs")
        if n_samples is not None and n != n_samples:
            raise ShapeError(f"response declares {n} samples, the request held {n_samples}")
        if len(cts) != packing.n_output_cts(n):
            raise ShapeError(f"response holds {len(cts)} ciphertexts, expected {packing.n_output_cts(n)}")
        decrypt = self._decryptor(layout, keys)
        return self.check_outputs(layout, packing.unpack([decrypt(ct) for ct in cts], n))

    def check_outputs(self, layout: str, Y: np.ndarray) -> np.ndarray:
        """Decrypted outputs `Y` of `layout` once checked against what the model can produce
        (a kind whose plans bound their outputs refuses the others); here, unchecked."""
        return Y
