"""Retry: backoff, jitter, Retry-After, the deadline, give-up notes, and the breaker.

The policy gets a fake clock and a fake sleep (which records each delay and advances
the clock), so every delay is checked as a value and no test waits.
"""

from __future__ import annotations

import logging
import random

import httpx
import openai
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
REQUEST = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")


def rate_limit_error(**headers: str) -> openai.RateLimitError:
    response = httpx.Response(
        429, headers={k.replace("_", "-"): v for k, v in headers.items()}, request=REQUEST
    )
    return openai.RateLimitError("Error code: 429 - slow down", response=response, body=None)


def auth_error() -> openai.AuthenticationError:
    response = httpx.Response(401, request=REQUEST)
    return openai.AuthenticationError("Error code: 401", response=response, body=None)


class ServerError(Exception):
    status_code = 503


class BadRequest(Exception):
    status_code = 400


class Script:
    """A model that raises the given errors in turn, then answers "ok"; keeps what it raised."""

    def __init__(self, *errors: object, forever: object | None = None) -> None:
        self.errors = list(errors)
        self.forever = forever
        self.calls = 0
        self.raised: list[BaseException] = []

    def __call__(self) -> str:
        self.calls += 1
        factory = self.errors.pop(0) if self.errors else self.forever
        if factory is None:
            return "ok"
        error = factory() if callable(factory) else factory
        assert isinstance(error, BaseException)
        self.raised.append(error)
        raise error

    async def acall(self) -> str:
        return self()


def make_policy(clock, sleeper, *, failure_threshold: int = 100, **retry) -> CallPolicy:
    return CallPolicy(
        failure_threshold=failure_threshold,
        retry=RetryPolicy(**retry),
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        rng=random.Random(1234),
    )


async def invoke(policy: CallPolicy, script: Script, mode: str) -> str:
    if mode == "sync":
        return policy.execute(KEY, script)
    return await policy.aexecute(KEY, script.acall)


# -- backoff and jitter -------------------------------------------------------------------------


async def test_the_references_delay_sequence(clock, sleeper, mode) -> None:
    policy = make_policy(
        clock, sleeper, base_delay=0.1, max_delay=0.8, jitter=0, max_attempts=6, deadline=None
    )
    script = Script(forever=ServerError)
    with pytest.raises(ServerError):
        await invoke(policy, script, mode)
    assert sleeper.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8])
    assert script.calls == 6


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    retry = RetryPolicy(base_delay=0.1, max_delay=0.8, jitter=0)
    assert [retry.backoff(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8])
    assert RetryPolicy(base_delay=1, multiplier=3, jitter=0).backoff(3) == 9.0


def test_reference_defaults() -> None:
    retry = RetryPolicy()
    assert (retry.max_attempts, retry.base_delay, retry.max_delay) == (4, 0.5, 30.0)
    assert (retry.multiplier, retry.jitter, retry.deadline) == (2.0, 0.2, 60.0)
    assert retry.honor_retry_after is True
    assert retry.retry_on == {
        ErrorClass.RATE_LIMITED,
        ErrorClass.TIMEOUT,
        ErrorClass.NETWORK,
        ErrorClass.SERVER,
    }


def test_jitter_stays_within_twenty_percent_and_actually_varies() -> None:
    retry = RetryPolicy(base_delay=1.0, max_delay=100.0)
    rng = random.Random(7)
    for attempt in (1, 2, 3):
        nominal = 2.0 ** (attempt - 1)
        draws = [retry.backoff(attempt, rng) / nominal for _ in range(2000)]
        assert min(draws) >= 0.8
        assert max(draws) <= 1.2
        assert min(draws) < 0.82, "the whole -20 % range is used"
        assert max(draws) > 1.18, "the whole +20 % range is used"


def test_jitter_is_applied_after_the_cap() -> None:
    retry = RetryPolicy(base_delay=10.0, max_delay=10.0)
    rng = random.Random(3)
    draws = [retry.backoff(5, rng) for _ in range(500)]
    assert all(8.0 <= d <= 12.0 for d in draws)
    assert max(draws) > 10.0, "jitter may lift a capped delay above the cap"


async def test_the_policys_rng_drives_the_jitter(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, base_delay=1.0, max_delay=1.0, max_attempts=40)
    with pytest.raises(ServerError):
        await invoke(policy, Script(forever=ServerError), mode)
    assert all(0.8 <= d <= 1.2 for d in sleeper.delays)
    assert len(set(sleeper.delays)) > 30, "every delay is drawn afresh"

    expected_rng = random.Random(1234)
    expected = [1.0 * (1 + expected_rng.uniform(-0.2, 0.2)) for _ in sleeper.delays]
    assert sleeper.delays == pytest.approx(expected)


# -- what is retried ------------------------------------------------------------------------------


async def test_two_rate_limits_then_success_makes_three_calls(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, jitter=0)
    script = Script(rate_limit_error, rate_limit_error)
    assert await invoke(policy, script, mode) == "ok"
    assert script.calls == 3
    assert sleeper.delays == [0.5, 1.0]
    assert policy.snapshot()[KEY].failures == 0, "the final success reset the count"


async def test_persistent_rate_limit_gives_up_raising_the_original_error_with_a_note(
    clock, sleeper, mode
) -> None:
    policy = make_policy(clock, sleeper, max_attempts=3, jitter=0)
    script = Script(forever=rate_limit_error)
    with pytest.raises(openai.RateLimitError) as caught:
        await invoke(policy, script, mode)

    assert script.calls == 3
    assert caught.value is script.raised[-1], "the provider's own exception, unchanged"
    assert type(caught.value) is openai.RateLimitError
    (note,) = caught.value.__notes__
    assert note == (
        "callpolicy: gave up on acme/m1 after 3 attempts over 1.50s (attempts exhausted)"
    )
    assert not hasattr(script.raised[0], "__notes__"), "earlier attempts' errors are untouched"


async def test_an_auth_error_is_not_retried_and_gets_no_note(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper)
    script = Script(auth_error)
    with pytest.raises(openai.AuthenticationError) as caught:
        await invoke(policy, script, mode)
    assert script.calls == 1
    assert sleeper.delays == []
    assert caught.value is script.raised[0]
    assert not hasattr(caught.value, "__notes__")


async def test_a_non_retryable_error_after_retries_ends_them_with_a_note(
    clock, sleeper, mode
) -> None:
    policy = make_policy(clock, sleeper)
    script = Script(rate_limit_error, BadRequest)
    with pytest.raises(BadRequest) as caught:
        await invoke(policy, script, mode)
    assert script.calls == 2
    assert "after 2 attempts" in caught.value.__notes__[0]
    assert "(not retryable)" in caught.value.__notes__[0]


async def test_retry_on_chooses_the_retried_classes(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, retry_on=frozenset({ErrorClass.TIMEOUT}))
    server = Script(ServerError)
    with pytest.raises(ServerError):
        await invoke(policy, server, mode)
    assert server.calls == 1

    timeouts = Script(TimeoutError, TimeoutError)
    assert await invoke(policy, timeouts, mode) == "ok"
    assert timeouts.calls == 3


async def test_without_a_retry_policy_one_attempt_is_made(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    script = Script(rate_limit_error)
    with pytest.raises(openai.RateLimitError) as caught:
        await invoke(policy, script, mode)
    assert script.calls == 1
    assert not hasattr(caught.value, "__notes__")


async def test_aexecute_waits_with_async_sleep_never_the_blocking_one(clock, sleeper) -> None:
    def blocking_sleep(seconds: float) -> None:
        raise AssertionError("aexecute must not block the event loop")

    policy = CallPolicy(
        retry=RetryPolicy(jitter=0),
        clock=clock,
        sleep=blocking_sleep,
        async_sleep=sleeper.asleep,
    )
    script = Script(ServerError)
    assert await policy.aexecute(KEY, script.acall) == "ok"
    assert sleeper.delays == [0.5]


# -- Retry-After ----------------------------------------------------------------------------------


async def test_retry_after_is_waited_exactly_without_jitter(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, jitter=0.2)
    script = Script(lambda: rate_limit_error(retry_after="3"), rate_limit_error)
    assert await invoke(policy, script, mode) == "ok"
    assert sleeper.delays[0] == 3.0
    assert sleeper.delays[1] != 1.0, "without a Retry-After the jittered backoff applies"
    assert 0.8 <= sleeper.delays[1] <= 1.2


async def test_retry_after_ms_is_waited_exactly(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper)
    script = Script(lambda: rate_limit_error(retry_after_ms="250"))
    assert await invoke(policy, script, mode) == "ok"
    assert sleeper.delays == [0.25]


async def test_retry_after_is_capped_by_max_retry_after(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, max_retry_after=10, deadline=None)
    script = Script(lambda: rate_limit_error(retry_after="3600"))
    assert await invoke(policy, script, mode) == "ok"
    assert sleeper.delays == [10.0]


async def test_retry_after_can_be_ignored(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, honor_retry_after=False, jitter=0)
    script = Script(lambda: rate_limit_error(retry_after="30"))
    assert await invoke(policy, script, mode) == "ok"
    assert sleeper.delays == [0.5]


# -- the deadline --------------------------------------------------------------------------------


async def test_the_deadline_stops_retrying_before_it_would_be_passed(clock, sleeper, mode) -> None:
    policy = make_policy(
        clock, sleeper, base_delay=0.25, max_delay=1.0, jitter=0, max_attempts=10, deadline=1.0
    )
    script = Script(forever=ServerError)
    with pytest.raises(ServerError) as caught:
        await invoke(policy, script, mode)
    # 0.25 + 0.5 = 0.75 s waited; the next wait (1.0 s) would end past the deadline.
    assert sleeper.delays == [0.25, 0.5]
    assert script.calls == 3
    assert "after 3 attempts over 0.75s (deadline reached)" in caught.value.__notes__[0]


async def test_the_references_short_deadline_stops_early(clock, sleeper, mode) -> None:
    # The reference: a 150 ms deadline with a 50..200 ms backoff stops early.
    policy = make_policy(
        clock, sleeper, base_delay=0.05, max_delay=0.2, jitter=0, max_attempts=10, deadline=0.15
    )
    script = Script(forever=ServerError)
    with pytest.raises(ServerError) as caught:
        await invoke(policy, script, mode)
    assert sum(sleeper.delays) <= 0.15 + 1e-9
    assert script.calls < 10
    assert "deadline reached" in caught.value.__notes__[0]


async def test_time_spent_in_the_calls_counts_toward_the_deadline(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, base_delay=1, jitter=0, max_attempts=10, deadline=10)

    def slow_failure() -> ServerError:
        clock.advance(4)  # each attempt takes 4 s
        return ServerError()

    script = Script(forever=slow_failure)
    with pytest.raises(ServerError):
        await invoke(policy, script, mode)
    # attempt 1 ends at 4 s (+1 s wait), attempt 2 ends at 9 s: a 2 s wait would pass 10 s.
    assert script.calls == 2
    assert sleeper.delays == [1.0]


# -- retry and the breaker --------------------------------------------------------------------


async def test_every_attempt_is_counted_by_the_breaker(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, max_attempts=3)
    with pytest.raises(ServerError):
        await invoke(policy, Script(forever=ServerError), mode)
    assert policy.snapshot()[KEY].failures == 3


async def test_a_retry_storm_trips_the_breaker_and_stops_retrying(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=3, max_attempts=10)
    script = Script(forever=ServerError)
    with pytest.raises(ServerError) as caught:
        await invoke(policy, script, mode)

    assert script.calls == 3, "no attempt goes to the open circuit"
    assert len(sleeper.delays) == 2
    assert policy.state(KEY) is CircuitState.OPEN
    assert "after 3 attempts" in caught.value.__notes__[0]
    assert "(the circuit opened)" in caught.value.__notes__[0]

    with pytest.raises(CircuitOpenError):
        await invoke(policy, script, mode)
    assert script.calls == 3


async def test_a_circuit_opened_elsewhere_during_the_wait_ends_the_retries(
    clock, sleeper, events, mode
) -> None:
    policy = make_policy(clock, sleeper)
    policy.add_listener(events)
    sleeper.on_sleep.append(lambda: policy.trip(KEY))  # another caller trips it meanwhile
    script = Script(forever=ServerError)

    with pytest.raises(ServerError) as caught:
        await invoke(policy, script, mode)

    assert script.calls == 1
    assert caught.value is script.raised[0]
    assert "after 1 attempt over" in caught.value.__notes__[0]
    assert "(the circuit opened)" in caught.value.__notes__[0]
    assert len(events.of(EventKind.REFUSED)) == 1


async def test_a_failed_probe_is_not_retried(clock, sleeper, mode) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1)
    policy.trip(KEY)
    clock.advance(policy.breaker.cooldown)
    script = Script(forever=ServerError)

    with pytest.raises(ServerError) as caught:
        await invoke(policy, script, mode)
    assert script.calls == 1
    assert sleeper.delays == []
    assert policy.state(KEY) is CircuitState.OPEN
    assert "(the circuit opened)" in caught.value.__notes__[0]


# -- events --------------------------------------------------------------------------------------


async def test_each_retry_emits_an_event_with_its_delay_and_error_class(
    clock, sleeper, events, mode
) -> None:
    policy = make_policy(clock, sleeper, jitter=0)
    policy.add_listener(events)
    script = Script(lambda: rate_limit_error(retry_after="2"), ServerError)
    assert await invoke(policy, script, mode) == "ok"

    retries = events.of(EventKind.RETRY)
    assert [(e.attempt, e.delay) for e in retries] == [(1, 2.0), (2, 1.0)]
    assert [(e.error_class, e.error_type) for e in retries] == [
        (ErrorClass.RATE_LIMITED, "RateLimitError"),
        (ErrorClass.SERVER, "ServerError"),
    ]
    assert all((e.key, e.provider, e.model) == (KEY, "acme", "m1") for e in retries)


async def test_retries_are_logged_at_info_without_the_message(clock, sleeper, caplog, mode) -> None:
    caplog.set_level(logging.INFO, logger="callpolicy")
    policy = make_policy(clock, sleeper, jitter=0)
    script = Script(lambda: ServerError("secret prompt text"))
    await invoke(policy, script, mode)

    (record,) = [r for r in caplog.records if r.callpolicy_event == "retry"]
    assert record.levelno == logging.INFO
    assert (record.callpolicy_attempt, record.callpolicy_delay) == (1, 0.5)
    assert record.callpolicy_error_class == "server"
    assert record.callpolicy_error_type == "ServerError"
    assert "secret prompt text" not in record.getMessage()
