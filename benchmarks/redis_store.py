"""Figure 7: guarded calls per second through ``RedisStore`` on one loopback Redis, next to
the in-memory store, and where the time of one call goes (round trip, Lua, redis-py).

A guarded call on a closed circuit with a clean record is one round trip (the ``admit``
script; the success needs none). With ``failure_rate_threshold`` set, every outcome is
recorded too: two round trips. ``redis-server`` is started on a free loopback port
(``tests/support/redis_server.py``) and stopped at the end.

Every section checks with ``INFO commandstats`` that Redis ran the scripts: past 100
concurrent callers, redis-py 8's pool raises ``MaxConnectionsError``, which the store
takes for an outage (it then serves from local state), and in-memory speed would pass
for Redis throughput.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import redis
import redis.asyncio as aioredis

from callpolicy import CallPolicy
from callpolicy.redis import RedisStore, _scripts
from tests.support.redis_server import RedisServer

from ._harness import Result, ratio_rows

TARGET = 3_000  # guarded calls per second per process


def _model_call() -> int:
    return 1


async def _amodel_call() -> int:
    return 1


def _resp(*parts: bytes) -> bytes:
    """A command in the Redis protocol, as a client library would send it."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class _RawSocket:
    """The floor: the same ``admit`` script sent as pre-built bytes on a bare socket, no
    client library (what Redis and the network cost; the rest is Python)."""

    _CLOSED_REPLY = b"*5\r\n:1\r\n:0\r\n:0\r\n:0\r\n$0\r\n\r\n"  # RESP2: admitted, closed

    def __init__(self, port: int, sha: str, keys: list[str]) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ping = _resp(b"PING")
        self._admit = _resp(
            b"EVALSHA",
            sha.encode(),
            b"3",
            *(k.encode() for k in keys),
            b"1",
            b"60000",
            b"86400000",
            uuid.uuid4().hex.encode(),
        )
        if self._call(self._admit, len(self._CLOSED_REPLY)) != self._CLOSED_REPLY:
            raise RuntimeError("raw EVALSHA: unexpected reply")

    def _call(self, command: bytes, expected: int | None = None) -> bytes:
        self._sock.sendall(command)
        reply = self._sock.recv(4096)
        while expected is not None and len(reply) < expected:
            reply += self._sock.recv(4096)
        return reply

    def ping(self) -> None:
        self._call(self._ping, 7)  # +PONG\r\n

    def admit(self) -> None:
        self._call(self._admit, len(self._CLOSED_REPLY))

    def close(self) -> None:
        self._sock.close()


def _evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0))


def _check_served(client: redis.Redis, before: int, expected: int, what: str) -> None:
    """Fail unless Redis ran ``expected`` more scripts: a store that fell back to local
    state (it treats any connection error, pool exhaustion included, as an outage) would
    otherwise show in-memory speed as Redis throughput."""
    ran = _evalsha_calls(client) - before
    if ran < expected:
        raise AssertionError(
            f"{what}: Redis ran {ran} scripts for {expected} expected; the store fell back "
            "to local state (see the callpolicy.redis log)"
        )


def _throughput(seconds_for: Callable[[], float], calls: int, repeats: int) -> list[float]:
    return [calls / seconds_for() for _ in range(repeats)]


def _sync(server: RedisServer, quick: bool) -> list[Result]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(server.url, prefix=prefix)
    memory = CallPolicy()
    shared = CallPolicy(store=store)
    # failure_rate_threshold: the window needs every outcome, so a success is recorded too.
    windowed = CallPolicy(store=store, failure_rate_threshold=0.5)
    key = "bench::model"
    client = redis.Redis.from_url(server.url, socket_timeout=0.5)
    sha = client.script_load(_scripts.ADMIT)
    base = f"{prefix}:cb:{{raw::m}}"
    raw_keys = [base, f"{base}:probes", f"{base}:window"]
    raw = _RawSocket(server.port, sha, raw_keys)
    args = [1, 60_000, 86_400_000]

    def redis_py_evalsha() -> None:
        client.evalsha(sha, 3, *raw_keys, *args, uuid.uuid4().hex)

    loops, repeats = (300, 3) if quick else (2_000, 9)
    before = _evalsha_calls(client)
    try:
        timings = ratio_rows(
            {
                "memory": lambda: memory.execute(key, _model_call),
                "redis": lambda: shared.execute(key, _model_call),
                "windowed": lambda: windowed.execute("bench::windowed", _model_call),
                "raw_ping": raw.ping,
                "raw_admit": raw.admit,
                "redis_py": redis_py_evalsha,
            },
            loops=loops,
            repeats=repeats,
        )
        # ratio_rows warms each candidate up with loops // 10 calls. Scripts per call:
        # redis 1, windowed 2 (admit + record), raw_admit 1, redis_py 1.
        _check_served(client, before, (loops // 10 + loops * repeats) * 5, "one thread")
    finally:
        raw.close()
        client.close()
        store.close()
    per_s = {name: [1e9 / ns for ns in found] for name, found in timings.items()}
    us = {name: statistics.median(found) / 1000 for name, found in timings.items()}
    slower = [r / m for r, m in zip(timings["redis"], timings["memory"], strict=True)]
    over_raw = [r / a for r, a in zip(timings["redis"], timings["raw_admit"], strict=True)]
    redis_per_s = statistics.median(per_s["redis"])
    return [
        Result(
            "redis: guarded calls/s, one thread, RedisStore on loopback Redis",
            per_s["redis"],
            f">= {TARGET:,}/s",
            redis_per_s >= TARGET,
            f"absolute calls/s; {us['redis']:.0f} us per call (one round trip: admit); "
            f"in-memory store {statistics.median(per_s['memory']):,.0f}/s",
        ),
        Result(
            "redis: in-memory store calls/s / RedisStore calls/s",
            slower,
            "-",
            True,
            f"memory {us['memory'] * 1000:.0f} ns vs Redis {us['redis']:.0f} us per call",
            info=True,
        ),
        Result(
            "redis: guarded call / raw-socket EVALSHA of the same admit script",
            over_raw,
            "-",
            True,
            f"raw PING {us['raw_ping']:.0f} us, raw EVALSHA admit {us['raw_admit']:.0f} us, "
            f"redis-py evalsha {us['redis_py']:.0f} us, guarded {us['redis']:.0f} us",
            info=True,
        ),
        Result(
            "redis: guarded calls/s, failure_rate_threshold set (admit + record)",
            per_s["windowed"],
            "-",
            True,
            f"absolute calls/s; two round trips, {us['windowed']:.0f} us per call",
            info=True,
        ),
    ]


def _threads(server: RedisServer, quick: bool) -> Result:
    threads = 16
    per_thread = 60 if quick else 250
    store = RedisStore.from_url(server.url, prefix=f"bench-{uuid.uuid4().hex}")
    policy = CallPolicy(store=store)

    def work() -> None:
        for _ in range(per_thread):
            policy.execute("bench::model", _model_call)

    def seconds() -> float:
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            for future in [pool.submit(work) for _ in range(threads)]:
                future.result()
            return time.perf_counter() - start

    seconds()  # connections into the pool
    client = redis.Redis.from_url(server.url, socket_timeout=0.5)
    before = _evalsha_calls(client)
    repeats = 3 if quick else 5
    found = _throughput(seconds, threads * per_thread, repeats)
    _check_served(client, before, repeats * threads * per_thread, f"{threads} threads")
    client.close()
    store.close()
    return Result(
        f"redis: guarded calls/s, {threads} threads x {per_thread} execute",
        found,
        f">= {TARGET:,}/s",
        statistics.median(found) >= TARGET,
        "absolute calls/s, one process, a connection per thread",
    )


def _async(server: RedisServer, quick: bool) -> list[Result]:
    tasks = 64
    per_task = 30 if quick else 100
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(server.url, prefix=prefix)
    policy = CallPolicy(store=store)
    base = f"{prefix}:cb:{{raw::m}}"
    keys = [base, f"{base}:probes", f"{base}:window"]

    async def guarded() -> None:
        await policy.aexecute("bench::model", _amodel_call)

    async def measure() -> dict[str, list[float]]:
        # The baseline: the same admit script through redis.asyncio alone (same socket
        # timeout as the store's client), at the same concurrency.
        client = aioredis.Redis.from_url(server.url, socket_timeout=0.5)
        sha = await client.script_load(_scripts.ADMIT)

        async def bare() -> None:
            await client.evalsha(sha, 3, *keys, 1, 60_000, 86_400_000, uuid.uuid4().hex)

        async def storm(call: Callable[[], Awaitable[None]]) -> float:
            async def work() -> None:
                for _ in range(per_task):
                    await call()

            start = time.perf_counter()
            await asyncio.gather(*(work() for _ in range(tasks)))
            return tasks * per_task / (time.perf_counter() - start)

        candidates = {"guarded": guarded, "bare": bare}
        for call in candidates.values():
            await storm(call)  # connections opened (one redis.asyncio client per loop)
        found: dict[str, list[float]] = {name: [] for name in candidates}
        for repeat in range(repeats):
            order = list(candidates) if repeat % 2 == 0 else list(candidates)[::-1]
            for name in order:
                found[name].append(await storm(candidates[name]))
        await client.aclose()
        await store.aclose()
        return found

    checker = redis.Redis.from_url(server.url, socket_timeout=0.5)
    repeats = 3 if quick else 5
    before = _evalsha_calls(checker)
    found = asyncio.run(measure())
    _check_served(checker, before, 2 * (repeats + 1) * tasks * per_task, f"{tasks} tasks")
    checker.close()
    ratios = [g / b for g, b in zip(found["guarded"], found["bare"], strict=True)]
    return [
        Result(
            f"redis: guarded calls/s, {tasks} tasks x {per_task} aexecute on one loop",
            found["guarded"],
            f">= {TARGET:,}/s",
            statistics.median(found["guarded"]) >= TARGET,
            "absolute calls/s, redis.asyncio; 64 tasks stay under redis-py's default pool "
            "of 100 connections",
        ),
        Result(
            "redis: aexecute calls/s / bare redis.asyncio EVALSHA calls/s, same concurrency",
            ratios,
            "-",
            True,
            f"bare redis.asyncio: {statistics.median(found['bare']):,.0f} calls/s",
            info=True,
        ),
    ]


def run(*, quick: bool) -> list[Result]:
    server = RedisServer()
    try:
        return [*_sync(server, quick), _threads(server, quick), *_async(server, quick)]
    finally:
        server.stop()
