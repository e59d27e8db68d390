"""Entry point of one rank: ``python -m veil.mpc.party --rank R --world N --peers ... --certs DIR ...``.

Ranks 0..N-2 run the given ``--entry module:function`` as computing parties; rank N-1 is the
dealer and needs no entry. Every link is mutually authenticated TLS 1.3 (`veil.mpc.transport`):
each process needs the CA certificate and its own certificate and key, naming its rank
(``veil mpc certs`` makes development ones). Exit status 0 on success, 3 if a peer failed or
did not join, 2 for bad arguments or parties started on different terms (`AgreementError`, e.g.
two result holders), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from veil.mpc import ring
from veil.mpc.certs import TLSFiles, identity_for
from veil.mpc.errors import AgreementError, PartyFailureError, ProtocolError
from veil.mpc.launcher import resolve, run_party
from veil.mpc.transport import TLSComm, parse_addr


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``veil mpc party`` and ``python -m veil.mpc.party``."""
    p.add_argument("--rank", type=int, required=True, help="this rank; the last rank is the dealer")
    p.add_argument("--world", type=int, required=True, help="parties + 1 (the dealer)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--peers", default="", help="HOST:PORT of parties 0..N-2, comma-separated")
    where.add_argument("--addr", default="", help="HOST:PORT shorthand: party r listens at HOST:PORT+r")
    p.add_argument("--listen", default="", help="HOST:PORT this party binds (default: its --peers entry)")
    p.add_argument("--certs", default="", help="directory with ca.pem and this rank's partyR/dealer .pem and .key")
    p.add_argument("--ca", default="", help="CA certificate (overrides --certs)")
    p.add_argument("--cert", default="", help="this rank's certificate (overrides --certs)")
    p.add_argument("--key", default="", help="this rank's private key (overrides --certs)")
    p.add_argument("--session", default="", help="name shared by every rank of this computation")
    p.add_argument("--entry", default="", help="module:function run by every computing party")
    p.add_argument("--args", default="", help="torch.save'd tuple of positional arguments")
    p.add_argument("--out", default="", help="where to torch.save the return value")
    p.add_argument("--frac-bits", type=int, default=ring.DEFAULT_FRAC_BITS)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer is an error")
    p.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for every rank to join")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def peer_addresses(ns: argparse.Namespace) -> list[str]:
    """Addresses of the computing parties from ``--peers`` or the ``--addr`` shorthand."""
    if ns.peers:
        return [a.strip() for a in ns.peers.split(",") if a.strip()]
    host, port = parse_addr(ns.addr)
    return [f"{host}:{port + r}" for r in range(ns.world - 1)]


def tls_files(ns: argparse.Namespace) -> TLSFiles:
    """This rank's TLS material from ``--certs`` and/or ``--ca/--cert/--key``."""
    label = identity_for(ns.rank, ns.world).label
    base = Path(ns.certs) if ns.certs else None
    ca = ns.ca or (base / "ca.pem" if base else "")
    cert = ns.cert or (base / f"{label}.pem" if base else "")
    key = ns.key or (base / f"{label}.key" if base else "")
    if not (ca and cert and key):
        raise ProtocolError("TLS is required: give --certs DIR or --ca, --cert and --key (see `veil mpc certs`)")
    files = TLSFiles(Path(ca), Path(cert), Path(key))
    files.check()
    return files


def run(ns: argparse.Namespace) -> int:
    """Run one rank from parsed arguments; returns the exit status."""
    torch.set_num_threads(ns.threads)
    is_dealer = ns.rank == ns.world - 1
    if not is_dealer and not ns.entry:
        print("--entry is required for computing parties", file=sys.stderr)
        return 2
    try:
        peers = peer_addresses(ns)
        tls = tls_files(ns)
    except ProtocolError as exc:
        print(f"veil.mpc rank {ns.rank}: {exc}", file=sys.stderr)
        return 2
    fn = resolve(ns.entry) if not is_dealer else None
    # the dealer never opens the parties' argument file (it may hold their private inputs)
    args = tuple(torch.load(ns.args, weights_only=False)) if ns.args and not is_dealer else ()
    try:
        comm = TLSComm(ns.rank, ns.world, peers, tls, timeout=ns.timeout, join_timeout=ns.join_timeout,
                       listen=ns.listen or None, session=ns.session)
        try:
            out = run_party(comm, fn, args, ns.frac_bits)
        finally:
            with contextlib.suppress(PartyFailureError):
                comm.close()
    except PartyFailureError as exc:
        print(f"veil.mpc rank {ns.rank}: {exc}", file=sys.stderr)
        return 3
    except AgreementError as exc:
        print(f"veil.mpc rank {ns.rank}: {exc}", file=sys.stderr)
        return 2
    if ns.out:
        torch.save(out, ns.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m veil.mpc.party", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
