"""``CircuitOpenError`` says why the circuit is open: the reason of the trip that opened it.

The memory store's circuits remember the reason of their last trip and pass it to every
refusal. Each scenario runs through ``execute`` and ``aexecute`` (the ``mode`` fixture);
cooldowns pass by advancing the engine suite's fake clock (the ``clock`` fixture).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, MemoryStore, Outcome

KEY = "p1::default"


class ServerError(Exception):
    """A provider's 500: a counted failure."""

    status_code = 500


class Provider:
    """A model that answers or fails on demand and counts the calls that reach it."""

    def __init__(self) -> None:
        self.fail = False
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.fail:
            raise ServerError("500 internal server error")
        return "ok"

    async def acall(self) -> str:
        return self()


async def invoke(policy: CallPolicy, provider: Provider, mode: str) -> str:
    if mode == "sync":
        return policy.execute(KEY, provider)
    return await policy.aexecute(KEY, provider.acall)


async def fail_times(policy: CallPolicy, provider: Provider, mode: str, n: int) -> None:
    provider.fail = True
    for _ in range(n):
        with pytest.raises(ServerError):
            await invoke(policy, provider, mode)


async def refusal(policy: CallPolicy, provider: Provider, mode: str) -> CircuitOpenError:
    calls = provider.calls
    with pytest.raises(CircuitOpenError) as refused:
        await invoke(policy, provider, mode)
    assert provider.calls == calls  # refused without calling the model
    return refused.value


# -- the exception itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "retry_in", "message"),
    [
        (
            "threshold",
            12.3,
            "circuit open for openai/gpt-4o: 5 consecutive failures; next probe in 12.30s",
        ),
        (
            "failure_rate",
            12.3,
            "circuit open for openai/gpt-4o: failure rate over the window reached; "
            "next probe in 12.30s",
        ),
        (
            "probe_failed",
            12.3,
            "circuit open for openai/gpt-4o: the half-open probe failed; next probe in 12.30s",
        ),
        (
            "probe_failed",
            0.0,
            "circuit open for openai/gpt-4o: the half-open probe failed; "
            "half-open, probe in flight",
        ),
        (
            "manual",
            None,
            "circuit open for openai/gpt-4o: opened by hand (force_open); held until reset",
        ),
        (
            "manual",
            12.3,
            "circuit open for openai/gpt-4o: opened by hand (force_open); next probe in 12.30s",
        ),
        (
            "threshold",
            None,
            "circuit open for openai/gpt-4o: 5 consecutive failures; forced open until reset",
        ),
        (
            "some_future_reason",
            12.3,
            "circuit open for openai/gpt-4o: opened (some_future_reason); next probe in 12.30s",
        ),
    ],
)
def test_the_message_names_the_reason_in_plain_words(
    reason: str, retry_in: float | None, message: str
) -> None:
    error = CircuitOpenError("openai", "gpt-4o", 5, retry_in, reason=reason)
    assert str(error) == message
    assert error.reason == reason
    assert (error.provider, error.model, error.failures, error.retry_in) == (
        "openai",
        "gpt-4o",
        5,
        retry_in,
    )


@pytest.mark.parametrize(
    ("retry_in", "message"),
    [
        (12.3, "circuit open for openai/gpt-4o: 5 consecutive failures; next probe in 12.30s"),
        (0.0, "circuit open for openai/gpt-4o: 5 consecutive failures; half-open, probe in flight"),
        (None, "circuit open for openai/gpt-4o: 5 consecutive failures; forced open until reset"),
    ],
)
def test_without_a_reason_the_message_is_unchanged(retry_in: float | None, message: str) -> None:
    error = CircuitOpenError("openai", "gpt-4o", 5, retry_in)
    assert error.reason is None
    assert str(error) == message
    assert error.args == (message,)


def test_the_reason_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        CircuitOpenError("openai", "gpt-4o", 5, 1.0, "threshold")  # type: ignore[misc]


@pytest.mark.parametrize("reason", ["threshold", "failure_rate", "probe_failed", "manual", None])
@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy])
def test_copies_keep_every_field_and_the_message(
    reason: str | None, copier: Callable[[CircuitOpenError], CircuitOpenError]
) -> None:
    error = CircuitOpenError("p", "m", 4, 2.5, reason=reason)
    copied = copier(error)
    assert copied is not error
    assert type(copied) is CircuitOpenError
    assert (copied.provider, copied.model, copied.failures, copied.retry_in, copied.reason) == (
        "p",
        "m",
        4,
        2.5,
        reason,
    )
    assert str(copied) == str(error)


def test_a_subclass_survives_copying_with_its_reason() -> None:
    class Refused(CircuitOpenError):
        pass

    copied = copy.deepcopy(Refused("p", "m", 1, None, reason="manual"))
    assert type(copied) is Refused
    assert copied.reason == "manual"


# -- through CallPolicy and the memory store ---------------------------------------------------


async def test_consecutive_failures_give_the_threshold_reason(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=3, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 3)
    clock.advance(4)

    error = await refusal(policy, provider, mode)
    assert error.reason == "threshold"
    assert str(error) == "circuit open for p1/default: 3 consecutive failures; next probe in 6.00s"


async def test_the_failure_rate_window_gives_its_reason(clock, mode) -> None:
    policy = CallPolicy(
        failure_threshold=100,
        failure_rate_threshold=0.5,
        window_size=4,
        minimum_calls=4,
        cooldown=10,
        clock=clock,
    )
    provider = Provider()
    for _ in range(2):  # ok, fail, ok, fail: never two failures in a row
        provider.fail = False
        assert await invoke(policy, provider, mode) == "ok"
        await fail_times(policy, provider, mode, 1)
    assert policy.state(KEY) is CircuitState.OPEN

    error = await refusal(policy, provider, mode)
    assert error.reason == "failure_rate"
    assert error.failures == 1
    assert str(error) == (
        "circuit open for p1/default: failure rate over the window reached; next probe in 10.00s"
    )


async def test_a_failed_probe_gives_its_reason(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 1)
    assert (await refusal(policy, provider, mode)).reason == "threshold"
    clock.advance(10)
    await fail_times(policy, provider, mode, 1)  # the probe

    error = await refusal(policy, provider, mode)
    assert error.reason == "probe_failed"
    assert str(error) == (
        "circuit open for p1/default: the half-open probe failed; next probe in 10.00s"
    )


async def test_force_open_gives_the_manual_reason_until_reset(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    provider = Provider()
    policy.force_open(KEY)
    clock.advance(1_000)

    error = await refusal(policy, provider, mode)
    assert error.reason == "manual"
    assert error.retry_in is None
    assert str(error) == (
        "circuit open for p1/default: opened by hand (force_open); held until reset"
    )

    # After a reset the next trip's own reason replaces it.
    policy.reset(KEY)
    await fail_times(policy, provider, mode, 1)
    error = await refusal(policy, provider, mode)
    assert error.reason == "threshold"
    assert str(error) == "circuit open for p1/default: 1 consecutive failures; next probe in 10.00s"


async def test_a_store_forced_open_without_hold_names_the_manual_reason_and_the_probe(
    clock, mode
) -> None:
    policy = CallPolicy(store=MemoryStore(clock=clock), cooldown=10, clock=clock)
    provider = Provider()
    policy.circuit(KEY).force(CircuitState.OPEN, hold=False)
    clock.advance(3)

    error = await refusal(policy, provider, mode)
    assert error.reason == "manual"
    assert str(error) == (
        "circuit open for p1/default: opened by hand (force_open); next probe in 7.00s"
    )


async def test_half_open_with_its_probe_in_flight_keeps_the_trip_reason(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=2, cooldown=10, clock=clock)
    provider = Provider()
    await fail_times(policy, provider, mode, 2)
    clock.advance(10)
    probe = policy.circuit(KEY).admit()  # the probe, still in flight
    assert probe.probe

    error = await refusal(policy, provider, mode)
    assert error.reason == "threshold"
    assert error.retry_in == 0.0
    assert str(error) == (
        "circuit open for p1/default: 2 consecutive failures; half-open, probe in flight"
    )


# -- the snapshot names it too ---------------------------------------------------------------


async def test_the_snapshot_says_what_opened_the_circuit_until_it_closes(clock, mode) -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    provider = Provider()
    assert policy.circuit(KEY).snapshot().opened_by is None
    await fail_times(policy, provider, mode, 1)
    assert policy.circuit(KEY).snapshot().opened_by == "threshold"
    clock.advance(10)
    await fail_times(policy, provider, mode, 1)  # the probe fails
    assert policy.circuit(KEY).snapshot().opened_by == "probe_failed"
    clock.advance(10)
    probe = policy.circuit(KEY).admit()
    assert policy.circuit(KEY).snapshot().state is CircuitState.HALF_OPEN
    assert policy.circuit(KEY).snapshot().opened_by == "probe_failed"
    policy.circuit(KEY).record(probe, Outcome.SUCCESS)
    assert policy.circuit(KEY).snapshot().state is CircuitState.CLOSED
    assert policy.circuit(KEY).snapshot().opened_by is None
    policy.force_open(KEY)
    assert policy.circuit(KEY).snapshot().opened_by == "manual"


def test_the_repr_and_args_are_those_of_the_message() -> None:
    error = CircuitOpenError("p", "m", 2, 1.5, reason="failure_rate")
    message = "circuit open for p/m: failure rate over the window reached; next probe in 1.50s"
    assert error.args == (message,)
    assert repr(error) == f"CircuitOpenError({message!r})"


def test_args_set_by_hand_make_the_message_as_on_any_error() -> None:
    error = CircuitOpenError("p", "m", 2, 1.5)
    error.args = ("replaced",)
    assert (str(error), repr(error), error.args) == (
        "replaced",
        "CircuitOpenError('replaced')",
        ("replaced",),
    )
    assert (error.provider, error.failures) == ("p", 2)  # the fields stay


@pytest.mark.parametrize("retry_in", [3.25, 0.0, None])
@pytest.mark.parametrize("reason", ["threshold", "manual", None])
def test_a_store_built_refusal_is_the_same_error(
    retry_in: float | None, reason: str | None
) -> None:
    from callpolicy._errors import refusal

    built = refusal("p", "m", 7, retry_in, reason)
    made = CircuitOpenError("p", "m", 7, retry_in, reason=reason)
    assert type(built) is CircuitOpenError
    assert (built.provider, built.model, built.failures, built.retry_in, built.reason) == (
        "p",
        "m",
        7,
        retry_in,
        reason,
    )
    assert (str(built), repr(built), built.args) == (str(made), repr(made), made.args)
    assert str(copy.deepcopy(built)) == str(made)
