"""The one rule for names users choose that become file names, URIs or URL path segments: model
names in `veil.serve`, dataset, result and data-owner names in `veil.mpc`.

A name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit: it cannot
climb out of a directory ('/', a leading '.'), be read as a command-line option (a leading '-'),
or carry a separator of a certificate URI (':'). `NAME_PATTERN` is the same rule for OpenAPI
schemas and path checks. Each layer raises its own typed error with `NAME_RULE` in the message.
"""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
_NAME = re.compile(NAME_PATTERN)


def is_name(value: object) -> bool:
    """Whether `value` is a string that follows the name rule (never raises)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None
