"""Option validation: bad values fail at construction, naming the option."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from callpolicy import (
    BreakerConfig,
    CallPolicy,
    ErrorClass,
    MemoryStore,
    RetryPolicy,
    policy_from_options,
)

BAD_BREAKER_OPTIONS = [
    pytest.param({"failure_threshold": 0}, "failure_threshold", id="failure_threshold=0"),
    pytest.param({"cooldown": 0}, "cooldown", id="cooldown=0"),
    pytest.param({"cooldown": -1}, "cooldown", id="cooldown=-1"),
    pytest.param({"cooldown": True}, "cooldown", id="cooldown=True"),
    pytest.param({"cooldown": "soon"}, "cooldown", id="cooldown=str"),
    pytest.param({"half_open_max_calls": 0}, "half_open_max_calls", id="half_open_max_calls=0"),
    pytest.param({"success_threshold": 0}, "success_threshold", id="success_threshold=0"),
    pytest.param(
        {"failure_rate_threshold": 0}, "failure_rate_threshold", id="failure_rate_threshold=0"
    ),
    pytest.param(
        {"failure_rate_threshold": 1.5}, "failure_rate_threshold", id="failure_rate_threshold=1.5"
    ),
    pytest.param({"window_size": 0}, "window_size", id="window_size=0"),
    pytest.param(
        {"window_size": 5, "minimum_calls": 6}, "minimum_calls", id="minimum_calls>window_size"
    ),
    pytest.param({"cooldown_multiplier": 0.5}, "cooldown_multiplier", id="cooldown_multiplier<1"),
    pytest.param({"cooldown": 30, "max_cooldown": 10}, "max_cooldown", id="max_cooldown<cooldown"),
    pytest.param({"max_cooldown": False}, "max_cooldown", id="max_cooldown=False"),
    pytest.param({"counted_errors": {"teapot"}}, "counted_errors", id="counted_errors=unknown"),
    pytest.param({"colldown": 3}, "colldown", id="misspelt-option"),
]


@pytest.mark.parametrize(("options", "field"), BAD_BREAKER_OPTIONS)
def test_bad_breaker_options_raise_a_validation_error_naming_the_field(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        BreakerConfig(**options)


@pytest.mark.parametrize(("options", "field"), BAD_BREAKER_OPTIONS)
def test_the_policys_breaker_shortcut_validates_the_same_way(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        CallPolicy(**options)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        pytest.param({"max_attempts": 0}, "max_attempts", id="max_attempts=0"),
        pytest.param({"jitter": 1.5}, "jitter", id="jitter=1.5"),
        pytest.param({"jitter": -0.1}, "jitter", id="jitter<0"),
        pytest.param({"base_delay": -1}, "base_delay", id="base_delay<0"),
        pytest.param({"base_delay": True}, "base_delay", id="base_delay=True"),
        pytest.param({"base_delay": 2, "max_delay": 1}, "max_delay", id="max_delay<base_delay"),
        pytest.param({"multiplier": 0.5}, "multiplier", id="multiplier<1"),
        pytest.param({"deadline": 0}, "deadline", id="deadline=0"),
        pytest.param({"max_retry_after": -1}, "max_retry_after", id="max_retry_after<0"),
        pytest.param({"retry_on": {"sometimes"}}, "retry_on", id="retry_on=unknown"),
        pytest.param({"max_attemps": 3}, "max_attemps", id="misspelt-option"),
    ],
)
def test_bad_retry_options_raise_a_validation_error_naming_the_field(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        RetryPolicy(**options)


def test_durations_accept_a_timedelta() -> None:
    breaker = BreakerConfig(cooldown=timedelta(seconds=90), max_cooldown=timedelta(minutes=10))
    assert (breaker.cooldown, breaker.max_cooldown) == (90.0, 600.0)
    retry = RetryPolicy(
        base_delay=timedelta(milliseconds=250),
        max_delay=timedelta(seconds=5),
        deadline=timedelta(minutes=1),
    )
    assert (retry.base_delay, retry.max_delay, retry.deadline) == (0.25, 5.0, 60.0)


def test_a_non_positive_timedelta_is_rejected() -> None:
    with pytest.raises(ValidationError, match="cooldown"):
        BreakerConfig(cooldown=timedelta(0))


def test_error_classes_may_be_given_by_name() -> None:
    breaker = BreakerConfig(counted_errors={"server", "timeout"})
    assert breaker.counted_errors == frozenset({ErrorClass.SERVER, ErrorClass.TIMEOUT})


def test_options_are_frozen() -> None:
    breaker = BreakerConfig()
    with pytest.raises(ValidationError):
        breaker.failure_threshold = 1  # type: ignore[misc]


def test_the_deadline_can_be_turned_off() -> None:
    assert RetryPolicy(deadline=None).deadline is None


def test_cooldown_for_grows_and_caps() -> None:
    breaker = BreakerConfig(cooldown=10, cooldown_multiplier=3, max_cooldown=50)
    assert [breaker.cooldown_for(n) for n in (1, 2, 3, 4)] == [10, 30, 50, 50]
    assert BreakerConfig(cooldown=10).cooldown_for(5) == 10


# -- CallPolicy's own arguments ---------------------------------------------------------------


def test_breaker_and_breaker_options_cannot_be_combined() -> None:
    with pytest.raises(TypeError, match="failure_threshold"):
        CallPolicy(breaker=BreakerConfig(), failure_threshold=3)


def test_breaker_options_build_the_breaker() -> None:
    policy = CallPolicy(failure_threshold=3, cooldown=12)
    assert policy.breaker == BreakerConfig(failure_threshold=3, cooldown=12)


@pytest.mark.parametrize(
    ("arguments", "error", "names"),
    [
        pytest.param({"fallback_on": "sometimes"}, ValueError, "fallback_on", id="fallback_on"),
        pytest.param({"store": object()}, TypeError, "store", id="store"),
        pytest.param({"store": {}}, TypeError, "store", id="store-dict"),
        pytest.param(
            {"breaker": {"failure_threshold": 3}}, TypeError, "breaker", id="breaker-dict"
        ),
        pytest.param({"retry": 3}, TypeError, "retry", id="retry-int"),
        pytest.param({"classifier": "builtin"}, TypeError, "classifier", id="classifier"),
        pytest.param({"clock": 5.0}, TypeError, "clock", id="clock"),
        pytest.param({"sleep": None}, TypeError, "sleep", id="sleep"),
    ],
)
def test_bad_policy_arguments_raise_naming_the_argument(
    arguments: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        CallPolicy(**arguments)


def test_a_store_implementing_the_protocol_is_accepted() -> None:
    class WrappingStore:
        def __init__(self) -> None:
            self.inner = MemoryStore()
            self.created: list[str] = []

        def circuit(self, key, *, provider, model, config, on_transition):
            self.created.append(key)
            return self.inner.circuit(
                key, provider=provider, model=model, config=config, on_transition=on_transition
            )

        def circuits(self):
            return self.inner.circuits()

    store = WrappingStore()
    policy = CallPolicy(store=store)
    assert policy.store is store
    assert policy.execute("a::m", lambda: "ok") == "ok"
    assert store.created == ["a::m"]


# -- policy_from_options, used by the adapters --------------------------------------------------


def test_policy_from_options_builds_a_policy_from_the_options_given() -> None:
    policy = policy_from_options(
        None, {"failure_threshold": 2, "cooldown": None, "retry": None}, owner="Adapter"
    )
    assert policy.breaker.failure_threshold == 2
    assert policy.breaker.cooldown == 30.0
    assert policy.retry is None


def test_policy_from_options_returns_a_given_policy_as_is() -> None:
    given = CallPolicy()
    assert policy_from_options(given, {"cooldown": None}, owner="Adapter") is given


def test_policy_from_options_refuses_a_policy_and_options_together() -> None:
    with pytest.raises(TypeError, match=r"Adapter: .*cooldown"):
        policy_from_options(CallPolicy(), {"cooldown": 5}, owner="Adapter")


def test_policy_from_options_refuses_something_that_is_not_a_policy() -> None:
    with pytest.raises(TypeError, match="policy"):
        policy_from_options(BreakerConfig(), {}, owner="Adapter")  # type: ignore[arg-type]
