"""RedisStore on a real Sentinel setup (a primary, its replica, a Sentinel): shared state
as on one server, and a forced failover that no caller of a guarded call notices."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis

from callpolicy import (
    Budget,
    BudgetExceededError,
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    ResponseCache,
)
from callpolicy.redis import RedisStore
from tests.support import redis_workers, sentinel_workers
from tests.support.redis_cluster import SentinelGroup

KEY = redis_workers.KEY
SPAWN = multiprocessing.get_context("spawn")

MakeSentinelStore = Callable[..., RedisStore]


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    started = SentinelGroup()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def make_store(group: SentinelGroup, prefix: str) -> AsyncIterator[MakeSentinelStore]:
    """``RedisStore.from_sentinel`` (this test's prefix unless given), closed with
    ``aclose()`` when the test ends."""
    made: list[RedisStore] = []

    def make(**options: Any) -> RedisStore:
        options.setdefault("prefix", prefix)
        options.setdefault("socket_timeout", 5.0)  # a loaded CI machine: no false outage
        store = RedisStore.from_sentinel(group.sentinels, group.service, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


def down() -> str:
    raise ConnectionError("connection refused")


def _primary_client(group: SentinelGroup) -> redis.Redis:
    host, port = group.primary()
    return redis.Redis(host=host, port=port, socket_timeout=2)


def test_a_trip_in_one_process_is_seen_by_another_through_the_sentinel(
    group: SentinelGroup, prefix: str, make_store: MakeSentinelStore
) -> None:
    results = SPAWN.Queue()
    process = SPAWN.Process(
        target=sentinel_workers.fail_n_times,
        args=(group.sentinels, group.service, prefix, 3, results),
    )
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert results.get(timeout=10) == "open"
    with pytest.raises(CircuitOpenError) as refused:
        CallPolicy(store=make_store()).execute(KEY, lambda: "never")
    assert refused.value.failures == 3
    with _primary_client(group) as primary:
        assert primary.hget(f"{prefix}:cb:{{{KEY}}}", "state") == b"open"


def test_half_open_probes_budgets_and_cache_are_shared(
    group: SentinelGroup, prefix: str, make_store: MakeSentinelStore
) -> None:
    stores = [make_store() for _ in range(4)]  # as four processes: their own connections
    policies = [CallPolicy(store=s, failure_threshold=1, half_open_max_calls=1) for s in stores]
    with pytest.raises(ConnectionError):
        policies[0].execute(KEY, down)
    with _primary_client(group) as primary:
        primary.hset(f"{prefix}:cb:{{{KEY}}}", "open_until", 0)  # the cooldown is over

    # Half-open: one probe at a time across every store.
    release = threading.Event()
    seen: list[str] = []

    def probe(policy: CallPolicy) -> None:
        def model() -> str:
            seen.append("called")
            release.wait(30)
            return "ok"

        try:
            policy.execute(KEY, model)
        except CircuitOpenError:
            seen.append("refused")

    threads = [threading.Thread(target=probe, args=(p,)) for p in policies]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(seen) < len(threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join()
    assert sorted(seen) == ["called", "refused", "refused", "refused"]
    assert policies[1].state(KEY) is CircuitState.CLOSED

    # An exact budget: 40 threads over four stores, 10 calls.
    budgets = [Budget(max_calls=10, store=s.budget_store()) for s in stores]
    granted: list[int] = []
    barrier = threading.Barrier(40)

    def spend(budget: Budget) -> None:
        barrier.wait()
        try:
            reservation = budget.reserve(KEY, 1)
        except BudgetExceededError:
            return
        budget.commit(reservation, None)
        granted.append(1)

    spenders = [threading.Thread(target=spend, args=(budgets[i % 4],)) for i in range(40)]
    for thread in spenders:
        thread.start()
    for thread in spenders:
        thread.join()
    assert len(granted) == 10
    assert budgets[3].usage().calls == 10

    # A cached answer: stored through one store, a hit through another.
    ResponseCache(backend=stores[0]).backend.set("question", '{"text": "4"}', ttl=60)
    assert ResponseCache(backend=stores[1]).backend.get("question") == '{"text": "4"}'


async def test_async_calls_go_through_the_sentinels_primary(
    group: SentinelGroup, prefix: str, make_store: MakeSentinelStore
) -> None:
    policy = CallPolicy(store=make_store(), failure_threshold=2)

    async def afail() -> str:
        raise ConnectionError("connection refused")

    assert await asyncio.gather(*(policy.aexecute(KEY, _aok) for _ in range(10))) == ["ok"] * 10
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await policy.aexecute(KEY, afail)
    with pytest.raises(CircuitOpenError):
        await policy.aexecute(KEY, _aok)
    with _primary_client(group) as primary:
        assert primary.hget(f"{prefix}:cb:{{{KEY}}}", "state") == b"open"


async def _aok() -> str:
    return "ok"


def test_from_sentinel_checks_its_arguments(group: SentinelGroup) -> None:
    with pytest.raises(ValueError, match="sentinels"):
        RedisStore.from_sentinel([], group.service)
    with pytest.raises(ValueError, match="service_name"):
        RedisStore.from_sentinel(group.sentinels, "")
    with pytest.raises(ValueError, match="max_connections"):
        RedisStore.from_sentinel(group.sentinels, group.service, max_connections=0)


def test_a_forced_failover_reaches_no_caller_and_shared_state_resumes_on_the_new_primary(
    group: SentinelGroup,
    prefix: str,
    make_store: MakeSentinelStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Calls from 4 threads (sync) and an event loop (async) run through a forced
    failover: each gets its model's answer or error, or a breaker decision — never a
    Redis error. Afterwards the circuits, budget and cache live on the new primary."""
    store = make_store(backoff_base=0.05, backoff_max=0.2)
    policy = CallPolicy(store=store, failure_threshold=1_000_000)
    budget = Budget(max_calls=1_000_000, store=store.budget_store())
    cache = ResponseCache(backend=store)
    stop = threading.Event()
    unexpected: list[BaseException] = []
    calls = [0]

    def model() -> str:
        return "ok"

    def sync_caller(index: int) -> None:
        while not stop.is_set():
            try:
                reservation = budget.reserve(KEY, 1)
                assert policy.execute(f"{KEY}-{index}", model) == "ok"
                budget.commit(reservation, None)
                cache.get(f"q{index}")
                with pytest.raises(ConnectionError):
                    policy.execute(f"{KEY}-{index}", down)
                calls[0] += 2
            except BaseException as exc:
                unexpected.append(exc)
                return

    async def async_callers() -> None:
        async def one(index: int) -> None:
            while not stop.is_set():
                try:
                    assert await policy.aexecute(f"{KEY}-a{index}", _aok) == "ok"
                    calls[0] += 1
                except BaseException as exc:
                    unexpected.append(exc)
                    return
                await asyncio.sleep(0)

        await asyncio.gather(*(one(i) for i in range(4)))

    threads = [threading.Thread(target=sync_caller, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=lambda: asyncio.run(async_callers())))
    old = group.primary()
    with caplog.at_level(logging.INFO, logger="callpolicy.redis"):
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.3)  # calls in flight on the old primary
            new = group.failover()
            time.sleep(1.0)  # and on through the switch
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert unexpected == []
        assert calls[0] > 0
        assert new != old

        # Shared state resumes on the new primary: a trip lands there.
        deadline = time.monotonic() + 20
        tripping = CallPolicy(store=store, failure_threshold=1)
        host, port = new
        with redis.Redis(host=host, port=port, socket_timeout=2) as promoted:
            while promoted.hget(f"{prefix}:cb:{{{KEY}}}", "state") != b"open":
                assert time.monotonic() < deadline, "the store never reached the new primary"
                tripping.reset(KEY)
                with pytest.raises(ConnectionError):
                    tripping.execute(KEY, down)
                time.sleep(0.05)
            assert budget.usage().calls > 0  # read from the new primary
        assert make_store().shared_keys()  # inspection too
