"""What a call costs: :class:`Price` per model, and :class:`Pricing`, a budget's price table
resolved once per key to whole cost units (pico-dollars) per token.

Cost is counted in integers (see :data:`~callpolicy._budget_store.COST_UNITS_PER_USD`),
so a price is turned into units per token once, from the decimal the user wrote, and a
call's cost is two integer products: exact, and cheap on every call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._budget_store import COST_UNITS_PER_USD
from ._errors import CallPolicyError
from ._numbers import MAX_PRICE_PER_MILLION, Number, to_units
from ._types import split_key
from ._usage import Usage

__all__ = ["MissingPriceError", "Price", "Pricing"]

logger = logging.getLogger("callpolicy")

# USD per million tokens -> pico-dollars per token: x / 1e6 * 1e12.
_UNITS_PER_TOKEN_PER_MILLION = COST_UNITS_PER_USD // 1_000_000


def _per_token_units(per_million: float) -> int:
    return to_units(per_million, _UNITS_PER_TOKEN_PER_MILLION)


class MissingPriceError(CallPolicyError, LookupError):
    """A budget with ``max_cost_usd`` was asked to meter a model missing from its price table.

    Raised by :meth:`Budget.require_price` (call it when a wrapper is built) and by
    :meth:`Budget.reserve`, always before the model is called.
    """

    def __init__(self, key: str, known: tuple[str, ...] = ()) -> None:
        self.key = key
        self.model = split_key(key)[1] or key
        listed = ", ".join(repr(name) for name in known[:10]) or "none"
        super().__init__(
            f"no price for model {self.model!r} (key {key!r}); max_cost_usd needs one for every "
            f"model it meters: add {self.model!r} or {key!r} to Budget(prices=...) "
            f"(priced: {listed})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.key,))


class Price(BaseModel):
    """A model's price in US dollars per million tokens.

    >>> Price(input_per_million=2.5, output_per_million=10).cost_usd(1000, 500)
    0.0075
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_million: Number = Field(ge=0, le=MAX_PRICE_PER_MILLION)
    """USD per million input (prompt) tokens (0 for a free model; else at least 0.000001,
    one pico-dollar a token, the smallest price counted)."""
    output_per_million: Number = Field(ge=0, le=MAX_PRICE_PER_MILLION)
    """USD per million output (completion) tokens (same range)."""

    @field_validator("input_per_million", "output_per_million")
    @classmethod
    def _countable(cls, value: float) -> float:
        to_units(value, _UNITS_PER_TOKEN_PER_MILLION)  # refuses a price that would count as 0
        return value

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """The cost of a call that used these tokens."""
        units = input_tokens * _per_token_units(self.input_per_million)
        units += output_tokens * _per_token_units(self.output_per_million)
        return units / COST_UNITS_PER_USD


_UNRESOLVED = (-1, -1)
"""Not yet looked up (None is a looked-up key with no price)."""


class Pricing:
    """A budget's price table: each key's price, resolved once, in cost units per token.

    ``required`` (a budget with ``max_cost_usd``): a key with no price raises
    :class:`MissingPriceError` before its call, since its cost could not be counted.
    """

    __slots__ = ("_lock", "_warned", "prices", "required", "resolved")

    def __init__(self, prices: Mapping[str, Price], *, required: bool) -> None:
        self.prices = prices
        self.required = required
        self.resolved: dict[str, tuple[int, int] | None] = {}
        """Cost units per input and output token by key, once looked up (None: no price).
        A budget reads it on every call, and calls :meth:`units` only on a miss."""
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def price_for(self, key: str) -> Price | None:
        """The entry for the key (``provider::model``), else for its model name."""
        found = self.prices.get(key)
        if found is None:
            found = self.prices.get(split_key(key)[1])
        return found

    def require(self, key: str) -> Price | None:
        """:meth:`price_for`; raises :class:`MissingPriceError` for a missing price that
        is ``required``."""
        price = self.price_for(key)
        if price is None and self.required:
            raise MissingPriceError(key, tuple(self.prices))
        return price

    def units(self, key: str) -> tuple[int, int] | None:
        """Cost units per input and output token of ``key`` (None: unpriced); raises as
        :meth:`require`."""
        units = self.resolved.get(key, _UNRESOLVED)
        if units is not _UNRESOLVED:
            return units
        price = self.require(key)
        if price is not None:
            units = (
                _per_token_units(price.input_per_million),
                _per_token_units(price.output_per_million),
            )
        else:
            units = None
        self.resolved[key] = units
        return units

    def cost(self, key: str, stand_in: str | None, usage: Usage) -> int:
        """The cost of what a call used, after it: never raises for pricing, because the
        answer is already paid for. A key with no price is priced as ``stand_in`` (the
        key reserved for, when a fallback answered), with a warning; with neither
        priced, its cost is not counted (a warning too, when the table is not empty)."""
        units = self.resolved.get(key, _UNRESOLVED)
        if units is _UNRESOLVED:
            units = self._lenient_units(key)
        if units is None:
            if stand_in is not None and stand_in != key:
                units = self._lenient_units(stand_in)
            if units is not None:
                assert stand_in is not None
                self._warn_unpriced(key, f"priced as {self._priced_as(stand_in)}")
            elif self.prices:
                self._warn_unpriced(key, "its cost is not counted")
        if units is None:
            return 0
        return usage.input_tokens * units[0] + usage.output_tokens * units[1]

    def _lenient_units(self, key: str) -> tuple[int, int] | None:
        try:
            return self.units(key)
        except MissingPriceError:
            return None

    def _priced_as(self, key: str) -> str:
        """The model whose price ``key`` is charged at, named by its price-table entry."""
        entry = key if key in self.prices else split_key(key)[1]
        price = self.prices[entry]
        return (
            f"{entry!r} ({price.input_per_million:g} / {price.output_per_million:g} USD "
            "per million input / output tokens)"
        )

    def _warn_unpriced(self, key: str, consequence: str) -> None:
        # Once per key and consequence: a fallback that answers for two primaries is
        # priced as each in turn, and each warning names the model really priced.
        with self._lock:
            if (key, consequence) in self._warned:
                return
            self._warned.add((key, consequence))
        logger.warning(
            "callpolicy budget: no price for %r in the price table; %s", key, consequence
        )
