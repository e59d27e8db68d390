"""Entry point of one rank: ``python -m veil.mpc.party --rank R --world N --addr HOST:PORT ...``.

Ranks 0..N-2 run the given ``--entry module:function`` as computing parties; rank N-1 is the
dealer and needs no entry. Exit status 0 on success, 3 if a peer failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from veil.mpc import ring
from veil.mpc.comm import GlooComm
from veil.mpc.errors import PartyFailureError
from veil.mpc.runtime import resolve, run_party


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``veil mpc party`` and ``python -m veil.mpc.party``."""
    p.add_argument("--rank", type=int, required=True, help="this rank; the last rank is the dealer")
    p.add_argument("--world", type=int, required=True, help="parties + 1 (the dealer)")
    p.add_argument("--addr", required=True, help="rendezvous HOST:PORT (rank 0 listens there)")
    p.add_argument("--entry", default="", help="module:function run by every computing party")
    p.add_argument("--args", default="", help="torch.save'd tuple of positional arguments")
    p.add_argument("--out", default="", help="where to torch.save the return value")
    p.add_argument("--frac-bits", type=int, default=ring.DEFAULT_FRAC_BITS)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer is an error")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def run(ns: argparse.Namespace) -> int:
    """Run one rank from parsed arguments; returns the exit status."""
    torch.set_num_threads(ns.threads)
    is_dealer = ns.rank == ns.world - 1
    if not is_dealer and not ns.entry:
        print("--entry is required for computing parties", file=sys.stderr)
        return 2
    fn = resolve(ns.entry) if not is_dealer else None
    # the dealer never opens the parties' argument file (it may hold their private inputs)
    args = tuple(torch.load(ns.args, weights_only=False)) if ns.args and not is_dealer else ()
    try:
        comm = GlooComm(ns.rank, ns.world, ns.addr, ns.timeout)
        try:
            out = run_party(comm, fn, args, ns.frac_bits)
        finally:
            with contextlib.suppress(PartyFailureError):
                comm.close()
    except PartyFailureError as exc:
        print(f"veil.mpc rank {ns.rank}: {exc}", file=sys.stderr)
        return 3
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
