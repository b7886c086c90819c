"""Every event path reaches both the listeners and the ``callpolicy`` logger, the log record
carrying the event's fields as structured ``extra`` (``callpolicy_provider``, ...)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from callpolicy import (
    Budget,
    BudgetExceededError,
    CallPolicy,
    CallRequest,
    CircuitOpenError,
    CircuitState,
    ErrorClass,
    Event,
    EventKind,
    ResponseCache,
    RetryPolicy,
)
from tests.observability.support import (
    FALLBACK_KEY,
    KEY,
    EventLog,
    Model,
    ServerError,
    invoke,
)
from tests.support.clock import FakeClock, FakeSleeper

EXTRA_FIELDS = (
    "event",
    "key",
    "provider",
    "model",
    "state",
    "old_state",
    "reason",
    "failures",
    "error_class",
    "error_type",
    "attempt",
    "delay",
)


def _records(log: pytest.LogCaptureFixture, kind: EventKind) -> list[logging.LogRecord]:
    return [
        record
        for record in log.records
        if record.name == "callpolicy" and getattr(record, "callpolicy_event", None) == kind.value
    ]


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {f"callpolicy_{name}": getattr(record, f"callpolicy_{name}") for name in EXTRA_FIELDS}


def _logged_once(log: pytest.LogCaptureFixture, event: Event, level: int) -> logging.LogRecord:
    """The one record of ``event``'s kind: at ``level``, with exactly its fields."""
    (record,) = _records(log, event.kind)
    assert record.levelno == level
    assert _extra(record) == event.log_extra()
    return record


def _request(text: str = "hello") -> CallRequest[str]:
    return CallRequest(
        describe=lambda: {"messages": [text]},
        input_text=lambda: text,
        encode=lambda result: {"text": result},
        decode=lambda payload: str(payload["text"]),
    )


async def test_a_state_change_is_heard_and_logged_with_its_fields(
    clock: FakeClock, events: EventLog, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=clock, listeners=[events])
    with pytest.raises(ServerError):
        await invoke(policy, KEY, Model(errors=[ServerError("503")]), mode)

    (change,) = events.of(EventKind.STATE_CHANGE)
    assert (change.key, change.provider, change.model) == (KEY, "acme", "m1")
    assert (change.old_state, change.state, change.reason) == (
        CircuitState.CLOSED,
        CircuitState.OPEN,
        "threshold",
    )
    assert (change.failures, change.delay) == (1, 30.0)
    record = _logged_once(engine_log, change, logging.WARNING)
    assert record.callpolicy_provider == "acme"  # type: ignore[attr-defined]
    assert record.callpolicy_model == "m1"  # type: ignore[attr-defined]
    assert record.callpolicy_state == "open"  # type: ignore[attr-defined]
    assert "circuit acme/m1 closed -> open" in record.getMessage()


async def test_closing_is_logged_at_info(
    clock: FakeClock, events: EventLog, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=clock, listeners=[events])
    policy.trip(KEY)
    clock.advance(30)
    engine_log.clear()
    events.events.clear()
    assert await invoke(policy, KEY, Model(), mode) == "primary"
    half_open, closed = events.of(EventKind.STATE_CHANGE)
    assert (half_open.state, closed.state) == (CircuitState.HALF_OPEN, CircuitState.CLOSED)
    records = _records(engine_log, EventKind.STATE_CHANGE)
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    assert [_extra(r) for r in records] == [half_open.log_extra(), closed.log_extra()]


async def test_a_refusal_is_heard_and_logged_with_its_fields(
    clock: FakeClock, events: EventLog, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=clock, listeners=[events])
    policy.trip(KEY)
    clock.advance(10)
    model = Model()
    with pytest.raises(CircuitOpenError):
        await invoke(policy, KEY, model, mode)
    assert model.calls == 0

    (refusal,) = events.of(EventKind.REFUSED)
    assert (refusal.key, refusal.state, refusal.failures) == (KEY, CircuitState.OPEN, 0)
    assert refusal.delay == pytest.approx(20.0)
    record = _logged_once(engine_log, refusal, logging.DEBUG)
    assert record.callpolicy_state == "open"  # type: ignore[attr-defined]


async def test_a_retry_is_heard_and_logged_with_its_delay_and_reason(
    clock: FakeClock,
    sleeper: FakeSleeper,
    events: EventLog,
    engine_log: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    policy = CallPolicy(
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        retry=RetryPolicy(max_attempts=3, base_delay=0.5, jitter=0.0),
        listeners=[events],
    )
    model = Model(errors=[TimeoutError("timed out"), ServerError("503")])
    assert await invoke(policy, KEY, model, mode) == "primary"

    first, second = events.of(EventKind.RETRY)
    assert (first.attempt, first.error_class, first.error_type, first.delay) == (
        1,
        ErrorClass.TIMEOUT,
        "TimeoutError",
        0.5,
    )
    assert (second.attempt, second.error_class, second.error_type, second.delay) == (
        2,
        ErrorClass.SERVER,
        "ServerError",
        1.0,
    )
    assert sleeper.delays == [0.5, 1.0]
    records = _records(engine_log, EventKind.RETRY)
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    assert [_extra(r) for r in records] == [first.log_extra(), second.log_extra()]
    assert records[0].callpolicy_error_class == "timeout"  # type: ignore[attr-defined]
    assert records[0].callpolicy_delay == 0.5  # type: ignore[attr-defined]


async def test_a_fallback_is_heard_and_logged_with_its_cause(
    clock: FakeClock, events: EventLog, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    policy = CallPolicy(failure_threshold=5, clock=clock, listeners=[events])
    answer = await invoke(
        policy, KEY, Model(errors=[ServerError("503")]), mode, fallback=Model("backup")
    )
    assert answer == "backup"

    (fallback,) = events.of(EventKind.FALLBACK)
    assert (fallback.key, fallback.error_class, fallback.error_type, fallback.state) == (
        KEY,
        ErrorClass.SERVER,
        "ServerError",
        None,
    )
    record = _logged_once(engine_log, fallback, logging.INFO)
    assert record.callpolicy_error_class == "server"  # type: ignore[attr-defined]


async def test_a_refused_fallback_circuit_is_reported_as_a_refusal_of_its_own_key(
    clock: FakeClock, events: EventLog, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    policy = CallPolicy(clock=clock, listeners=[events])
    policy.trip(KEY)
    policy.force_open(FALLBACK_KEY)
    backup = Model("backup")
    with pytest.raises(CircuitOpenError):
        await invoke(policy, KEY, Model(), mode, fallback=backup, fallback_key=FALLBACK_KEY)
    assert backup.calls == 0
    assert [e.key for e in events.of(EventKind.REFUSED)] == [KEY, FALLBACK_KEY]
    assert [r.callpolicy_key for r in _records(engine_log, EventKind.REFUSED)] == [  # type: ignore[attr-defined]
        KEY,
        FALLBACK_KEY,
    ]


async def test_a_cache_hit_is_heard_and_logged(
    events: EventLog, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    policy = CallPolicy(listeners=[events])
    cache, model = ResponseCache(), Model()
    for _ in range(2):
        assert await invoke(policy, KEY, model, mode, cache=cache, request=_request()) == "primary"
    assert model.calls == 1

    (hit,) = events.of(EventKind.CACHE_HIT)
    assert (hit.key, hit.provider, hit.model, hit.reason) == (KEY, "acme", "m1", "hit")
    record = _logged_once(engine_log, hit, logging.DEBUG)
    assert record.callpolicy_reason == "hit"  # type: ignore[attr-defined]


async def test_a_budget_refusal_is_heard_and_logged(
    events: EventLog, engine_log: pytest.LogCaptureFixture, mode: str
) -> None:
    policy = CallPolicy(listeners=[events])
    budget, model = Budget(max_calls=1), Model()
    assert await invoke(policy, KEY, model, mode, budget=budget, request=_request()) == "primary"
    with pytest.raises(BudgetExceededError):
        await invoke(policy, KEY, model, mode, budget=budget, request=_request())
    assert model.calls == 1

    (refusal,) = events.of(EventKind.BUDGET_REFUSED)
    assert (refusal.key, refusal.reason, refusal.error_type) == (
        KEY,
        "calls: 1 of 1",
        "BudgetExceededError",
    )
    record = _logged_once(engine_log, refusal, logging.WARNING)
    assert record.callpolicy_provider == "acme"  # type: ignore[attr-defined]
    assert "budget refused acme/m1" in record.getMessage()


def test_every_event_kind_has_a_logged_path() -> None:
    # A new EventKind must come with a test above (and a message in _events._describe).
    assert {kind.value for kind in EventKind} == {
        "state_change",
        "refused",
        "retry",
        "fallback",
        "cache_hit",
        "budget_refused",
    }


def test_a_failing_sync_listener_is_logged_and_the_others_still_hear(
    clock: FakeClock, events: EventLog, engine_log: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    policy = CallPolicy(failure_threshold=1, clock=clock, listeners=[broken, events])
    policy.trip(KEY)
    assert [e.kind for e in events.events] == [EventKind.STATE_CHANGE]
    (failure,) = [r for r in engine_log.records if "listener" in r.getMessage()]
    assert failure.levelno == logging.ERROR
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], RuntimeError)
