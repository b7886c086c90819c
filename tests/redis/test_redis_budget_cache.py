"""Budgets and the response cache on Redis: shared by every process, never overspent."""

from __future__ import annotations

import logging
import multiprocessing
import threading

import pytest
import redis

from callpolicy import Budget, BudgetExceededError, ResponseCache, Usage
from callpolicy.redis import BudgetUnavailableError
from tests.support import redis_workers
from tests.support.redis_server import MakeStore, RedisServer

KEY = redis_workers.KEY
SPAWN = multiprocessing.get_context("spawn")


def test_a_budget_is_shared_and_never_overspent_across_processes(
    redis_server: RedisServer, prefix: str, make_store: MakeStore
) -> None:
    results = SPAWN.Queue()
    workers = [
        SPAWN.Process(
            target=redis_workers.reserve_many, args=(redis_server.url, prefix, 8, results)
        )
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    granted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sum(granted) == 10  # 32 attempts from 4 processes, a 10-call budget
    budget = Budget(max_calls=10, store=make_store())
    assert budget.usage().calls == 10
    assert budget.usage().estimated_calls == 10


def test_100_threads_against_a_10_call_budget_get_exactly_10(make_store: MakeStore) -> None:
    budget = Budget(max_calls=10, store=make_store())
    barrier = threading.Barrier(100)
    granted: list[int] = []

    def caller() -> None:
        barrier.wait()
        try:
            budget.reserve(KEY, 1)
        except BudgetExceededError:
            return
        granted.append(1)

    threads = [threading.Thread(target=caller) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(granted) == 10


def test_tokens_and_cost_limits_and_usage_on_redis(make_store: MakeStore) -> None:
    store = make_store()
    budget = Budget(max_tokens=120, max_cost_usd=1.0, prices={"model-1": (1.0, 2.0)}, store=store)
    # The reference's scenario: 100 tokens a call against 120 -> the 2nd is allowed.
    for _ in range(2):
        reservation = budget.reserve(KEY, 1)
        budget.commit(reservation, Usage(input_tokens=60, output_tokens=40))
    with pytest.raises(BudgetExceededError) as refused:
        budget.reserve(KEY, 1)
    assert (refused.value.kind, refused.value.consumed, refused.value.limit) == ("tokens", 200, 120)
    usage = budget.usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (2, 120, 80)
    assert usage.cost_usd == pytest.approx(2 * (60 * 1.0 + 40 * 2.0) / 1_000_000)


def test_a_rolling_window_counts_recent_spend(make_store: MakeStore) -> None:
    budget = Budget(max_calls=2, window=3600, store=make_store())
    for _ in range(2):
        budget.commit(budget.reserve(KEY, 1), None)
    with pytest.raises(BudgetExceededError) as refused:
        budget.reserve(KEY, 1)
    assert refused.value.window == 3600
    assert budget.usage().window_calls == 2  # type: ignore[attr-defined]


def test_estimated_usage_is_counted_on_redis_also_when_settled_during_an_outage(
    make_store: MakeStore,
) -> None:
    server = RedisServer()
    try:
        store = make_store(server.url, socket_timeout=0.2, backoff_base=0.001, backoff_max=0.001)
        budget = Budget(store=store)
        budget.record(KEY, Usage(input_tokens=9, estimated=True), calls=1)  # a stream's end
        budget.record(KEY, Usage(2, 2), calls=1)  # a stream that reported
        assert budget.usage().estimated_calls == 1
        during = budget.reserve(KEY, 5)  # reserved on Redis
        server.stop()
        local = budget.reserve(KEY, 5)  # fail open: reserved locally
        budget.commit(local, None)  # no usage reported: the estimate stands
        budget.commit(during, None)  # queued for Redis
        server.start()  # empty: the shared counters start over, and the outage's are replayed
        budget.record(KEY, Usage(1, 1), calls=1)  # Redis is back: replays what it owes
        usage = budget.usage()
        assert usage.estimated_calls == 1  # the local settlement's (the other one's
        # reservation died with the server's memory, so its settlement is a no-op)
        assert usage.calls == 2
    finally:
        server.stop()


def test_a_redis_outage_loses_no_reservation(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer()
    try:
        store = make_store(server.url, socket_timeout=0.2, backoff_base=0.001, backoff_max=0.001)
        budget = Budget(max_calls=100, store=store)
        before = budget.reserve(KEY, 5)  # reserved on Redis
        server.stop()
        with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
            budget.commit(before, Usage(input_tokens=7, output_tokens=3))  # queued
            during = budget.reserve(KEY, 5)  # fail open: counted locally
            budget.commit(during, Usage(input_tokens=11, output_tokens=2))
        assert any("unreachable" in r.getMessage() for r in caplog.records)
        # The server restarts with no data (no persistence): the shared counters start
        # over, and what was settled or spent during the outage is replayed into them.
        server.start()
        after = budget.reserve(KEY, 1)
        budget.commit(after, Usage(input_tokens=1, output_tokens=1))
        usage = budget.usage()
        assert usage.calls == 2  # the outage's local call and the new one (before: lost
        # with the restarted server's memory, its settlement replayed as a no-op)
        assert usage.input_tokens == 12
        assert usage.output_tokens == 3
    finally:
        server.stop()


def test_fail_closed_refuses_while_redis_is_unreachable(make_store: MakeStore) -> None:
    server = RedisServer()
    try:
        store = make_store(server.url, socket_timeout=0.2)
        budget = Budget(max_calls=100, store=store.budget_store(on_unavailable="closed"))
        budget.commit(budget.reserve(KEY, 1), None)
        server.stop()
        with pytest.raises(BudgetUnavailableError):
            budget.reserve(KEY, 1)
    finally:
        server.stop()


def test_a_cached_answer_is_shared_across_processes(redis_server: RedisServer, prefix: str) -> None:
    results = SPAWN.Queue()
    for _ in range(2):
        process = SPAWN.Process(
            target=redis_workers.cached_call, args=(redis_server.url, prefix, results)
        )
        process.start()
        process.join(60)
    assert [results.get(timeout=10) for _ in range(2)] == ["model", "hit"]


def test_the_redis_cache_is_bounded_lru_with_ttl(
    prefix: str, make_store: MakeStore, client: redis.Redis
) -> None:
    store = make_store()
    backend = store.cache_backend(max_entries=3)
    for name in ("a", "b", "c"):
        backend.set(name, f'{{"v": "{name}"}}', ttl=600)
    assert backend.get("a") is not None  # a is now the most recently used
    backend.set("d", '{"v": "d"}', ttl=600)
    assert backend.get("b") is None  # the least recently used went
    assert [backend.get(n) is not None for n in ("a", "c", "d")] == [True, True, True]
    assert len(backend) == 3
    ttl = client.pttl(f"{prefix}:cache:e:a")
    assert 0 < ttl <= 600_000


def test_a_corrupt_redis_entry_is_a_miss_with_a_warning(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    cache = ResponseCache(backend=store)
    backend = cache.backend
    backend.set("k", "{not json", ttl=None)
    with caplog.at_level(logging.WARNING):
        assert cache.get("k") is None
    assert any(r.levelno == logging.WARNING for r in caplog.records)
