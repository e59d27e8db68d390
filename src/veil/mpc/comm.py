"""Communicators: who talks to whom, with byte and round counting.

Ranks 0..n-1 are the computing parties, rank n is the dealer (crypto provider). Two
implementations: `InProcessComm` (threads of one process and queues: nothing leaves the
process) and `veil.mpc.transport.TLSComm` (one process per rank, possibly on different machines,
every link mutually authenticated TLS 1.3). Any failure of a peer surfaces as
`PartyFailureError` (or `MPCTimeoutError`) in every other rank instead of a hang.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from veil.mpc.errors import MPCTimeoutError, PartyFailureError


@dataclass
class CommStats:
    """Traffic counters of one rank: bytes and messages it sent, rounds it took part in.

    ``bytes_sent`` counts message payloads; ``wire_bytes_sent`` what was written to sockets
    (TLS records with framing and handshakes; zero for the in-process communicator).
    """

    bytes_sent: int = 0
    messages: int = 0
    rounds: int = 0
    bytes_to_dealer: int = 0
    bytes_from_dealer: int = 0
    wire_bytes_sent: int = 0
    by_peer: dict = field(default_factory=dict)

    def snapshot(self) -> dict:
        """Plain-dict copy for reports and differences."""
        return {
            "bytes_sent": self.bytes_sent,
            "messages": self.messages,
            "rounds": self.rounds,
            "bytes_to_dealer": self.bytes_to_dealer,
            "bytes_from_dealer": self.bytes_from_dealer,
            "wire_bytes_sent": self.wire_bytes_sent,
        }


class Communicator:
    """Point-to-point tensor messages between ranks; `exchange` is one round among parties."""

    rank: int
    world: int

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        self.stats = CommStats()

    @property
    def n_parties(self) -> int:
        """Number of computing parties (the last rank is the dealer)."""
        return self.world - 1

    @property
    def dealer(self) -> int:
        """Rank of the dealer."""
        return self.world - 1

    def _send(self, t: torch.Tensor, dst: int) -> None:
        raise NotImplementedError

    def _recv(self, shape, dtype, src: int) -> torch.Tensor:
        raise NotImplementedError

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Non-blocking send of a tensor to rank ``dst`` (the tensor must not be modified after)."""
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        self.stats.bytes_sent += nbytes
        self.stats.messages += 1
        if dst == self.dealer:
            self.stats.bytes_to_dealer += nbytes
        self._send(t, dst)

    def recv(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        """Blocking receive of a tensor of known shape and dtype from rank ``src``."""
        t = self._recv(tuple(shape), dtype, src)
        if src == self.dealer:
            self.stats.bytes_from_dealer += t.numel() * t.element_size()
        return t

    def exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Send ``t`` to every other party and receive theirs: one communication round."""
        self.stats.rounds += 1
        n = self.n_parties
        for p in range(n):
            if p != self.rank:
                self.send(t, p)
        return [t if p == self.rank else self.recv(t.shape, t.dtype, p) for p in range(n)]

    def gather_to(self, t: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
        """Send ``t`` to party ``dst`` only; ``dst`` gets every party's tensor. One round."""
        self.stats.rounds += 1
        if self.rank != dst:
            self.send(t, dst)
            return None
        return [t if p == dst else self.recv(t.shape, t.dtype, p) for p in range(self.n_parties)]

    def close(self) -> None:
        """Release resources."""


class _Hub:
    """Shared state of the in-process ranks: one FIFO per (src, dst) and an abort flag."""

    def __init__(self, world: int) -> None:
        self.queues = {(s, d): queue.Queue() for s in range(world) for d in range(world) if s != d}
        self.abort = threading.Event()
        self.reason = ""


class InProcessComm(Communicator):
    """Threads in one process; a failing rank sets the hub's abort flag so peers stop waiting."""

    def __init__(self, rank: int, world: int, hub: _Hub, timeout: float) -> None:
        super().__init__(rank, world)
        self.hub = hub
        self.timeout = timeout

    def _send(self, t: torch.Tensor, dst: int) -> None:
        self.hub.queues[(self.rank, dst)].put(t.clone())

    def _recv(self, shape, dtype, src: int) -> torch.Tensor:
        q = self.hub.queues[(src, self.rank)]
        deadline = time.monotonic() + self.timeout
        while True:
            if self.hub.abort.is_set():
                raise PartyFailureError(f"rank {self.rank}: computation aborted ({self.hub.reason})")
            try:
                t = q.get(timeout=0.05)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.hub.reason = f"rank {self.rank} timed out waiting for rank {src}"
                    self.hub.abort.set()
                    raise MPCTimeoutError(
                        f"rank {self.rank}: no message from rank {src} within {self.timeout}s"
                    ) from None
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise PartyFailureError(f"rank {self.rank}: unexpected message from rank {src}")
        return t
