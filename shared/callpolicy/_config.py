"""Validated option objects: :class:`BreakerConfig` and :class:`RetryPolicy`.

Every field is checked at construction, and a bad value raises pydantic's
``ValidationError`` naming the field (``cooldown``, ``failure_threshold``, ...).
Durations are seconds as a number, or a :class:`datetime.timedelta`. Every number is
finite and within a range (``_numbers``): inf, NaN, bools and numeric strings are refused.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._numbers import MAX_SECONDS, Count, Fraction, Multiplier, Seconds, capped_growth
from ._types import ErrorClass

__all__ = [
    "DEFAULT_COUNTED_ERRORS",
    "DEFAULT_RETRYABLE_ERRORS",
    "BreakerConfig",
    "FallbackOn",
    "RetryPolicy",
    "Seconds",
    "checked_policy_options",
]

_MAX_CALLS = 1_000_000
"""The largest threshold, probe count or window: far more than any breaker needs, and
small enough for every store (the Redis store keeps the window as a list)."""

_MAX_ATTEMPTS = 1_000

DEFAULT_COUNTED_ERRORS: frozenset[ErrorClass] = frozenset(ErrorClass) - {
    ErrorClass.CLIENT,
    ErrorClass.CONTEXT_OVERFLOW,
    ErrorClass.CALLER,
}
"""Error classes that count as breaker failures by default: all but the caller's own faults
(a request the provider refused as invalid, one too long for the model, and a mistake
raised before any request left the process)."""

DEFAULT_RETRYABLE_ERRORS: frozenset[ErrorClass] = frozenset(
    {ErrorClass.RATE_LIMITED, ErrorClass.TIMEOUT, ErrorClass.NETWORK, ErrorClass.SERVER}
)
"""Error classes worth another attempt (never ``caller``: the same input fails the same way)."""

FallbackOn = Literal["failure", "open", "error"]
"""When the fallback model answers.

- ``"failure"`` (default): the circuit is open, or the primary failed with a counted
  failure after its retries.
- ``"open"``: only when the circuit is open (the reference crate's behaviour).
- ``"error"``: the circuit is open, or the primary raised any ``Exception``
  (like LangChain's ``with_fallbacks``).
"""

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class BreakerConfig(BaseModel):
    """Circuit breaker options. Defaults are the reference crate's where it has one.

    >>> BreakerConfig(failure_threshold=3, cooldown=10).cooldown
    10.0
    """

    model_config = _FROZEN

    failure_threshold: Count = Field(default=5, le=_MAX_CALLS)
    """Consecutive counted failures that open a closed circuit (reference: 5)."""
    cooldown: Seconds = Field(default=30.0, ge=0.001)
    """Seconds an opened circuit refuses calls before admitting a probe (reference: 30 s);
    from a millisecond (the Redis store's resolution) to ten years."""
    half_open_max_calls: Count = Field(default=1, le=_MAX_CALLS)
    """Probes in flight at once while half-open (reference: unlimited, a weak spot)."""
    success_threshold: Count = Field(default=1, le=_MAX_CALLS)
    """Probe successes needed to close a half-open circuit (reference: 1)."""
    failure_rate_threshold: Fraction | None = Field(default=None, gt=0)
    """Also open when this fraction of the last ``window_size`` calls failed (off by default)."""
    window_size: Count = Field(default=20, le=_MAX_CALLS)
    """Calls in the sliding window of the failure-rate mode."""
    minimum_calls: Count = Field(default=10, le=_MAX_CALLS)
    """Calls the window must hold before the failure rate can open the circuit."""
    cooldown_multiplier: Multiplier = 1.0
    """Each consecutive re-open multiplies the cooldown by this (1.0: no growth; at most
    1000)."""
    max_cooldown: Seconds | None = Field(default=None, ge=0.001)
    """Cap of a growing cooldown (None: ten years, the longest duration any option takes)."""
    counted_errors: frozenset[ErrorClass] = DEFAULT_COUNTED_ERRORS
    """Error classes that count as failures; the others neither count nor reset."""

    @model_validator(mode="after")
    def _check_relations(self) -> BreakerConfig:
        if self.minimum_calls > self.window_size:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) must not exceed "
                f"window_size ({self.window_size})"
            )
        if self.max_cooldown is not None and self.max_cooldown < self.cooldown:
            raise ValueError(
                f"max_cooldown ({self.max_cooldown}) must be at least cooldown ({self.cooldown})"
            )
        return self

    @property
    def cooldown_cap(self) -> float:
        """The longest cooldown: ``max_cooldown``, else ten years."""
        return MAX_SECONDS if self.max_cooldown is None else self.max_cooldown

    def cooldown_for(self, consecutive_trips: int) -> float:
        """Cooldown after the ``consecutive_trips``-th open in a row (1 for the first),
        capped before it is grown: no number of re-opens can overflow."""
        return capped_growth(
            self.cooldown,
            self.cooldown_multiplier,
            max(consecutive_trips - 1, 0),
            self.cooldown_cap,
        )


class RetryPolicy(BaseModel):
    """Retry options, off unless given. Defaults are the reference crate's.

    The delay before attempt ``n + 1`` is ``min(base_delay * multiplier**(n-1), max_delay)``
    with +-``jitter`` applied after the cap, unless the provider sent a Retry-After, which
    is used as is (no jitter) up to ``max_retry_after``.

    >>> RetryPolicy(jitter=0).backoff(3)
    2.0
    """

    model_config = _FROZEN

    max_attempts: Count = Field(default=4, le=_MAX_ATTEMPTS)
    """Attempts in all, the first included (reference: 4)."""
    base_delay: Seconds = 0.5
    """Delay before the second attempt (reference: 0.5 s)."""
    max_delay: Seconds = 30.0
    """Cap of the exponential delay (reference: 30 s)."""
    multiplier: Multiplier = 2.0
    """Growth of the delay per attempt (reference: doubling)."""
    jitter: Fraction = 0.2
    """Relative jitter, +-20 % by default (reference: 0.2)."""
    honor_retry_after: bool = True
    """Wait what the provider's Retry-After says instead of the backoff (reference: yes)."""
    max_retry_after: Seconds = 60.0
    """Cap of a Retry-After value (reference: none below 3600 s, a weak spot)."""
    deadline: Seconds | None = Field(default=60.0, gt=0)
    """No new attempt starts once this many seconds have passed since the first (reference:
    60 s); a wait that would end past it ends retrying at once."""
    retry_on: frozenset[ErrorClass] = DEFAULT_RETRYABLE_ERRORS
    """Error classes that are retried."""

    @model_validator(mode="after")
    def _check_relations(self) -> RetryPolicy:
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({self.max_delay}) must be at least base_delay ({self.base_delay})"
            )
        return self

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay after failed attempt number ``attempt`` (1-based), jitter included."""
        delay = capped_growth(self.base_delay, self.multiplier, attempt - 1, self.max_delay)
        if self.jitter and delay:
            draw = (rng or random).uniform(-self.jitter, self.jitter)
            delay *= 1.0 + draw
        return delay

    def delay(
        self, attempt: int, retry_after: float | None, rng: random.Random | None = None
    ) -> float:
        """Delay after failed attempt ``attempt``, honouring a Retry-After when configured."""
        if retry_after is not None and self.honor_retry_after:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return self.backoff(attempt, rng)


def checked_policy_options(
    breaker: BreakerConfig | None,
    breaker_options: dict[str, Any],
    *,
    retry: object,
    fallback_on: object,
    classifier: object,
    callables: dict[str, object],
    listeners: Iterable[object],
    listener_timeout: object,
) -> tuple[BreakerConfig, tuple[Any, ...], float]:
    """``CallPolicy``'s arguments checked, each error naming its argument: the breaker's
    options as one :class:`BreakerConfig`, the listeners, and the listener timeout."""
    if breaker is not None and breaker_options:
        raise TypeError(
            "pass either breaker=BreakerConfig(...) or breaker options "
            f"({', '.join(sorted(breaker_options))}), not both"
        )
    if breaker is None:
        breaker = BreakerConfig(**breaker_options)
    elif not isinstance(breaker, BreakerConfig):
        raise TypeError(f"breaker: expected a BreakerConfig, got {type(breaker).__name__}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry: expected a RetryPolicy or None, got {type(retry).__name__}")
    modes = get_args(FallbackOn)
    if fallback_on not in modes:
        raise ValueError(f"fallback_on: expected one of {modes}, got {fallback_on!r}")
    if classifier is not None and not callable(classifier):
        raise TypeError("classifier: expected a callable taking an exception")
    for name, fn in callables.items():
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable")
    if isinstance(listener_timeout, bool) or not isinstance(listener_timeout, (int, float)):
        raise TypeError("listener_timeout: expected a number of seconds")
    if not 0 < listener_timeout < float("inf"):
        raise ValueError(f"listener_timeout: expected a positive number, got {listener_timeout}")
    found = tuple(listeners)
    if not all(callable(listener) for listener in found):
        raise TypeError("listeners: expected callables taking an Event")
    return breaker, found, float(listener_timeout)
