"""Fallback: when it answers (per ``fallback_on``), its own circuit, its failures, its events."""

from __future__ import annotations

import logging

import pytest

from callpolicy import (
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    ErrorClass,
    EventKind,
    RetryPolicy,
)

KEY = "acme::m1"
FALLBACK_KEY = "backup::m2"
CLOSED, OPEN = CircuitState.CLOSED, CircuitState.OPEN


class ServerError(Exception):
    status_code = 503


class BadRequest(Exception):
    status_code = 400


class Model:
    """Answers ``answer`` or raises ``error`` (a class or an instance); counts its calls."""

    def __init__(self, answer: str = "ok", error: object = None) -> None:
        self.answer = answer
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error() if isinstance(self.error, type) else self.error  # type: ignore[misc]
        return self.answer

    async def acall(self) -> str:
        return self()


async def invoke(
    policy: CallPolicy,
    primary: Model,
    fallback: Model | None,
    mode: str,
    *,
    fallback_key: str | None = None,
) -> str:
    if mode == "sync":
        return policy.execute(KEY, primary, fallback=fallback, fallback_key=fallback_key)
    return await policy.aexecute(
        KEY,
        primary.acall,
        fallback=None if fallback is None else fallback.acall,
        fallback_key=fallback_key,
    )


# -- when the fallback answers ----------------------------------------------------------------


@pytest.mark.parametrize("fallback_on", ["failure", "open", "error"])
async def test_an_open_circuit_is_served_by_the_fallback_without_calling_the_primary(
    clock, mode, fallback_on
) -> None:
    policy = CallPolicy(clock=clock, fallback_on=fallback_on)
    policy.trip(KEY)
    primary, backup = Model("primary"), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (0, 1)


async def test_a_counted_failure_is_served_by_the_fallback_by_default(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    assert policy.fallback_on == "failure"
    primary, backup = Model(error=ServerError), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (1, 1)
    assert policy.snapshot()[KEY].failures == 1, "the primary's failure still counted"


async def test_a_client_error_is_not_served_by_the_fallback_by_default(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    primary, backup = Model(error=BadRequest), Model("backup")
    with pytest.raises(BadRequest):
        await invoke(policy, primary, backup, mode)
    assert backup.calls == 0


async def test_fallback_on_error_serves_any_exception(clock, mode) -> None:
    policy = CallPolicy(clock=clock, fallback_on="error")
    primary, backup = Model(error=BadRequest), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert backup.calls == 1


async def test_fallback_on_error_does_not_catch_interrupts(clock, mode) -> None:
    policy = CallPolicy(clock=clock, fallback_on="error")
    primary, backup = Model(error=KeyboardInterrupt), Model("backup")
    with pytest.raises(KeyboardInterrupt):
        await invoke(policy, primary, backup, mode)
    assert backup.calls == 0


async def test_fallback_on_open_serves_only_an_open_circuit(clock, mode) -> None:
    policy = CallPolicy(clock=clock, fallback_on="open", failure_threshold=2)
    primary, backup = Model(error=ServerError), Model("backup")
    with pytest.raises(ServerError):
        await invoke(policy, primary, backup, mode)
    assert backup.calls == 0

    with pytest.raises(ServerError):  # this failure opens the circuit; still the error
        await invoke(policy, primary, backup, mode)
    assert backup.calls == 0

    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (2, 1)


async def test_the_fallback_answers_after_the_retries_are_spent(clock, sleeper, mode) -> None:
    policy = CallPolicy(
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        retry=RetryPolicy(max_attempts=3, jitter=0),
    )
    primary, backup = Model(error=ServerError), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (3, 1)
    assert sleeper.delays == [0.5, 1.0]


async def test_the_fallback_answers_when_a_retry_storm_opens_the_circuit(
    clock, sleeper, mode
) -> None:
    policy = CallPolicy(
        failure_threshold=2,
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        retry=RetryPolicy(max_attempts=5),
    )
    primary, backup = Model(error=ServerError), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (2, 1)
    assert policy.state(KEY) is OPEN


async def test_the_fallback_answers_when_the_circuit_opens_during_a_retry_wait(
    clock, sleeper, mode
) -> None:
    policy = CallPolicy(clock=clock, sleep=sleeper, async_sleep=sleeper.asleep, retry=RetryPolicy())
    sleeper.on_sleep.append(lambda: policy.trip(KEY))
    primary, backup = Model(error=ServerError), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (1, 1)


async def test_fallback_on_open_also_serves_a_circuit_that_opened_during_a_retry_wait(
    clock, sleeper, mode
) -> None:
    policy = CallPolicy(
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        retry=RetryPolicy(),
        fallback_on="open",
    )
    sleeper.on_sleep.append(lambda: policy.trip(KEY))
    primary, backup = Model(error=ServerError), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (1, 1)


async def test_a_retried_uncounted_error_falls_back_once_the_circuit_is_open(
    clock, sleeper, mode
) -> None:
    # CLIENT is retried here but not counted; when another caller opens the circuit
    # during the wait, the next attempt is refused, and that refusal is a failure.
    policy = CallPolicy(
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        retry=RetryPolicy(retry_on=frozenset({ErrorClass.CLIENT})),
    )
    sleeper.on_sleep.append(lambda: policy.trip(KEY))
    primary, backup = Model(error=BadRequest), Model("backup")
    assert await invoke(policy, primary, backup, mode) == "backup"
    assert (primary.calls, backup.calls) == (1, 1)


async def test_the_fallback_is_not_retried(clock, sleeper, mode) -> None:
    policy = CallPolicy(clock=clock, sleep=sleeper, async_sleep=sleeper.asleep, retry=RetryPolicy())
    policy.trip(KEY)
    backup = Model(error=ServerError)
    with pytest.raises(ServerError):
        await invoke(policy, Model(), backup, mode)
    assert backup.calls == 1
    assert sleeper.delays == []


async def test_without_a_fallback_the_refusal_propagates(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    policy.trip(KEY)
    with pytest.raises(CircuitOpenError):
        await invoke(policy, Model(), None, mode)


# -- the fallback's own circuit -----------------------------------------------------------------


async def test_fallback_key_guards_the_fallback_with_its_own_circuit(clock, mode) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=2)
    policy.trip(KEY)
    primary, backup = Model(), Model(error=ServerError)

    for _ in range(2):
        with pytest.raises(ServerError):
            await invoke(policy, primary, backup, mode, fallback_key=FALLBACK_KEY)
    assert policy.state(FALLBACK_KEY) is OPEN
    assert backup.calls == 2

    with pytest.raises(CircuitOpenError) as refused:
        await invoke(policy, primary, backup, mode, fallback_key=FALLBACK_KEY)
    assert (refused.value.provider, refused.value.model) == ("backup", "m2")
    assert backup.calls == 2, "the fallback's open circuit was not called"
    assert primary.calls == 0


async def test_a_succeeding_guarded_fallback_keeps_its_circuit_closed(clock, mode) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=1)
    policy.trip(KEY)
    backup = Model("backup")
    for _ in range(3):
        assert await invoke(policy, Model(), backup, mode, fallback_key=FALLBACK_KEY) == "backup"
    snapshot = policy.snapshot()[FALLBACK_KEY]
    assert (snapshot.state, snapshot.failures) == (CLOSED, 0)


async def test_an_unguarded_fallback_has_no_circuit(clock, mode) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=1)
    policy.trip(KEY)
    backup = Model(error=ServerError)
    for _ in range(3):
        with pytest.raises(ServerError):
            await invoke(policy, Model(), backup, mode)
    assert list(policy.snapshot()) == [KEY]
    assert backup.calls == 3


# -- when the fallback fails -------------------------------------------------------------------


async def test_a_failing_fallback_raises_its_error_chained_to_the_primarys(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    primary_error = ServerError("primary down")
    fallback_error = TimeoutError("backup slow")
    primary, backup = Model(error=primary_error), Model(error=fallback_error)

    with pytest.raises(TimeoutError) as caught:
        await invoke(policy, primary, backup, mode)

    assert caught.value is fallback_error
    assert primary_error in (caught.value.__cause__, caught.value.__context__)
    assert caught.value.__notes__ == [
        "callpolicy: the fallback failed after acme/m1 failed with ServerError"
    ]


async def test_a_failing_fallback_after_a_refusal_chains_the_refusal(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    policy.trip(KEY)
    with pytest.raises(TimeoutError) as caught:
        await invoke(policy, Model(), Model(error=TimeoutError), mode)
    chained = caught.value.__cause__ or caught.value.__context__
    assert isinstance(chained, CircuitOpenError)
    assert "failed with CircuitOpenError" in caught.value.__notes__[0]


# -- events ------------------------------------------------------------------------------------


async def test_fallbacks_emit_events_naming_the_cause(clock, events, mode) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=1, listeners=[events])
    primary, backup = Model(error=ServerError), Model("backup")
    await invoke(policy, primary, backup, mode)  # counted failure, opens the circuit
    await invoke(policy, primary, backup, mode)  # refused

    after_failure, after_refusal = events.of(EventKind.FALLBACK)
    assert (after_failure.key, after_failure.provider, after_failure.model) == (KEY, "acme", "m1")
    assert (after_failure.error_class, after_failure.error_type) == (
        ErrorClass.SERVER,
        "ServerError",
    )
    assert after_failure.state is None
    assert (after_refusal.state, after_refusal.error_type, after_refusal.error_class) == (
        OPEN,
        None,
        None,
    )
    kinds = [e.kind for e in events.events]
    assert kinds.index(EventKind.REFUSED) < len(kinds) - 1, "refusal is reported before fallback"
    assert kinds[-1] is EventKind.FALLBACK


async def test_fallbacks_are_logged_at_info(clock, caplog, mode) -> None:
    caplog.set_level(logging.INFO, logger="callpolicy")
    policy = CallPolicy(clock=clock)
    policy.trip(KEY)
    await invoke(policy, Model(), Model("backup"), mode)
    (record,) = [r for r in caplog.records if r.callpolicy_event == "fallback"]
    assert record.levelno == logging.INFO
    assert record.callpolicy_key == KEY
    assert record.callpolicy_state == "open"


async def test_the_policy_counts_fallback_answers_by_primary_key(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    policy.trip(KEY)
    assert policy.fallback_served() == {}
    for _ in range(3):
        await invoke(policy, Model(), Model("backup"), mode)
    assert policy.fallback_served() == {KEY: 3}
