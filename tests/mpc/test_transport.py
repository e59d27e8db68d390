"""The TLS transport: only TLS records on the wire, strangers refused, one listening address.

The landed transport (gloo over TCP) sent the dealer's keys, the parties' common key, dealer
request headers and every share in clear, accepted any process that claimed a rank, and its
rendezvous listened on all interfaces.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from veil.mpc import certs, ring
from veil.mpc.errors import FrameError, MPCTimeoutError, PartyFailureError
from veil.mpc.launcher import run_party
from veil.mpc.transport import TLSComm
from veil.net import free_port

ROOT = Path(__file__).resolve().parents[2]
TLS_TYPES = {20, 21, 22, 23}  # change_cipher_spec, alert, handshake, application_data


class Recorder:
    """A loopback TCP relay that records every byte in both directions of every connection."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.streams: list[bytearray] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target)
            except OSError:  # the party is not listening yet: the connecting rank retries
                down.close()
                continue
            for src, dst in ((down, up), (up, down)):
                buf = bytearray()
                with self.lock:
                    self.streams.append(buf)
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while data := src.recv(1 << 16):
                buf.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


def tls_records(stream: bytes) -> list[tuple[int, int]]:
    """Parse a byte stream as consecutive TLS records; fails on anything else."""
    out, pos = [], 0
    while pos < len(stream):
        assert pos + 5 <= len(stream), "truncated record header"
        kind, version, length = stream[pos], stream[pos + 1 : pos + 3], int.from_bytes(stream[pos + 3 : pos + 5])
        assert kind in TLS_TYPES, f"byte {pos}: not a TLS record (type {kind})"
        assert version in (b"\x03\x01", b"\x03\x03"), f"byte {pos}: bad record version {version!r}"
        assert length <= 2**14 + 256, f"byte {pos}: record too long"
        out.append((kind, length))
        pos += 5 + length
    assert pos == len(stream)
    return out


@pytest.mark.timeout(180)
def test_bytes_on_the_wire_of_a_process_run_are_tls_records_only(tmp_path):
    n = 2
    world = n + 1
    pki = certs.make_dev_pki(tmp_path / "pki", n)
    real = [free_port() for _ in range(n)]
    relays = [Recorder(p) for p in real]
    peers = ",".join(f"127.0.0.1:{r.port}" for r in relays)  # every connection goes through a relay
    procs = []
    for r in range(world):
        cmd = [sys.executable, "-m", "veil.mpc.party", "--rank", str(r), "--world", str(world), "--peers", peers,
               "--ca", str(pki[r].ca), "--cert", str(pki[r].cert), "--key", str(pki[r].key),
               "--entry", "tests.mpc.programs:key_material", "--out", str(tmp_path / f"out{r}.pt"),
               "--timeout", "60"]
        if r < n:
            cmd += ["--listen", f"127.0.0.1:{real[r]}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for rl in relays:
            rl.close()
    assert codes == [0] * world, [p.stderr.read() for p in procs]
    out = [torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(world)]
    assert torch.allclose(out[0]["z"], torch.full((256,), 1234.5678 * -8.25), rtol=1e-4)

    streams = [bytes(s) for rl in relays for s in rl.streams if s]
    # 2 parties + dealer: links 1-0, 2-0, 2-1, each recorded in both directions
    assert len(streams) == 6
    captured = b"".join(streams)
    payload = sum(o["stats"]["bytes_sent"] for o in out[:n]) + out[n]["bytes_sent"]
    assert len(captured) > payload  # the relays saw all the traffic (and TLS framing on top)
    for s in streams:
        records = tls_records(s)
        assert records[0][0] == 22  # a handshake first
        assert sum(length for kind, length in records if kind == 23) > 0
    # none of the secrets that crossed in clear before: keys, request headers, inputs, the result
    secrets = [o["dealer_key"] for o in out[:n]] + [out[0]["common_key"], b'"kind"', b"beaver", b"urn:veil:mpc"]
    secrets += [ring.encode(torch.tensor([1234.5678]), 16).numpy().tobytes(),
                ring.encode(torch.tensor([-8.25]), 16).numpy().tobytes(), out[0]["z"].numpy().tobytes()[:16]]
    for secret in secrets:
        assert secret not in captured, secret


# ---- strangers --------------------------------------------------------------------------------


def _product(a: float, b: float):
    def prog():
        import veil.mpc as mpc

        rt = mpc.current()
        x = mpc.share(torch.full((4,), a) if rt.rank == 0 else None, 0, shape=(4,))
        y = mpc.share(torch.full((4,), b) if rt.rank == 1 else None, 1, shape=(4,))
        return (x * y).reveal()

    return prog


def _rank_thread(rank, world, peers, files, results, join_timeout=30.0, session="s"):
    def body():
        try:
            comm = TLSComm(rank, world, peers, files, timeout=30, join_timeout=join_timeout, session=session)
            try:
                results[rank] = (run_party(comm, _product(3.0, 0.5), (), 16), comm.refused)
            finally:
                comm.close()
        except BaseException as exc:
            results[rank] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def _tls_client(files: certs.TLSFiles | None, ca: Path, port: int, hello: dict | None) -> str:
    """Connect as a stranger; returns how the party answered."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    if files is not None:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
            if hello is not None:
                body = json.dumps(hello).encode()
                s.sendall(len(body).to_bytes(8, "little") + body)
            data = s.recv(100)
            return "answered" if data else "closed"
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {type(exc).__name__}"


@pytest.mark.timeout(120)
def test_strangers_are_refused_and_the_real_ranks_go_on(tmp_path):
    n, world = 2, 3
    pki = certs.make_dev_pki(tmp_path / "pki", n)
    other = certs.make_dev_pki(tmp_path / "other", n)  # a CA the parties do not trust
    port = free_port()
    peers = [f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"]
    results: dict = {}
    t0 = _rank_thread(0, world, peers, pki[0], results)
    time.sleep(0.5)
    attempts = {
        # not TLS at all
        "garbage": None,
        # TLS without a client certificate
        "no certificate": _tls_client(None, pki[0].ca, port, {"rank": 1, "world": world, "session": "s"}),
        # a certificate naming party 1, signed by another CA
        "other CA": _tls_client(other[1], pki[0].ca, port, {"rank": 1, "world": world, "session": "s"}),
        # a valid certificate for party 1 claiming to be the dealer
        "wrong rank": _tls_client(pki[1], pki[0].ca, port, {"rank": 2, "world": world, "session": "s"}),
        # a valid certificate, another computation
        "other session": _tls_client(pki[1], pki[0].ca, port, {"rank": 1, "world": world, "session": "x"}),
    }
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(1000))
        s.settimeout(10)
        try:
            attempts["garbage"] = "answered" if s.recv(100) else "closed"
        except OSError as exc:
            attempts["garbage"] = f"refused: {type(exc).__name__}"
    assert all(v != "answered" for v in attempts.values()), attempts
    t1 = _rank_thread(1, world, peers, pki[1], results)
    t2 = _rank_thread(2, world, peers, pki[2], results)
    for t in (t0, t1, t2):
        t.join(60)
    for r in range(world - 1):
        assert not isinstance(results[r], BaseException), results[r]
        assert torch.allclose(results[r][0], torch.full((4,), 1.5), atol=1e-3)
    refused = results[0][1]
    assert len(refused) >= 5, refused


@pytest.mark.timeout(60)
def test_a_missing_rank_fails_fast_with_a_clear_error(tmp_path):
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    peers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    results: dict = {}
    t0 = _rank_thread(0, 3, peers, pki[0], results, join_timeout=3.0)
    t0.join(30)
    assert isinstance(results[0], PartyFailureError)
    assert "did not join" in str(results[0]) and "[1, 2]" in str(results[0])


@pytest.mark.timeout(60)
def test_a_fake_listener_is_refused_by_the_connecting_rank(tmp_path):
    """Someone else holds party 0's address with a certificate of another CA: party 1 will not talk to it."""
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    other = certs.make_dev_pki(tmp_path / "other", 2)
    server_ctx, _ = other[0].contexts()
    fake = socket.create_server(("127.0.0.1", 0))
    peers = [f"127.0.0.1:{fake.getsockname()[1]}", f"127.0.0.1:{free_port()}"]

    def serve():
        while True:
            try:
                conn, _ = fake.accept()
            except OSError:
                return
            with contextlib.suppress(ssl.SSLError, OSError):
                server_ctx.wrap_socket(conn, server_side=True).recv(10)

    threading.Thread(target=serve, daemon=True).start()
    results: dict = {}
    t1 = _rank_thread(1, 3, peers, pki[1], results, join_timeout=3.0)
    t1.join(30)
    fake.close()
    assert isinstance(results[1], PartyFailureError)
    assert "could not join rank 0" in str(results[1])


@pytest.mark.timeout(60)
def test_listens_only_on_the_given_address(tmp_path):
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    port = free_port()
    peers = [f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"]
    results: dict = {}
    t0 = _rank_thread(0, 3, peers, pki[0], results, join_timeout=4.0)
    time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # listening there
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()  # not on other addresses
    t0.join(30)


def test_a_certificate_for_another_rank_cannot_be_used(tmp_path):
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    with pytest.raises(Exception, match="names"):
        TLSComm(0, 3, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], pki[1], join_timeout=1)


def test_dev_pki_identities_and_key_permissions(tmp_path):
    pki = certs.make_dev_pki(tmp_path, 3)
    assert [f.cert.name for f in pki.values()] == ["party0.pem", "party1.pem", "party2.pem", "dealer.pem"]
    for f in pki.values():
        assert f.key.stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    assert certs.identity_uri(3, 4) == "urn:veil:mpc:dealer:3"
    assert certs.identities_of({"subjectAltName": [("URI", "urn:veil:mpc:party:1"), ("DNS", "x")]}) == [
        certs.Identity("party", 1)
    ]


# ---- found by the attack review: a stalled reader, oversized frames, connection floods -----------


@pytest.mark.timeout(120)
def test_a_peer_that_stops_reading_makes_the_sender_time_out(tmp_path):
    """SIGSTOP the receiving party mid-stream: the sender fails with a timeout, not a hang in sendall."""
    import os
    import signal

    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    marker = str(tmp_path / "m")
    torch.save((marker,), tmp_path / "args.pt")
    procs = []
    for r in range(3):
        cmd = [sys.executable, "-m", "veil.mpc.party", "--rank", str(r), "--world", "3", "--peers", peers,
               "--ca", str(pki[r].ca), "--cert", str(pki[r].cert), "--key", str(pki[r].key),
               "--entry", "tests.mpc.programs:stream", "--args", str(tmp_path / "args.pt"), "--timeout", "5"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    try:
        for _ in range(600):
            if Path(marker + "1").exists():
                break
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGSTOP)
        code = procs[0].wait(timeout=60)
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    assert code == 3, err
    assert "took no data" in err or "timed out" in err or "within" in err, err


def _stranger_hello(files: certs.TLSFiles, port: int, length: int) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(length.to_bytes(8, "little") + b"{")
        try:
            return "answered" if s.recv(10) else "closed"
        except OSError as exc:
            return f"refused: {type(exc).__name__}"


@pytest.mark.timeout(120)
def test_oversized_hello_and_connection_floods_are_refused_cheaply(tmp_path):
    import resource

    n, world = 2, 3
    pki = certs.make_dev_pki(tmp_path / "pki", n)
    port = free_port()
    peers = [f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"]
    results: dict = {}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = _rank_thread(0, world, peers, pki[0], results)
    time.sleep(0.5)
    # an authenticated process announcing a 1 GiB hello: refused before anything is allocated
    assert _stranger_hello(pki[2], port, 1 << 30) != "answered"
    assert _stranger_hello(pki[2], port, 1 << 30) != "answered"
    # a flood of idle connections: bounded work, and the real ranks still join
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    t1 = _rank_thread(1, world, peers, pki[1], results)
    t2 = _rank_thread(2, world, peers, pki[2], results)
    for t in (t0, t1, t2):
        t.join(60)
    closed = 0
    for s in idle:  # the party closed every idle connection once the real ranks had joined
        s.settimeout(5)
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        s.close()
    assert closed == len(idle)
    assert not isinstance(results[0], BaseException), results[0]
    assert torch.allclose(results[0][0], torch.full((4,), 1.5), atol=1e-3)
    refused = results[0][1]
    assert sum("exceeds the limit" in r for r in refused) == 2, refused
    assert sum("still joining when the join ended" in r for r in refused) == len(idle), refused
    growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert growth_kb < 512 * 1024, growth_kb  # far below the 2 GiB the hellos announced


# ---- issue 19: strangers holding the join, huge frame headers ------------------------------------

# the start of a TLS record that announces 16 kB (a ClientHello to come): OpenSSL waits for the rest
TRICKLE = b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc" + bytes(64)
GARBAGE = b"\x16\x03\x01\x00\x40" + bytes(range(64))  # a handshake record that is no ClientHello


def _client_hello() -> bytes:
    """A real TLS 1.3 ClientHello (from a client without a certificate), to send and then stall."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        ctx.wrap_bio(inb, outb).do_handshake()
    return outb.read()


class Strangers:
    """Connections from 127.0.0.1 without a certificate, each kept open (reconnected when the
    party closes it) until `stop`: ``silent`` ones send nothing, ``trickle`` ones one byte of a
    TLS record every 3 s, ``garbage`` ones a handshake record that is no ClientHello, ``hello``
    ones a real ClientHello and then nothing (the party has answered them). They keep
    trying to connect (non-blocking, every ``again`` s) before the party listens, so they are
    there from its first accept."""

    def __init__(self, ports: list[int], n: int, kinds=("silent", "trickle", "garbage"), again: float = 0.05):
        self.slots = [(port, kind) for port in ports for kind in kinds for _ in range(n)]
        self.again = again
        self.first = {"garbage": GARBAGE, "hello": _client_hello()}
        self.socks: dict[int, socket.socket] = {}
        self.up: set[int] = set()  # slots whose connection is established
        self.sent = [0] * len(self.slots)
        self.next = [0.0] * len(self.slots)
        self.connects = dict.fromkeys(kinds, 0)
        self.connects_to = dict.fromkeys(ports, 0)
        self.closed_by_party = dict.fromkeys(kinds, 0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import errno
        import selectors

        sel = selectors.DefaultSelector()

        def end(i: int, by_party: bool) -> None:
            s = self.socks.pop(i)
            sel.unregister(s)
            s.close()
            if i in self.up:
                self.up.discard(i)
                self.closed_by_party[self.slots[i][1]] += by_party
            self.next[i] = time.monotonic() + (self.again if by_party else 0.05)

        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                for i, (port, kind) in enumerate(self.slots):
                    if i not in self.socks and now >= self.next[i]:
                        s = socket.socket()
                        s.setblocking(False)
                        if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                            s.close()
                            self.next[i] = now + 0.05
                            continue
                        self.socks[i] = s
                        self.next[i] = now + 3.0  # connect deadline, then trickle time
                        sel.register(s, selectors.EVENT_WRITE, i)
                    elif i in self.socks and i not in self.up and now >= self.next[i]:
                        end(i, False)  # the connection did not complete in 3 s: try again
                    elif i in self.up and kind == "trickle" and now >= self.next[i] and self.sent[i] < len(TRICKLE):
                        with contextlib.suppress(OSError):
                            self.sent[i] += self.socks[i].send(TRICKLE[self.sent[i] : self.sent[i] + 1])
                        self.next[i] = now + 3.0
                for key, _ in sel.select(0.05):
                    i, s = key.data, key.fileobj
                    if i not in self.up:  # connect finished
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            end(i, False)
                            continue
                        kind = self.slots[i][1]
                        self.up.add(i)
                        self.sent[i] = 0
                        self.connects[kind] += 1
                        self.connects_to[self.slots[i][0]] += 1
                        self.next[i] = 0.0
                        sel.modify(s, selectors.EVENT_READ, i)
                        if kind in self.first:
                            with contextlib.suppress(OSError):
                                s.send(self.first[kind])
                        continue
                    try:
                        alive = bool(s.recv(4096))
                    except BlockingIOError:
                        continue
                    except OSError:
                        alive = False
                    if not alive:
                        end(i, True)
        finally:
            for s in self.socks.values():
                s.close()
            sel.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [16, 256])
def test_slow_and_silent_strangers_do_not_stop_a_process_run(tmp_path, n):
    """Issue 19 (A): 16 strangers trickling one byte every 3 s held all 16 join slots and every
    real rank exited with 'did not join'. Now n strangers of each kind (silent, trickling,
    garbage ClientHello, real ClientHello then silence) on each listening party, there before
    the parties listen and reconnecting whenever closed, do not stop 2 parties + dealer
    (processes, mutual TLS)."""
    world = 3
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    strangers = Strangers(ports, n, kinds=("silent", "trickle", "garbage", "hello"))
    time.sleep(0.5)
    procs = []
    try:
        for r in range(world):
            if r == world - 1:
                # the dealer joins both parties; it starts once every kind of stranger reached both
                # listening parties (a party joined within milliseconds of listening would see none)
                deadline = time.monotonic() + 60
                while min(strangers.connects_to.values()) < 4 * n and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert min(strangers.connects_to.values()) >= 4 * n, strangers.connects_to
                time.sleep(1.0)
            cmd = [sys.executable, "-m", "veil.mpc.party", "--rank", str(r), "--world", str(world), "--peers", peers,
                   "--ca", str(pki[r].ca), "--cert", str(pki[r].cert), "--key", str(pki[r].key),
                   "--entry", "tests.mpc.programs:key_material", "--out", str(tmp_path / f"out{r}.pt"),
                   "--timeout", "30", "--join-timeout", "40"]
            with open(tmp_path / f"err{r}.txt", "w") as err:  # a file: refusals may be many lines
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=err))
        codes = [p.wait(timeout=150) for p in procs]
        errs = [(tmp_path / f"err{r}.txt").read_text() for r in range(world)]
    finally:
        strangers.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * world, errs
    out = torch.load(tmp_path / "out0.pt", weights_only=False)
    assert torch.allclose(out["z"], torch.full((256,), 1234.5678 * -8.25), rtol=1e-4)
    # the strangers were there: both listening parties were holding at least n of them when the
    # real ranks had joined, and both refused garbage
    import re

    for r in range(world - 1):
        held = re.search(r"closed (\d+) connections still joining when the join ended", errs[r])
        assert held and int(held[1]) >= n, (r, strangers.connects, errs[r][-2000:])
        assert "unexpected message" in errs[r], (r, errs[r][-2000:])
    assert all(c >= n for c in strangers.connects.values()), strangers.connects


@pytest.mark.timeout(120)
def test_a_full_join_pool_evicts_strangers_not_the_real_ranks(tmp_path, monkeypatch):
    """With room for only 16 joining connections and 8 times as many strangers reconnecting as
    fast as they are closed, the oldest stranger makes room and the real ranks still join."""
    from veil.mpc import transport

    monkeypatch.setattr(transport, "MAX_PENDING_JOINS", 16)
    assert transport.pending_limit() == 16
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    port = free_port()
    peers = [f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"]
    strangers = Strangers([port], 64, kinds=("silent", "trickle"), again=0.0)
    results: dict = {}
    try:
        t0 = _rank_thread(0, 3, peers, pki[0], results)
        time.sleep(1.0)  # the pool is full of strangers before the real ranks come
        t1 = _rank_thread(1, 3, peers, pki[1], results)
        t2 = _rank_thread(2, 3, peers, pki[2], results)
        for t in (t0, t1, t2):
            t.join(60)
    finally:
        strangers.stop()
    for r in range(2):
        assert not isinstance(results[r], BaseException), results[r]
        assert torch.allclose(results[r][0], torch.full((4,), 1.5), atol=1e-3)
    refused = results[0][1]
    assert any("closed to admit a newer connection (16 were joining)" in r for r in refused), refused
    assert sum(strangers.closed_by_party.values()) > 16, strangers.closed_by_party


def _joined_comms(tmp_path, timeout: float = 4.0) -> list[TLSComm]:
    """Ranks 0, 1 and the dealer 2 as threads of this process, joined over mutual TLS."""
    pki = certs.make_dev_pki(tmp_path / "pki", 2)
    peers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    comms: dict = {}

    def make(r):
        comms[r] = TLSComm(r, 3, peers, pki[r], timeout=timeout, join_timeout=30, session="s")

    threads = [threading.Thread(target=make, args=(r,), daemon=True) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert sorted(comms) == [0, 1, 2]
    return [comms[r] for r in range(3)]


def _raw_frame_header(comm: TLSComm, dst: int, length: int) -> None:
    """What a peer with a valid certificate can do: announce any length on its own link."""
    link = comm.links[dst]
    with link.lock:
        link.obj.write(length.to_bytes(8, "little"))
        link.sock.sendall(link.outb.read())


@pytest.mark.timeout(120)
def test_a_huge_frame_header_from_a_certified_peer_is_refused_before_allocating(tmp_path):
    """Issue 19 (B): one 8-byte header of 2 GiB made a party allocate 2 GiB (the cap was 4 GiB).
    Now the receiver expects 4 int64 from rank 1, so any other length is refused with a typed
    error at once, nothing is allocated, and the link is closed (the peer sees it end)."""
    import tracemalloc

    c0, c1, c2 = _joined_comms(tmp_path)
    try:
        tracemalloc.start()
        _raw_frame_header(c1, 0, 1 << 31)
        t0 = time.monotonic()
        with pytest.raises(FrameError, match="2147483648 bytes where 32 were expected"):
            c0.recv((4,), torch.int64, 1)
        assert time.monotonic() - t0 < 3.0  # refused on the header, not after the 4 s timeout
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 << 20, peak
        # that link is closed on both ends; the others still work
        with pytest.raises(PartyFailureError):
            c0.recv((4,), torch.int64, 1)
        with pytest.raises(PartyFailureError):
            c1.recv((4,), torch.int64, 0)
        c2.send(torch.arange(4), 0)
        assert torch.equal(c0.recv((4,), torch.int64, 2), torch.arange(4))
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        for c in (c0, c1, c2):
            with contextlib.suppress(PartyFailureError):
                c.close()


@pytest.mark.timeout(120)
def test_frames_no_one_asked_for_are_not_buffered(tmp_path):
    """Issue 19 (B): the receive queue was unbounded. A certified peer sending 256 MB the
    receiver never asked for now fills only the kernel's socket buffers: the receiver holds
    none of it, and the sender is the one that times out."""
    import tracemalloc

    c0, c1, c2 = _joined_comms(tmp_path, timeout=3.0)
    failures: list = []

    def flood():
        chunk = torch.zeros(1 << 19, dtype=torch.int64)  # 4 MB
        try:
            for _ in range(64):
                c1.send(chunk, 0)
        except PartyFailureError as exc:
            failures.append(exc)

    try:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t = threading.Thread(target=flood, daemon=True)
        t.start()
        t.join(30)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert failures and isinstance(failures[0], MPCTimeoutError), failures
        # the sender's own queue (at most SEND_BACKLOG plus one message) is all that was held
        assert peak < 64 << 20, peak
        # the receiver reads only what it expects: the first frame is 4 MB, not 32 bytes
        with pytest.raises(FrameError):
            c0.recv((4,), torch.int64, 1)
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        for c in (c0, c1, c2):
            with contextlib.suppress(PartyFailureError):
                c.close()
