"""Chunked, process-parallel end-to-end encrypted evaluation on the client's own machine.

Encrypting a whole batch at once keeps every ciphertext of every row alive (memory grows with n),
and SEAL holds the GIL, so one Python process uses one core. `ChunkedExecutor` instead splits the
rows into chunks whose size is a multiple of the slot count (full ciphertexts), and runs the whole
pipeline of a chunk (encrypt, serialize, server deserialize/evaluate/serialize, decrypt) in one of
a few persistent worker processes. At most about two chunks per worker are in flight, each worker
receives only its slice of X (raw bytes, not a pickled array), and the parent keeps only the
decrypted outputs, so peak memory does not grow with n beyond the (n, n_outputs) result.

The executor knows circuits only through their duck-typed interface (the server's
`run(request, bundle) -> bytes`; the client's `encrypt`, `decrypt`, `public_bundle`, `set_keys`
and `params[layout].slot_count`), and rebuilds both sides in a worker from plain dicts with the
module-level factories it is given (`LinearCircuit.from_dict` and `CircuitClient` today), so any
circuit with that interface runs unchanged.

Security note: this runs both sides in local processes of the same user, as the in-process
`fhe="execute"` mode does. The client's secret keys (serialized by `SecretKeys.to_bytes`) cross
only pipes to the client's own worker processes; no server process ever sees them. In a real
deployment the server workers are separate machines or processes that receive only the public
bundle and ciphertexts.

Worker processes are started with the "spawn" method (torch may be loaded in the parent, which
makes fork unsafe), so a script that triggers a parallel run must guard its entry point with
``if __name__ == "__main__":`` as with any multiprocessing code.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import multiprocessing
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from veil.errors import ExecutorError, ShapeError
from veil.he.keys import SecretKeys

DEFAULT_CHUNK_CTS = 4
"""Default chunk size in full ciphertexts' worth of rows (4 x 4096 = 16,384 rows for the batch
layout): big enough that per-chunk overhead (IPC, headers) is negligible, small enough that a few
chunks per worker balance the load and each in-flight chunk stays at tens of megabytes."""
IN_FLIGHT_PER_WORKER = 2
PROGRESS_MIN_CHUNKS = 16
"""With progress=None a bar is shown (on a terminal) from this many chunks on."""
START_METHOD = "spawn"

Loader = Callable[[dict], Any]


class _Pipeline:
    """One client and one server circuit in the same process: the reference end-to-end path."""

    def __init__(self, server: Any, client: Any) -> None:
        self.server = server
        self.client = client

    def __call__(self, X: np.ndarray, layout: str) -> np.ndarray:
        request = self.client.encrypt(X, layout)
        response = self.server.run(request, self.client.public_bundle(layout))
        return self.client.decrypt(response, len(X))


def _build(server_dict: dict, client_spec: dict, load_server: Loader, load_client: Loader,
           keys: dict[str, bytes]) -> _Pipeline:
    """Rebuild server and client from their dicts and install the client's secret keys."""
    server = load_server(server_dict)
    client = load_client(client_spec)
    for layout, blob in keys.items():
        client.set_keys(layout, SecretKeys.from_bytes(blob))
    return _Pipeline(server, client)


_worker_pipeline: _Pipeline | None = None
_worker_error: BaseException | None = None


def _init_worker(server_dict: dict, client_spec: dict, load_server: Loader, load_client: Loader,
                 keys: dict[str, bytes]) -> None:
    """Pool initializer. A failure is kept and raised by the first task, so the caller gets the
    typed exception instead of a broken pool."""
    global _worker_pipeline, _worker_error
    try:
        _worker_pipeline = _build(server_dict, client_spec, load_server, load_client, keys)
    except Exception as exc:
        _worker_error = exc


def _run_chunk(layout: str, data: bytes, dtype: str, n_features: int) -> np.ndarray:
    """Worker task: rebuild the chunk from raw bytes and run the whole pipeline on it."""
    if _worker_error is not None:
        raise _worker_error
    if _worker_pipeline is None:
        raise ExecutorError("worker process was not initialised")
    X = np.frombuffer(data, dtype=dtype).reshape(-1, n_features)
    return _worker_pipeline(X, layout)


def _chunk_bytes(X: Any, lo: int, hi: int) -> tuple[bytes, str]:
    """Rows lo:hi as contiguous raw bytes (reads only that slice of a memmap) and their dtype."""
    block = np.asarray(X[lo:hi])
    if block.dtype not in (np.float32, np.float64):
        block = block.astype(np.float64)
    return np.ascontiguousarray(block).tobytes(), block.dtype.str


def _progress_bar(total: int, n_chunks: int, progress: bool | None) -> Any:
    """A tqdm bar on stderr in rows; None shows it only for many chunks and on a terminal."""
    from tqdm import tqdm

    if progress is None:
        disable: bool | None = None if n_chunks >= PROGRESS_MIN_CHUNKS else True
    else:
        disable = not progress
    return tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr, disable=disable,
                desc="encrypted inference", leave=False)


class ChunkedExecutor:
    """A persistent pool of worker processes, each holding the server circuit and the client
    (with its secret keys), that evaluates inputs chunk by chunk end to end.

    `load_server` and `load_client` must be picklable module-level callables (e.g.
    `LinearCircuit.from_dict`, `CircuitClient`); `keys` maps layout names to
    `SecretKeys.to_bytes()`. The pool starts on the first parallel `run` and is reused until
    `close()` (also called at interpreter exit)."""

    def __init__(self, *, server_dict: dict, client_spec: dict, load_server: Loader,
                 load_client: Loader, keys: dict[str, bytes], workers: int | None = None) -> None:
        for name, fn in (("load_server", load_server), ("load_client", load_client)):
            try:
                pickle.dumps(fn)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise TypeError(f"{name} must be a picklable module-level callable: {exc}") from None
        self._setup = (server_dict, client_spec, load_server, load_client, dict(keys))
        self.workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
        self.client = load_client(client_spec)
        self._local: _Pipeline | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        ref = weakref.ref(self)
        atexit.register(lambda: (ex := ref()) is not None and ex.close())

    def chunk_rows(self, layout: str, chunk_rows: int | None = None) -> int:
        """`chunk_rows` rounded up to a whole number of full ciphertexts of `layout`."""
        if layout not in self.client.params:
            raise ShapeError(f"unknown layout {layout!r}; this circuit supports {sorted(self.client.params)}")
        slots = int(self.client.params[layout].slot_count)
        if chunk_rows is None:
            return DEFAULT_CHUNK_CTS * slots
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int | np.integer) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        return math.ceil(int(chunk_rows) / slots) * slots

    def run(self, X: Any, layout: str, chunk_rows: int | None = None,
            progress: bool | None = None) -> np.ndarray:
        """Raw decrypted outputs (n, n_outputs) for the rows of X (array or memmap), in order.

        Inputs of at most one chunk, or a single worker, run in this process (still chunk by
        chunk); otherwise chunks go to the pool, at most `2 * workers` at a time. An error in a
        chunk is raised as its own (veil) exception type, with a note naming the chunk's rows."""
        if getattr(X, "ndim", None) != 2:
            X = np.asarray(X)
            if X.ndim != 2:
                raise ShapeError(f"expected a 2-D array of samples, got shape {X.shape}")
        n, n_features = int(X.shape[0]), int(X.shape[1])
        if n == 0:
            raise ShapeError("no samples to encrypt")
        rows = self.chunk_rows(layout, chunk_rows)
        bounds = [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]
        out: np.ndarray | None = None
        with _progress_bar(n, len(bounds), progress) as bar:
            for (lo, hi), Y in self._results(X, layout, bounds, n_features):
                if out is None:
                    out = np.empty((n, Y.shape[1]), dtype=np.float64)
                out[lo:hi] = Y
                bar.update(hi - lo)
        assert out is not None
        return out

    def _results(self, X: Any, layout: str, bounds: list[tuple[int, int]],
                 n_features: int) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        if len(bounds) <= 1 or self.workers == 1:
            local = self._local_pipeline()
            for lo, hi in bounds:
                try:
                    yield (lo, hi), local(np.asarray(X[lo:hi]), layout)
                except Exception as exc:
                    exc.add_note(f"in the chunk of rows {lo}:{hi} (sample numbers above count from {lo})")
                    raise
            return
        yield from self._pooled(X, layout, bounds, n_features)

    def _pooled(self, X: Any, layout: str, bounds: list[tuple[int, int]],
                n_features: int) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        pool = self._get_pool()
        pending: dict[Future, tuple[int, int]] = {}
        todo = iter(bounds)
        limit = IN_FLIGHT_PER_WORKER * self.workers
        try:
            while True:
                while len(pending) < limit:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    data, dtype = _chunk_bytes(X, *nxt)
                    pending[pool.submit(_run_chunk, layout, data, dtype, n_features)] = nxt
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    lo, hi = pending.pop(fut)
                    try:
                        Y = fut.result()
                    except BrokenProcessPool as exc:
                        self._discard_pool()
                        raise ExecutorError(
                            "a worker process died during encrypted evaluation (killed or out of "
                            "memory?), or could not start (a script using parallel execution must "
                            "guard its entry point with `if __name__ == \"__main__\":`); retry with "
                            "fewer workers or smaller chunks") from exc
                    except Exception as exc:
                        exc.add_note(f"in the chunk of rows {lo}:{hi} (sample numbers above count from {lo})")
                        raise
                    yield (lo, hi), Y
        finally:
            for fut in pending:
                fut.cancel()

    def _local_pipeline(self) -> _Pipeline:
        if self._local is None:
            self._local = _build(*self._setup)
        return self._local

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=multiprocessing.get_context(START_METHOD),
                    initializer=_init_worker, initargs=self._setup)
            return self._pool

    def _discard_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker processes (idempotent); a later `run` starts a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ChunkedExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_cached: tuple[str, ChunkedExecutor] | None = None
_cache_lock = threading.Lock()


def _digest(setup: tuple) -> str:
    return hashlib.sha256(pickle.dumps(setup, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()


def executor_for(*, server_dict: dict, client_spec: dict, load_server: Loader, load_client: Loader,
                 keys: dict[str, bytes], workers: int | None = None) -> ChunkedExecutor:
    """The shared executor for this circuit, keys and worker count, reusing its warm pool when
    the same setup is asked for again (the previous one is closed when the setup changes, so at
    most one set of worker processes is alive)."""
    global _cached
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    key = _digest((server_dict, client_spec, load_server, load_client, sorted(keys.items()), workers))
    with _cache_lock:
        if _cached is not None and _cached[0] == key:
            return _cached[1]
        old, _cached = _cached, None
    if old is not None:
        old[1].close()
    ex = ChunkedExecutor(server_dict=server_dict, client_spec=client_spec, load_server=load_server,
                         load_client=load_client, keys=keys, workers=workers)
    with _cache_lock:
        _cached = (key, ex)
    return ex


def shutdown() -> None:
    """Close the shared executor's worker processes, if any."""
    global _cached
    with _cache_lock:
        old, _cached = _cached, None
    if old is not None:
        old[1].close()


atexit.register(shutdown)


def execute_chunked(X: Any, *, server_dict: dict, client_spec: dict, load_server: Loader,
                    load_client: Loader, keys: dict[str, bytes], layout: str,
                    chunk_rows: int | None = None, workers: int | None = None,
                    progress: bool | None = None) -> np.ndarray:
    """Encrypt, evaluate and decrypt X chunk by chunk in parallel worker processes; returns the
    raw outputs (n, n_outputs) in row order. See `ChunkedExecutor.run`; the pool is shared
    between calls with the same setup (`executor_for`). Secret keys go only to the client's own
    local worker processes, never to a server."""
    ex = executor_for(server_dict=server_dict, client_spec=client_spec, load_server=load_server,
                      load_client=load_client, keys=keys, workers=workers)
    return ex.run(X, layout, chunk_rows=chunk_rows, progress=progress)
