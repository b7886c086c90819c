"""Single flight: concurrent identical misses make one model call — threads, asyncio tasks,
and a mix — and an error or a cancelled leader never wedges the waiters.

The model call is held open until every caller has arrived (signalled by events and by
counting lookups), so the callers really are in the air together; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from callpolicy._cache import ResponseCache
from callpolicy._cache_backend import MemoryCacheBackend
from callpolicy._cache_sqlite import SQLiteCacheBackend

KEY = "same-request"
WAIT = 10.0  # seconds before a wedged test fails instead of hanging


class CountingBackend(MemoryCacheBackend):
    """Counts lookups, so a test knows when every caller has missed."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.arrived = threading.Condition()

    def get(self, key: str) -> str | None:
        with self.arrived:
            self.lookups += 1
            self.arrived.notify_all()
        return super().get(key)

    def wait_for_lookups(self, count: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.lookups >= count, timeout=WAIT)


class Callers:
    """``count`` daemon threads running ``fn``: a wedged caller fails the test at join
    instead of hanging the run (a thread pool would wait for it on shutdown)."""

    def __init__(self, count: int, fn: Callable[[], Any]) -> None:
        self.outcomes: list[Any] = [None] * count

        def run(index: int) -> None:
            try:
                self.outcomes[index] = fn()
            except BaseException as exc:
                self.outcomes[index] = exc

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def join(self) -> list[Any]:
        for thread in self.threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in self.threads), "a caller is wedged"
        return self.outcomes


def encode(value: dict[str, Any]) -> dict[str, Any]:
    return value


def decode(payload: dict[str, Any]) -> dict[str, Any]:
    return payload


def answer() -> dict[str, Any]:
    return {"content": "42", "tool_calls": [{"name": "f", "args": {"x": 1}}]}


def wait_for_flight_waiters(cache: ResponseCache, count: int) -> None:
    """Until ``count`` async waiters are registered on the flight of KEY."""
    flights = cache._flights

    def registered() -> int:
        flight = flights._flights.get(KEY)
        return 0 if flight is None else len(flight._async_waiters)

    deadline = threading.Event()
    for _ in range(100_000):
        if registered() >= count:
            return
        deadline.wait(0.001)
    raise AssertionError("the waiters never arrived")


# -- threads ---------------------------------------------------------------------------------
def test_50_threads_make_one_model_call() -> None:
    backend = CountingBackend()
    cache = ResponseCache(backend=backend)
    release = threading.Event()
    calls: list[int] = []

    def compute() -> dict[str, Any]:
        calls.append(1)
        # Hold the call until all 50 callers have looked (the leader looks twice).
        backend.wait_for_lookups(51)
        assert release.wait(WAIT)
        return answer()

    callers = Callers(50, lambda: cache.get_or_compute(KEY, compute, encode=encode, decode=decode))
    backend.wait_for_lookups(51)
    release.set()
    results = callers.join()
    assert len(calls) == 1
    statuses = Counter(status for _, status in results)
    assert statuses["miss"] == 1
    assert statuses["shared"] + statuses["hit"] == 49
    assert statuses["shared"] >= 1  # the collapse really happened
    values = [value for value, _ in results]
    assert all(value == answer() for value in values)
    assert len({id(value) for value in values}) == 50  # each caller has its own copy
    assert cache.stats().misses == 1


def test_waiters_get_the_leaders_exception_and_nothing_is_cached() -> None:
    backend = CountingBackend()
    cache = ResponseCache(backend=backend)
    calls: list[int] = []

    def compute() -> dict[str, Any]:
        calls.append(1)
        backend.wait_for_lookups(21)
        raise ConnectionError("provider down")

    callers = Callers(20, lambda: cache.get_or_compute(KEY, compute, encode=encode, decode=decode))
    errors = callers.join()
    assert len(calls) == 1
    assert all(isinstance(error, ConnectionError) for error in errors)
    assert cache.get(KEY) is None
    assert cache.get_or_compute(KEY, answer, encode=encode, decode=decode) == (answer(), "miss")


class Interrupted(BaseException):
    """Like KeyboardInterrupt: the leader is torn down, not failed."""


def test_an_interrupted_thread_leader_does_not_wedge_its_waiters() -> None:
    cache = ResponseCache()
    in_call = threading.Event()
    waiter_joined = threading.Event()
    calls: list[str] = []

    def leader_compute() -> dict[str, Any]:
        calls.append("leader")
        in_call.set()
        assert waiter_joined.wait(WAIT)
        raise Interrupted

    def waiter_compute() -> dict[str, Any]:
        calls.append("waiter")
        return answer()

    def lead() -> None:
        with pytest.raises(Interrupted):
            cache.get_or_compute(KEY, leader_compute, encode=encode, decode=decode)

    leader = threading.Thread(target=lead, daemon=True)
    leader.start()
    assert in_call.wait(WAIT)
    flight = cache._flights._flights[KEY]
    original_wait = flight.done.wait

    def signalling_wait(timeout: float | None = None) -> bool:
        waiter_joined.set()
        return original_wait(timeout)

    flight.done.wait = signalling_wait  # type: ignore[method-assign]
    value, status = cache.get_or_compute(KEY, waiter_compute, encode=encode, decode=decode)
    leader.join(WAIT)
    assert not leader.is_alive()
    assert (value, status) == (answer(), "miss")  # it led the retry itself
    assert calls == ["leader", "waiter"]


# -- asyncio ---------------------------------------------------------------------------------
async def test_100_tasks_make_one_model_call() -> None:
    cache = ResponseCache()
    release = asyncio.Event()
    calls: list[int] = []

    async def compute() -> dict[str, Any]:
        calls.append(1)
        await release.wait()
        return answer()

    tasks = [
        asyncio.create_task(cache.aget_or_compute(KEY, compute, encode=encode, decode=decode))
        for _ in range(100)
    ]
    for _ in range(3):
        await asyncio.sleep(0)  # every task runs to its wait
    assert len(cache._flights._flights[KEY]._async_waiters) == 99
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert len(calls) == 1
    assert Counter(status for _, status in results) == {"miss": 1, "shared": 99}
    assert all(value == answer() for value, _ in results)
    assert len({id(value) for value, _ in results}) == 100


async def test_async_waiters_get_the_leaders_exception() -> None:
    cache = ResponseCache()
    release = asyncio.Event()

    async def compute() -> dict[str, Any]:
        await release.wait()
        raise ValueError("bad request")

    tasks = [
        asyncio.create_task(cache.aget_or_compute(KEY, compute, encode=encode, decode=decode))
        for _ in range(10)
    ]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
    assert all(isinstance(result, ValueError) for result in results)
    assert len({id(result) for result in results}) == 1  # the leader's own exception
    assert cache.stats().errors == 1
    assert cache.get(KEY) is None


async def test_a_cancelled_leader_does_not_wedge_its_waiters() -> None:
    cache = ResponseCache()
    leader_started = asyncio.Event()
    calls: list[str] = []

    async def slow() -> dict[str, Any]:
        calls.append("leader")
        leader_started.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError("unreachable")

    async def quick() -> dict[str, Any]:
        calls.append("waiter")
        return answer()

    leader = asyncio.create_task(cache.aget_or_compute(KEY, slow, encode=encode, decode=decode))
    await leader_started.wait()
    waiters = [
        asyncio.create_task(cache.aget_or_compute(KEY, quick, encode=encode, decode=decode))
        for _ in range(5)
    ]
    await asyncio.sleep(0)
    assert len(cache._flights._flights[KEY]._async_waiters) == 5
    leader.cancel()
    results = await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert calls == ["leader", "waiter"]  # one waiter led the retry; the rest reused it
    statuses = Counter(status for _, status in results)
    assert statuses["miss"] == 1
    assert statuses["hit"] + statuses["shared"] == 4
    assert len(cache._flights) == 0


async def test_a_cancelled_waiter_leaves_the_others_alone() -> None:
    cache = ResponseCache()
    release = asyncio.Event()

    async def compute() -> dict[str, Any]:
        await release.wait()
        return answer()

    tasks = [
        asyncio.create_task(cache.aget_or_compute(KEY, compute, encode=encode, decode=decode))
        for _ in range(3)
    ]
    await asyncio.sleep(0)
    tasks[1].cancel()
    await asyncio.sleep(0)
    release.set()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
    assert isinstance(done[1], asyncio.CancelledError)
    assert done[0] == (answer(), "miss")
    assert done[2] == (answer(), "shared")


async def test_the_leader_answer_is_shared_even_if_it_is_cancelled_while_storing(
    tmp_path: Any,
) -> None:
    backend = SQLiteCacheBackend(tmp_path / "c.sqlite")
    cache = ResponseCache(backend=backend)
    computed = asyncio.Event()

    async def compute() -> dict[str, Any]:
        computed.set()
        return answer()

    leader = asyncio.create_task(cache.aget_or_compute(KEY, compute, encode=encode, decode=decode))
    await computed.wait()  # the leader is now storing, in a worker thread
    waiter = asyncio.create_task(cache.aget_or_compute(KEY, compute, encode=encode, decode=decode))
    await asyncio.sleep(0)
    leader.cancel()
    value, _ = await asyncio.wait_for(waiter, WAIT)
    assert value == answer()
    with pytest.raises(asyncio.CancelledError):
        await leader
    backend.close()


# -- a mix of threads and tasks ------------------------------------------------------------
async def test_threads_and_tasks_collapse_into_one_call() -> None:
    backend = CountingBackend()
    cache = ResponseCache(backend=backend)
    release = threading.Event()
    calls: list[int] = []

    def compute() -> dict[str, Any]:
        calls.append(1)
        assert release.wait(WAIT)
        return answer()

    async def acompute() -> dict[str, Any]:
        calls.append(1)
        return answer()

    def call() -> Any:
        return cache.get_or_compute(KEY, compute, encode=encode, decode=decode)

    leader = Callers(1, call)
    backend.wait_for_lookups(2)  # the thread leads (it looked, and looked again)
    thread_waiters = Callers(9, call)
    tasks = [
        asyncio.create_task(cache.aget_or_compute(KEY, acompute, encode=encode, decode=decode))
        for _ in range(20)
    ]
    await asyncio.sleep(0)
    await asyncio.to_thread(backend.wait_for_lookups, 2 + 9 + 20)
    await asyncio.to_thread(wait_for_flight_waiters, cache, 20)
    release.set()
    task_results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    results = [*leader.join(), *thread_waiters.join(), *task_results]
    assert len(calls) == 1
    assert results[0] == (answer(), "miss")
    assert all(value == answer() for value, _ in results)
    assert {status for _, status in results[1 + 9 :]} == {"shared"}


def test_tasks_on_other_threads_loops_wait_for_a_thread_leader() -> None:
    cache = ResponseCache()
    release = threading.Event()
    calls: list[int] = []
    ready = threading.Barrier(4)

    def compute() -> dict[str, Any]:
        calls.append(1)
        ready.wait(WAIT)
        assert release.wait(WAIT)
        return answer()

    async def acompute() -> dict[str, Any]:
        calls.append(1)
        return answer()

    outcomes: list[Any] = []

    def run_loop() -> None:
        async def main() -> Any:
            task = asyncio.create_task(
                cache.aget_or_compute(KEY, acompute, encode=encode, decode=decode)
            )
            await asyncio.sleep(0)
            ready.wait(WAIT)
            return await task

        outcomes.append(asyncio.run(main()))

    leader = threading.Thread(
        target=lambda: outcomes.append(
            cache.get_or_compute(KEY, compute, encode=encode, decode=decode)
        ),
        daemon=True,
    )
    leader.start()
    for _ in range(10_000):
        if KEY in cache._flights._flights:
            break
        threading.Event().wait(0.001)
    loops = [threading.Thread(target=run_loop, daemon=True) for _ in range(3)]
    for thread in loops:
        thread.start()
    wait_for_flight_waiters(cache, 3)
    release.set()
    for thread in [leader, *loops]:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert len(calls) == 1
    assert sorted(status for _, status in outcomes) == ["miss", "shared", "shared", "shared"]


# -- no deadlock on oneself -------------------------------------------------------------------
async def test_a_sync_call_inside_an_async_leader_does_not_wait_on_it() -> None:
    cache = ResponseCache()

    async def compute() -> dict[str, Any]:
        # A blocking call on the same thread, for the same key (bad practice, but it must
        # not deadlock: its leader cannot finish while this thread is blocked).
        inner, status = cache.get_or_compute(KEY, answer, encode=encode, decode=decode)
        assert status == "miss"
        return inner

    value, status = await asyncio.wait_for(
        cache.aget_or_compute(KEY, compute, encode=encode, decode=decode), WAIT
    )
    assert (value, status) == (answer(), "miss")


async def test_a_task_that_reenters_its_own_key_does_not_wait_on_itself() -> None:
    cache = ResponseCache()
    depth = 0

    async def compute() -> dict[str, Any]:
        nonlocal depth
        depth += 1
        if depth == 1:
            inner, _ = await cache.aget_or_compute(KEY, compute, encode=encode, decode=decode)
            return inner
        return answer()

    value, _ = await asyncio.wait_for(
        cache.aget_or_compute(KEY, compute, encode=encode, decode=decode), WAIT
    )
    assert value == answer()


def test_an_answer_that_cannot_be_shared_lets_each_waiter_call_alone() -> None:
    backend = CountingBackend()
    cache = ResponseCache(backend=backend)
    calls: list[int] = []
    lock = threading.Lock()

    def compute() -> object:
        with lock:
            calls.append(1)
            first = len(calls) == 1
        if first:
            backend.wait_for_lookups(6)
        return object()  # not JSON-able

    def bad_encode(value: object) -> dict[str, Any]:
        return {"value": value}

    results = Callers(
        5, lambda: cache.get_or_compute(KEY, compute, encode=bad_encode, decode=dict)
    ).join()
    assert len(calls) == 5
    assert {status for _, status in results} == {"miss"}
