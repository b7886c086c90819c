"""``async def`` listeners: a task on the running loop, or run to completion in a thread
that has none; bounded by ``listener_timeout``; failures logged, never raised."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from callpolicy import CallPolicy, CircuitState, Event, EventKind
from tests.observability.support import KEY, Model, ServerError, invoke
from tests.support.clock import FakeClock


class AsyncLog:
    """An async listener that keeps every event, the thread and the loop it ran on."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.threads: list[int] = []
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def __call__(self, event: Event) -> None:
        await asyncio.sleep(0)  # a real suspension point
        self.events.append(event)
        self.threads.append(threading.get_ident())
        self.loops.append(asyncio.get_running_loop())

    def kinds(self) -> list[EventKind]:
        return [event.kind for event in self.events]


def _listener_errors(log: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in log.records if "async listener" in r.getMessage()]


async def test_in_a_running_loop_an_async_listener_is_a_task_on_that_loop(
    clock: FakeClock, mode: str
) -> None:
    heard = AsyncLog()
    policy = CallPolicy(failure_threshold=1, clock=clock, listeners=[heard])
    with pytest.raises(ServerError):
        await invoke(policy, KEY, Model(errors=[ServerError("503")]), mode)
    assert heard.events == [], "scheduled, not awaited by the call"

    await policy.flush_listeners()
    assert heard.kinds() == [EventKind.STATE_CHANGE]
    assert heard.events[0].state is CircuitState.OPEN
    assert heard.loops == [asyncio.get_running_loop()]
    assert heard.threads == [threading.get_ident()]


async def test_sync_listeners_still_hear_at_once_beside_async_ones(clock: FakeClock) -> None:
    heard_later, heard_now = AsyncLog(), []
    policy = CallPolicy(clock=clock, listeners=[heard_later, heard_now.append])
    policy.trip(KEY)
    assert [e.kind for e in heard_now] == [EventKind.STATE_CHANGE]
    assert heard_later.events == []
    await policy.flush_listeners()
    assert heard_later.events == heard_now


def test_outside_any_loop_an_async_listener_runs_to_completion_before_the_call_returns(
    clock: FakeClock,
) -> None:
    heard = AsyncLog()
    policy = CallPolicy(failure_threshold=1, clock=clock)
    policy.add_listener(heard)
    with pytest.raises(ServerError):
        policy.execute(KEY, Model(errors=[ServerError("503")]))
    assert heard.kinds() == [EventKind.STATE_CHANGE]
    assert heard.threads == [threading.get_ident()]
    assert heard.loops[0].is_closed(), "a private loop, closed once the listener is done"


def test_the_private_loop_leaves_the_threads_own_loop_alone(clock: FakeClock) -> None:
    heard = AsyncLog()
    policy = CallPolicy(clock=clock, listeners=[heard])
    found: list[object] = []

    def worker() -> None:
        own = asyncio.new_event_loop()
        asyncio.set_event_loop(own)  # set, not running
        try:
            policy.trip(KEY)
            found.append(asyncio.get_event_loop_policy().get_event_loop() is own)
        finally:
            asyncio.set_event_loop(None)
            own.close()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert heard.kinds() == [EventKind.STATE_CHANGE]
    assert heard.loops[0] is not None
    assert found == [True]


async def test_a_sync_call_in_a_worker_thread_runs_the_listener_in_that_thread(
    clock: FakeClock,
) -> None:
    heard = AsyncLog()
    policy = CallPolicy(clock=clock, listeners=[heard])

    def trip() -> int:
        policy.trip(KEY)
        return threading.get_ident()

    worker_thread = await asyncio.to_thread(trip)
    assert heard.kinds() == [EventKind.STATE_CHANGE], "done before to_thread returned"
    assert heard.threads == [worker_thread]
    assert worker_thread != threading.get_ident()


async def test_a_failing_async_listener_is_logged_and_never_raised(
    clock: FakeClock, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    async def broken(event: Event) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("listener bug")

    heard = AsyncLog()
    policy = CallPolicy(failure_threshold=1, clock=clock, listeners=[broken, heard])
    with pytest.raises(ServerError):  # the call's own error, not the listener's
        await invoke(policy, KEY, Model(errors=[ServerError("503")]), mode)
    await policy.flush_listeners()

    (failure,) = _listener_errors(engine_log)
    assert failure.levelno == logging.ERROR
    assert "failed on state_change event" in failure.getMessage()
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], RuntimeError)
    assert heard.kinds() == [EventKind.STATE_CHANGE], "the other listener still heard"


def test_a_failing_async_listener_outside_a_loop_is_logged_too(
    clock: FakeClock, engine_log: pytest.LogCaptureFixture
) -> None:
    async def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    policy = CallPolicy(clock=clock, listeners=[broken])
    policy.trip(KEY)
    assert policy.state(KEY) is CircuitState.OPEN
    (failure,) = _listener_errors(engine_log)
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], RuntimeError)


def test_a_hung_async_listener_outside_a_loop_is_cancelled_after_the_timeout(
    clock: FakeClock, engine_log: pytest.LogCaptureFixture
) -> None:
    cancelled: list[bool] = []

    async def hung(event: Event) -> None:
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    policy = CallPolicy(clock=clock, listeners=[hung], listener_timeout=0.02)
    policy.trip(KEY)  # returns: the listener is not waited for beyond its timeout
    assert cancelled == [True]
    (timeout,) = _listener_errors(engine_log)
    assert "timed out" in timeout.getMessage()


async def test_a_hung_async_listener_in_a_loop_is_cancelled_after_the_timeout(
    clock: FakeClock, engine_log: pytest.LogCaptureFixture
) -> None:
    cancelled: list[bool] = []

    async def hung(event: Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    policy = CallPolicy(clock=clock, listeners=[hung], listener_timeout=0.02)
    policy.trip(KEY)
    await policy.flush_listeners()
    assert cancelled == [True]
    assert "timed out" in _listener_errors(engine_log)[0].getMessage()


async def test_the_policy_holds_each_listener_task_until_it_ends(clock: FakeClock) -> None:
    release = asyncio.Event()
    done: list[Event] = []

    async def slow(event: Event) -> None:
        await release.wait()
        done.append(event)

    policy = CallPolicy(clock=clock, listeners=[slow])
    policy.trip(KEY)
    policy.reset(KEY)
    await asyncio.sleep(0)
    assert len(policy._listener_tasks) == 2
    release.set()
    await policy.flush_listeners()
    assert [e.state for e in done] == [CircuitState.OPEN, CircuitState.CLOSED]
    assert policy._listener_tasks == set()


async def test_flush_listeners_with_nothing_pending_returns() -> None:
    await CallPolicy().flush_listeners()


def test_listener_options_are_validated() -> None:
    with pytest.raises(TypeError):
        CallPolicy(listeners=["not callable"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="listener_timeout"):
        CallPolicy(listener_timeout=0)
    with pytest.raises(ValueError, match="listener_timeout"):
        CallPolicy(listener_timeout=float("inf"))
    with pytest.raises(TypeError, match="listener_timeout"):
        CallPolicy(listener_timeout=True)
