"""Chunked encrypted evaluation on a Ray cluster: `RayExecutor`.

`model.predict(X, fhe="execute", executor=RayExecutor(address))` splits X into chunks of whole
ciphertexts (`parallel.default_chunk_rows`, as the local process pool does) and runs them on a
pool of Ray actors, each holding the server circuit loaded once. Two modes, by where the client's
secret key may go:

- ``ship_keys=False`` (the default): the key never leaves this (driver) process. The driver
  encrypts a chunk, an actor evaluates it on ciphertexts (`server.run(request, bundle)`, the
  public bundle sent once to the object store), and the driver decrypts the answer. The cluster
  sees what a `veil serve` server sees: public keys and ciphertexts. The driver's own core does
  every encryption and decryption, so this scales the server's work, not the client's.
- ``ship_keys=True``: each actor also holds the client and its secret key and runs the whole
  pipeline of a chunk (encrypt, evaluate, decrypt), as the local worker processes do; use it only
  on a cluster whose every node you trust with the key (it then scales the client's work too).

Steps of a run: (1) check the transport (below) and connect (`ray.init(address)`, a local
cluster when `address` is None); (2) start the actor pool for this circuit and key (reused while
the setup stays the same); (3) submit chunks to the least busy actor, at most `in_flight` at a
time, reading each chunk's rows from X only when it is submitted (a memmap stays on disk);
(4) write each answer into its rows of the (n, n_outputs) output as it arrives, so results are in
order and the driver's memory is the output plus the chunks in flight. A chunk that raises on an
actor raises the same veil exception here, with a note naming its rows; an actor that dies raises
`ExecutorError`.

Transport: every byte between veil's processes travels over mutually authenticated TLS, so a run
refuses to start unless Ray's own TLS is configured in this process's environment (Ray reads the
same variables in every node it starts): ``RAY_USE_TLS=1``, ``RAY_TLS_SERVER_CERT``,
``RAY_TLS_SERVER_KEY`` and ``RAY_TLS_CA_CERT`` naming readable files, set before ray is imported
(Ray reads them on import; a process that imported ray without them is refused rather than left
waiting on a handshake it cannot make). Each node's certificate must be issued by that CA and name
the node's IP address (Ray binds its node IP, not loopback); the certificate also authenticates
the node as a client, so the TLS is mutual.

TLS covers Ray's gRPC ports (GCS, raylet, object manager, each worker's), not two HTTP servers
of each node: the runtime-env agent (on the node IP; it installs runtime environments, pip
packages included, for whoever asks) and the autoscaler's Prometheus metrics (0.0.0.0:44217,
cluster counts only). A run therefore also requires Ray's token authentication
(``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, the same token on
every node): the agent then refuses a stranger (401) instead of running code for them. Before
`ray.init(address="host:port")` the driver makes one mutual TLS handshake with that address
(`probe_cluster`, bounded by `CONNECT_TIMEOUT`), because `ray.init` keeps retrying for minutes
when the cluster is down or refuses this process's certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.abc
import ipaddress
import os
import pickle
import queue
import secrets
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import ExecutorError, ShapeError
from veil.he.keys import PublicBundle, SecretKeys
from veil.program.parallel import (
    IN_FLIGHT_PER_WORKER,
    Loader,
    build_pipeline,
    chunk_bytes,
    chunk_size,
    progress_bar,
    run_chunk,
    sample_array,
    tune_allocator,
)

TLS_VARIABLES = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")
CONNECT_TIMEOUT = 15.0
"""Seconds the driver's handshake with a cluster address may take (`probe_cluster`)."""
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def check_tls(environ: dict[str, str] | None = None) -> None:
    """Refuse (ExecutorError) unless Ray's mutual TLS is configured: RAY_USE_TLS set to 1 (or
    true) and the certificate, key and CA variables naming readable files."""
    env = os.environ if environ is None else environ
    problems = []
    if not _tls_enabled(env.get("RAY_USE_TLS")):
        problems.append("RAY_USE_TLS is not 1")
    for name in TLS_VARIABLES:
        path = env.get(name)
        if not path:
            problems.append(f"{name} is not set")
        elif not os.access(path, os.R_OK):
            problems.append(f"{name}={path} is not a readable file")
    if (env.get("RAY_AUTH_MODE") or "").strip().lower() != "token":
        problems.append("RAY_AUTH_MODE is not token (Ray's HTTP agents are not under TLS)")
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if not (env.get("RAY_AUTH_TOKEN") or "").strip():
        if not token_path:
            problems.append("neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set")
        elif not os.access(token_path, os.R_OK):
            problems.append(f"RAY_AUTH_TOKEN_PATH={token_path} is not a readable file")
    if not problems and environ is None and _imported_before_tls():
        problems.append("ray was imported before RAY_USE_TLS was set, and Ray reads it on import: set the "
                        "variables before starting Python (or at least before importing ray)")
    if problems:
        raise ExecutorError(
            "RayExecutor sends ciphertexts, keys and the model between processes, which must use mutually "
            "authenticated TLS; configure Ray's TLS (RAY_USE_TLS=1, RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY, "
            "RAY_TLS_CA_CERT) and token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH) in this process and on every node: " + "; ".join(problems))


def probe_cluster(address: str, timeout: float = CONNECT_TIMEOUT, environ: dict[str, str] | None = None) -> None:
    """One mutual TLS handshake with a Ray cluster's "host:port" using this process's certificate,
    key and CA, then a wait for the server's first HTTP/2 frame; ExecutorError within `timeout`
    seconds when nothing answers there, its certificate is not from our CA or it refuses ours
    (it then closes the connection after the handshake). Ray's own `ray.init` keeps retrying in
    those cases (over three minutes when measured). Other address forms ("auto", "ray://...") are
    left to Ray. Only the chain is verified, not the server name, so a node certificate naming
    the node's IP also serves an address given by host name."""
    env = os.environ if environ is None else environ
    host, sep, port = address.rpartition(":")
    if not sep or not host or "/" in address or not port.isdigit():
        return
    host = host.strip("[]")
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(env["RAY_TLS_CA_CERT"])
        ctx.load_cert_chain(env["RAY_TLS_SERVER_CERT"], env["RAY_TLS_SERVER_KEY"])
        ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as exc:
        raise ExecutorError(f"cannot load this process's Ray TLS certificate, key or CA: {exc}") from None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(_H2_PREFACE)
            if not tls.recv(9):
                raise ConnectionError("it closed the connection after the handshake, so it refuses this process's "
                                      "certificate (issued by another CA?)")
    except ssl.SSLCertVerificationError as exc:
        raise ExecutorError(f"the Ray cluster at {address} presents a certificate RAY_TLS_CA_CERT did not issue: "
                            f"{exc.verify_message}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ExecutorError(f"cannot reach the Ray cluster at {address} over mutual TLS within {timeout:g} s: "
                            f"{exc}") from None


def local_addresses() -> tuple[str, ...]:
    """This machine's IPv4 addresses a local Ray node may bind: loopback, the host name's
    addresses and the outgoing interface's (found without sending a packet)."""
    ips = {"127.0.0.1"}
    with contextlib.suppress(OSError):
        ips.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # a UDP connect selects a route; nothing is sent
        ips.add(s.getsockname()[0])
    return tuple(sorted(ips))


def write_dev_tls(directory: str | Path, ips: tuple[str, ...] | None = None, days: int = 7) -> dict[str, str]:
    """For a development cluster on one machine: a CA and one node certificate (P-256, naming
    `ips`, default `local_addresses()`) and a random authentication token written to `directory`;
    returns the RAY_* variables that use them, to put in the environment before Python starts.
    Production clusters issue one certificate per node from their own CA and keep its key off
    the nodes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: x509.Name, signer: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            names = [x509.DNSName("localhost"),
                     *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in (ips or local_addresses()))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil development Ray CA")])
    ca = cert("veil development Ray CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    node = cert("veil Ray node", key, ca_name, ca_key, False)
    pem = serialization.Encoding.PEM
    key_path = out / "node.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (out / "node.pem").write_bytes(node.public_bytes(pem))
    (out / "ca.pem").write_bytes(ca.public_bytes(pem))
    token_path = out / "auth_token"
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(out / "node.pem"),
            "RAY_TLS_SERVER_KEY": str(key_path), "RAY_TLS_CA_CERT": str(out / "ca.pem"),
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _tls_enabled(value: str | bytes | None) -> bool:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return (value or "").strip().lower() in ("1", "true")


class _RayImportWatch(importlib.abc.MetaPathFinder):
    """Notes whether RAY_USE_TLS was set when ray is first imported (it finds nothing itself)."""

    tls_at_import: bool | None = None

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "ray" and self.tls_at_import is None:
            type(self).tls_at_import = _tls_enabled(os.environ.get("RAY_USE_TLS"))
        return None


if "ray" not in sys.modules:
    sys.meta_path.insert(0, _RayImportWatch())


def _imported_before_tls() -> bool:
    """True when ray was imported in this process without RAY_USE_TLS set: ray may then have read
    an environment without TLS, and its connections would fail or wait for ever. Known exactly
    when ray is imported after this module; otherwise judged from the environment the process
    started with (Linux's /proc/self/environ). False when unsure."""
    if _RayImportWatch.tls_at_import is not None:
        return not _RayImportWatch.tls_at_import
    if "ray" not in sys.modules:
        return False
    try:
        with open("/proc/self/environ", "rb") as f:
            start = f.read().split(b"\0")
    except OSError:
        return False
    return not any(entry.split(b"=", 1)[0] == b"RAY_USE_TLS" and _tls_enabled(entry.split(b"=", 1)[-1])
                   for entry in start)


class _ChunkActor:
    """One Ray actor: the server circuit, loaded once; with a pipeline setup also the client and
    its secret keys (``ship_keys=True``). Its process keeps freed memory as the local workers do
    (`tune_allocator`)."""

    def __init__(self, server_dict: dict, load_server: Loader, pipeline_setup: tuple | None) -> None:
        tune_allocator()
        self.bundles: dict[str, PublicBundle] = {}
        if pipeline_setup is not None:
            self.pipeline = build_pipeline(*pipeline_setup)
            self.server = self.pipeline.server
        else:
            self.pipeline = None
            self.server = load_server(server_dict)

    def ready(self) -> bool:
        return True

    def set_bundle(self, layout: str, bundle: bytes) -> bool:
        """Load the client's public bundle (evaluation keys) of `layout` for the chunks of a run."""
        self.bundles[layout] = PublicBundle.from_bytes(bundle)
        return True

    def evaluate(self, request: bytes, layout: str) -> bytes:
        """The server's answer to one encrypted request under the bundle of `layout` (no secret key here)."""
        return self.server.run(request, self.bundles[layout])

    def run_chunk(self, layout: str, data: bytes, dtype: str, n_features: int) -> np.ndarray:
        """Encrypt, evaluate and decrypt one chunk (only on actors that were given the keys)."""
        if self.pipeline is None:
            raise ExecutorError("this actor holds no client keys (ship_keys=False)")
        return run_chunk(self.pipeline, layout, data, dtype, n_features)


def _unwrap(exc: BaseException) -> BaseException:
    """The exception a chunk raised on an actor (Ray wraps it), or ExecutorError for a dead actor."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
        return ExecutorError(f"a Ray task failed: {exc}")
    if isinstance(exc, rex.RayActorError | rex.WorkerCrashedError | rex.ObjectLostError):
        return ExecutorError(f"a Ray actor died during encrypted evaluation (killed or out of memory?): {exc}")
    return exc


class RayExecutor:
    """Runs `fhe="execute"` chunks on a Ray cluster (see the module docstring for the two modes
    and the TLS requirement). Pass it as ``predict(X, fhe="execute", executor=...)``.

    `address`: a Ray cluster address for `ray.init` (None: connect to the one this process already
    initialised, else start a local cluster). `actors`: actors in the pool (None: one per CPU of
    the cluster). `ship_keys`: let the actors hold the client's secret key. `in_flight`: chunks
    submitted at once (None: two per actor). `init_options`: extra keyword arguments of
    `ray.init`. `close()` stops the actors and, if this executor started Ray, Ray itself."""

    def __init__(self, address: str | None = None, *, actors: int | None = None, ship_keys: bool = False,
                 in_flight: int | None = None, init_options: dict[str, Any] | None = None) -> None:
        for name, value in (("actors", actors), ("in_flight", in_flight)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.address = address
        self.actors = actors
        self.ship_keys = bool(ship_keys)
        self.in_flight = in_flight
        self.init_options = dict(init_options or {})
        self._lock = threading.Lock()
        self._started_ray = False
        self._pool: list[Any] = []
        self._pool_key: str | None = None

    def _connect(self) -> Any:
        check_tls()
        import ray

        if not ray.is_initialized():
            if self.address is not None:
                probe_cluster(self.address)
            options = {"include_dashboard": False, "log_to_driver": False, **self.init_options}
            ray.init(address=self.address, **options)
            self._started_ray = True
        return ray

    def _actors_for(self, ray: Any, server_dict: dict, load_server: Loader, pipeline_setup: tuple | None) -> list:
        key = hashlib.sha256(pickle.dumps((server_dict, load_server, pipeline_setup),
                                          protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
        if self._pool and self._pool_key == key:
            return self._pool
        self._kill_pool(ray)
        n = self.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1)(_ChunkActor)
        pool = [remote.remote(server_dict, load_server, pipeline_setup) for _ in range(n)]
        self._pool, self._pool_key = pool, key
        self._call(ray, [a.ready.remote() for a in pool])
        return pool

    def _call(self, ray: Any, refs: list) -> list:
        """`ray.get(refs)`; on failure the pool goes (a later run starts a new one) and the error
        is raised as veil's."""
        try:
            return ray.get(refs)
        except Exception as exc:
            self._kill_pool(ray)
            raise _unwrap(exc) from None

    def _kill_pool(self, ray: Any) -> None:
        for actor in self._pool:
            ray.kill(actor)
        self._pool, self._pool_key = [], None

    def execute(self, X: Any, *, server_dict: dict, client_spec: dict, load_server: Loader, load_client: Loader,
                keys: dict[str, bytes], layout: str, chunk_rows: int | None = None,
                progress: bool | None = None) -> np.ndarray:
        """Raw decrypted outputs (n, n_outputs) for the rows of X (array or memmap), in order; the
        same arguments as `parallel.execute_chunked`. Calls from several threads run one after
        the other.

        Each chunk in flight has a driver thread: with ``ship_keys=False`` it runs the client's
        whole protocol (`infer`: one round trip, or one per stage of a staged program) with a
        client of its own and a transport to one actor; with ``ship_keys=True`` it waits for the
        actor's `run_chunk`."""
        X, n, n_features = sample_array(X)
        if layout not in keys:
            raise ShapeError(f"no keys for layout {layout!r}")
        probe = load_client(client_spec)
        rows = chunk_size(probe, layout, chunk_rows)
        bounds = [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]
        with self._lock:
            ray = self._connect()
            setup = (server_dict, client_spec, load_server, load_client, {layout: keys[layout]})
            pool = self._actors_for(ray, server_dict, load_server, setup if self.ship_keys else None)
            limit = self.in_flight or IN_FLIGHT_PER_WORKER * len(pool)
            run = (self._remote_pipeline(ray, pool, layout, n_features) if self.ship_keys
                   else self._driver_pipeline(ray, pool, layout, limit, setup))
            out: np.ndarray | None = None
            todo = iter(bounds)
            with ThreadPoolExecutor(limit, thread_name_prefix="veil-ray") as threads, \
                    progress_bar(n, len(bounds), progress) as bar:
                pending: dict[Future, tuple[int, int]] = {}
                try:
                    while True:
                        while len(pending) < limit and (nxt := next(todo, None)) is not None:
                            pending[threads.submit(run, X, *nxt)] = nxt
                        if not pending:
                            break
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            lo, hi = pending.pop(future)
                            try:
                                Y = future.result()
                            except Exception as exc:
                                err = _unwrap(exc)
                                err.add_note(f"in the chunk of rows {lo}:{hi} (sample numbers above count from {lo})")
                                if isinstance(err, ExecutorError):
                                    self._kill_pool(ray)
                                raise err from None
                            if out is None:
                                out = np.empty((n, Y.shape[1]), dtype=np.float64)
                            out[lo:hi] = Y
                            bar.update(hi - lo)
                finally:
                    for future in pending:
                        future.cancel()
        assert out is not None
        return out

    @staticmethod
    def _least_busy(busy: list[int], lock: threading.Lock) -> int:
        with lock:
            i = min(range(len(busy)), key=busy.__getitem__)
            busy[i] += 1
            return i

    def _remote_pipeline(self, ray: Any, pool: list, layout: str, n_features: int) -> Callable:
        """A chunk's task when the actors hold the keys: its rows' bytes to one actor's `run_chunk`."""
        busy, lock = [0] * len(pool), threading.Lock()

        def run(X: Any, lo: int, hi: int) -> np.ndarray:
            i = self._least_busy(busy, lock)
            try:
                data, dtype = chunk_bytes(X, lo, hi)
                return ray.get(pool[i].run_chunk.remote(layout, data, dtype, n_features))
            finally:
                with lock:
                    busy[i] -= 1
        return run

    def _driver_pipeline(self, ray: Any, pool: list, layout: str, limit: int, setup: tuple) -> Callable:
        """A chunk's task when the key stays here: a client of its own (from a pool of `limit`)
        runs `infer` with a transport to one actor, which first receives each layout's public
        bundle once (`set_bundle`)."""
        _, client_spec, _, load_client, keys = setup
        clients: queue.Queue = queue.Queue()
        for _ in range(limit):
            client = load_client(client_spec)
            client.set_keys(layout, SecretKeys.from_bytes(keys[layout]))
            clients.put(client)
        busy, lock = [0] * len(pool), threading.Lock()
        bundles: dict[str, Any] = {}
        loaded: list[set[str]] = [set() for _ in pool]

        def transport(i: int, client: Any) -> Callable[[bytes, str], bytes]:
            def send(request: bytes, name: str) -> bytes:
                with lock:
                    if name not in bundles:
                        bundles[name] = ray.put(client.public_bundle(name).to_bytes())
                    ref, fresh = bundles[name], name not in loaded[i]
                    loaded[i].add(name)
                if fresh:
                    ray.get(pool[i].set_bundle.remote(name, ref))
                return ray.get(pool[i].evaluate.remote(request, name))
            return send

        def run(X: Any, lo: int, hi: int) -> np.ndarray:
            i = self._least_busy(busy, lock)
            client = clients.get()
            try:
                return client.infer(np.asarray(X[lo:hi]), layout, transport(i, client))
            finally:
                clients.put(client)
                with lock:
                    busy[i] -= 1
        return run

    def close(self) -> None:
        """Stop this executor's actors, and Ray if this executor started it (idempotent)."""
        with self._lock:
            try:
                import ray
            except ImportError:
                return
            if ray.is_initialized():
                self._kill_pool(ray)
                if self._started_ray:
                    ray.shutdown()
            self._pool, self._pool_key, self._started_ray = [], None, False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
