"""Chunked, process-parallel end-to-end encrypted evaluation on the client's own machine.

Encrypting a whole batch at once keeps every ciphertext of every row alive (memory grows with n),
and SEAL holds the GIL, so one Python process uses one core. `ChunkedExecutor` instead splits the
rows into chunks whose size is a multiple of the slot count (full ciphertexts), and runs the whole
pipeline of a chunk (encrypt, serialize, server deserialize/evaluate/serialize, decrypt) in one of
a few persistent worker processes. At most about two chunks per worker are in flight, each worker
receives only its slice of X (raw bytes, not a pickled array), and the parent keeps only the
decrypted outputs, so peak memory does not grow with n beyond the (n, n_outputs) result.

The executor knows circuits only through their duck-typed interface (the server's
`run(request, bundle) -> bytes`; the client's `infer` (its whole protocol over a transport: one
round trip, or one per stage of a staged program), `public_bundle`, `set_keys`, `layout(name)`
(whose ciphertexts per request size the chunks) and `params[layout].slot_count`), and rebuilds
both sides in a worker from plain dicts with the module-level factories it is given
(`load_server` and `load_client`), so any circuit kind with that interface runs unchanged.

Security note: this runs both sides in local processes of the same user, as the in-process
`fhe="execute"` mode does. The client's secret keys (serialized by `SecretKeys.to_bytes`) cross
only pipes to the client's own worker processes; no server process ever sees them. In a real
deployment the server workers are separate machines or processes that receive only the public
bundle and ciphertexts.

Workers are fresh interpreters (`python -m veil.program.worker`), not multiprocessing children:
they import veil only, never the caller's `__main__`, so a plain script without an
``if __name__ == "__main__":`` guard, a notebook and ``python -`` work alike (multiprocessing's
"spawn" re-runs the script in every child, which then dies or waits forever). Parent and worker
exchange length-prefixed pickles (`send_frame`, `recv_frame`) over two pipes of their own, passed
to the worker as file descriptors, never over its stdin or stdout: whatever the interpreter prints
(a sitecustomize or .pth hook, a debugger, a library) goes to its stdout and stderr, which the
parent only keeps the last lines of, and cannot corrupt a frame. A worker that exits, is killed or
never starts closes its pipe: the parent sees the end of the stream and raises `ExecutorError` with
the worker's exit status and last lines of output.

Concurrency: one executor runs one input at a time (`run` takes the executor's lock, so two threads
calling it are served one after the other, each with its own rows); the shared executors of
`executor_for` are retired, never closed under a running call: a retired executor stops its
workers when its last running call returns.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import math
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import numpy as np

from veil.errors import ExecutorError, ShapeError
from veil.he.keys import SecretKeys
from veil.program import rows_per_request
from veil.program.common import checked_layout, local_transport

DEFAULT_CHUNK_CTS = 4
"""Default chunk size in full ciphertexts' worth of rows (4 x 4096 = 16,384 rows for the batch
layout): big enough that per-chunk overhead (IPC, headers) is negligible, small enough that a few
chunks per worker balance the load and each in-flight chunk stays at tens of megabytes."""
MAX_CHUNK_BYTES = 256 << 20
"""Largest encrypted request of a default chunk (`default_chunk_rows`): a layout that sends many
ciphertexts per sample (the row layout of a CNN sends one per few kernel positions, megabytes per
image) gets fewer rows per chunk, never fewer than one full ciphertext group."""
IN_FLIGHT_PER_WORKER = 2
PROGRESS_MIN_CHUNKS = 16
"""With progress=None a bar is shown (on a terminal) from this many chunks on."""
START_TIMEOUT = 300.0
"""Seconds a new worker may take to import veil and rebuild its circuits before it counts as
failed to start (a few seconds normally; generous for a loaded machine)."""
STOP_TIMEOUT = 10.0
OUTPUT_LINES = 20
"""Last lines of a worker's output (stdout and stderr) kept for the error raised when it dies."""
WORKER_MODULE = "veil.program.worker"

Loader = Callable[[dict], Any]


class _Pipeline:
    """One client and one server circuit in the same process: the reference end-to-end path."""

    def __init__(self, server: Any, client: Any) -> None:
        self.server = server
        self.client = client

    def __call__(self, X: np.ndarray, layout: str) -> np.ndarray:
        return self.client.infer(X, layout, local_transport(self.server, self.client))


def build_pipeline(server_dict: dict, client_spec: dict, load_server: Loader, load_client: Loader,
           keys: dict[str, bytes]) -> _Pipeline:
    """Rebuild server and client from their dicts and install the client's secret keys."""
    server = load_server(server_dict)
    client = load_client(client_spec)
    for layout, blob in keys.items():
        client.set_keys(layout, SecretKeys.from_bytes(blob))
    return _Pipeline(server, client)


def run_chunk(pipeline: _Pipeline, layout: str, data: bytes, dtype: str, n_features: int) -> np.ndarray:
    """One task: rebuild the chunk's rows from raw bytes and run the whole pipeline on them."""
    X = np.frombuffer(data, dtype=dtype).reshape(-1, n_features)
    return pipeline(X, layout)


_HEADER = struct.Struct(">Q")


def send_frame(stream: IO[bytes], obj: Any) -> None:
    """Write one length-prefixed pickle and flush it."""
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(blob)))
    stream.write(blob)
    stream.flush()


def recv_frame(stream: IO[bytes]) -> Any:
    """Read one frame written by `send_frame`; EOFError at a clean or truncated end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("end of stream")
    size = _HEADER.unpack(header)[0]
    blob = stream.read(size)
    if len(blob) < size:
        raise EOFError("stream ended inside a frame")
    return pickle.loads(blob)


def portable_exception(exc: BaseException) -> BaseException:
    """`exc` if it survives a pickle round trip (its type and notes reach the parent), otherwise
    an ExecutorError carrying its type name and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return ExecutorError(f"{type(exc).__name__}: {exc}")


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Thread counts of the BLAS libraries numpy and scipy may load (read when they load)."""


def worker_blas_threads(workers: int) -> int:
    """BLAS threads per worker of a pool of `workers`: the cores shared out, at least one. Each
    BLAS otherwise starts one thread per core in every worker, and `workers` processes of that many
    spinning threads oversubscribe the cores (measured here: a 100 x 845 by 845 x 2048 float64
    product takes 2 to 6 times longer with two threads than with one on a loaded 2-core machine)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


ALLOCATOR_SETTINGS = {"MALLOC_TRIM_THRESHOLD_": (-1, 256 << 20), "MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20)}
"""glibc malloc settings of the processes that evaluate programs, by environment variable (read when
a process starts) with the `mallopt` parameter that sets the same (M_TRIM_THRESHOLD = -1,
M_MMAP_THRESHOLD = -3, for a process already running): keep up to 256 MiB of freed memory at the
top of a heap, and serve allocations below 32 MiB from the heaps. glibc's defaults give the kernel
back every freed buffer of more than a few MiB and map a fresh one for the next, so the megabyte
temporaries of every column step of `veil.he.linear.WeightedSum` and SEAL's serialization buffers
(a ciphertext's bytes) are page-faulted in again each time: here, 200 pairs of 2.4 MB numpy
arrays made and freed fault 227,800 pages with the defaults and none with these; CryptoNets' server
on 4,096 images takes 17% less CPU time (user 11.4 -> 10.0 s, system 2.9 -> 1.9 s, same peak
memory). Freed memory kept is still the process's peak, which stays bounded as before."""


def _malloc_chosen(env: Mapping[str, str]) -> bool:
    """Whether an environment sets glibc malloc itself (any ``MALLOC_`` variable): the user's choice wins."""
    return any(var.startswith("MALLOC_") for var in env)


def tune_allocator() -> bool:
    """Apply `ALLOCATOR_SETTINGS` to this process (glibc only: `mallopt`; elsewhere nothing) unless
    its environment sets any ``MALLOC_`` variable (the user's choice wins). For long-lived
    processes that evaluate programs (`veil serve`, `veil worker`, the Ray executor's actors);
    executor workers get the same through their environment (`_worker_env`). Returns whether the
    settings were applied."""
    if _malloc_chosen(os.environ):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS.values())


def _worker_env(blas_threads: int) -> dict[str, str]:
    """The parent's environment with its import path, so a worker finds veil (and any module a
    loader lives in) where the parent found them; `blas_threads` BLAS threads unless the parent's
    environment sets a BLAS thread count itself, and `ALLOCATOR_SETTINGS` unless it sets any
    ``MALLOC_`` variable (the user's choice wins in both)."""
    env = dict(os.environ)
    paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if os.path.isdir(p)))
    if not any(var in env for var in BLAS_THREAD_VARIABLES):
        env.update(dict.fromkeys(BLAS_THREAD_VARIABLES, str(blas_threads)))
    if not _malloc_chosen(env):
        env.update({var: str(value) for var, (_, value) in ALLOCATOR_SETTINGS.items()})
    return env


class _Worker:
    """One worker interpreter and the threads that feed it tasks and read its replies.

    Frames go over two dedicated pipes (`pass_fds`); the worker's stdout and stderr are one
    stream whose last lines are kept for errors. Replies land on the pool's shared queue as
    (worker, message); when the frame pipe ends (the worker exited, was killed, or failed to
    start), the reader posts (worker, None)."""

    def __init__(self, index: int, setup: bytes, replies: queue.Queue, blas_threads: int) -> None:
        self.index = index
        executable = sys.executable or "python3"
        task_r, task_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [executable, "-m", WORKER_MODULE, str(task_r), str(reply_w)], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(task_r, reply_w),
                env=_worker_env(blas_threads))
        except BaseException:
            for fd in (task_w, reply_r):
                os.close(fd)
            raise
        finally:
            os.close(task_r)
            os.close(reply_w)
        self._frames_out = os.fdopen(task_w, "wb")
        self._frames_in = os.fdopen(reply_r, "rb")
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.tasks: queue.Queue = queue.Queue()
        self.in_flight = 0
        self.tasks.put(setup)
        self._replies = replies
        for target, name in ((self._write, "writer"), (self._read, "reader"), (self._drain, "output")):
            threading.Thread(target=target, name=f"veil-worker-{index}-{name}", daemon=True).start()

    def _write(self) -> None:
        stream = self._frames_out
        try:
            while (item := self.tasks.get()) is not None:
                if isinstance(item, bytes):
                    stream.write(item)
                    stream.flush()
                else:
                    send_frame(stream, item)
        except (OSError, ValueError):
            pass  # the worker is gone: its reader reports it
        finally:
            with contextlib.suppress(OSError):
                stream.close()

    def _read(self) -> None:
        try:
            while True:
                self._replies.put((self, recv_frame(self._frames_in)))
        except Exception:
            self._replies.put((self, None))
        finally:
            with contextlib.suppress(OSError):
                self._frames_in.close()

    def _drain(self) -> None:
        output = self.proc.stdout
        assert output is not None
        for line in iter(output.readline, b""):
            self.output.append(line.decode("utf-8", "replace").rstrip())

    def death(self) -> ExecutorError:
        """The error for a worker whose stream ended: exit status and the end of its output."""
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        tail = "\n".join(self.output)
        return ExecutorError(
            f"a worker process died during encrypted evaluation (exit status {code}: killed or out of "
            f"memory?); retry with fewer workers or smaller chunks" + (f"\nits last output:\n{tail}" if tail else ""))

    def stop(self) -> None:
        self.tasks.put(None)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _ProcessPool:
    """`workers` worker interpreters holding the same circuits and keys, fed chunk tasks.

    Start-up: each worker receives the setup frame and answers ("ready",) once its circuits are
    built, or ("error", exception); the pool is usable when all are ready. Tasks: the caller puts
    one on the least busy worker (`submit`) and collects ("ok" | "error", task id, value) replies
    (`next_reply`); a worker's end of stream raises ExecutorError instead of waiting forever."""

    def __init__(self, workers: int, setup: tuple) -> None:
        blob = pickle.dumps(setup, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _HEADER.pack(len(blob)) + blob
        self.replies: queue.Queue = queue.Queue()
        self.workers: list[_Worker] = []
        try:
            for i in range(workers):
                self.workers.append(_Worker(i, frame, self.replies, worker_blas_threads(workers)))
            ready = 0
            while ready < workers:
                _, message = self._get(START_TIMEOUT, "start")
                if message[0] == "error":
                    raise message[1]
                ready += 1
        except BaseException:
            self.close()
            raise

    def _get(self, timeout: float | None, doing: str) -> tuple[_Worker, Any]:
        try:
            worker, message = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise ExecutorError(f"worker processes did not {doing} within {timeout:.0f} s") from None
        if message is None:
            raise worker.death()
        return worker, message

    def submit(self, task_id: int, task: tuple) -> None:
        worker = min(self.workers, key=lambda w: w.in_flight)
        worker.in_flight += 1
        worker.tasks.put(("task", task_id, *task))

    def next_reply(self) -> tuple[str, int, Any]:
        """The next task reply: ("ok", task id, outputs) or ("error", task id, exception)."""
        worker, message = self._get(None, "answer")
        worker.in_flight -= 1
        return message

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []


def chunk_bytes(X: Any, lo: int, hi: int) -> tuple[bytes, str]:
    """Rows lo:hi as contiguous raw bytes (reads only that slice of a memmap) and their dtype."""
    block = np.asarray(X[lo:hi])
    if block.dtype not in (np.float32, np.float64):
        block = block.astype(np.float64)
    return np.ascontiguousarray(block).tobytes(), block.dtype.str


def progress_bar(total: int, n_chunks: int, progress: bool | None) -> Any:
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
    `LinearCircuit.from_dict`, `LinearClient`); `keys` maps layout names to
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
        self._pool: _ProcessPool | None = None
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._running = 0
        self._retired = False
        ref = weakref.ref(self)
        atexit.register(lambda: (ex := ref()) is not None and ex.close())

    def chunk_rows(self, layout: str, chunk_rows: int | None = None) -> int:
        """`chunk_rows` rounded up to a whole number of full ciphertexts of `layout`."""
        return chunk_size(self.client, layout, chunk_rows)

    def run(self, X: Any, layout: str, chunk_rows: int | None = None,
            progress: bool | None = None) -> np.ndarray:
        """Raw decrypted outputs (n, n_outputs) for the rows of X (array or memmap), in order.

        Inputs of at most one chunk, or a single worker, run in this process (still chunk by
        chunk); otherwise chunks go to the pool, at most `2 * workers` at a time. An error in a
        chunk is raised as its own (veil) exception type, with a note naming the chunk's rows.
        Calls from several threads run one after the other (one pool, one reply stream)."""
        X, n, n_features = sample_array(X)
        rows = self.chunk_rows(layout, chunk_rows)
        bounds = [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]
        out: np.ndarray | None = None
        with self._lock:
            self._running += 1
        try:
            with self._run_lock, progress_bar(n, len(bounds), progress) as bar:
                for (lo, hi), Y in self._results(X, layout, bounds, n_features):
                    if out is None:
                        out = np.empty((n, Y.shape[1]), dtype=np.float64)
                    out[lo:hi] = Y
                    bar.update(hi - lo)
        finally:
            with self._lock:
                self._running -= 1
                last_of_retired = self._retired and self._running == 0
            if last_of_retired:
                self._discard_pool()
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
        pending: dict[int, tuple[int, int]] = {}
        todo = enumerate(bounds)
        limit = IN_FLIGHT_PER_WORKER * self.workers
        try:
            while True:
                while len(pending) < limit:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    task_id, (lo, hi) = nxt
                    data, dtype = chunk_bytes(X, lo, hi)
                    pool.submit(task_id, (layout, data, dtype, n_features))
                    pending[task_id] = (lo, hi)
                if not pending:
                    return
                status, task_id, value = pool.next_reply()
                lo, hi = pending.pop(task_id)
                if status == "error":
                    value.add_note(f"in the chunk of rows {lo}:{hi} (sample numbers above count from {lo})")
                    raise value
                yield (lo, hi), value
        finally:
            if pending:
                self._discard_pool()  # replies still due would be taken for a later run's

    def _local_pipeline(self) -> _Pipeline:
        if self._local is None:
            self._local = build_pipeline(*self._setup)
        return self._local

    def _get_pool(self) -> _ProcessPool:
        with self._lock:
            if self._pool is None:
                self._pool = _ProcessPool(self.workers, self._setup)
            return self._pool

    def _discard_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent); a later `run` starts a new pool."""
        self._discard_pool()

    def retire(self) -> None:
        """Stop the worker processes once no call is running: now if idle, else when the last
        running `run` returns (a later `run` still works and stops its pool when it returns)."""
        with self._lock:
            self._retired = True
            idle = self._running == 0
        if idle:
            self._discard_pool()

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
    the same setup is asked for again. When the setup changes the previous executor is retired
    (`ChunkedExecutor.retire`): its workers stop once its running calls return, so only calls
    in progress keep an older set of worker processes alive."""
    global _cached
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    key = _digest((server_dict, client_spec, load_server, load_client, sorted(keys.items()), workers))
    with _cache_lock:
        if _cached is not None and _cached[0] == key:
            return _cached[1]
        old, _cached = _cached, None
    if old is not None:
        old[1].retire()
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


def default_chunk_rows(client: Any, layout: str) -> int:
    """Rows of a default chunk of `layout`: DEFAULT_CHUNK_CTS full ciphertexts' worth, fewer when
    their encrypted request would exceed MAX_CHUNK_BYTES (whole ciphertext groups either way)."""
    slots = int(client.params[checked_layout(layout, client.params)].slot_count)
    return rows_per_request(client, layout, MAX_CHUNK_BYTES, DEFAULT_CHUNK_CTS * slots)


def sample_array(X: Any) -> tuple[Any, int, int]:
    """X as a 2-D array of samples (an array or memmap is kept as it is, never copied) with its
    row and feature counts; ShapeError for any other shape or no rows."""
    if getattr(X, "ndim", None) != 2:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ShapeError(f"expected a 2-D array of samples, got shape {X.shape}")
    n, n_features = int(X.shape[0]), int(X.shape[1])
    if n == 0:
        raise ShapeError("no samples to encrypt")
    return X, n, n_features


def chunk_size(client: Any, layout: str, chunk_rows: int | None = None) -> int:
    """Rows per chunk of `layout`: `default_chunk_rows` for None, else `chunk_rows` rounded up to
    a whole number of full ciphertexts (ShapeError for an unknown layout, ValueError for a bad
    count)."""
    if layout not in client.params:
        raise ShapeError(f"unknown layout {layout!r}; this circuit supports {sorted(client.params)}")
    slots = int(client.params[layout].slot_count)
    if chunk_rows is None:
        return default_chunk_rows(client, layout)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int | np.integer) or chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    return math.ceil(int(chunk_rows) / slots) * slots


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
