"""``veil mpc ...`` sub-commands, to be wired into veil.cli with `add_parser`."""

from __future__ import annotations

import argparse

from veil.mpc import party


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mpc party`` under the given argparse sub-parsers; the handler is ``ns.func``."""
    mpc = subparsers.add_parser("mpc", help="secure multi-party computation")
    sub = mpc.add_subparsers(dest="mpc_command", required=True)
    p = sub.add_parser("party", help="run one party (or the dealer, the last rank) of a computation")
    party.add_arguments(p)
    p.set_defaults(func=party.run)
    return mpc
