"""``veil mpc ...`` sub-commands, to be wired into veil.cli with `add_parser`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from veil.mpc import certs, party, sharefile
from veil.mpc.errors import ProtocolError


def _certs(ns: argparse.Namespace) -> int:
    owners = tuple(o for o in ns.owners.split(",") if o) if ns.owners else ()
    files = certs.make_dev_pki(ns.out, ns.parties, owners)
    print(f"development CA and {len(files)} certificates in {ns.out}:")
    for who, f in files.items():
        print(f"  {'rank ' if isinstance(who, int) else 'owner '}{who}: {f.cert.name} / {f.key.name}")
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
    c.add_argument("--owners", default="", help="comma-separated data owners / result holders (owner-NAME.pem)")
    c.add_argument("--out", required=True, help="directory to write ca.pem, partyR.pem/.key, dealer.pem/.key")
    c.set_defaults(func=_certs)
    s = sub.add_parser("share", help="split a dataset or model offline into one encrypted file per party")
    s.add_argument("data", help=".npz, .csv, .pt (state dict) or MNIST IDX file")
    s.add_argument("--parties", type=int, required=True, help="number of computing parties")
    s.add_argument("--certs", required=True, help="directory with the parties' partyR.pem (and the owner's key)")
    s.add_argument("--owner", default="", help="sign as owner NAME (owner-NAME.pem/.key in --certs)")
    s.add_argument("--name", default="", help="dataset name (default: the file name)")
    s.add_argument("--label-column", type=int, default=None, help="CSV: this column becomes y")
    s.add_argument("--frac-bits", type=int, default=16)
    s.add_argument("--out", required=True, help="directory for <name>.partyR.vshare")
    s.set_defaults(func=_share)
    t = sub.add_parser("train", help="run one rank of a training script on share files (the dealer: no script)")
    party.add_arguments(t)
    t.add_argument("script", nargs="?", default="", help="Python file defining train(ctx) (parties only)")
    t.add_argument("--shares", default="", help="directory with this party's .vshare files")
    t.add_argument("--holder", default="", help="owner NAME to whom results are revealed (owner-NAME.pem)")
    t.add_argument("--results", default="", help="directory for the results encrypted to the holder")
    t.set_defaults(func=_train)
    r = sub.add_parser("reveal", help="as the holder, decrypt and add the parties' result files")
    r.add_argument("results", help="directory with <name>.partyR.vshare result files")
    r.add_argument("--certs", required=True, help="directory with ca.pem and owner-NAME.pem/.key")
    r.add_argument("--holder", required=True, help="your owner NAME")
    r.add_argument("--name", default="result")
    r.add_argument("--parties", type=int, required=True, help="number of computing parties you expect results from")
    r.add_argument("--out", required=True, help=".npz file to write")
    r.set_defaults(func=_reveal)
    return mpc


def _owner_files(certs_dir: str, name: str) -> certs.TLSFiles:
    d = Path(certs_dir)
    files = certs.TLSFiles(d / "ca.pem", d / f"owner-{name}.pem", d / f"owner-{name}.key")
    files.check()
    return files


def _share(ns: argparse.Namespace) -> int:
    try:
        tensors = sharefile.load_tensors(ns.data, ns.label_column)
        parties = [Path(ns.certs) / f"party{r}.pem" for r in range(ns.parties)]
        owner = _owner_files(ns.certs, ns.owner) if ns.owner else None
        name = ns.name or Path(ns.data).name.split(".")[0]
        paths = sharefile.write_shares(tensors, parties, ns.out, name, ca=Path(ns.certs) / "ca.pem", owner=owner,
                                       frac_bits=ns.frac_bits)
    except ProtocolError as exc:
        print(f"veil mpc share: {exc}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    print(f"{name}: {shapes} -> {', '.join(p.name for p in paths)} (each readable by its party only)")
    return 0


def _train(ns: argparse.Namespace) -> int:
    is_dealer = ns.rank == ns.world - 1
    if not is_dealer:
        if not ns.script or not ns.shares:
            print("veil mpc train: parties need SCRIPT and --shares", file=sys.stderr)
            return 2
        # checked before connecting: a party that fails later holds the other ranks until their timeout
        for path, ok, what in ((ns.script, Path(ns.script).is_file(), "script"),
                               (ns.shares, Path(ns.shares).is_dir(), "--shares directory")):
            if not ok:
                print(f"veil mpc train: {what} {path} does not exist", file=sys.stderr)
                return 2
        ns.entry = "veil.mpc.cli:run_script"
        holder = Path(ns.certs) / f"owner-{ns.holder}.pem" if ns.holder else None
        args = (str(Path(ns.script).resolve()), ns.shares, ns.certs, ns.rank, ns.world,
                str(holder) if holder else None, ns.results or ".")
        fd, tmp = tempfile.mkstemp(suffix=".pt")
        os.close(fd)
        torch.save(args, tmp)
        ns.args = tmp
    try:
        return party.run(ns)
    finally:
        if not is_dealer:
            os.unlink(ns.args)


def run_script(script: str, shares: str, certs_dir: str, rank: int, world: int, holder: str | None,
               results: str):
    """Party side of ``veil mpc train``: agree on the holder with the other parties (the
    context's first round), then load SCRIPT and call its ``train(ctx)``."""
    label = certs.identity_for(rank, world).label
    d = Path(certs_dir)
    me = certs.TLSFiles(d / "ca.pem", d / f"{label}.pem", d / f"{label}.key")
    ctx = sharefile.PartyContext(shares, me, holder, results)
    spec = importlib.util.spec_from_file_location("veil_mpc_user_script", script)
    if spec is None or spec.loader is None:
        raise ProtocolError(f"cannot load {script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "train"):
        raise ProtocolError(f"{script} defines no train(ctx)")
    return module.train(ctx)


def _reveal(ns: argparse.Namespace) -> int:
    try:
        paths = sorted(Path(ns.results).glob(f"{ns.name}.party*{sharefile.SUFFIX}"))
        values = sharefile.read_result(paths, _owner_files(ns.certs, ns.holder), parties=ns.parties)
    except ProtocolError as exc:
        print(f"veil mpc reveal: {exc}", file=sys.stderr)
        return 2
    np.savez(ns.out, **{k: v.numpy() for k, v in values.items()})
    for k, v in values.items():
        print(f"{k}: {tuple(v.shape)}" + (f" = {float(v):.6g}" if v.numel() == 1 else ""))
    return 0
