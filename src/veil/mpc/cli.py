"""``veil mpc ...`` sub-commands, to be wired into veil.cli with `add_parser`."""

from __future__ import annotations

import argparse

from veil.mpc import certs, party


def _certs(ns: argparse.Namespace) -> int:
    files = certs.make_dev_pki(ns.out, ns.parties)
    print(f"development CA and {len(files)} certificates in {ns.out}:")
    for rank, f in files.items():
        print(f"  rank {rank}: {f.cert.name} / {f.key.name}")
    print("give each process ca.pem and only its own certificate and key; keep ca.key offline")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mpc party`` and ``mpc certs`` under the given sub-parsers; the handler is ``ns.func``."""
    mpc = subparsers.add_parser("mpc", help="secure multi-party computation")
    sub = mpc.add_subparsers(dest="mpc_command", required=True)
    p = sub.add_parser("party", help="run one party (or the dealer, the last rank) of a computation")
    party.add_arguments(p)
    p.set_defaults(func=party.run)
    c = sub.add_parser("certs", help="make a development CA and one certificate per rank (role and rank named)")
    c.add_argument("--parties", type=int, default=2, help="number of computing parties (the dealer is added)")
    c.add_argument("--out", required=True, help="directory to write ca.pem, partyR.pem/.key, dealer.pem/.key")
    c.set_defaults(func=_certs)
    return mpc
