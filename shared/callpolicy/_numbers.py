"""Numeric option types shared by every validated option object, and capped growth.

Every duration, multiplier, count, price and limit of :class:`BreakerConfig`,
:class:`RetryPolicy`, :class:`Budget` and :class:`ResponseCache` is one of the types
here, so the rules are the same everywhere: a number (never a bool, never a numeric
string), finite (inf and NaN refused), and within a range that the engine's arithmetic
and every store can represent. A bad value raises pydantic's ``ValidationError``
naming the field.

:func:`capped_growth` grows a delay by a multiplier without ever computing a power past
its cap, so a long outage (many re-opens) or a long retry run never overflows.
"""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

__all__ = [
    "MAX_COST_USD",
    "MAX_COUNT",
    "MAX_MULTIPLIER",
    "MAX_PRICE_PER_MILLION",
    "MAX_SECONDS",
    "Count",
    "Fraction",
    "Multiplier",
    "Number",
    "Seconds",
    "capped_growth",
    "to_units",
]

MAX_SECONDS = 10 * 365 * 86_400.0
"""The longest duration any option takes: ten years. In milliseconds (the Redis store's
unit) it stays far below 2**53, so every store keeps it exactly."""

MAX_MULTIPLIER = 1_000.0
"""The largest growth factor of a cooldown or a retry delay."""

MAX_COUNT = 10**15
"""The largest count (calls, tokens): exact as a double, as Redis's Lua sees numbers."""

MAX_COST_USD = 1_000_000.0
"""The largest dollar limit: 10**18 cost units (pico-dollars), within a 64-bit counter."""

MAX_PRICE_PER_MILLION = 100_000.0
"""The largest price, in USD per million tokens."""


def _refuse_non_numbers(value: Any) -> Any:
    # ValueError, not TypeError: pydantic turns only ValueError into a ValidationError.
    if isinstance(value, bool):  # bool is an int; True seconds or calls is never meant
        raise ValueError("expected a number, not a bool")
    if isinstance(value, (str, bytes, bytearray)):  # pydantic would parse "5" as 5.0
        raise ValueError(f"expected a number, not a {type(value).__name__}")
    return _finite(value)


def _finite(value: Any) -> Any:
    # Checked first, so that inf and NaN are named as such rather than as out of range.
    if isinstance(value, (float, Decimal)) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


def _to_seconds(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (bool, str, bytes, bytearray)):
        raise ValueError(
            f"expected seconds as a number or a timedelta, not a {type(value).__name__}"
        )
    return _finite(value)


Number = Annotated[float, BeforeValidator(_refuse_non_numbers), Field(allow_inf_nan=False)]
"""A finite number (an int is accepted); ranges are set per field."""

Seconds = Annotated[
    float, BeforeValidator(_to_seconds), Field(allow_inf_nan=False, ge=0, le=MAX_SECONDS)
]
"""A duration: seconds as a finite number, or a ``timedelta``; at most :data:`MAX_SECONDS`."""

Multiplier = Annotated[
    float, BeforeValidator(_refuse_non_numbers), Field(allow_inf_nan=False, ge=1, le=MAX_MULTIPLIER)
]
"""A growth factor, from 1 (no growth) to :data:`MAX_MULTIPLIER`."""

Fraction = Annotated[
    float, BeforeValidator(_refuse_non_numbers), Field(allow_inf_nan=False, ge=0, le=1)
]
"""A share, from 0 to 1."""

Count = Annotated[int, BeforeValidator(_refuse_non_numbers), Field(ge=1, le=MAX_COUNT)]
"""A positive whole number, at most :data:`MAX_COUNT`."""


def capped_growth(base: float, multiplier: float, steps: int, cap: float) -> float:
    """``min(base * multiplier**steps, cap)``, without computing a power past the cap.

    The comparison is made on logarithms first, so no ``steps`` (a re-open count after
    a week-long outage, a retry run of any length) can overflow.

    >>> capped_growth(0.5, 2.0, 2, 30.0)
    2.0
    >>> capped_growth(30.0, 2.0, 10**12, 3600.0)
    3600.0
    """
    if steps <= 0 or multiplier == 1.0 or base <= 0.0:
        return min(base, cap)
    if base >= cap:
        return cap
    growth = steps * math.log(multiplier)
    if growth >= math.log(cap) - math.log(base):
        return cap
    # Below the cap from here on. A power is exact where it matters (2.0**2 is 4.0);
    # only a base far below a nanosecond could need more than a double's range for it.
    power = multiplier**steps if growth < 700.0 else math.exp(growth)
    return min(base * power, cap)


def to_units(value: float, units_per_one: int) -> int:
    """``value`` in whole units (``units_per_one`` per 1), from its exact decimal form.

    The shortest decimal that round-trips the float (``repr``) is what the user wrote,
    so 0.1 dollars is exactly 10**11 pico-dollars, not the binary float's expansion;
    finer digits round to the nearest unit. A positive value that would round to zero
    units raises ``ValueError`` (in a validator: a ``ValidationError`` naming the field)
    rather than becoming a silent zero.

    >>> to_units(0.1, 10**12)
    100000000000
    """
    units = round(Decimal(repr(float(value))) * units_per_one)
    if value > 0 and units == 0:
        raise ValueError(
            f"{value!r} is below the smallest amount counted (1/{units_per_one:,}); "
            "it would count as zero"
        )
    return units
