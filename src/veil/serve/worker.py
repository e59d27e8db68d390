"""`veil worker`: evaluates queued predictions from the Redis stream in a consumer group.

The consumer side of the ``redis`` serving backend (`veil.serve.backends.redis`, whose
`RedisExecutor` queues the jobs on the front ends).

Each job is read with XREADGROUP, evaluated, answered through `post_result` (SET NX on a per-request
marker, so a request answers once even if two workers computed it), then acknowledged and deleted.
Jobs pending on a consumer idle for `claim_idle` seconds (a dead worker) are taken over with
XAUTOCLAIM by any live worker; a live worker keeps its current job by refreshing it (XCLAIM JUSTID).

Run as ``python -m veil.serve.worker --queue redis://host:6379/0``; every worker needs the front
ends' model key: from VEIL_MODEL_KEY, VEIL_MODEL_KEY_FILE or --model-key-file, or, with
``--attest sgx|tdx|sev-snp|nitro --key-broker https://front:8000``, by key release: at start the
worker attests through its platform's device and a front end running with ``--attest-policy``
releases the key to its evidence (`veil.serve.attested.request_model_key`). A worker that cannot
attest, or whose measurement the policy does not list, gets no key and exits saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from veil.errors import VeilError
from veil.program.parallel import tune_allocator
from veil.serve.backends.redis import (
    DEFAULT_PREFIX,
    RESULT_GRACE,
    RedisKeyNames,
    RedisStore,
    connect,
    encode_result,
    post_result,
)
from veil.serve.crypto import KEY_ENV, KEY_FILE_ENV, ArtefactCipher
from veil.serve.errors import NotFoundError, UnavailableError
from veil.serve.server import ServerConfig, configure_logging, load_cipher
from veil.serve.service import Service
from veil.serve.tee_setup import (
    BROKER_TOKEN_ENV,
    DEFAULT_CLAIM_IDLE,
    KeyBrokerOptions,
    add_worker_options,
    broker_options,
)

log = logging.getLogger("veil.serve")
BLOCK_SECONDS = 1.0
MAX_DELIVERIES = 3


class Worker:
    """One consumer of the job stream; `run` returns when stopped or after `max_jobs` jobs."""

    def __init__(self, url: str, service: Service, name: str | None = None,
                 claim_idle: float = DEFAULT_CLAIM_IDLE, prefix: str = DEFAULT_PREFIX) -> None:
        if claim_idle <= 0:
            raise ValueError("claim_idle must be positive")
        self.service, self.claim_idle, self.names = service, claim_idle, RedisKeyNames(prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.client = connect(url, socket_timeout=BLOCK_SECONDS + 10)
        self.handled = 0
        self._cursor = "0-0"
        self._next_claim = 0.0

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing, keeping jobs queued before, and
        register this consumer so XINFO CONSUMERS lists live workers."""
        try:
            self.client.xgroup_create(self.names.stream, self.names.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.client.xgroup_createconsumer(self.names.stream, self.names.group, self.name)

    def run(self, stop_event: threading.Event, max_jobs: int | None = None) -> int:
        """Consume until `stop_event` is set (or `max_jobs` handled); Redis outages are waited out."""
        backoff = 0.1
        ready = False
        log.info("worker started", extra={"worker": self.name, "claim_idle": self.claim_idle})
        while not stop_event.is_set() and (max_jobs is None or self.handled < max_jobs):
            try:
                if not ready:
                    self.ensure_group()
                    ready = True
                for entry_id, fields in self._next_jobs():
                    self._handle(entry_id, fields)
                backoff = 0.1
            except redis.RedisError as exc:
                log.warning("redis unavailable; retrying",
                            extra={"worker": self.name, "error": type(exc).__name__})
                ready = False
                stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("worker loop failed; the job stays pending", extra={"worker": self.name})
                stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self._leave()
        log.info("worker stopped", extra={"worker": self.name, "handled": self.handled})
        return self.handled

    def close(self) -> None:
        """Close the job loop's Redis client and its connections (`run_worker` does, once it returns)."""
        self.client.close()

    def _next_jobs(self) -> list[tuple[bytes, dict]]:
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + min(self.claim_idle / 2, 5.0)
            claimed = self._reclaim()
            if claimed:
                self._next_claim = 0.0
                return claimed
        got = self.client.xreadgroup(self.names.group, self.name, {self.names.stream: ">"}, count=1,
                                     block=int(BLOCK_SECONDS * 1000))
        return [(i, f) for _, entries in got or [] for i, f in entries if f is not None]

    def _reclaim(self) -> list[tuple[bytes, dict]]:
        """Take over one job left idle by another consumer; give up on jobs that keep killing workers."""
        cursor, entries, *_ = self.client.xautoclaim(self.names.stream, self.names.group, self.name,
                                                     int(self.claim_idle * 1000), self._cursor, count=1)
        self._cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        jobs = []
        for entry_id, fields in entries:
            if entry_id is None or not fields:
                continue
            log.warning("reclaimed job", extra={"worker": self.name, "entry": entry_id.decode()})
            info = self.client.xpending_range(self.names.stream, self.names.group, entry_id, entry_id, 1)
            if info and info[0]["times_delivered"] > MAX_DELIVERIES:
                error = UnavailableError(f"this request failed on {MAX_DELIVERIES} workers; not retried")
                request_id = fields.get(b"id", b"").decode(errors="replace")
                self._answer(entry_id, request_id, self._now(), encode_result(error=error))
                continue
            jobs.append((entry_id, fields))
        return jobs

    def _handle(self, entry_id: bytes, fields: dict) -> None:
        try:
            request_id = fields[b"id"].decode()
            deadline = int(entry_id.split(b"-")[0]) / 1000 + float(fields[b"timeout"])
        except (KeyError, ValueError, UnicodeDecodeError):
            log.warning("malformed job dropped", extra={"worker": self.name, "entry": entry_id.decode()})
            self._ack(entry_id)
            return
        extra = {"worker": self.name, "request_id": request_id}
        if self.client.exists(self.names.done(request_id)):
            self._ack(entry_id)
            return
        if self._now() > deadline:
            self.client.hincrby(self.names.stats, "expired", 1)
            log.warning("job expired before evaluation", extra=extra)
            self._ack(entry_id)
            return
        stop = threading.Event()
        keeper = threading.Thread(target=self._keep, args=(entry_id, stop), daemon=True)
        keeper.start()
        try:
            answer = self._evaluate(fields, extra)
        finally:
            stop.set()
            keeper.join()
        self._answer(entry_id, request_id, deadline, answer)
        self.handled += 1

    def _now(self) -> float:
        """Redis server time: job deadlines come from stream ids, so worker clocks do not matter."""
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def _evaluate(self, fields: dict, extra: dict) -> bytes:
        start = time.perf_counter()
        try:
            name, version = fields[b"name"].decode(), int(fields[b"version"])
            key = self.service.key_record(fields[b"key_id"].decode())
            if key is None:
                raise NotFoundError("unknown key id: register the public bundle first")
            record = self.service.record(name, version)
            answer = encode_result(version, self.service.evaluate(record, key, fields[b"payload"]))
            log.info("evaluated", extra=dict(extra, model=name, version=version,
                                             ms=round((time.perf_counter() - start) * 1e3, 2)))
            return answer
        except redis.RedisError:
            raise
        except Exception as exc:
            log.info("evaluation failed", extra=dict(extra, error=type(exc).__name__),
                     exc_info=not isinstance(exc, VeilError))
            return encode_result(error=exc)

    def _answer(self, entry_id: bytes, request_id: str, deadline: float, answer: bytes) -> None:
        ttl = max(0.0, deadline - self._now()) + RESULT_GRACE
        if not post_result(self.client, self.names, request_id, answer, int(ttl), self.name):
            log.info("duplicate answer dropped", extra={"worker": self.name, "request_id": request_id})
        self._ack(entry_id)

    def _ack(self, entry_id: bytes) -> None:
        """Acknowledge and delete: the stream only ever holds jobs not yet answered."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.names.stream, self.names.group, entry_id)
        pipe.xdel(self.names.stream, entry_id)
        pipe.execute()

    def _keep(self, entry_id: bytes, stop: threading.Event) -> None:
        """While evaluating, reset the job's idle time so live workers are not robbed of their job."""
        while not stop.wait(self.claim_idle / 3):
            with contextlib.suppress(redis.RedisError):
                self.client.xclaim(self.names.stream, self.names.group, self.name, 0, [entry_id], justid=True)

    def _leave(self) -> None:
        """Remove this consumer from the group if it holds no pending job (else others reclaim them)."""
        with contextlib.suppress(redis.RedisError):
            if not self.client.xpending_range(self.names.stream, self.names.group, "-", "+", 1, self.name):
                self.client.xgroup_delconsumer(self.names.stream, self.names.group, self.name)


def _cipher(config: ServerConfig, broker: KeyBrokerOptions | None = None) -> Any:
    """The front ends' model key; a worker never creates one (it could not read any model). With
    `config.attest` (or `attest_provider`) it comes by key release from `broker`, and a key in the
    environment or a file is refused: it would make the attestation pointless."""
    from veil.serve.tee_setup import collateral_source, evidence_provider

    provider = evidence_provider(config)
    if provider is None:
        has_key = (config.model_key_file or os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV)
                   or (Path(config.data_dir) / "model.key").exists())
        if not has_key:
            raise SystemExit("veil worker needs the front ends' model key: set VEIL_MODEL_KEY, "
                             "VEIL_MODEL_KEY_FILE or --model-key-file, or attest (--attest PLATFORM --key-broker URL)")
        return load_cipher(config)
    if config.model_key_file or os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV):
        raise ValueError("an attesting worker gets the model key by key release: unset VEIL_MODEL_KEY, "
                         "VEIL_MODEL_KEY_FILE and --model-key-file")
    if broker is None:
        raise ValueError("an attesting worker needs --key-broker URL and a worker token "
                         f"({BROKER_TOKEN_ENV} or --key-broker-token-file)")
    from veil.serve.attested import request_model_key
    from veil.serve.client import tls_context

    collateral = collateral_source(config)
    with collateral if collateral is not None else contextlib.nullcontext():
        key = request_model_key(broker.url, broker.token, provider, verify=tls_context(broker.ca or True),
                                collateral=collateral)
    log.info("model key released to this worker", extra={"platform": provider.platform, "broker": broker.url})
    return ArtefactCipher(key)


def run_worker(config: ServerConfig, name: str | None = None, claim_idle: float = DEFAULT_CLAIM_IDLE,
               stop_event: threading.Event | None = None, max_jobs: int | None = None,
               broker: KeyBrokerOptions | None = None) -> int:
    """Serve jobs from `config.queue` until SIGTERM/SIGINT, `stop_event` or `max_jobs`.
    Returns the number of jobs evaluated. An attesting worker (`config.attest`) first obtains the
    model key from `broker` and raises `veil.tee.KeyReleaseError` if it is refused. However it ends
    (stopped, a signal, an error), the Redis clients of its store and of its job loop are closed."""
    if not config.queue:
        raise ValueError("a worker needs a queue URL (--queue redis://...)")
    with contextlib.ExitStack() as closing:
        store = RedisStore(config.queue)
        closing.callback(store.close)
        worker = Worker(config.queue, Service(store, _cipher(config, broker)), name=name, claim_idle=claim_idle)
        closing.callback(worker.close)
        return _serve(worker, stop_event or threading.Event(), max_jobs)


def _serve(worker: Worker, stop: threading.Event, max_jobs: int | None) -> int:
    """`worker.run` with SIGTERM/SIGINT setting `stop` (in the main thread), the handlers restored after."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def _stop(signum: int, _frame: Any) -> None:
            log.info("stopping after the current job", extra={"worker": worker.name, "signal": signum})
            stop.set()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _stop)
    try:
        return worker.run(stop, max_jobs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_from_args(args: argparse.Namespace) -> int:
    """Run a worker from the options `add_worker_options` defines (a process of its own, which keeps
    freed memory for the next job: `veil.program.parallel.tune_allocator`); exit status 2 on an error."""
    configure_logging(args.log_level)
    config = ServerConfig(queue=args.queue, model_key_file=args.model_key_file, data_dir=args.data_dir,
                          log_level=args.log_level, attest=args.attest, attest_provider=args.attest_provider,
                          dcap_collateral=args.dcap_collateral, pccs_url=args.pccs_url)
    tune_allocator()
    try:
        run_worker(config, name=args.name, claim_idle=args.claim_idle, max_jobs=args.max_jobs,
                   broker=broker_options(args))
    except (VeilError, ValueError, OSError) as exc:
        print(f"veil worker: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of `veil worker` (the same options as the `veil` command's)."""
    parser = argparse.ArgumentParser(prog="veil worker", description=__doc__.splitlines()[0])
    add_worker_options(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
