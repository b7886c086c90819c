"""Concurrency: probe slots under a crowd of tasks and threads, freed slots, exact counts.

Calls overlap by blocking on an event that the test sets; nothing waits on a timer
(the timeouts below only bound how long a broken engine can hang the test).
"""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from callpolicy import CallPolicy, CircuitOpenError, CircuitState

KEY = "acme::m1"
CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
HANG_GUARD = 10.0  # seconds; reached only if the engine is broken


class ServerError(Exception):
    status_code = 503


def _raise_server_error() -> None:
    raise ServerError("503 service unavailable")


def half_open_policy(clock, **options) -> CallPolicy:
    """A policy whose circuit for KEY is open with its cooldown over: next call probes."""
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock, **options)
    with pytest.raises(ServerError):
        policy.execute(KEY, _raise_server_error)
    clock.advance(10)
    return policy


# -- asyncio --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_probes", [1, 3])
async def test_a_thousand_tasks_on_a_half_open_circuit_send_exactly_the_allowed_probes(
    clock, max_probes
) -> None:
    policy = half_open_policy(clock, half_open_max_calls=max_probes)
    release = asyncio.Event()
    reached_model = 0

    async def model_call() -> str:
        nonlocal reached_model
        reached_model += 1
        await release.wait()
        return "ok"

    tasks = [asyncio.create_task(policy.aexecute(KEY, model_call)) for _ in range(1000)]
    for _ in range(5):  # let every task run up to its first await
        await asyncio.sleep(0)

    assert reached_model == max_probes
    assert sum(task.done() for task in tasks) == 1000 - max_probes
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.probes_in_flight) == (HALF_OPEN, max_probes)

    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANG_GUARD)
    refusals = [r for r in results if isinstance(r, CircuitOpenError)]
    assert results.count("ok") == max_probes
    assert len(refusals) == 1000 - max_probes
    assert all(r.retry_in == 0.0 for r in refusals), "refused because the slots were taken"
    assert policy.state(KEY) is CLOSED


async def test_a_cancelled_probe_frees_its_slot(clock) -> None:
    policy = half_open_policy(clock)
    started = asyncio.Event()
    never = asyncio.Event()

    async def hanging_call() -> str:
        started.set()
        await never.wait()
        return "unreachable"

    probe = asyncio.create_task(policy.aexecute(KEY, hanging_call))
    await asyncio.wait_for(started.wait(), HANG_GUARD)
    with pytest.raises(CircuitOpenError):  # the one slot is taken
        await policy.aexecute(KEY, hanging_call)

    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe

    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.probes_in_flight, snapshot.failures) == (HALF_OPEN, 0, 1)

    async def answer() -> str:
        return "ok"

    assert await policy.aexecute(KEY, answer) == "ok"  # admitted as the next probe
    assert policy.state(KEY) is CLOSED


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
async def test_a_probe_cut_off_by_asyncio_timeout_frees_its_slot(clock) -> None:
    policy = half_open_policy(clock)
    never = asyncio.Event()
    reached: list[bool] = []

    async def hanging_call() -> str:
        reached.append(True)
        await never.wait()
        return "unreachable"

    # A deadline already past: the probe is admitted, reaches its first await, and is
    # cancelled on the next loop iteration (no real time passes).
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await policy.aexecute(KEY, hanging_call)
    assert reached == [True]
    assert policy.snapshot()[KEY].probes_in_flight == 0

    async def answer() -> str:
        return "ok"

    assert await policy.aexecute(KEY, answer) == "ok"
    assert policy.state(KEY) is CLOSED


class Interrupt(BaseException):
    """Something like KeyboardInterrupt that is not an Exception."""


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, Interrupt])
def test_an_interrupted_sync_probe_frees_its_slot_without_counting(clock, interrupt) -> None:
    policy = half_open_policy(clock)

    def interrupted() -> str:
        raise interrupt()

    with pytest.raises(interrupt):
        policy.execute(KEY, interrupted)

    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.probes_in_flight, snapshot.failures) == (HALF_OPEN, 0, 1)
    assert policy.execute(KEY, lambda: "ok") == "ok"  # admitted as the next probe
    assert policy.state(KEY) is CLOSED


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Interrupt])
async def test_an_interrupted_async_probe_frees_its_slot_without_counting(clock, interrupt) -> None:
    policy = half_open_policy(clock)

    async def interrupted() -> str:
        raise interrupt()

    async def answer() -> str:
        return "ok"

    with pytest.raises(interrupt):
        await policy.aexecute(KEY, interrupted)
    assert policy.snapshot()[KEY].probes_in_flight == 0
    assert await policy.aexecute(KEY, answer) == "ok"


# -- threads --------------------------------------------------------------------------------


def run_threads(count: int, target) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(HANG_GUARD)
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("max_probes", [1, 3])
def test_sixteen_threads_on_a_half_open_circuit_send_exactly_the_allowed_probes(
    clock, max_probes
) -> None:
    policy = half_open_policy(clock, half_open_max_calls=max_probes)
    threads = 16
    release = threading.Event()
    settled = threading.Semaphore(0)  # one release per thread once it probed or was refused
    lock = threading.Lock()
    reached_model = 0
    results: list[object] = []

    def model_call() -> str:
        nonlocal reached_model
        with lock:
            reached_model += 1
        settled.release()
        release.wait(HANG_GUARD)
        return "ok"

    def caller(_: int) -> None:
        try:
            result: object = policy.execute(KEY, model_call)
        except CircuitOpenError as refusal:
            result = refusal
            settled.release()
        with lock:
            results.append(result)

    runner = threading.Thread(target=run_threads, args=(threads, caller))
    runner.start()
    try:
        for _ in range(threads):
            assert settled.acquire(timeout=HANG_GUARD)
        with lock:
            assert reached_model == max_probes
        assert policy.snapshot()[KEY].probes_in_flight == max_probes
    finally:
        release.set()
        runner.join(HANG_GUARD)

    assert results.count("ok") == max_probes
    assert sum(isinstance(r, CircuitOpenError) for r in results) == threads - max_probes
    assert policy.state(KEY) is CLOSED


def test_threads_that_only_succeed_never_open_the_circuit(clock) -> None:
    policy = CallPolicy(failure_threshold=1, clock=clock)

    def succeed_many(_: int) -> None:
        for _ in range(500):
            assert policy.execute(KEY, lambda: "ok") == "ok"

    run_threads(16, succeed_many)
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures, snapshot.trips) == (CLOSED, 0, 0)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [(800, (OPEN, 800, 1)), (801, (CLOSED, 800, 0))],
    ids=["exactly-the-threshold-trips", "one-short-stays-closed"],
)
def test_concurrent_failures_are_all_counted(clock, threshold, expected) -> None:
    policy = CallPolicy(failure_threshold=threshold, clock=clock)

    def fail_many(_: int) -> None:
        for _ in range(100):
            with pytest.raises(ServerError):
                policy.execute(KEY, _raise_server_error)

    run_threads(8, fail_many)
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures, snapshot.trips) == expected


def test_concurrent_mixed_outcomes_keep_the_window_exact(clock) -> None:
    # A window larger than the total and a rate that cannot be reached: every outcome
    # must land in the window, none lost, none doubled.
    policy = CallPolicy(
        failure_threshold=10_000,
        failure_rate_threshold=1.0,
        window_size=1000,
        minimum_calls=1000,
        clock=clock,
    )

    def mixed(index: int) -> None:
        for i in range(50):
            if (i + index) % 5 < 2:
                with pytest.raises(ServerError):
                    policy.execute(KEY, _raise_server_error)
            else:
                policy.execute(KEY, lambda: "ok")

    run_threads(16, mixed)
    snapshot = policy.snapshot()[KEY]
    assert snapshot.state is CLOSED
    assert (snapshot.calls_in_window, snapshot.failures_in_window) == (800, 320)


def test_concurrent_failures_after_the_trip_are_stale_and_not_counted(clock) -> None:
    # 16 threads fail at once against a threshold of 4: the circuit trips once, and
    # failures of calls admitted before the trip do not push the count past it.
    policy = CallPolicy(failure_threshold=4, cooldown=10, clock=clock)
    gate = threading.Barrier(16)

    def slow_failure() -> None:
        gate.wait(HANG_GUARD)  # every call is admitted (closed) before any fails
        _raise_server_error()

    def caller(_: int) -> None:
        with pytest.raises(ServerError):
            policy.execute(KEY, slow_failure)

    run_threads(16, caller)
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures, snapshot.trips) == (OPEN, 4, 1)
