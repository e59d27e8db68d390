"""`TLSComm`: the ranks of a computation as processes linked by mutually authenticated TLS 1.3.

Every byte between two processes of a computation (party to party, dealer to party) travels
inside a TLS 1.3 session (Python's ``ssl`` on OpenSSL) in which both sides presented a
certificate signed by the operator's CA naming their role and rank (`veil.mpc.certs`).

Joining (once, before any message; one TLS handshake and one hello round trip per link):

1. Computing party r listens on its own address (and only there) if a higher rank exists;
   the dealer (rank n) never listens.
2. Rank r connects to every party j < r at the address it was given, retrying until
   ``join_timeout``. The TLS handshake checks j's certificate against the CA and the identity
   it names must be ``urn:veil:mpc:party:j``; then r sends its hello (its rank, the world size
   and the session name) and waits for j's. One attempt has `JOIN_SECONDS` in total.
3. A listening party drives every joining connection from one thread over non-blocking sockets
   (a selector): the handshake, which requires a CA-signed client certificate, then a hello
   naming the rank that certificate proves, the world size and the session. Each connection
   has `JOIN_SECONDS` in total for both (a deadline, not a per-read timeout) and may send at
   most `JOIN_BYTES`; up to `pending_limit()` connections join at once and, when that many
   are joining, the oldest that has not sent a whole ClientHello (else the oldest) is closed
   to admit the newest. A stranger therefore holds one file descriptor and a few kB for at
   most `JOIN_SECONDS`, and cannot keep a real rank out: a real rank's ClientHello is answered
   as soon as it arrives, and from then on only connections that also sent a whole ClientHello
   can push it out (and its connecting side retries). Anything else (no certificate, another
   CA, a rank already joined, a lower rank, a wrong session, bytes that are not TLS, too slow,
   too much) is refused and logged, and the party keeps waiting for the real rank. A rank
   that has not joined by ``join_timeout`` ends the computation with `PartyFailureError`
   naming it.
4. The party answers a valid hello with its own, so a refused client learns it at once.

Messages (after joining): a frame is an 8-byte little-endian length, then the tensor's bytes,
inside TLS records.

- Sending encrypts on the caller's thread and queues the records for a writer thread per peer,
  so a send never waits for the receiver to post its receive and exchanges cannot deadlock. A
  new message waits while more than `SEND_BACKLOG` bytes are still queued to that peer (one
  message of any size is always taken), and a peer that takes no data for ``timeout`` seconds
  ends the link with `MPCTimeoutError`.
- Receiving reads the socket only when the program asks for a message, whose shape and dtype
  it knows: a length prefix of any other size is refused with `FrameError` and the link closed
  before anything is allocated. Nothing is read ahead of the program (no receive queue), so a
  peer cannot make a party hold more than the one message it expects, beyond the kernel's
  socket buffer.
- The SSL object is driven through memory BIOs under a lock, so the writer and the reader never
  use OpenSSL on one connection at once. A peer that closes or crashes surfaces as
  `PartyFailureError` in every rank that waits for it, a silent one (no byte for ``timeout``
  seconds) as `MPCTimeoutError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import resource
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

from veil.mpc.certs import Identity, TLSFiles, cert_identity, identities_of, identity_for
from veil.mpc.comm import CommStats, Communicator
from veil.mpc.errors import FrameError, MPCTimeoutError, PartyFailureError, ProtocolError

log = logging.getLogger("veil.mpc")

HELLO_BYTES = 4096  # largest hello frame
JOIN_SECONDS = 10.0  # total time one connection has for its TLS handshake and hello
JOIN_BYTES = 1 << 15  # most bytes one connection may send while joining (certificate chain and hello)
JOIN_CHUNK = 1 << 14
MAX_PENDING_JOINS = 1024  # connections joining at once (also bounded by the descriptor limit)
SEND_BACKLOG = 1 << 23  # bytes queued to one peer beyond which a new message waits
RECV_CHUNK = 1 << 18
SEND_CHUNK = 1 << 18
CLOSE_LINGER = 2.0  # seconds a closing rank reads on, so that closing resets no connection
MAX_REFUSALS_KEPT = 256
_SHAKEN = "handshake done"


def pending_limit() -> int:
    """How many connections may be joining at once: `MAX_PENDING_JOINS`, or a quarter of this
    process's file descriptor limit if that is smaller (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return MAX_PENDING_JOINS
    return max(16, min(MAX_PENDING_JOINS, soft // 4))


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(f"address must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


class _Link:
    """One TLS session with a peer rank, driven through memory BIOs.

    While joining, the socket is non-blocking and `step` advances the handshake and the hello
    with whatever has arrived. After `start`, the socket blocks with the link's timeout, a writer
    thread sends the queued records and `recv_frame` reads on the caller's thread.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, stats: CommStats,
                 deadline: float) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.stats = stats
        self.deadline = deadline  # of the join
        self.inb, self.outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inb, self.outb, server_side=server_side)
        self.shaken = False
        self.hello = bytearray()
        self.joined_bytes = 0
        self.out = bytearray()  # join phase: records the socket did not take yet
        self.answered = False  # join phase: the peer's first flight was complete (OpenSSL answered it)
        self.lock = threading.Lock()  # the SSL object and its BIOs; held while records are queued
        self.cond = threading.Condition()  # the send queue
        self.pending: deque[bytes] = deque()
        self.queued = 0
        self.ending = False
        self.broken: OSError | None = None
        self.eof = False
        self.writer: threading.Thread | None = None
        self.timeout = 0.0

    # ---- joining (non-blocking) ------------------------------------------------------------

    def step(self) -> str | dict | None:
        """Advance the join with what has arrived: `_SHAKEN` once the handshake is done, then the
        peer's hello (a dict), or None when more bytes are needed. Raises on anything wrong."""
        while True:
            try:
                if not self.shaken:
                    self.obj.do_handshake()
                    self.shaken = True
                    self._flush_nb()
                    return _SHAKEN
                return self._read_hello()
            except ssl.SSLWantReadError:
                self._flush_nb()
                if not self._read_nb():
                    return None
            except ssl.SSLZeroReturnError:
                raise ConnectionError("peer ended the TLS session while joining") from None

    def _read_hello(self) -> dict:
        """The peer's hello frame (at most `HELLO_BYTES`), read without taking a byte more."""
        buf = self.hello
        while True:
            need = 8
            if len(buf) >= 8:
                n = int.from_bytes(buf[:8], "little")
                if n > HELLO_BYTES:
                    raise ConnectionError(f"frame of {n} bytes exceeds the limit of {HELLO_BYTES}")
                need += n
            if len(buf) >= 8 and len(buf) == need:
                break
            chunk = self.obj.read(need - len(buf))
            if not chunk:
                raise ConnectionError("peer ended the TLS session while joining")
            buf += chunk
        msg = json.loads(bytes(buf[8:]).decode())
        if not isinstance(msg, dict):
            raise ConnectionError("malformed hello")
        return msg

    def _read_nb(self) -> bool:
        try:
            data = self.sock.recv(JOIN_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            raise ConnectionError("connection closed while joining")
        self.joined_bytes += len(data)
        if self.joined_bytes > JOIN_BYTES:
            raise ConnectionError(f"more than {JOIN_BYTES} bytes while joining")
        self.inb.write(data)
        return True

    def _flush_nb(self) -> None:
        self.out += self.outb.read()
        if self.out:
            self.answered = True
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            self.stats.wire_bytes_sent += n
            del self.out[:n]

    def write_hello(self, hello: bytes) -> None:
        """Send a hello frame while joining."""
        self.obj.write(len(hello).to_bytes(8, "little") + hello)
        self._flush_nb()

    # ---- messages (after start) ------------------------------------------------------------

    def start(self, name: str, timeout: float) -> None:
        """Leave the join: blocking socket with ``timeout``, and a writer thread for the records."""
        self.timeout = timeout
        self.sock.settimeout(timeout)
        if self.out:
            self.sock.sendall(self.out)
            self.stats.wire_bytes_sent += len(self.out)
            self.out.clear()
        self.writer = threading.Thread(target=self._write_loop, name=name, daemon=True)
        self.writer.start()

    def _raise_broken(self) -> None:
        exc = self.broken
        if exc is not None:
            raise (TimeoutError if isinstance(exc, TimeoutError) else ConnectionError)(str(exc) or type(exc).__name__)

    def _queue(self, data: bytes) -> None:
        if data:
            with self.cond:
                self.pending.append(data)
                self.queued += len(data)
                self.cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.ending:
                    self.cond.wait()
                if not self.pending:
                    return
                data = self.pending[0]
            try:
                self.sock.sendall(data)
            except OSError as exc:  # a timeout too: the peer took nothing for `timeout` seconds
                with self.cond:
                    self.broken = self.broken or exc
                    self.pending.clear()
                    self.queued = 0
                    self.cond.notify_all()
                return
            with self.cond:
                if self.pending and self.pending[0] is data:  # (an abort may have emptied the queue)
                    self.pending.popleft()
                    self.queued -= len(data)
                self.stats.wire_bytes_sent += len(data)
                self.cond.notify_all()

    def send(self, payload: memoryview | bytes) -> None:
        """Queue one frame (length prefix and payload) as TLS records.

        Encrypted in slices of `SEND_CHUNK` bytes, each queued at once, so the writer thread
        sends while the rest is encrypted (OpenSSL's memory BIO is several times slower on
        multi-megabyte buffers). Waits first while more than `SEND_BACKLOG` bytes are queued;
        raises TimeoutError or ConnectionError if the link is broken.
        """
        view = memoryview(payload).cast("B")
        head = len(view).to_bytes(8, "little")
        with self.cond:
            while self.queued > SEND_BACKLOG and self.broken is None:
                if not self.cond.wait(self.timeout) and self.queued > SEND_BACKLOG:
                    raise TimeoutError(f"no data taken for {self.timeout:g}s")
        self._raise_broken()
        with self.lock:
            for i in range(0, max(len(view), 1), SEND_CHUNK):
                part = view[i : i + SEND_CHUNK]
                if i == 0 and len(part) < 4096:
                    self.obj.write(head + bytes(part))
                else:
                    if i == 0:
                        self.obj.write(head)
                    self.obj.write(part)
                self._queue(self.outb.read())

    def recv_frame(self, nbytes: int) -> bytearray:
        """The next frame, which must hold exactly ``nbytes`` bytes.

        Any other length prefix raises `FrameError` and closes the link before anything is
        allocated. A failure (including a timeout) breaks the link: later calls fail alike.
        """
        self._raise_broken()
        try:
            head = bytearray(8)
            self._fill(memoryview(head))
            n = int.from_bytes(head, "little")
            if n != nbytes:
                self.abort(ConnectionError(f"sent a frame of {n} bytes where {nbytes} were expected"))
                raise FrameError(f"sent a frame of {n} bytes where {nbytes} were expected")
            buf = bytearray(n)
            if n:
                self._fill(memoryview(buf))
            return buf
        except (OSError, ssl.SSLError) as exc:
            self.broken = self.broken or (exc if isinstance(exc, OSError) else ConnectionError(str(exc)))
            raise

    def _fill(self, mv: memoryview) -> None:
        """Read exactly len(mv) plaintext bytes into mv (the socket's timeout applies per read)."""
        off, n = 0, len(mv)
        while off < n:
            try:
                with self.lock:
                    try:
                        k = self.obj.read(n - off, mv[off:])
                    finally:  # records OpenSSL wrote while reading (e.g. a key update) go out in order
                        if self.outb.pending and self.writer is not None:
                            self._queue(self.outb.read())
            except ssl.SSLWantReadError:
                data = self.sock.recv(RECV_CHUNK)
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

    def abort(self, why: OSError) -> None:
        """Break the link at once (both directions); the socket is closed by `close_links`."""
        with self.cond:
            self.broken = self.broken or why
            self.pending.clear()
            self.queued = 0
            self.ending = True
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # ---- closing ---------------------------------------------------------------------------

    def end_writes(self) -> None:
        """The writer sends what is queued, then stops."""
        with self.cond:
            self.ending = True
            self.cond.notify_all()

    def writing(self) -> bool:
        """Whether the writer thread is still sending."""
        return self.writer is not None and self.writer.is_alive()

    def finish(self) -> None:
        """close_notify and a FIN after the queued records (a writer still stuck is cut off)."""
        if self.writing():
            self.abort(TimeoutError("closed with data the peer did not take"))
            return
        if self.broken is None:
            with contextlib.suppress(Exception):
                with self.lock:
                    with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
                        self.obj.unwrap()
                    data = self.outb.read()
                if data:
                    self.sock.settimeout(1.0)
                    self.sock.sendall(data)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def discard(self) -> None:
        """Read and drop what the peer sent (closing only; the socket is readable); notes its end."""
        try:
            if not self.sock.recv(RECV_CHUNK, socket.MSG_DONTWAIT):
                self.eof = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.eof = True


def _ready(socks: dict[socket.socket, int], timeout: float) -> list:
    """The sockets among ``socks`` (each with its selector events) ready within ``timeout`` seconds
    (a selector: descriptors above FD_SETSIZE work too)."""
    with selectors.DefaultSelector() as sel:
        for s, events in socks.items():
            sel.register(s, events)
        return [key.fileobj for key, _ in sel.select(timeout)]


def _discard_some(links: list[_Link], wait: float) -> None:
    socks = {link.sock: link for link in links if not link.eof}
    try:
        ready = _ready(dict.fromkeys(socks, selectors.EVENT_READ), wait) if socks else []
    except (OSError, ValueError):
        ready = list(socks)
    if not socks:
        time.sleep(wait)
    for s in ready:
        socks[s].discard()


def close_links(links: list[_Link], send_for: float, linger: float = CLOSE_LINGER) -> None:
    """Close links without losing what was sent or resetting a connection.

    1. Every writer sends what is queued (for up to ``send_for`` seconds) while what the peers
       still send is read and dropped, so two closing ranks never wait on each other's full buffers.
    2. close_notify and a FIN on every link.
    3. Read and drop until every peer has closed too (at most ``linger`` seconds), then close the
       sockets: closing a socket with unread bytes resets the connection and can destroy data
       the peer has received but not read yet.
    """
    for link in links:
        link.end_writes()
    until = time.monotonic() + send_for
    while any(link.writing() for link in links) and time.monotonic() < until:
        _discard_some(links, 0.05)
    for link in links:
        link.finish()
    until = time.monotonic() + linger
    while any(not link.eof for link in links) and time.monotonic() < until:
        _discard_some(links, min(0.05, max(0.0, until - time.monotonic())))
    for link in links:
        if link.writer is not None:
            link.writer.join(0.5)
        with contextlib.suppress(OSError):
            link.sock.close()


class TLSComm(Communicator):
    """Rank ``rank`` of ``world`` (the last rank is the dealer), linked to all others over mTLS.

    ``peers`` are the addresses (``HOST:PORT``) at which the computing parties 0..n-1 can be
    reached (the dealer has none); ``listen`` is where this party binds (default: its own entry
    of ``peers``; only that address is bound). ``tls`` holds the CA, this rank's certificate and
    key; the certificate must name this rank (`veil.mpc.certs.identity_for`). ``session`` is a
    name every rank of one computation shares, so two computations never cross-connect.
    ``refused`` lists the latest refused connections (`MAX_REFUSALS_KEPT`), ``refusals`` counts all.
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
        self.refusals = 0
        self.links: dict[int, _Link] = {}
        self._lock = threading.Lock()
        self._joined = threading.Event()
        server_ctx, client_ctx = tls.contexts()
        server_ctx.num_tickets = 0  # no session resumption: every connection is fully authenticated
        mine = self._check_own_cert(tls)
        if mine != self.me:
            raise ProtocolError(f"certificate {tls.cert} names {mine}, not rank {rank} ({self.me.role})")
        deadline = time.monotonic() + join_timeout
        addrs = [parse_addr(p) for p in peers]
        higher = set(range(rank + 1, world))
        listener = acceptor = None
        if higher:
            host, port = parse_addr(listen) if listen else addrs[rank]
            listener = socket.create_server((host, port), reuse_port=False, backlog=pending_limit())
            listener.setblocking(False)
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
            self._stop_accepting(listener, acceptor)
            self.close()
            raise
        self._stop_accepting(listener, acceptor)
        for r, link in self.links.items():
            link.start(f"veil-mpc-{rank}-to-{r}", timeout)

    @staticmethod
    def _check_own_cert(tls: TLSFiles) -> Identity | None:
        """The single identity named by this process's own certificate (None if not exactly one)."""
        return cert_identity(Path(tls.cert).read_bytes())

    # ---- joining ----------------------------------------------------------------------------

    def _hello(self) -> bytes:
        return json.dumps({"rank": self.rank, "world": self.world, "session": self.session}).encode()

    def _refuse(self, who: str, why: str, quiet: bool = False) -> None:
        text = f"{who}: {why}"
        with self._lock:
            self.refusals += 1
            self.refused.append(text)
            del self.refused[:-MAX_REFUSALS_KEPT]
            count = self.refusals
        if not quiet and (count <= 64 or count % 1000 == 0):  # a flood of strangers does not flood the log
            log.warning("veil.mpc rank %d refused a connection from %s (%d refused)", self.rank, text, count)

    def _stop_accepting(self, listener: socket.socket | None, acceptor: threading.Thread | None) -> None:
        if acceptor is not None:
            acceptor.join(5.0)  # it stops within 0.1 s of the join's end
        if listener is not None:
            listener.close()

    def _accept(self, listener: socket.socket, ctx: ssl.SSLContext, expected: set[int], deadline: float) -> None:
        """The listening side of joining (step 3): one selector over the listener and every
        joining connection, each with its own deadline; oldest first out when full."""
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, None)
        joining: dict[socket.socket, tuple[_Link, str]] = {}  # insertion order is age order
        cap = pending_limit()

        def drop(sock: socket.socket, why: str, quiet: bool = False) -> None:
            link, who = joining.pop(sock)
            sel.unregister(sock)
            with contextlib.suppress(OSError, ssl.SSLError):
                link._flush_nb()  # an alert, if OpenSSL wrote one
            with contextlib.suppress(OSError):
                sock.close()
            self._refuse(who, why, quiet)

        try:
            while not self._joined.is_set():
                now = time.monotonic()
                if now >= deadline:
                    return
                while joining:  # deadlines grow with age: expire from the oldest
                    sock, (link, _) = next(iter(joining.items()))
                    if link.deadline > now:
                        break
                    drop(sock, f"no TLS handshake and hello within {JOIN_SECONDS:g}s")
                wake = min(deadline, next(iter(joining.values()))[0].deadline) if joining else deadline
                for key, _ in sel.select(max(0.0, min(wake - now, 0.1))):
                    if key.data is None:
                        self._take(listener, sel, joining, cap, ctx, deadline, drop)
                    elif key.fileobj in joining:
                        self._advance(key.fileobj, sel, joining, expected, drop)
                    if self._joined.is_set():
                        return
        finally:
            left = len(joining)
            for sock in list(joining):
                drop(sock, "still joining when the join ended", quiet=True)
            if left:
                log.warning("veil.mpc rank %d closed %d connections still joining when the join ended",
                            self.rank, left)
            sel.close()

    def _take(self, listener, sel, joining, cap, ctx, deadline, drop) -> None:
        """Accept what is waiting (at most 64 at a time, so joining connections get their turn)."""
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and joining:
                    drop(next(iter(joining)), "closed to free a file descriptor")
                return
            if len(joining) >= cap:  # the oldest that never sent a whole ClientHello, else the oldest
                quiet = next((s for s, (link, _) in joining.items() if not link.answered), None)
                drop(quiet or next(iter(joining)), f"closed to admit a newer connection ({cap} were joining)")
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                link = _Link(sock, ctx, server_side=True, stats=self.stats,
                             deadline=min(time.monotonic() + JOIN_SECONDS, deadline))
            except OSError:
                sock.close()
                continue
            joining[sock] = (link, f"{peer[0]}:{peer[1]}")
            sel.register(sock, selectors.EVENT_READ, link)

    def _advance(self, sock, sel, joining, expected: set[int], drop) -> None:
        link = joining[sock][0]
        try:
            while (ev := link.step()) == _SHAKEN:
                pass
            if ev is None:
                sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0), link)
                return
            self._admit(link, ev, expected)
        except Exception as exc:  # anything a stranger can cause ends its connection, never the party
            drop(sock, str(exc) or type(exc).__name__)
            return
        del joining[sock]
        sel.unregister(sock)

    def _admit(self, link: _Link, hello: dict, expected: set[int]) -> None:
        """A hello after the handshake: the rank it claims must be one the certificate proves,
        expected here, not yet joined, for this world and session. Then answer with ours."""
        ids = identities_of(link.obj.getpeercert() or {})
        claim = hello.get("rank")
        ok = type(claim) is int and 0 <= claim < self.world
        claimed = identity_for(claim, self.world) if ok else None
        if claimed is None or claimed not in ids:
            raise PermissionError(f"certificate names {[i.uri() for i in ids]}, hello claims rank {claim!r}")
        if hello.get("world") != self.world or hello.get("session") != self.session:
            raise PermissionError("hello for another computation (world size or session differs)")
        with self._lock:
            if claim not in expected or claim in self.links:
                raise PermissionError(f"rank {claim} is not expected here or has already joined")
            self.links[claim] = link
            done = expected <= set(self.links)
        try:
            link.write_hello(self._hello())
        except BaseException:
            with self._lock:
                del self.links[claim]
            raise
        if done:
            self._joined.set()

    def _connect(self, j: int, addr: tuple[str, int], ctx: ssl.SSLContext, deadline: float) -> None:
        """The connecting side of joining (step 2), retried until ``deadline``."""
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                link = self._dial(j, addr, ctx, min(deadline, time.monotonic() + JOIN_SECONDS))
            except (ssl.SSLError, OSError, ValueError, PermissionError, RecursionError) as exc:
                last = f"rank {j} at {addr[0]}:{addr[1]}: {exc or type(exc).__name__}"
                time.sleep(0.1)
                continue
            with self._lock:
                self.links[j] = link
            return
        raise PartyFailureError(f"rank {self.rank}: could not join rank {j}: {last}")

    def _dial(self, j: int, addr: tuple[str, int], ctx: ssl.SSLContext, until: float) -> _Link:
        """One attempt: TCP, TLS handshake, j's identity, hellos; all within ``until``."""
        want = identity_for(j, self.world)
        sock = socket.create_connection(addr, timeout=max(0.05, until - time.monotonic()))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(sock, ctx, server_side=False, stats=self.stats, deadline=until)
            while True:
                ev = link.step()
                if ev == _SHAKEN:
                    ids = identities_of(link.obj.getpeercert() or {})
                    if want not in ids:
                        raise PermissionError(f"{addr[0]}:{addr[1]} presents {[i.uri() for i in ids]}, "
                                              f"not {want.uri()}")
                    link.write_hello(self._hello())
                elif isinstance(ev, dict):
                    if ev.get("rank") != j or ev.get("world") != self.world or ev.get("session") != self.session:
                        raise PermissionError(f"unexpected hello from {addr[0]}:{addr[1]}")
                    return link
                else:
                    left = until - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no TLS handshake and hello within {JOIN_SECONDS:g}s")
                    _ready({sock: selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0)}, left)
        except BaseException:
            sock.close()
            raise

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
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        try:
            buf = link.recv_frame(nbytes)
        except FrameError as exc:
            raise FrameError(f"rank {self.rank}: rank {src} {exc}; link closed") from None
        except TimeoutError:
            raise MPCTimeoutError(f"rank {self.rank}: no message from rank {src} within {self.timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise PartyFailureError(f"rank {self.rank}: connection to rank {src} failed: "
                                    f"{exc or type(exc).__name__}") from None
        if not numel:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        """Deliver what is queued, end every TLS session (close_notify) and close the sockets."""
        links, self.links = list(self.links.values()), {}
        close_links(links, send_for=self.timeout)
