"""Starting a computation: threads of this process (tests) or one OS process per rank over mutual TLS."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from veil.mpc import certs, provider, ring
from veil.mpc.comm import Communicator, InProcessComm, _Hub
from veil.mpc.errors import MPCTimeoutError, PartyFailureError, ProtocolError
from veil.mpc.primitives import Runtime
from veil.net import free_port


def setup_party(comm: Communicator, frac_bits: int) -> Runtime:
    """Key hand-out with the dealer and a common key among parties (for public randomness)."""
    key = provider.receive_key(comm)
    if comm.rank == 0:
        common = ring.PRG()
        raw = torch.frombuffer(bytearray(common.key), dtype=torch.uint8).clone()
        for p in range(1, comm.n_parties):
            comm.send(raw, p)
    else:
        raw = comm.recv((32,), torch.uint8, 0)
        common = ring.PRG(bytes(raw.numpy().tobytes()))
    return Runtime(comm, provider.DealerClient(comm, key), frac_bits, common)


def run_party(comm: Communicator, fn: Callable[..., Any], args: tuple, frac_bits: int) -> Any:
    """Run ``fn(*args)`` as one party (or run the dealer loop if this rank is the dealer)."""
    if comm.rank == comm.dealer:
        return provider.run_dealer(comm, frac_bits)
    rt = setup_party(comm, frac_bits)
    with rt:
        out = fn(*args)
    rt.dealer.stop()
    return out


def run_local(
    fn: Callable[..., Any],
    n_parties: int = 2,
    args: tuple = (),
    frac_bits: int = ring.DEFAULT_FRAC_BITS,
    timeout: float = 60.0,
    transport: str = "memory",
) -> list[Any]:
    """Run ``fn(*args)`` in every party, each a thread of this process, plus a dealer thread.

    ``transport="memory"`` passes messages through queues; ``"tls"`` links the threads with the
    real transport (`TLSComm` on 127.0.0.1 with a throw-away development CA), as separate
    processes would be. Returns the parties' return values (index = rank). If any rank fails,
    every other rank stops with `PartyFailureError` and the first error is re-raised here.
    """
    if n_parties < 2:
        raise ProtocolError("at least 2 computing parties are needed")
    if transport not in ("memory", "tls"):
        raise ProtocolError(f"transport must be 'memory' or 'tls', got {transport!r}")
    world = n_parties + 1
    hub = _Hub(world)
    results: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world
    tmp = tempfile.TemporaryDirectory(prefix="veil-mpc-pki-") if transport == "tls" else None
    if tmp is not None:
        pki = certs.make_dev_pki(tmp.name, n_parties)
        peers = [f"127.0.0.1:{free_port()}" for _ in range(n_parties)]
        session = os.urandom(8).hex()

    def body(rank: int) -> None:
        comm: Communicator | None = None
        try:
            if tmp is None:
                comm = InProcessComm(rank, world, hub, timeout)
            else:
                from veil.mpc.transport import TLSComm

                comm = TLSComm(rank, world, peers, pki[rank], timeout=timeout, join_timeout=timeout,
                               session=session)
            results[rank] = run_party(comm, fn, args, frac_bits)
        except BaseException as exc:
            errors[rank] = exc
            if not hub.abort.is_set():
                hub.reason = f"rank {rank} failed: {exc!r}"
                hub.abort.set()
        finally:
            if comm is not None:
                with contextlib.suppress(PartyFailureError):
                    comm.close()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout * 4
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    finally:
        if tmp is not None:
            tmp.cleanup()
    if any(t.is_alive() for t in threads):
        hub.reason = "run_local deadline"
        hub.abort.set()
        raise MPCTimeoutError("in-process computation did not finish")
    first = next((e for e in errors if e is not None and not isinstance(e, PartyFailureError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results[:n_parties]


def resolve(entry: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function."""
    mod, _, name = entry.partition(":")
    if not name:
        raise ProtocolError(f"entry must be module:function, got {entry!r}")
    return getattr(importlib.import_module(mod), name)


def launch(
    entry: str,
    n_parties: int = 2,
    args: tuple = (),
    frac_bits: int = ring.DEFAULT_FRAC_BITS,
    timeout: float = 60.0,
    wall_timeout: float = 600.0,
    threads: int = 1,
    party_args: list[tuple] | None = None,
) -> list[Any]:
    """Run ``entry`` in n party processes plus a dealer process on loopback; return their results.

    Party r runs ``entry(*args, *party_args[r])``: ``args`` are public (every party gets them),
    ``party_args[r]`` is party r's private input and is written to a file only party r reads.

    Each process is ``python -m veil.mpc.party`` with its own certificate from a throw-away
    development CA (it receives the CA certificate and only its own key) and a free port on
    127.0.0.1; every link between them is mutually authenticated TLS 1.3. The results come back
    through files written with ``torch.save``. Raises `PartyFailureError` if any process fails,
    after stopping all of them. The dealer gets no arguments at all. In a real deployment each
    party runs ``veil mpc party --rank R --world N --peers ... --certs ... --entry ... --args
    <its own file>`` (or ``veil mpc train`` on share files) on its own machine.
    """
    if party_args is not None and len(party_args) != n_parties:
        raise ProtocolError(f"party_args needs one tuple per party ({n_parties})")
    world = n_parties + 1
    with tempfile.TemporaryDirectory(prefix="veil-mpc-") as tmp:
        pki = certs.make_dev_pki(Path(tmp) / "pki", n_parties)
        peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(n_parties))
        session = os.urandom(8).hex()
        argfs = []
        for r in range(n_parties):
            argf = Path(tmp) / f"args{r}.pt"
            torch.save((*args, *(party_args[r] if party_args is not None else ())), argf)
            argfs.append(argf)
        procs = []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for r in range(world):
            cmd = [
                sys.executable, "-m", "veil.mpc.party", "--rank", str(r), "--world", str(world),
                "--peers", peers, "--session", session, "--entry", entry,
                "--ca", str(pki[r].ca), "--cert", str(pki[r].cert), "--key", str(pki[r].key),
                "--out", str(Path(tmp) / f"out{r}.pt"), "--frac-bits", str(frac_bits),
                "--timeout", str(timeout), "--join-timeout", str(max(timeout, 60.0)), "--threads", str(threads),
            ]
            if r != world - 1:  # each party its own file; the dealer none: it never sees inputs
                cmd += ["--args", str(argfs[r])]
            with open(Path(tmp) / f"err{r}.txt", "w") as errf:
                procs.append(subprocess.Popen(cmd, env=env, stderr=errf))
        codes = _wait_all(procs, wall_timeout, grace=timeout + 5.0)
        errs = [(Path(tmp) / f"err{r}.txt").read_text() for r in range(world)]
        if any(c != 0 for c in codes):
            detail = "; ".join(
                f"rank {i}: {'killed' if c is None else f'exit {c}'}: {_last_line(errs[i])}"
                for i, c in enumerate(codes)
                if c != 0
            )
            exc = PartyFailureError(f"MPC processes failed: {detail}")
            exc.exit_codes = codes
            exc.stderr = errs
            raise exc
        return [torch.load(Path(tmp) / f"out{r}.pt", weights_only=False) for r in range(world)]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _wait_all(procs: list[subprocess.Popen], wall_timeout: float, grace: float) -> list[int | None]:
    """Wait for every process; once one fails, the others get ``grace`` seconds before being killed.

    Returns exit codes, None for a process that had to be killed.
    """
    deadline = time.monotonic() + wall_timeout
    failed_at: float | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return codes
            now = time.monotonic()
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > grace):
                return codes
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
