"""``fallback_start()``: inside a fallback the engine runs, why it was called (the key,
the primary circuit's state as the fallback started, the cause); None anywhere else."""

from __future__ import annotations

import asyncio
import threading

import pytest

from callpolicy import (
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    FallbackStart,
    RetryPolicy,
    fallback_start,
)
from tests.support.clock import FakeClock, FakeSleeper

KEY = "acme::m1"


class ServerError(Exception):
    status_code = 500


def down() -> str:
    raise ServerError("500")


async def adown() -> str:
    return down()


def seen() -> FallbackStart:
    start = fallback_start()
    assert start is not None
    return start


async def aseen() -> FallbackStart:
    return seen()


async def guarded(policy: CallPolicy, mode: str, *, fail: bool = True) -> FallbackStart:
    if mode == "sync":
        return policy.execute(KEY, down if fail else seen, fallback=seen)  # type: ignore[arg-type]
    return await policy.aexecute(KEY, adown if fail else aseen, fallback=aseen)  # type: ignore[arg-type]


async def test_a_failure_below_the_threshold_hands_over_a_closed_circuit_and_its_error(
    clock: FakeClock, mode: str
) -> None:
    policy = CallPolicy(failure_threshold=2, fallback_on="error", clock=clock)
    start = await guarded(policy, mode)
    assert (start.key, start.state) == (KEY, CircuitState.CLOSED)
    assert isinstance(start.cause, ServerError)
    # The failure that opens it, then a refusal.
    assert (await guarded(policy, mode)).state is CircuitState.OPEN
    refused = await guarded(policy, mode)
    assert refused.state is CircuitState.OPEN
    assert isinstance(refused.cause, CircuitOpenError)
    assert fallback_start() is None  # reset once the fallback is done


async def test_a_refusal_while_the_probe_is_in_flight_hands_over_half_open(
    clock: FakeClock, mode: str
) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    await guarded(policy, mode)
    clock.advance(10)
    probe = policy.circuit(KEY).admit()
    assert probe.probe
    start = await guarded(policy, mode)
    assert start.state is CircuitState.HALF_OPEN
    assert isinstance(start.cause, CircuitOpenError)
    assert start.cause.retry_in == 0.0


async def test_a_retry_refused_mid_way_hands_over_open_and_the_primarys_error(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = CallPolicy(
        retry=RetryPolicy(max_attempts=4),
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
    )
    sleeper.on_sleep.append(lambda: policy.force_open(KEY))  # opened while it waits
    start = await guarded(policy, mode)
    assert start.state is CircuitState.OPEN
    assert isinstance(start.cause, ServerError)


async def test_outside_a_fallback_and_after_a_failed_one_it_is_none(
    clock: FakeClock, mode: str
) -> None:
    policy = CallPolicy(clock=clock)
    policy.force_open(KEY)
    assert fallback_start() is None
    assert await guarded(policy, mode, fail=False) is not None  # the fallback answered

    def failing_backup() -> str:
        assert fallback_start() is not None
        raise ValueError("backup down")

    async def afailing_backup() -> str:
        return failing_backup()

    if mode == "sync":
        with pytest.raises(ValueError, match="backup down"):
            policy.execute(KEY, down, fallback=failing_backup)
    else:
        with pytest.raises(ValueError, match="backup down"):
            await policy.aexecute(KEY, adown, fallback=afailing_backup)
    assert fallback_start() is None
    # The primary itself, when called, never sees one.
    policy.reset(KEY)
    observed: list[FallbackStart | None] = []

    def primary() -> str:
        observed.append(fallback_start())
        return "ok"

    assert policy.execute(KEY, primary, fallback=seen) == "ok"  # type: ignore[arg-type]
    assert observed == [None]


async def test_concurrent_tasks_each_see_their_own() -> None:
    policy = CallPolicy(failure_threshold=1_000, fallback_on="error")
    errors = {n: ServerError(str(n)) for n in range(200)}

    async def one(n: int) -> bool:
        async def primary() -> str:
            await asyncio.sleep(0)
            raise errors[n]

        async def backup() -> bool:
            await asyncio.sleep(0)  # let the others interleave
            start = fallback_start()
            return start is not None and start.cause is errors[n]

        return await policy.aexecute(f"acme::m{n % 7}", primary, fallback=backup)

    assert all(await asyncio.gather(*(one(n) for n in range(200))))


def test_concurrent_threads_each_see_their_own() -> None:
    policy = CallPolicy(failure_threshold=1_000, fallback_on="error")
    barrier = threading.Barrier(16)
    results: list[bool] = []

    def one(n: int) -> None:
        error = ServerError(str(n))

        def primary() -> str:
            raise error

        def backup() -> bool:
            barrier.wait(timeout=10)  # every thread inside its fallback at once
            start = fallback_start()
            return start is not None and start.cause is error

        for _ in range(3):
            results.append(policy.execute("acme::m1", primary, fallback=backup))
            barrier.wait(timeout=10)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 48


async def test_a_failing_fallback_after_a_refusal_keeps_the_refusal_as_its_context(
    clock: FakeClock, mode: str
) -> None:
    policy = CallPolicy(clock=clock)
    policy.force_open(KEY)
    causes: list[BaseException] = []

    def backup() -> str:
        start = seen()
        causes.append(start.cause)
        # Kept past its except block without its traceback (no frame -> refusal cycle).
        assert start.cause.__traceback__ is None
        raise ValueError("backup down")

    async def abackup() -> str:
        return backup()

    if mode == "sync":
        with pytest.raises(ValueError, match="backup down") as caught:
            policy.execute(KEY, down, fallback=backup)
    else:
        with pytest.raises(ValueError, match="backup down") as caught:
            await policy.aexecute(KEY, adown, fallback=abackup)
    (refusal,) = causes
    assert isinstance(refusal, CircuitOpenError)
    assert caught.value.__context__ is refusal
    assert any("the fallback failed" in note for note in caught.value.__notes__)
