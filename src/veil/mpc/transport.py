"""`TLSComm`: the ranks of a computation as processes linked by mutually authenticated TLS 1.3.

Every byte between two processes of a computation (party to party, dealer to party) travels
inside a TLS 1.3 session (Python's ``ssl`` on OpenSSL) in which both sides presented a
certificate signed by the operator's CA naming their role and rank (`veil.mpc.certs`).

Joining (once, before any message):

1. Computing party r listens on its own address (and only there) if a higher rank exists;
   the dealer (rank n) never listens.
2. Rank r connects to every party of lower rank at the address it was given, retrying until
   ``join_timeout``; the TLS handshake checks the server's certificate against the CA, then the
   identity it names must be that party's (``urn:veil:mpc:party:j``).
3. A listening party accepts connections until every higher rank has joined. Each accepted
   connection must complete the handshake with a CA-signed client certificate and then send a
   hello naming the rank its certificate proves, the world size and the session name; anything
   else (no certificate, another CA, a rank already joined, a lower rank, a wrong session, bytes
   that are not TLS) is refused and logged, and the party keeps waiting for the real rank.
   A rank that has not joined by ``join_timeout`` ends the computation with `PartyFailureError`
   naming it.
4. Both ends exchange hellos, so a refused client learns it at once instead of on its first
   message.

Messages are length-prefixed frames (8-byte little-endian length, then the tensor's bytes); a
reader thread per peer drains its socket into a queue, so a send never waits for the receiver
to post a receive and exchanges cannot deadlock. The SSL object is driven through memory BIOs
under a lock, so the reader and the sender never use OpenSSL on one connection at once. A peer
that closes or crashes surfaces as `PartyFailureError` in every rank that waits for it, a silent
one as `MPCTimeoutError` after ``timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from veil.mpc.certs import Identity, TLSFiles, cert_identity, identities_of, identity_for
from veil.mpc.comm import CommStats, Communicator
from veil.mpc.errors import MPCTimeoutError, PartyFailureError, ProtocolError

log = logging.getLogger("veil.mpc")

MAX_FRAME = 1 << 32  # bytes of one message; a larger length prefix ends the connection
HELLO_BYTES = 4096
MAX_PENDING_JOINS = 16  # connections in the handshake at once; more are closed at once
RECV_CHUNK = 1 << 18
SEND_CHUNK = 1 << 18


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(f"address must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


class _Closed:
    """Queue marker: the connection to a peer ended (with the reason)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Link:
    """One TLS session with a peer rank, driven through memory BIOs (full duplex, thread-safe)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, stats: CommStats) -> None:
        self.sock = sock
        self.stats = stats
        self.inb, self.outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inb, self.outb, server_side=server_side)
        self.lock = threading.Lock()  # the SSL object and its BIOs
        self.send_lock = threading.Lock()  # order of records on the socket
        self.queue: queue.Queue = queue.Queue()
        self.idle_ok = False  # set once joined: the reader waits through idle periods
        self.closing = False
        self.reader: threading.Thread | None = None

    def handshake(self) -> None:
        """TLS 1.3 handshake on the socket (its timeout applies); raises ssl.SSLError or OSError."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(RECV_CHUNK)
                if not data:
                    raise ConnectionError("connection closed during the TLS handshake") from None
                self.inb.write(data)
        self._flush()

    def _flush(self) -> None:
        data = self.outb.read()
        if data:
            self.sock.sendall(data)
            self.stats.wire_bytes_sent += len(data)

    def send(self, payload: memoryview | bytes) -> None:
        """Send one frame (length prefix and payload) as TLS records.

        Encrypted in slices of `SEND_CHUNK` bytes, each written to the socket at once: OpenSSL's
        memory BIO is several times slower on multi-megabyte buffers, and the peer can start
        decrypting while the rest is being encrypted.
        """
        view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else memoryview(payload)
        head = len(view).to_bytes(8, "little")
        with self.send_lock:
            first = True
            for i in range(0, max(len(view), 1), SEND_CHUNK):
                part = view[i : i + SEND_CHUNK]
                with self.lock:
                    if first:
                        self.obj.write(head + bytes(part) if len(part) < 4096 else head)
                        if len(part) >= 4096:
                            self.obj.write(part)
                        first = False
                    else:
                        self.obj.write(part)
                    data = self.outb.read()
                self.sock.sendall(data)
                self.stats.wire_bytes_sent += len(data)

    def fill(self, mv: memoryview) -> None:
        """Read exactly len(mv) plaintext bytes into mv."""
        off, n = 0, len(mv)
        while off < n:
            try:
                with self.lock:
                    k = self.obj.read(n - off, mv[off:])
            except ssl.SSLWantReadError:
                try:
                    data = self.sock.recv(RECV_CHUNK)
                except TimeoutError:
                    if self.idle_ok and not self.closing:
                        continue  # an idle peer is not an error here: the receiver's timeout decides
                    raise
                if not data:
                    raise ConnectionError("peer closed the connection") from None
                with self.lock:
                    self.inb.write(data)
                continue
            except ssl.SSLZeroReturnError:
                raise ConnectionError("peer ended the TLS session") from None
            if k == 0:
                raise ConnectionError("peer ended the TLS session")
            off += k

    def read_frame(self, limit: int = MAX_FRAME) -> bytearray:
        """The next frame's payload; a length prefix over ``limit`` ends the connection before
        anything is allocated."""
        head = bytearray(8)
        self.fill(memoryview(head))
        n = int.from_bytes(head, "little")
        if n > limit:
            raise ConnectionError(f"frame of {n} bytes exceeds the limit of {limit}")
        buf = bytearray(n)
        if n:
            self.fill(memoryview(buf))
        return buf

    def start_reader(self, name: str, timeout: float) -> None:
        """Drain the connection into ``queue`` from a daemon thread until it ends.

        From now on the socket has a ``timeout``: a send that makes no progress for that long
        (a peer that stopped reading) fails instead of blocking forever; the reader simply
        keeps waiting through idle periods.
        """
        self.sock.settimeout(timeout)
        self.idle_ok = True

        def run() -> None:
            try:
                while True:
                    self.queue.put(self.read_frame())
            except Exception as exc:  # the reason reaches whoever waits for the next message
                self.queue.put(_Closed(str(exc) or type(exc).__name__))

        self.reader = threading.Thread(target=run, name=name, daemon=True)
        self.reader.start()

    def close(self, linger: float = 2.0) -> None:
        """Send close_notify, let the peer finish reading, then close the socket."""
        self.closing = True
        with contextlib.suppress(Exception):
            with self.send_lock:
                with self.lock:
                    with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
                        self.obj.unwrap()
                    data = self.outb.read()
                if data:
                    self.sock.sendall(data)
            self.sock.shutdown(socket.SHUT_WR)
        if self.reader is not None:
            self.reader.join(linger)
        with contextlib.suppress(OSError):
            self.sock.close()


class TLSComm(Communicator):
    """Rank ``rank`` of ``world`` (the last rank is the dealer), linked to all others over mTLS.

    ``peers`` are the addresses (``HOST:PORT``) at which the computing parties 0..n-1 can be
    reached (the dealer has none); ``listen`` is where this party binds (default: its own entry
    of ``peers``; only that address is bound). ``tls`` holds the CA, this rank's certificate and
    key; the certificate must name this rank (`veil.mpc.certs.identity_for`). ``session`` is a
    name every rank of one computation shares, so two computations never cross-connect.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        peers: Sequence[str],
        tls: TLSFiles,
        timeout: float = 60.0,
        join_timeout: float = 120.0,
        listen: str | None = None,
        session: str = "",
    ) -> None:
        super().__init__(rank, world)
        if world < 3:
            raise ProtocolError("a computation needs at least 2 parties and the dealer")
        if len(peers) != world - 1:
            raise ProtocolError(f"need the addresses of {world - 1} parties, got {len(peers)}")
        self.timeout = timeout
        self.session = session
        self.me = identity_for(rank, world)
        self.refused: list[str] = []
        self.links: dict[int, _Link] = {}
        self._lock = threading.Lock()
        self._joined = threading.Event()
        self._pending = threading.BoundedSemaphore(MAX_PENDING_JOINS)
        server_ctx, client_ctx = tls.contexts()
        server_ctx.num_tickets = 0  # no session resumption: every connection is fully authenticated
        mine = self._check_own_cert(tls)
        if mine != self.me:
            raise ProtocolError(f"certificate {tls.cert} names {mine}, not rank {rank} ({self.me.role})")
        deadline = time.monotonic() + join_timeout
        addrs = [parse_addr(p) for p in peers]
        higher = set(range(rank + 1, world))
        listener = None
        if higher:
            host, port = parse_addr(listen) if listen else addrs[rank]
            listener = socket.create_server((host, port), reuse_port=False)
            listener.settimeout(0.2)
            acceptor = threading.Thread(target=self._accept, args=(listener, server_ctx, higher, deadline),
                                        name=f"veil-mpc-accept-{rank}", daemon=True)
            acceptor.start()
        try:
            for j in range(rank):
                self._connect(j, addrs[j], client_ctx, deadline)
            if higher and not self._joined.wait(max(0.0, deadline - time.monotonic())):
                missing = sorted(higher - set(self.links))
                extra = f"; refused: {'; '.join(self.refused[-5:])}" if self.refused else ""
                raise PartyFailureError(
                    f"rank {rank}: rank(s) {missing} did not join within {join_timeout:g}s{extra}"
                )
        except BaseException:
            self._joined.set()
            if listener is not None:
                listener.close()
            self.close()
            raise
        if listener is not None:
            listener.close()
        for r, link in self.links.items():
            link.start_reader(f"veil-mpc-{rank}-from-{r}", timeout)

    @staticmethod
    def _check_own_cert(tls: TLSFiles) -> Identity | None:
        """The single identity named by this process's own certificate (None if not exactly one)."""
        return cert_identity(Path(tls.cert).read_bytes())

    # ---- joining ----------------------------------------------------------------------------

    def _hello(self) -> bytes:
        return json.dumps({"rank": self.rank, "world": self.world, "session": self.session}).encode()

    @staticmethod
    def _read_hello(link: _Link) -> dict:
        raw = link.read_frame(HELLO_BYTES)
        msg = json.loads(raw.decode())
        if not isinstance(msg, dict):
            raise ConnectionError("malformed hello")
        return msg

    def _refuse(self, who: str, why: str) -> None:
        text = f"{who}: {why}"
        with self._lock:
            self.refused.append(text)
        log.warning("veil.mpc rank %d refused a connection from %s", self.rank, text)

    def _accept(self, listener: socket.socket, ctx: ssl.SSLContext, expected: set[int], deadline: float) -> None:
        while not self._joined.is_set() and time.monotonic() < deadline:
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._pending.acquire(blocking=False):
                self._refuse(f"{peer[0]}:{peer[1]}", f"more than {MAX_PENDING_JOINS} connections joining at once")
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            threading.Thread(target=self._admit, args=(sock, peer, ctx, expected, deadline), daemon=True).start()

    def _admit(self, sock: socket.socket, peer, ctx: ssl.SSLContext, expected: set[int], deadline: float) -> None:
        who = f"{peer[0]}:{peer[1]}"
        link = _Link(sock, ctx, server_side=True, stats=self.stats)
        rank = None
        try:
            sock.settimeout(max(0.1, min(10.0, deadline - time.monotonic())))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link.handshake()
            ids = identities_of(link.obj.getpeercert() or {})
            hello = self._read_hello(link)
            claim = hello.get("rank")
            claimed = identity_for(claim, self.world) if isinstance(claim, int) and 0 <= claim < self.world else None
            if claimed is None or claimed not in ids:
                raise PermissionError(f"certificate names {[i.uri() for i in ids]}, hello claims rank {claim!r}")
            if hello.get("world") != self.world or hello.get("session") != self.session:
                raise PermissionError("hello for another computation (world size or session differs)")
            with self._lock:
                if claim not in expected or claim in self.links:
                    raise PermissionError(f"rank {claim} is not expected here or has already joined")
                rank = claim
                self.links[rank] = link
                done = expected <= set(self.links)
            link.send(self._hello())
            if done:
                self._joined.set()
        except Exception as exc:  # anything a stranger can cause ends its connection, never the party
            self._refuse(who, str(exc) or type(exc).__name__)
            with self._lock:
                if rank is not None and self.links.get(rank) is link:
                    del self.links[rank]
            with contextlib.suppress(OSError):
                sock.close()
        finally:
            self._pending.release()

    def _connect(self, j: int, addr: tuple[str, int], ctx: ssl.SSLContext, deadline: float) -> None:
        want = identity_for(j, self.world)
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(addr, timeout=max(0.1, min(10.0, deadline - time.monotonic())))
            except OSError as exc:
                last = str(exc)
                time.sleep(0.05)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(sock, ctx, server_side=False, stats=self.stats)
            try:
                link.handshake()
                ids = identities_of(link.obj.getpeercert() or {})
                if want not in ids:
                    raise PermissionError(f"{addr[0]}:{addr[1]} presents {[i.uri() for i in ids]}, not {want.uri()}")
                link.send(self._hello())
                hello = self._read_hello(link)
                if hello.get("rank") != j or hello.get("world") != self.world or hello.get("session") != self.session:
                    raise PermissionError(f"unexpected hello from {addr[0]}:{addr[1]}")
            except (ssl.SSLError, OSError, ValueError, PermissionError) as exc:
                last = f"rank {j} at {addr[0]}:{addr[1]}: {exc or type(exc).__name__}"
                with contextlib.suppress(OSError):
                    sock.close()
                time.sleep(0.1)
                continue
            self.links[j] = link
            return
        raise PartyFailureError(f"rank {self.rank}: could not join rank {j}: {last}")

    # ---- messages -----------------------------------------------------------------------------

    def _send(self, t: torch.Tensor, dst: int) -> None:
        link = self.links.get(dst)
        if link is None:
            raise PartyFailureError(f"rank {self.rank}: no link to rank {dst}")
        arr = t.detach().reshape(-1).numpy()
        try:
            link.send(memoryview(arr).cast("B") if arr.size else b"")
        except TimeoutError as exc:
            raise MPCTimeoutError(f"rank {self.rank}: rank {dst} took no data for {self.timeout:g}s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise PartyFailureError(f"rank {self.rank}: send to rank {dst} failed: {exc}") from exc

    def _recv(self, shape, dtype, src: int) -> torch.Tensor:
        link = self.links.get(src)
        if link is None:
            raise PartyFailureError(f"rank {self.rank}: no link to rank {src}")
        try:
            msg = link.queue.get(timeout=self.timeout)
        except queue.Empty:
            raise MPCTimeoutError(f"rank {self.rank}: no message from rank {src} within {self.timeout:g}s") from None
        if isinstance(msg, _Closed):
            link.queue.put(msg)  # every later receive fails the same way
            raise PartyFailureError(f"rank {self.rank}: connection to rank {src} failed: {msg.reason}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= int(s)
        if len(msg) != numel * itemsize:
            raise PartyFailureError(f"rank {self.rank}: unexpected message from rank {src}")
        if not numel:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(msg, dtype=dtype).reshape(shape)

    def close(self) -> None:
        """End every TLS session (close_notify) and close the sockets."""
        links, self.links = dict(self.links), {}
        for link in links.values():
            link.close()
