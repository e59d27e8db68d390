"""The `redis` serving backend: registries shared in Redis, predictions queued for `veil worker`.

Any number of front ends (`veil serve --backend redis --queue URL`) and workers (`veil worker
--queue URL`, `veil.serve.worker`), on any machines, share one Redis. `RedisStore` is the `Store`;
`RedisExecutor` is the `Executor` of a front end: it authorises the request, puts it on a stream and
waits for the one answer a worker posts; `RedisNonceStore` shares the key-release nonces of the
front ends (`veil.tee.NonceStore`); `RedisBackend` makes the three from a server configuration.

Layout under a prefix (default ``veil:``; `RedisKeyNames` spells every name):

* ``key:<key_id>``: hash of a registered public bundle; ``usage:<owner>``: hash of the owner's
  bundle count and bytes (for quotas); ``key-id-secret``: the secret of key ids (made once, SET NX,
  see `veil.serve.backends.base`); ``models``: set of model names; ``model:<name>:versions``:
  sorted set of versions; ``model:<name>:<version>``: hash of one version; ``model:<name>:reserved``:
  the last version handed out (versions are reserved before the artefacts are sealed to them).
* ``jobs``: the request stream, consumed by the group ``workers``; entries are deleted once answered
  (or given up by their front end), so it holds only jobs in flight and needs no MAXLEN. A job expires
  `timeout` seconds after its stream id (Redis server time, so host clocks do not matter).
* ``result:<request id>``: a list receiving the single answer; ``done:<request id>``: the marker set
  (SET NX) by whoever answers first, a worker or the front end giving up, so a request answers once.
* ``stats``: counters (answered, duplicates, timeouts, expired) for operations and tests.
* ``tee:nonce:<hex>``: an outstanding key-release nonce (value: the worker it was issued to, expiring
  with the nonce); ``tee:nonces``: sorted set of them by deadline, which bounds how many are kept
  (`RedisNonceStore`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from starlette.concurrency import run_in_threadpool

from veil.serve.backends.base import (
    MAX_VERSION,
    KeyQuota,
    KeyRecord,
    ModelRecord,
    check_key_conflict,
    check_version,
    last_version_error,
    legacy_key_id,
    new_key_id_secret,
)
from veil.serve.errors import ConflictError, QuotaExceededError, ServeError, UnavailableError, error_fields

if TYPE_CHECKING:
    from veil.serve.auth import Principal
    from veil.serve.server import ServerConfig
    from veil.serve.service import Service

log = logging.getLogger("veil.serve")
DEFAULT_PREFIX = "veil:"
RESULT_GRACE = 300
WAIT_SLICE = 5.0

_PUT_KEY = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('HGET', KEYS[3], 'owner') == ARGV[1] then return 2 end
local count = tonumber(redis.call('HGET', KEYS[2], 'count') or '0')
local used = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
local size = string.len(ARGV[5])
if ARGV[6] ~= '' and count + 1 > tonumber(ARGV[6]) then return {-1, count, used} end
if ARGV[7] ~= '' and used + size > tonumber(ARGV[7]) then return {-1, count, used} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'params', ARGV[2], 'rotation_steps', ARGV[3],
           'created', ARGV[4], 'bundle', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'count', 1)
redis.call('HINCRBY', KEYS[2], 'bytes', size)
return 1
"""

_DELETE_KEY = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local size = redis.call('HSTRLEN', KEYS[1], 'bundle')
redis.call('DEL', KEYS[1])
redis.call('HINCRBY', KEYS[2], 'count', -1)
redis.call('HINCRBY', KEYS[2], 'bytes', -size)
return 1
"""

_RESERVE_VERSION = """
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local v = 0
if top[2] then v = tonumber(top[2]) end
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
if reserved > v then v = reserved end
v = v + 1
if v > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], v)
return v
"""

_PUT_MODEL = """
local v
if ARGV[3] == '' then
  local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if top[2] then v = tonumber(top[2]) + 1 else v = 1 end
  if v > tonumber(ARGV[8]) then return -1 end
else
  v = tonumber(ARGV[3])
  if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 0 end
end
redis.call('HSET', ARGV[1] .. v, 'created', ARGV[4], 'meta', ARGV[5], 'server', ARGV[6], 'client', ARGV[7])
redis.call('ZADD', KEYS[1], v, v)
redis.call('SADD', KEYS[2], ARGV[2])
return v
"""

_POST_RESULT = """
if redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('HINCRBY', KEYS[3], 'answered', 1)
  return 1
end
redis.call('HINCRBY', KEYS[3], 'duplicates', 1)
return 0
"""


_ISSUE_NONCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
while redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) do
  local oldest = redis.call('ZPOPMIN', KEYS[1])
  redis.call('DEL', ARGV[4] .. oldest[1])
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[5])
return 1
"""

_CONSUME_NONCE = """
local owner = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
if not owner then return 0 end
if owner ~= ARGV[2] then return -1 end
return 1
"""


@dataclass(frozen=True)
class RedisKeyNames:
    """Redis key names under one prefix, shared by front ends and workers."""

    prefix: str = DEFAULT_PREFIX

    @property
    def stream(self) -> str:
        return self.prefix + "jobs"

    @property
    def group(self) -> str:
        return self.prefix + "workers"

    @property
    def stats(self) -> str:
        return self.prefix + "stats"

    @property
    def model_names(self) -> str:
        return self.prefix + "models"

    @property
    def key_id_secret(self) -> str:
        return self.prefix + "key-id-secret"

    def key(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}"

    def versions(self, name: str) -> str:
        return f"{self.prefix}model:{name}:versions"

    def model(self, name: str, version: int | str = "") -> str:
        return f"{self.prefix}model:{name}:{version}"

    def reserved(self, name: str) -> str:
        return f"{self.prefix}model:{name}:reserved"

    def usage(self, owner: str) -> str:
        return f"{self.prefix}usage:{owner}"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}result:{request_id}"

    def done(self, request_id: str) -> str:
        return f"{self.prefix}done:{request_id}"

    @property
    def tee_nonces(self) -> str:
        return self.prefix + "tee:nonces"

    def tee_nonce(self, nonce_hex: str = "") -> str:
        return f"{self.prefix}tee:nonce:{nonce_hex}"


def connect(url: str, socket_timeout: float | None = 30.0) -> redis.Redis:
    """A sync client with short, bounded reconnect retries (readiness must not hang)."""
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5,
                                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))


class RemoteError(ServeError):
    """An error raised by a worker, re-raised by the front end with the worker's status and code."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code = status, code


def encode_result(version: int | None = None, body: bytes = b"", error: BaseException | None = None) -> bytes:
    """A worker's answer: one JSON header line, then the response bytes."""
    if error is None:
        header: dict[str, Any] = {"ok": True, "version": version}
    else:
        status, code, detail = error_fields(error)
        header = {"ok": False, "status": status, "code": code, "detail": detail}
    return json.dumps(header).encode() + b"\n" + body


def decode_result(data: bytes) -> tuple[int, bytes]:
    """(version, response) from a worker's answer, or raise its error as a `RemoteError`."""
    head, _, body = data.partition(b"\n")
    header = json.loads(head)
    if not header.get("ok"):
        raise RemoteError(int(header["status"]), str(header["code"]), str(header["detail"]))
    return int(header["version"]), body


def post_result(client: redis.Redis, names: RedisKeyNames, request_id: str, answer: bytes, ttl: int,
                by: str) -> bool:
    """Deliver an answer unless the request was already answered; True if this one was delivered."""
    script = client.register_script(_POST_RESULT)
    posted = script(keys=[names.done(request_id), names.result(request_id), names.stats],
                    args=[answer, max(1, int(ttl)), by])
    return bool(posted)


class RedisStore:
    """`Store` in Redis, shared by every front end and worker; see the module docstring for the layout."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.names = RedisKeyNames(prefix)
        self.client = connect(url)
        self._put_key = self.client.register_script(_PUT_KEY)
        self._delete_key = self.client.register_script(_DELETE_KEY)
        self._reserve = self.client.register_script(_RESERVE_VERSION)
        self._put_model = self.client.register_script(_PUT_MODEL)
        self._secret: bytes | None = None

    def ping(self) -> None:
        self.client.ping()

    def key_id_secret(self) -> bytes:
        """The secret of key ids, shared by every front end: the first to ask makes it (SET NX)."""
        if self._secret is None:
            self.client.set(self.names.key_id_secret, new_key_id_secret(), nx=True)
            self._secret = bytes(self.client.get(self.names.key_id_secret))
        return self._secret

    def put_key(self, record: KeyRecord, quota: KeyQuota | None = None, attempts: int = 3) -> KeyRecord:
        """One Lua script: return the owner's record of this bundle if it exists (under this id or
        its legacy one), else insert within the owner's quota; exact under any concurrency."""
        quota = quota or KeyQuota()
        limits = ["" if v is None else str(int(v)) for v in (quota.max_keys, quota.max_bytes)]
        legacy = legacy_key_id(record.bundle)
        for _ in range(attempts):
            got = self._put_key(keys=[self.names.key(record.key_id), self.names.usage(record.owner),
                                      self.names.key(legacy)],
                                args=[record.owner, record.params, json.dumps(list(record.rotation_steps)),
                                      repr(record.created), record.bundle, *limits])
            if isinstance(got, list):
                quota.check(int(got[1]), int(got[2]), len(record.bundle))
                raise QuotaExceededError("key quota reached")
            if got == 1:
                return record
            existing = check_key_conflict(self.get_key(record.key_id if got == 0 else legacy), record)
            if existing is not None:
                return existing
        raise UnavailableError("the key registry changed during registration; try again")

    def delete_key(self, key_id: str, owner: str) -> bool:
        """Delete `owner`'s bundle and give back its quota; False if there is no such bundle of theirs."""
        return bool(self._delete_key(keys=[self.names.key(key_id), self.names.usage(owner)], args=[owner]))

    def reserve_version(self, name: str) -> int:
        """The next version of `name`, never handed out twice across front ends."""
        got = int(self._reserve(keys=[self.names.versions(name), self.names.reserved(name)], args=[MAX_VERSION]))
        if not got:
            raise last_version_error(name)
        return got

    def key_owner(self, key_id: str) -> str | None:
        """The owner of a registered bundle, without fetching the (possibly large) bundle."""
        owner = self.client.hget(self.names.key(key_id), "owner")
        return None if owner is None else owner.decode()

    def get_key(self, key_id: str) -> KeyRecord | None:
        fields = ["owner", "params", "rotation_steps", "created", "bundle"]
        row = self.client.hmget(self.names.key(key_id), fields)
        if row[0] is None:
            return None
        return KeyRecord(key_id, row[0].decode(), row[1].decode(), tuple(json.loads(row[2])), float(row[3]),
                         bytes(row[4]))

    def put_model(self, name: str, version: int | None, meta: dict, server_blob: bytes,
                  client_blob: bytes) -> ModelRecord:
        """Version numbering is one Lua script, so concurrent deploys never share a version."""
        created = time.time()
        wanted = "" if version is None else str(check_version(version))
        got = self._put_model(keys=[self.names.versions(name), self.names.model_names],
                              args=[self.names.model(name), name, wanted, repr(created), json.dumps(meta), server_blob,
                                    client_blob, MAX_VERSION])
        if got == -1:
            raise last_version_error(name)
        if not got:
            raise ConflictError(f"model {name!r} version {version} already exists")
        return ModelRecord(name, int(got), created, meta, server_blob, client_blob)

    def resolve_version(self, name: str, version: int | None = None) -> int | None:
        """The version a request for (name, version) would use, without fetching the artefacts."""
        if version is None:
            top = self.client.zrevrange(self.names.versions(name), 0, 0)
            return int(top[0]) if top else None
        return version if self.client.zscore(self.names.versions(name), str(version)) is not None else None

    def get_model(self, name: str, version: int | None = None) -> ModelRecord | None:
        resolved = self.resolve_version(name, version)
        if resolved is None:
            return None
        row = self.client.hmget(self.names.model(name, resolved), ["created", "meta", "server", "client"])
        if row[0] is None:
            return None
        return ModelRecord(name, resolved, float(row[0]), json.loads(row[1]), bytes(row[2]), bytes(row[3]))

    def list_models(self) -> list[ModelRecord]:
        names = sorted(n.decode() for n in self.client.smembers(self.names.model_names))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.zrange(self.names.versions(name), 0, -1)
        pairs = [(name, int(v)) for name, versions in zip(names, pipe.execute(), strict=True)
                 for v in versions]
        pipe = self.client.pipeline(transaction=False)
        for name, version in pairs:
            pipe.hmget(self.names.model(name, version), ["created", "meta"])
        rows = pipe.execute()
        return [ModelRecord(name, version, float(row[0]), json.loads(row[1]))
                for (name, version), row in zip(pairs, rows, strict=True) if row[0] is not None]

    def close(self) -> None:
        """Close the Redis client and its connections."""
        self.client.close()


class RedisExecutor:
    """Authorises here, queues the evaluation on the Redis stream, and waits for one worker's answer."""

    def __init__(self, url: str, service: Service, timeout: float = 120.0,
                 prefix: str = DEFAULT_PREFIX) -> None:
        self.service, self.timeout, self.names = service, timeout, RedisKeyNames(prefix)
        self._sync = connect(url, socket_timeout=5.0)
        self._async = aioredis.Redis.from_url(url, socket_timeout=WAIT_SLICE + 10, socket_connect_timeout=5,
                                              retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 2))

    def check(self) -> None:
        self._sync.ping()

    async def predict(self, principal: Principal, name: str, version: int | None, key_id: str,
                      payload: bytes) -> tuple[int, bytes]:
        """Fail fast with 4xx here; otherwise queue the job and return the worker's answer or error."""
        try:
            resolved = await run_in_threadpool(self.service.authorise, principal, name, version, key_id)
        except redis.RedisError as exc:
            raise UnavailableError(f"the registry is unreachable: {type(exc).__name__}") from None
        request_id = uuid.uuid4().hex
        fields = {"id": request_id, "name": name, "version": str(resolved), "key_id": key_id,
                  "timeout": repr(self.timeout), "payload": payload}
        try:
            entry_id = await self._async.xadd(self.names.stream, fields)
        except redis.RedisError as exc:
            raise UnavailableError(f"the queue is unreachable: {type(exc).__name__}") from None
        log.debug("queued", extra={"request_id": request_id, "model": name, "version": resolved})
        return decode_result(await self._wait(request_id, entry_id))

    async def _wait(self, request_id: str, entry_id: bytes) -> bytes:
        """BLPOP in slices until the deadline; on timeout, claim the answer slot so no late answer is
        delivered (and drop the job), unless a worker got there first."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        result = self.names.result(request_id)
        while (remaining := end - loop.time()) > 0:
            try:
                got = await self._async.blpop([result], timeout=max(0.01, min(remaining, WAIT_SLICE)))
            except redis.RedisError:
                await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))
                continue
            if got is not None:
                return got[1]
        try:
            if await self._async.set(self.names.done(request_id), b"timeout", nx=True, ex=RESULT_GRACE):
                await self._async.xdel(self.names.stream, entry_id)
                await self._async.hincrby(self.names.stats, "timeouts", 1)
            else:
                got = await self._async.lpop(result)
                if got is not None:
                    return got
        except redis.RedisError:
            pass
        log.warning("queue timeout", extra={"request_id": request_id, "timeout": self.timeout})
        raise UnavailableError(f"no worker answered within {self.timeout:g}s; are `veil worker` processes "
                               "running against this queue?")

    async def aclose(self) -> None:
        """Close both Redis clients (the readiness one and the queue's) and their connections."""
        await self._async.aclose()
        self._sync.close()


class RedisNonceStore:
    """Key-release nonces shared by every front end of a Redis cluster (`veil.tee.NonceStore`).

    Any front end may answer a challenge another one issued (a load balancer need not be sticky),
    and still only once: consuming is one Lua script (GET, DEL), so two front ends racing with the
    same nonce cannot both succeed. Lifetimes are Redis key expiries (Redis's clock, not the front
    ends'); at most `max_pending` nonces are kept, the oldest forgotten first. A front end that
    cannot reach Redis refuses (503) rather than falling back to memory.
    """

    def __init__(self, url: str, ttl: float = 60.0, max_pending: int = 4096, prefix: str = DEFAULT_PREFIX) -> None:
        if ttl <= 0 or max_pending < 1:
            raise ValueError("nonce ttl and max_pending must be positive")
        self.ttl, self.max_pending, self.names = ttl, max_pending, RedisKeyNames(prefix)
        self.client = connect(url, socket_timeout=5.0)
        self._issue = self.client.register_script(_ISSUE_NONCE)
        self._consume = self.client.register_script(_CONSUME_NONCE)

    def issue(self, nonce: bytes, owner: str) -> None:
        try:
            self._issue(keys=[self.names.tee_nonces, self.names.tee_nonce(nonce.hex())],
                        args=[owner, max(1, int(self.ttl * 1000)), self.max_pending, self.names.tee_nonce(),
                              nonce.hex()])
        except redis.RedisError as exc:
            raise UnavailableError(f"the nonce store is unreachable: {type(exc).__name__}") from None

    def consume(self, nonce: bytes, owner: str) -> None:
        from veil.tee import NonceError

        try:
            got = self._consume(keys=[self.names.tee_nonces, self.names.tee_nonce(nonce.hex())],
                                args=[nonce.hex(), owner])
        except redis.RedisError as exc:
            raise UnavailableError(f"the nonce store is unreachable: {type(exc).__name__}") from None
        if got == 0:
            raise NonceError("nonce is unknown, was already used or expired")
        if got == -1:
            raise NonceError("nonce was issued to another worker")

    def close(self) -> None:
        """Close the Redis client and its connections."""
        self.client.close()


def check_redis_persistence(client: redis.Redis) -> bool:
    """Warn at start-up when Redis would lose the registries on restart (no AOF, no RDB snapshots):
    models and keys live only in Redis in cluster mode. True if some persistence is on."""
    try:
        aof = client.config_get("appendonly").get("appendonly", "")
        save = client.config_get("save").get("save", "")
    except redis.RedisError as exc:  # CONFIG renamed or forbidden by an ACL, or Redis not up yet
        log.warning("cannot read Redis persistence settings; make sure appendonly or "
                    "save is on, or every model and key is lost when Redis restarts",
                    extra={"error": str(exc)[:200]})
        return False
    if aof != "yes" and not save.strip():
        log.warning("Redis has no persistence (appendonly no, save \"\"): a Redis restart loses every "
                    "deployed model and registered key, and clients get 404 until they are redeployed; "
                    "set appendonly yes (see docs/serving.md, A cluster on Redis)",
                    extra={"appendonly": aof, "save": save})
        return False
    if aof != "yes":
        log.warning("Redis persists by RDB snapshots only: models and keys written since the last snapshot "
                    "are lost if Redis stops; appendonly yes is safer", extra={"save": save})
    return True


class RedisBackend:
    """`Backend` of a cluster: every part in the Redis at `config.queue`."""

    name = "redis"

    def store(self, config: ServerConfig) -> RedisStore:
        """The shared registries; warns if this Redis would lose them on restart."""
        store = RedisStore(_url(config))
        check_redis_persistence(store.client)
        return store

    def executor(self, config: ServerConfig, service: Service) -> RedisExecutor:
        """Predictions queued for workers, each waited for at most `config.queue_timeout` seconds."""
        return RedisExecutor(_url(config), service, timeout=config.queue_timeout)

    def nonce_store(self, config: ServerConfig) -> RedisNonceStore:
        """Key-release nonces shared by every front end, living `config.nonce_ttl` seconds."""
        return RedisNonceStore(_url(config), ttl=config.nonce_ttl)


def _url(config: ServerConfig) -> str:
    if not config.queue:
        raise ValueError("the redis backend needs a Redis URL: --queue redis://host:6379/0 (rediss:// for TLS)")
    return config.queue


BACKEND = RedisBackend()
