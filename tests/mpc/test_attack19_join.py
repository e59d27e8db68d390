"""Attack review of issue 19's MPC join (second round): strangers without a certificate against
2 parties + dealer as processes over mutual TLS, and certified peers that break the rules.

Each test either passes (the defence holds: kept as a regression test) or is a strict xfail
(a finding, reproduced)."""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from veil.mpc import certs
from veil.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def client_hello(group: str | None = None) -> bytes:
    """A real TLS 1.3 ClientHello from a client without a certificate, offering only ``group``
    for the key exchange (default: Python's defaults). Made once; strangers replay the bytes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if group is not None:
        ctx.set_ecdh_curve(group)  # OpenSSL 3: SSL_CTX_set1_groups with this one group
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        ctx.wrap_bio(inb, outb).do_handshake()
    return outb.read()


class Replayer:
    """Opens ``rate`` connections a second to ``port`` (non-blocking), sends the same bytes on
    each at once and keeps them open without reading until `stop` (at most ``most`` open)."""

    def __init__(self, port: int, data: bytes, rate: float, most: int = 2000) -> None:
        self.port, self.data, self.rate, self.most = port, data, rate, most
        self.sent = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        socks: list[socket.socket] = []
        pending: dict[socket.socket, float] = {}
        sel = selectors.DefaultSelector()
        nxt = time.monotonic()
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                while now >= nxt and len(socks) + len(pending) < self.most:
                    s = socket.socket()
                    s.setblocking(False)
                    if s.connect_ex(("127.0.0.1", self.port)) in (0, errno.EINPROGRESS):
                        pending[s] = now
                        sel.register(s, selectors.EVENT_WRITE)
                    else:
                        s.close()
                    nxt += 1.0 / self.rate
                for key, _ in sel.select(0.01):
                    s = key.fileobj
                    sel.unregister(s)
                    pending.pop(s, None)
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        s.close()
                        continue
                    with contextlib.suppress(OSError):
                        s.send(self.data)
                        self.sent += 1
                    socks.append(s)
                for s, t in list(pending.items()):
                    if now - t > 3.0:
                        sel.unregister(s)
                        del pending[s]
                        s.close()
        finally:
            for s in socks + list(pending):
                s.close()
            sel.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


def _wait_listening(port: int, bound: float) -> None:
    """Until something listens on port ``port`` (reads /proc/net/tcp: connects nothing)."""
    until = time.monotonic() + bound
    while time.monotonic() < until:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
            if any(r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows):
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


def run_three(tmp_path: Path, ports: list[int], join_timeout: float = 25.0, timeout: float = 30.0,
              extra: dict[int, list[str]] | None = None, later: float = 0.0) -> tuple[list[int | None], list[str]]:
    """2 parties + dealer (``python -m veil.mpc.party``, tests.mpc.programs:key_material) on ``ports``;
    ranks 1 and 2 start ``later`` seconds after party 0 listens (as they would, started by other
    operators). Returns exit codes (None: killed at the bound) and stderr texts."""
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs = []
    try:
        for r in range(3):
            cmd = [sys.executable, "-m", "veil.mpc.party", "--rank", str(r), "--world", "3", "--peers", peers,
                   "--ca", str(pki[r].ca), "--cert", str(pki[r].cert), "--key", str(pki[r].key),
                   "--entry", "tests.mpc.programs:key_material", "--out", str(tmp_path / f"out{r}.pt"),
                   "--timeout", str(timeout), "--join-timeout", str(join_timeout)]
            cmd += (extra or {}).get(r, [])
            with open(tmp_path / f"err{r}.txt", "w") as err:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=err))
            if r == 0 and later:
                _wait_listening(ports[0], 60.0)
                time.sleep(later)
        bound = time.monotonic() + join_timeout + timeout + 60
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, bound - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode if p.returncode is not None and p.returncode >= 0 else None for p in procs]
    return codes, [(tmp_path / f"err{r}.txt").read_text() for r in range(3)]


@pytest.mark.timeout(200)
def test_replayed_ffdhe8192_client_hellos_do_not_stop_a_process_run(tmp_path):
    """A stranger without a certificate (and without doing any cryptography itself: it replays one
    ClientHello that offers only ffdhe8192) opens 30 connections a second to party 0. The party
    drives every joining connection from one thread; when it accepted OpenSSL's default groups each
    of these cost it an 8192-bit Diffie-Hellman exchange (~0.16 s), the real ranks' handshakes
    waited behind them past their 10 s join deadline and every rank exited with 'did not join'.
    Parties now offer and accept X25519 only: the ClientHello fails at once."""
    hello = client_hello("ffdhe8192")
    assert len(hello) > 1024  # the 8192-bit key share is in it
    ports = [free_port(), free_port()]
    attacker = Replayer(ports[0], hello, rate=30.0)
    try:
        time.sleep(1.0)
        codes, errs = run_three(tmp_path, ports, later=5.0)
    finally:
        attacker.stop()
    assert attacker.sent > 100, attacker.sent  # the attack ran
    assert codes == [0, 0, 0], [e[-1500:] for e in errs]
    out = torch.load(tmp_path / "out0.pt", weights_only=False)
    assert torch.allclose(out["z"], torch.full((256,), 1234.5678 * -8.25), rtol=1e-4)


@pytest.mark.timeout(120)
def test_a_full_pool_of_answered_strangers_churning_does_not_keep_the_real_ranks_out(tmp_path, monkeypatch):
    """Every stranger sends a real ClientHello (so it is 'answered' and as protected as a real rank)
    and reconnects at once when closed; with room for 16 joining connections and 64 strangers per
    slot, the real ranks must still join."""
    from veil.mpc import transport

    from .test_transport import Strangers, _rank_thread

    monkeypatch.setattr(transport, "MAX_PENDING_JOINS", 16)
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    port = free_port()
    peers = [f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"]
    strangers = Strangers([port], 64, kinds=("hello",), again=0.0)
    results: dict = {}
    try:
        t0 = _rank_thread(0, 3, peers, pki[0], results, join_timeout=40.0)
        time.sleep(1.0)
        t1 = _rank_thread(1, 3, peers, pki[1], results, join_timeout=40.0)
        t2 = _rank_thread(2, 3, peers, pki[2], results, join_timeout=40.0)
        for t in (t0, t1, t2):
            t.join(60)
    finally:
        strangers.stop()
    for r in range(2):
        assert not isinstance(results[r], BaseException), results[r]
        assert torch.allclose(results[r][0], torch.full((4,), 1.5), atol=1e-3)
    assert sum(strangers.closed_by_party.values()) > 16, strangers.closed_by_party


@pytest.mark.timeout(120)
def test_an_owner_certificate_of_the_same_ca_cannot_take_a_rank(tmp_path):
    """A data owner's (or result holder's) certificate is signed by the parties' own CA, but names
    `urn:veil:mpc:owner:NAME`: claiming party 1 or the dealer with it is refused, and the real
    ranks then join."""
    from .test_transport import _rank_thread, _tls_client

    pki = certs.make_dev_pki(tmp_path / "pki", 2, owners=("alice",))
    port = free_port()
    peers = [f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"]
    results: dict = {}
    t0 = _rank_thread(0, 3, peers, pki[0], results)
    time.sleep(0.5)
    tries = [_tls_client(pki["alice"], pki[0].ca, port, {"rank": r, "world": 3, "session": "s"}) for r in (1, 2)]
    assert all(t != "answered" for t in tries), tries
    t1 = _rank_thread(1, 3, peers, pki[1], results)
    t2 = _rank_thread(2, 3, peers, pki[2], results)
    for t in (t0, t1, t2):
        t.join(60)
    assert not isinstance(results[0], BaseException), results[0]
    assert torch.allclose(results[0][0], torch.full((4,), 1.5), atol=1e-3)
    assert sum("owner:alice" in r for r in results[0][1]) == 2, results[0][1]
