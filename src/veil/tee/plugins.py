"""Plug-ins named on the command line as ``module:attribute`` (evidence providers, verifiers).

`veil worker --attest-provider` and `veil serve --attest-provider/--attest-verifier` take such a
name: the module is imported and the attribute called (a provider factory takes no argument, a
verifier factory takes the policy's root files). This is how a platform veil does not know is
added, and how the tests plug in their own attester (whose root only the tests' policy trusts):
nothing in veil itself trusts a plug-in, only the operator who names it.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from veil.tee.errors import AttestationError

SPEC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$")


class PluginError(AttestationError, ValueError):
    """A ``module:attribute`` plug-in name that is malformed, cannot be imported or is not callable."""


def load_object(spec: str, what: str) -> Any:
    """The callable `spec` (``package.module:name``, dots allowed after the colon) names."""
    if not isinstance(spec, str) or not SPEC_RE.fullmatch(spec):
        raise PluginError(f"{what} must be given as module:attribute, got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import {what} module {module_name!r}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise PluginError(f"{what} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not callable(found):
        raise PluginError(f"{what} {spec!r} is not callable")
    return found
