"""The circuit breaker's rules: the reference crate's scenarios first, then what we add.

Every scenario runs through ``execute`` and through ``aexecute`` (the ``mode`` fixture).
Cooldowns pass by advancing the fake clock by hand, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import pytest

from callpolicy import (
    BreakerConfig,
    CallPolicy,
    CircuitOpenError,
    CircuitSnapshot,
    CircuitState,
    ErrorClass,
    EventKind,
)

KEY = "p1::default"
CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class ServerError(Exception):
    """A provider's 500, like the reference's ``always_err("500 internal server error")``."""

    status_code = 500


class BadRequest(Exception):
    """The caller's fault (400): not counted by default."""

    status_code = 400


class Provider:
    """A model that answers or fails on demand and counts the calls that reach it."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.error: type[Exception] = ServerError
        self.calls = 0
        self.during_call: list[object] = []
        """Callables run inside the next calls (one per call), to act while a call is in flight."""

    def __call__(self) -> str:
        self.calls += 1
        if self.during_call:
            action = self.during_call.pop(0)
            if callable(action):
                action()
        if self.fail:
            raise self.error("500 internal server error")
        return "ok"

    async def acall(self) -> str:
        return self()


async def invoke(policy: CallPolicy, provider: Provider, mode: str, key: str = KEY) -> str:
    if mode == "sync":
        return policy.execute(key, provider)
    return await policy.aexecute(key, provider.acall)


async def fail_times(policy: CallPolicy, provider: Provider, mode: str, n: int) -> None:
    provider.fail = True
    for _ in range(n):
        with pytest.raises(ServerError):
            await invoke(policy, provider, mode)


# -- the reference crate's tests ---------------------------------------------------------


def test_state_starts_closed() -> None:
    policy = CallPolicy()
    assert policy.state(KEY) is CLOSED
    assert policy.breaker.failure_threshold == 5
    assert policy.breaker.cooldown == 30.0


async def test_opens_after_threshold_and_then_fails_fast_without_calling_the_model(
    clock, mode
) -> None:
    policy = CallPolicy(failure_threshold=3, cooldown=0.05, clock=clock)
    provider = Provider()

    await fail_times(policy, provider, mode, 2)
    assert policy.state(KEY) is CLOSED
    await fail_times(policy, provider, mode, 1)
    assert policy.state(KEY) is OPEN
    assert provider.calls == 3

    for _ in range(5):
        with pytest.raises(CircuitOpenError):
            await invoke(policy, provider, mode)
    assert provider.calls == 3, "an open circuit must not call the model"


async def test_half_open_then_closes_on_success(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=2, cooldown=20, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 2)
    assert policy.state(KEY) is OPEN

    clock.advance(20)
    provider.fail = False
    assert await invoke(policy, provider, mode) == "ok"

    assert policy.state(KEY) is CLOSED
    assert policy.snapshot()[KEY].failures == 0
    assert provider.calls == 3


async def test_half_open_reopens_at_once_on_failure_surfacing_the_providers_error(
    clock, mode
) -> None:
    policy = CallPolicy(failure_threshold=2, cooldown=20, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 2)

    clock.advance(20)
    # The probe's own error is what the caller sees, not CircuitOpenError.
    with pytest.raises(ServerError, match="500"):
        await invoke(policy, provider, mode)
    assert provider.calls == 3
    assert policy.state(KEY) is OPEN, "one probe failure re-opens, no new threshold needed"

    with pytest.raises(CircuitOpenError):
        await invoke(policy, provider, mode)
    assert provider.calls == 3


# -- cooldown and the refusal's fields ---------------------------------------------------


async def test_calls_are_refused_until_the_cooldown_has_fully_elapsed(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=20, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 1)

    clock.advance(19.999)
    with pytest.raises(CircuitOpenError):
        await invoke(policy, provider, mode)
    assert provider.calls == 1

    clock.advance(0.001)
    provider.fail = False
    assert await invoke(policy, provider, mode) == "ok"
    assert provider.calls == 2


async def test_circuit_open_error_names_provider_model_failures_and_retry_in(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=3, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 3)

    clock.advance(4)
    with pytest.raises(CircuitOpenError) as refused:
        await invoke(policy, provider, mode)

    error = refused.value
    assert (error.provider, error.model, error.failures) == ("p1", "default", 3)
    assert error.retry_in == pytest.approx(6.0)
    assert "p1/default" in str(error)
    assert "3 consecutive failures" in str(error)


async def test_probe_failure_restarts_the_cooldown(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 1)
    clock.advance(10)
    await fail_times(policy, provider, mode, 1)  # the probe

    with pytest.raises(CircuitOpenError) as refused:
        await invoke(policy, provider, mode)
    assert refused.value.retry_in == pytest.approx(10.0)
    assert refused.value.failures == 2


def test_circuit_open_error_survives_copying_with_its_fields() -> None:
    # deepcopy goes through __reduce__, as crossing a process boundary would.
    import copy

    error = copy.deepcopy(CircuitOpenError("p", "m", 4, 2.5))
    assert (error.provider, error.model, error.failures, error.retry_in) == ("p", "m", 4, 2.5)


def test_cooldown_may_be_given_as_a_timedelta(clock) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=timedelta(minutes=2), clock=clock)
    with pytest.raises(ServerError):
        policy.execute(KEY, Provider(fail=True))
    assert policy.snapshot()[KEY].retry_in == pytest.approx(120.0)


# -- success_threshold and growing cooldowns ---------------------------------------------


async def test_success_threshold_needs_that_many_probe_successes_to_close(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, success_threshold=2, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 1)
    clock.advance(10)

    provider.fail = False
    await invoke(policy, provider, mode)
    assert policy.state(KEY) is HALF_OPEN
    await invoke(policy, provider, mode)
    assert policy.state(KEY) is CLOSED


async def test_a_probe_failure_after_some_probe_successes_reopens(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, success_threshold=2, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 1)
    clock.advance(10)
    provider.fail = False
    await invoke(policy, provider, mode)

    await fail_times(policy, provider, mode, 1)
    assert policy.state(KEY) is OPEN


async def test_probe_successes_do_not_carry_over_to_the_next_half_open_period(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, success_threshold=2, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 1)
    clock.advance(10)
    provider.fail = False
    await invoke(policy, provider, mode)  # one probe success of two
    await fail_times(policy, provider, mode, 1)  # then a probe failure: open again

    clock.advance(10)
    provider.fail = False
    await invoke(policy, provider, mode)
    assert policy.state(KEY) is HALF_OPEN, "the count of probe successes started over"
    await invoke(policy, provider, mode)
    assert policy.state(KEY) is CLOSED


async def test_cooldown_grows_with_each_reopen_up_to_its_cap_and_resets_on_close(
    clock, mode
) -> None:
    policy = CallPolicy(
        failure_threshold=1, cooldown=10, cooldown_multiplier=2, max_cooldown=35, clock=clock
    )
    provider = Provider()
    await fail_times(policy, provider, mode, 1)

    cooldowns = [policy.snapshot()[KEY].retry_in]
    for _ in range(3):
        clock.advance(cooldowns[-1])
        await fail_times(policy, provider, mode, 1)  # the probe fails: re-open
        cooldowns.append(policy.snapshot()[KEY].retry_in)
    assert cooldowns == pytest.approx([10, 20, 35, 35])

    clock.advance(35)
    provider.fail = False
    await invoke(policy, provider, mode)  # closes
    await fail_times(policy, provider, mode, 1)
    assert policy.snapshot()[KEY].retry_in == pytest.approx(10.0)


# -- failure-rate mode ---------------------------------------------------------------------


def _rate_policy(clock) -> CallPolicy:
    return CallPolicy(
        failure_threshold=100,
        failure_rate_threshold=0.5,
        window_size=4,
        minimum_calls=4,
        cooldown=10,
        clock=clock,
    )


async def test_failure_rate_opens_the_circuit_without_consecutive_failures(clock, mode) -> None:
    policy = _rate_policy(clock)
    provider = Provider()
    for fail in (False, True, False):
        provider.fail = fail
        with contextlib.suppress(ServerError):
            await invoke(policy, provider, mode)
    assert policy.state(KEY) is CLOSED, "fewer than minimum_calls in the window"

    await fail_times(policy, provider, mode, 1)  # 2 of 4 failed: 50 %
    snapshot = policy.snapshot()[KEY]
    assert snapshot.state is OPEN
    assert snapshot.failures == 1, "it was the rate, not the consecutive count"


async def test_failure_rate_forgets_calls_that_slid_out_of_the_window(clock, mode) -> None:
    policy = _rate_policy(clock)
    provider = Provider()
    outcomes = [True, False, False, False, False, True]  # the first failure slides out
    for fail in outcomes:
        provider.fail = fail
        with contextlib.suppress(ServerError):
            await invoke(policy, provider, mode)
    snapshot = policy.snapshot()[KEY]
    assert snapshot.state is CLOSED
    assert (snapshot.calls_in_window, snapshot.failures_in_window) == (4, 1)

    await fail_times(policy, provider, mode, 1)  # window: S S F F
    assert policy.state(KEY) is OPEN


async def test_failure_rate_does_not_count_uncounted_errors(clock, mode) -> None:
    policy = _rate_policy(clock)
    provider = Provider(fail=True)
    provider.error = BadRequest
    for _ in range(10):
        with pytest.raises(BadRequest):
            await invoke(policy, provider, mode)
    snapshot = policy.snapshot()[KEY]
    assert snapshot.state is CLOSED
    assert (snapshot.calls_in_window, snapshot.failures_in_window) == (0, 0)


# -- uncounted errors are neutral ----------------------------------------------------------


async def test_uncounted_errors_neither_count_nor_reset_the_consecutive_failures(
    clock, mode
) -> None:
    policy = CallPolicy(failure_threshold=3, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 2)

    provider.error = BadRequest
    for _ in range(10):
        with pytest.raises(BadRequest):
            await invoke(policy, provider, mode)
    assert policy.snapshot()[KEY].failures == 2
    assert policy.state(KEY) is CLOSED

    provider.error = ServerError
    await fail_times(policy, provider, mode, 1)
    assert policy.state(KEY) is OPEN


async def test_an_uncounted_probe_error_frees_the_slot_and_keeps_half_open(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 1)
    clock.advance(10)

    provider.error = BadRequest
    with pytest.raises(BadRequest):
        await invoke(policy, provider, mode)
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.probes_in_flight) == (HALF_OPEN, 0)

    provider.fail = False
    assert await invoke(policy, provider, mode) == "ok"  # admitted as the next probe
    assert policy.state(KEY) is CLOSED


async def test_counted_errors_are_configurable(clock, mode) -> None:
    breaker = BreakerConfig(failure_threshold=1, counted_errors=frozenset({ErrorClass.CLIENT}))
    policy = CallPolicy(breaker=breaker, clock=clock)
    provider = Provider(fail=True)
    with pytest.raises(ServerError):
        await invoke(policy, provider, mode)
    assert policy.state(KEY) is CLOSED, "SERVER is no longer counted"

    provider.error = BadRequest
    with pytest.raises(BadRequest):
        await invoke(policy, provider, mode)
    assert policy.state(KEY) is OPEN, "CLIENT now is"


# -- stale outcomes ----------------------------------------------------------------------


async def test_a_stale_success_does_not_close_a_circuit_that_opened_meanwhile(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=2, cooldown=10, clock=clock)
    slow = Provider()
    failing = Provider(fail=True)

    def trip_meanwhile() -> None:
        for _ in range(2):
            with pytest.raises(ServerError):
                policy.execute(KEY, failing)

    slow.during_call.append(trip_meanwhile)
    assert await invoke(policy, slow, mode) == "ok"  # admitted while closed

    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures, snapshot.trips) == (OPEN, 2, 1)


async def test_a_stale_failure_does_not_add_to_an_open_circuit(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=2, cooldown=10, clock=clock)
    slow = Provider(fail=True)
    failing = Provider(fail=True)

    def trip_meanwhile() -> None:
        for _ in range(2):
            with pytest.raises(ServerError):
                policy.execute(KEY, failing)
        clock.advance(3)

    slow.during_call.append(trip_meanwhile)
    with pytest.raises(ServerError):
        await invoke(policy, slow, mode)

    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures, snapshot.trips) == (OPEN, 2, 1)
    assert snapshot.retry_in == pytest.approx(7.0), "the cooldown was not restarted"


async def test_a_stale_failure_does_not_trip_a_circuit_that_closed_again(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    slow = Provider(fail=True)

    def open_and_recover_meanwhile() -> None:
        policy.trip(KEY)
        clock.advance(10)
        policy.execute(KEY, Provider())  # the probe succeeds: closed again

    slow.during_call.append(open_and_recover_meanwhile)
    with pytest.raises(ServerError):  # admitted in the earlier closed period
        await invoke(policy, slow, mode)

    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures, snapshot.trips) == (CLOSED, 0, 1)


async def test_a_stale_failure_while_a_probe_is_in_flight_changes_nothing(clock) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    finish_slow, finish_probe = asyncio.Event(), asyncio.Event()

    async def slow_failure() -> str:
        await finish_slow.wait()
        raise ServerError("503")

    async def slow_probe() -> str:
        await finish_probe.wait()
        return "ok"

    slow = asyncio.create_task(policy.aexecute(KEY, slow_failure))
    await asyncio.sleep(0)  # admitted while closed
    policy.trip(KEY)
    clock.advance(10)
    probe = asyncio.create_task(policy.aexecute(KEY, slow_probe))
    await asyncio.sleep(0)  # admitted as the probe

    finish_slow.set()
    with pytest.raises(ServerError):
        await slow
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.probes_in_flight, snapshot.trips) == (HALF_OPEN, 1, 1)

    finish_probe.set()
    assert await probe == "ok"
    assert policy.state(KEY) is CLOSED


# -- manual control ----------------------------------------------------------------------


async def test_trip_opens_for_one_cooldown_then_probes_resume(clock, mode) -> None:
    policy = CallPolicy(cooldown=10, clock=clock)
    provider = Provider()
    policy.trip(KEY)
    with pytest.raises(CircuitOpenError):
        await invoke(policy, provider, mode)
    assert provider.calls == 0

    clock.advance(10)
    assert await invoke(policy, provider, mode) == "ok"
    assert policy.state(KEY) is CLOSED


async def test_reset_closes_and_clears_the_counts(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=2, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 2)

    policy.reset(KEY)
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures) == (CLOSED, 0)
    await fail_times(policy, provider, mode, 1)
    assert policy.state(KEY) is CLOSED, "the count restarted from zero"


async def test_force_open_holds_without_probes_until_reset(clock, mode) -> None:
    policy = CallPolicy(cooldown=10, clock=clock)
    provider = Provider()
    policy.force_open(KEY)

    clock.advance(1_000_000)
    with pytest.raises(CircuitOpenError) as refused:
        await invoke(policy, provider, mode)
    assert refused.value.retry_in is None
    assert provider.calls == 0
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.forced, snapshot.retry_in) == (OPEN, OPEN, None)

    policy.reset(KEY)
    assert await invoke(policy, provider, mode) == "ok"
    assert policy.snapshot()[KEY].forced is None


async def test_force_closed_does_not_count_failures_until_reset(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, clock=clock)
    provider = Provider()
    policy.force_closed(KEY)

    await fail_times(policy, provider, mode, 5)
    snapshot = policy.snapshot()[KEY]
    assert (snapshot.state, snapshot.failures, snapshot.forced) == (CLOSED, 0, CLOSED)

    policy.reset(KEY)
    await fail_times(policy, provider, mode, 1)
    assert policy.state(KEY) is OPEN


def test_force_closed_closes_an_open_circuit(clock) -> None:
    policy = CallPolicy(failure_threshold=1, clock=clock)
    policy.trip(KEY)
    policy.force_closed(KEY)
    assert policy.execute(KEY, Provider()) == "ok"


# -- snapshots and independent keys --------------------------------------------------------


async def test_snapshot_reports_every_field(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=3, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 2)
    assert policy.snapshot()[KEY] == CircuitSnapshot(
        key=KEY,
        provider="p1",
        model="default",
        state=CLOSED,
        failures=2,
        retry_in=None,
        trips=0,
        probes_in_flight=0,
    )

    await fail_times(policy, provider, mode, 1)
    clock.advance(4)
    opened = policy.snapshot()[KEY]
    assert (opened.state, opened.failures, opened.trips) == (OPEN, 3, 1)
    assert opened.retry_in == pytest.approx(6.0)

    clock.advance(6)
    during_probe: list[CircuitSnapshot] = []
    provider.fail = False
    provider.during_call.append(lambda: during_probe.append(policy.snapshot()[KEY]))
    await invoke(policy, provider, mode)
    probing = during_probe[0]
    assert (probing.state, probing.probes_in_flight, probing.retry_in) == (HALF_OPEN, 1, 0.0)


async def test_keys_have_independent_circuits_and_the_snapshot_lists_them_all(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, clock=clock)
    failing = Provider(fail=True)
    with pytest.raises(ServerError):
        await invoke(policy, failing, mode, key="p1::a")
    assert await invoke(policy, Provider(), mode, key="p1::b") == "ok"
    assert await invoke(policy, Provider(), mode, key="p2::a") == "ok"

    snapshot = policy.snapshot()
    assert list(snapshot) == ["p1::a", "p1::b", "p2::a"]
    assert [s.state for s in snapshot.values()] == [OPEN, CLOSED, CLOSED]
    assert (snapshot["p2::a"].provider, snapshot["p2::a"].model) == ("p2", "a")


def test_policies_sharing_a_store_share_circuit_state(clock) -> None:
    first = CallPolicy(failure_threshold=1, clock=clock)
    second = CallPolicy(failure_threshold=1, store=first.store, clock=clock)
    with pytest.raises(ServerError):
        first.execute(KEY, Provider(fail=True))
    with pytest.raises(CircuitOpenError):
        second.execute(KEY, Provider())


# -- events and logging ------------------------------------------------------------------


async def test_listeners_see_state_changes_and_refusals(clock, mode, events) -> None:
    policy = CallPolicy(failure_threshold=2, cooldown=10, clock=clock, listeners=[events])
    provider = Provider()
    await fail_times(policy, provider, mode, 2)
    with pytest.raises(CircuitOpenError):
        await invoke(policy, provider, mode)
    clock.advance(10)
    provider.fail = False
    await invoke(policy, provider, mode)

    changes = [
        (e.old_state, e.state, e.reason, e.failures) for e in events.of(EventKind.STATE_CHANGE)
    ]
    assert changes == [
        (CLOSED, OPEN, "threshold", 2),
        (OPEN, HALF_OPEN, "cooldown_elapsed", 2),
        (HALF_OPEN, CLOSED, "probe_succeeded", 0),
    ]
    assert events.of(EventKind.STATE_CHANGE)[0].delay == pytest.approx(10.0)
    (refusal,) = events.of(EventKind.REFUSED)
    assert (refusal.key, refusal.provider, refusal.model) == (KEY, "p1", "default")
    assert (refusal.state, refusal.failures) == (OPEN, 2)
    assert refusal.delay == pytest.approx(10.0)


def test_listeners_can_be_added_and_removed(clock, events) -> None:
    policy = CallPolicy(failure_threshold=1, clock=clock)
    policy.add_listener(events)
    policy.trip("a::m")
    policy.remove_listener(events)
    policy.trip("b::m")
    assert [e.key for e in events.events] == ["a::m"]
    with pytest.raises(TypeError):
        policy.add_listener("not callable")  # type: ignore[arg-type]


def test_manual_changes_are_reported_with_reason_manual(clock, events) -> None:
    policy = CallPolicy(clock=clock, listeners=[events])
    policy.force_open(KEY)
    policy.reset(KEY)
    policy.reset(KEY)  # already closed: no change to report
    assert [(e.state, e.reason) for e in events.events] == [(OPEN, "manual"), (CLOSED, "manual")]


async def test_opening_logs_a_warning_and_closing_an_info_with_structured_fields(
    clock, mode, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="callpolicy")
    policy = CallPolicy(failure_threshold=2, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 2)
    clock.advance(10)
    provider.fail = False
    await invoke(policy, provider, mode)

    changes = [r for r in caplog.records if r.callpolicy_event == "state_change"]
    opened, half_opened, closed = changes
    assert opened.levelno == logging.WARNING
    assert opened.name == "callpolicy"
    assert opened.callpolicy_state == "open"
    assert opened.callpolicy_old_state == "closed"
    assert opened.callpolicy_reason == "threshold"
    assert opened.callpolicy_failures == 2
    assert (opened.callpolicy_key, opened.callpolicy_provider, opened.callpolicy_model) == (
        KEY,
        "p1",
        "default",
    )
    assert opened.callpolicy_delay == pytest.approx(10.0)
    assert "p1/default" in opened.getMessage()
    assert (half_opened.levelno, half_opened.callpolicy_state) == (logging.INFO, "half_open")
    assert (closed.levelno, closed.callpolicy_state) == (logging.INFO, "closed")
    assert closed.callpolicy_reason == "probe_succeeded"


async def test_a_refusal_is_logged_at_debug(clock, mode, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="callpolicy")
    policy = CallPolicy(clock=clock)
    policy.force_open(KEY)
    with pytest.raises(CircuitOpenError):
        await invoke(policy, Provider(), mode)
    (record,) = [r for r in caplog.records if r.callpolicy_event == "refused"]
    assert record.levelno == logging.DEBUG
    assert record.callpolicy_state == "open"


async def test_a_raising_listener_is_logged_and_does_not_break_the_call(
    clock, mode, caplog, events
) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    policy = CallPolicy(failure_threshold=1, clock=clock, listeners=[broken, events])
    provider = Provider(fail=True)
    with pytest.raises(ServerError):  # the provider's error, not the listener's
        await invoke(policy, provider, mode)
    with pytest.raises(CircuitOpenError):
        await invoke(policy, provider, mode)

    assert policy.state(KEY) is OPEN
    assert [e.kind for e in events.events] == [EventKind.STATE_CHANGE, EventKind.REFUSED]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert all("listener" in r.getMessage() for r in failures)
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in failures)


# -- keys ---------------------------------------------------------------------------------


def test_circuit_key_and_split_key_round_trip() -> None:
    from callpolicy import circuit_key, split_key

    assert circuit_key("openai", "gpt-4o") == "openai::gpt-4o"
    assert split_key("openai::gpt-4o") == ("openai", "gpt-4o")
    assert split_key("bare") == ("bare", "")
