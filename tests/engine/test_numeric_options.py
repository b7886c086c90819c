"""No arithmetic blow-up: every numeric option is finite and in range at construction
(inf, NaN, bools and numeric strings refused, naming the field), growing cooldowns and
retry delays are capped before they are exponentiated, and money is counted exactly."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from callpolicy import (
    BreakerConfig,
    Budget,
    CallPolicy,
    CircuitState,
    Price,
    ResponseCache,
    RetryPolicy,
)
from callpolicy._numbers import MAX_SECONDS, capped_growth
from tests.support.clock import FakeClock, FakeSleeper


def breaker(**options: Any) -> object:
    return BreakerConfig(**options)


def retry(**options: Any) -> object:
    return RetryPolicy(**options)


def budget(**options: Any) -> object:
    if "max_cost_usd" in options:
        options.setdefault("prices", {"m": (1, 1)})
    return Budget(**options)


def cache(**options: Any) -> object:
    return ResponseCache(**options)


def price(**options: Any) -> object:
    options = {"input_per_million": 1.0, "output_per_million": 1.0, **options}
    return Price(**options)


# Each numeric option, with a value in range (to show the field is otherwise fine).
FIELDS: list[tuple[str, Any, str, float]] = [
    ("BreakerConfig", breaker, "failure_threshold", 3),
    ("BreakerConfig", breaker, "cooldown", 30.0),
    ("BreakerConfig", breaker, "half_open_max_calls", 2),
    ("BreakerConfig", breaker, "success_threshold", 2),
    ("BreakerConfig", breaker, "failure_rate_threshold", 0.5),
    ("BreakerConfig", breaker, "window_size", 20),
    ("BreakerConfig", breaker, "minimum_calls", 5),
    ("BreakerConfig", breaker, "cooldown_multiplier", 2.0),
    ("BreakerConfig", breaker, "max_cooldown", 600.0),
    ("RetryPolicy", retry, "max_attempts", 3),
    ("RetryPolicy", retry, "base_delay", 0.5),
    ("RetryPolicy", retry, "max_delay", 30.0),
    ("RetryPolicy", retry, "multiplier", 2.0),
    ("RetryPolicy", retry, "jitter", 0.2),
    ("RetryPolicy", retry, "max_retry_after", 60.0),
    ("RetryPolicy", retry, "deadline", 60.0),
    ("Budget", budget, "max_calls", 10),
    ("Budget", budget, "max_tokens", 1000),
    ("Budget", budget, "max_cost_usd", 5.0),
    ("Budget", budget, "window", 60.0),
    ("ResponseCache", cache, "ttl", 60.0),
    ("ResponseCache", cache, "max_entries", 100),
    ("ResponseCache", cache, "max_bytes", 4096),
    ("ResponseCache", cache, "stale_ttl", 60.0),
    ("Price", price, "input_per_million", 2.5),
    ("Price", price, "output_per_million", 10.0),
]
IDS = [f"{owner}.{name}" for owner, _, name, _ in FIELDS]

NOT_NUMBERS = [
    math.inf,
    -math.inf,
    math.nan,
    True,
    False,
    "5",
    "1e3",
    "inf",
    "nan",
    b"5",
]


def refused(make: Any, name: str, value: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        make(**{name: value})
    return caught.value


@pytest.mark.parametrize(("owner", "make", "name", "fine"), FIELDS, ids=IDS)
@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_inf_nan_bools_and_numeric_strings_are_refused_naming_the_field(
    owner: str, make: Any, name: str, fine: float, value: Any
) -> None:
    make(**{name: fine})  # the field is otherwise fine
    error = refused(make, name, value)
    assert [entry["loc"][0] for entry in error.errors()] == [name]
    assert name in str(error)


@pytest.mark.parametrize(("owner", "make", "name", "fine"), FIELDS, ids=IDS)
@settings(max_examples=25, deadline=None)
@given(value=st.one_of(st.floats(min_value=1e16), st.floats(max_value=-1e-300)))
def test_out_of_range_numbers_are_refused_naming_the_field(
    owner: str, make: Any, name: str, fine: float, value: float
) -> None:
    """Far too large (past every range) or negative: refused, whatever the field."""
    error = refused(make, name, value)
    assert error.errors()[0]["loc"][0] == name


@pytest.mark.parametrize(
    ("make", "name", "value"),
    [
        (breaker, "cooldown", 0.0005),  # below a millisecond
        (breaker, "cooldown", MAX_SECONDS * 2),
        (breaker, "cooldown", timedelta(days=365 * 11)),
        (breaker, "cooldown_multiplier", 1001),
        (breaker, "cooldown_multiplier", 0.5),
        (breaker, "failure_rate_threshold", 1.5),
        (breaker, "window_size", 10**7),
        (retry, "max_attempts", 1001),
        (retry, "multiplier", 10_000.0),
        (retry, "jitter", 1.01),
        (budget, "max_calls", 10**16),
        (budget, "max_cost_usd", 1e7),
        (price, "input_per_million", 1e6),
        (cache, "max_entries", 10**16),
    ],
    ids=lambda value: repr(value) if not callable(value) else value.__name__,
)
def test_values_past_a_sane_range_are_refused(make: Any, name: str, value: Any) -> None:
    assert refused(make, name, value).errors()[0]["loc"][0] == name


# -- exact money --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "name", "value"),
    [
        (budget, "max_cost_usd", 1e-13),  # below one pico-dollar: would be a zero limit
        (budget, "max_cost_usd", 4e-13),  # rounds to zero pico-dollars
        (price, "input_per_million", 1e-7),  # below one pico-dollar a token
        (price, "output_per_million", 4e-7),
    ],
)
def test_an_amount_that_would_count_as_zero_is_refused(make: Any, name: str, value: float) -> None:
    error = refused(make, name, value)
    assert error.errors()[0]["loc"][0] == name
    assert "count as zero" in str(error)


def test_a_free_model_is_still_priced_zero() -> None:
    assert Price(input_per_million=0, output_per_million=0).cost_usd(10**6, 10**6) == 0


@given(
    dollars=st.decimals(min_value="0.000001", max_value="1000000", places=6).map(float),
    tokens=st.integers(0, 10**6),
)
@settings(max_examples=50, deadline=None)
def test_a_cost_limit_is_kept_exactly(dollars: float, tokens: int) -> None:
    """What the user wrote (up to six decimals here) is the limit, to the pico-dollar:
    the remaining dollars before any spend are exactly the limit."""
    limited = Budget(max_cost_usd=dollars, prices={"m": (0, 0)})
    assert limited.usage().remaining_cost_usd == dollars


def test_the_largest_and_smallest_limits_are_exact() -> None:
    largest = Budget(max_cost_usd=1_000_000, prices={"m": (100_000, 100_000)})
    reservation = largest.reserve("acme::m", 10**6)  # 100,000 dollars held
    largest.release(reservation, refund_call=True)
    assert largest.usage().remaining_cost_usd == 1_000_000
    smallest = Budget(max_cost_usd=1e-12, prices={"m": (0.000001, 0)})
    smallest.reserve("acme::m", 1)  # one pico-dollar: exactly the limit
    assert smallest.usage().remaining_cost_usd == 0


# -- capped growth ------------------------------------------------------------------


@given(
    base=st.floats(min_value=0, max_value=MAX_SECONDS),
    multiplier=st.floats(min_value=1, max_value=1000),
    steps=st.integers(0, 10**18),
    cap=st.floats(min_value=0, max_value=MAX_SECONDS),
)
def test_capped_growth_never_overflows_and_stays_within_its_bounds(
    base: float, multiplier: float, steps: int, cap: float
) -> None:
    grown = capped_growth(base, multiplier, steps, cap)
    assert math.isfinite(grown)
    assert grown <= cap
    assert grown >= min(base, cap)
    assert capped_growth(base, multiplier, steps + 1, cap) >= grown


@given(
    cooldown=st.floats(min_value=0.001, max_value=3600),
    multiplier=st.floats(min_value=1, max_value=1000),
    cap_factor=st.none() | st.floats(min_value=1, max_value=1000),
    trips=st.integers(1, 10**12),
)
def test_a_growing_cooldown_never_overflows(
    cooldown: float, multiplier: float, cap_factor: float | None, trips: int
) -> None:
    config = BreakerConfig(
        cooldown=cooldown,
        cooldown_multiplier=multiplier,
        max_cooldown=None if cap_factor is None else min(cooldown * cap_factor, MAX_SECONDS),
    )
    seconds = config.cooldown_for(trips)
    assert cooldown <= seconds <= config.cooldown_cap <= MAX_SECONDS
    assert config.cooldown_for(trips + 1) >= seconds


@given(
    base=st.floats(min_value=0, max_value=60),
    multiplier=st.floats(min_value=1, max_value=1000),
    attempt=st.integers(1, 10**12),
    jitter=st.floats(min_value=0, max_value=1),
)
def test_a_retry_backoff_never_overflows(
    base: float, multiplier: float, attempt: int, jitter: float
) -> None:
    policy = RetryPolicy(
        base_delay=base, max_delay=max(base, 30.0), multiplier=multiplier, jitter=jitter
    )
    delay = policy.backoff(attempt)
    assert 0 <= delay <= policy.max_delay * (1 + jitter)


def test_the_documented_backoff_is_unchanged() -> None:
    policy = RetryPolicy(jitter=0)
    assert [policy.backoff(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    config = BreakerConfig(cooldown=30, cooldown_multiplier=2, max_cooldown=300)
    assert [config.cooldown_for(n) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]


def test_a_long_outage_of_re_opens_never_overflows() -> None:
    """1,200 failed probes in a row, each doubling the cooldown a thousandfold."""
    clock = FakeClock()
    policy = CallPolicy(failure_threshold=1, cooldown=30, cooldown_multiplier=1000, clock=clock)

    def down() -> str:
        raise ConnectionError("connection refused")

    for _ in range(1200):
        with pytest.raises(ConnectionError):
            policy.execute("acme::m1", down)
        snapshot = policy.snapshot()["acme::m1"]
        assert snapshot.state is CircuitState.OPEN
        assert snapshot.retry_in is not None
        assert snapshot.retry_in <= MAX_SECONDS
        clock.advance(snapshot.retry_in)
    assert policy.snapshot()["acme::m1"].retry_in == 0.0


def test_a_long_retry_run_never_overflows() -> None:
    clock = FakeClock()
    sleeper = FakeSleeper(clock)
    policy = CallPolicy(
        failure_threshold=1_000_000,
        retry=RetryPolicy(
            max_attempts=1000, base_delay=1, max_delay=60, multiplier=1000, deadline=None
        ),
        clock=clock,
        sleep=sleeper,
    )
    attempts = 0

    def flaky() -> str:
        nonlocal attempts
        attempts += 1
        raise TimeoutError("slow")

    with pytest.raises(TimeoutError):
        policy.execute("acme::m1", flaky)
    assert attempts == 1000
    assert max(sleeper.delays) <= 60 * 1.2


def test_option_models_name_every_numeric_field() -> None:
    """Every numeric field of the option objects is covered above."""
    from callpolicy._budget import _BudgetOptions
    from callpolicy._cache import _CacheOptions

    covered = {(owner, name) for owner, _, name, _ in FIELDS}
    models: dict[str, type[BaseModel]] = {
        "BreakerConfig": BreakerConfig,
        "RetryPolicy": RetryPolicy,
        "Budget": _BudgetOptions,
        "ResponseCache": _CacheOptions,
        "Price": Price,
    }
    for owner, model in models.items():
        for name, info in model.model_fields.items():
            text = str(info.annotation)
            if "float" in text or "int" in text:
                assert (owner, name) in covered, f"{owner}.{name} is not tested"
