"""Spending limits: :class:`Budget` refuses a call before it reaches the model once it
would exceed a limit on calls, tokens or dollars, in total or in a rolling window.

The check and the reservation are one atomic step in the budget's store (see
``_budget_store``), so concurrent callers can never overspend: 100 callers racing for a
10-call budget get exactly 10 calls through. The lifecycle of one call::

    reservation = budget.reserve(key, budget.estimate(prompt_text))   # may refuse
    try:
        answer = call_the_model()
    except BaseException:
        budget.release(reservation)          # the call still counts; its estimate is freed
        raise
    budget.commit(reservation, Usage(input_tokens=..., output_tokens=...))  # or None: unknown

Where the reference crate checked and counted in two steps (so concurrent callers
overspent), had no window, and counted cost only by hand, this one reserves atomically,
supports a rolling window, and prices usage from a table the user supplies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Generator,
    Iterable,
    Mapping,
)
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from ._budget_store import (
    COST_UNITS_PER_USD,
    BudgetExceededError,
    BudgetLimits,
    BudgetStore,
    MemoryBudgetStore,
    Reservation,
    Tally,
)
from ._errors import CallPolicyError
from ._numbers import (
    MAX_COST_USD,
    MAX_PRICE_PER_MILLION,
    Count,
    Number,
    Seconds,
    to_units,
)
from ._types import split_key

__all__ = [
    "SHARED_SCOPE",
    "Budget",
    "BudgetExceededError",
    "BudgetUsage",
    "MissingPriceError",
    "Price",
    "Reservation",
    "Usage",
    "approx_tokens",
]

logger = logging.getLogger("callpolicy")

T = TypeVar("T")

SHARED_SCOPE = "*"
"""The store scope of a budget shared across keys (``per_key=False``)."""

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def approx_tokens(text: str) -> int:
    """The reference crate's token estimate: UTF-8 bytes / 4, rounded down.

    >>> approx_tokens("Hello, world!")
    3
    """
    if text.isascii():  # one byte a character: skip the encode
        return len(text) // 4
    return len(text.encode("utf-8")) // 4


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

    model_config = _FROZEN

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


# USD per million tokens -> pico-dollars per token: x / 1e6 * 1e12.
_UNITS_PER_TOKEN_PER_MILLION = COST_UNITS_PER_USD // 1_000_000


def _per_token_units(per_million: float) -> int:
    return to_units(per_million, _UNITS_PER_TOKEN_PER_MILLION)


_USAGE_SECTIONS = ("usage_metadata", "usage", "token_usage", "usageMetadata")
_INPUT_NAMES = ("input_tokens", "prompt_tokens", "prompt_token_count", "promptTokenCount")
_OUTPUT_NAMES = (
    "output_tokens",
    "completion_tokens",
    "candidates_token_count",
    "candidatesTokenCount",
)
# Anthropic's raw usage counts cached prompt tokens apart from input_tokens (LangChain's
# usage_metadata already folds them in, under input_token_details, which is not read).
_EXTRA_INPUT_NAMES = ("cache_creation_input_tokens", "cache_read_input_tokens")


def _field(source: object, name: str) -> object:
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _count(source: object, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = _field(source, name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call used, as the model reported them (or estimated: ``estimated=True``).

    >>> Usage(input_tokens=12, output_tokens=30).total_tokens
    42
    >>> Usage.from_report({"usage": {"prompt_tokens": 12, "completion_tokens": 30}})
    Usage(input_tokens=12, output_tokens=30, estimated=False)
    """

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a count >= 0, got {value!r}")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.estimated or other.estimated,
        )

    @classmethod
    def from_report(cls, report: object) -> Usage | None:
        """Read usage from what a provider or framework reports, or None if it says nothing.

        Understands a mapping or an object (attributes) with ``input_tokens`` /
        ``output_tokens`` (LangChain ``usage_metadata``, Anthropic), ``prompt_tokens`` /
        ``completion_tokens`` (OpenAI; LlamaIndex's raw response), or Gemini's
        ``prompt_token_count`` / ``candidates_token_count``; also one or two levels down
        under ``usage_metadata``, ``usage``, ``token_usage`` or ``usageMetadata``.
        """
        return cls._read(report, depth=0)

    @classmethod
    def _read(cls, report: object, depth: int) -> Usage | None:
        if report is None or isinstance(report, (str, bytes, int, float)):
            return None
        found_in = _count(report, _INPUT_NAMES)
        found_out = _count(report, _OUTPUT_NAMES)
        if found_in is not None or found_out is not None:
            extra = sum(_count(report, (name,)) or 0 for name in _EXTRA_INPUT_NAMES)
            return cls((found_in or 0) + extra, found_out or 0)
        if depth < 2:
            for section in _USAGE_SECTIONS:
                inner = _field(report, section)
                if inner is not None:
                    found = cls._read(inner, depth + 1)
                    if found is not None:
                        return found
        return None


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What a budget has used, as :meth:`Budget.usage` reports it.

    Totals are lifetime totals (since creation or :meth:`Budget.reset`) and include the
    estimates held by calls still in flight. With a window, the ``window_*`` fields give
    what was spent in the last ``window`` seconds, and the limits and ``remaining_*`` apply
    to those; without one they apply to the totals. ``None`` limits are unbounded.
    """

    key: str | None
    """The key these counters belong to (per-key budgets), or None for a shared budget."""
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated_calls: int
    """Calls whose usage the model did not report, counted by their estimate."""
    in_flight: int
    window: float | None
    window_calls: int | None
    window_tokens: int | None
    window_cost_usd: float | None
    max_calls: int | None
    max_tokens: int | None
    max_cost_usd: float | None
    remaining_calls: int | None
    remaining_tokens: int | None
    remaining_cost_usd: float | None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (``tokens`` included)."""
        data = asdict(self)
        data["tokens"] = self.tokens
        return data


class _BudgetOptions(BaseModel):
    """Validation of :class:`Budget`'s options: a bad value names its field."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Budget")

    max_calls: Count | None = None
    max_tokens: Count | None = None
    max_cost_usd: Number | None = Field(default=None, gt=0, le=MAX_COST_USD)
    window: Seconds | None = Field(default=None, gt=0)
    prices: dict[str, Price] | None = None
    per_key: StrictBool = False

    @field_validator("prices", mode="before")
    @classmethod
    def _prices_from_pairs(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError("expected a mapping of model name to Price or (input, output)")
        prices: dict[Any, Any] = {}
        for name, given in value.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"model names must be non-empty strings, got {name!r}")
            price = given
            if isinstance(price, (tuple, list)):
                if len(price) != 2:
                    raise ValueError(
                        f"{name!r}: expected (input_per_million, output_per_million), "
                        f"got {len(price)} values"
                    )
                price = {"input_per_million": price[0], "output_per_million": price[1]}
            prices[name] = price
        return prices

    @field_validator("max_cost_usd")
    @classmethod
    def _countable(cls, value: float | None) -> float | None:
        if value is not None:
            to_units(value, COST_UNITS_PER_USD)  # refuses a limit that would count as 0
        return value

    @model_validator(mode="after")
    def _check_relations(self) -> _BudgetOptions:
        if self.max_cost_usd is not None and not self.prices:
            raise ValueError(
                "max_cost_usd needs prices=: a price per model, "
                "e.g. prices={'gpt-4o-mini': (0.15, 0.60)} (USD per million input, output tokens)"
            )
        return self


def _check_meter_options(
    key: object, usage_of: object, estimate: object, cumulative: object, key_of: object
) -> None:
    # Checked when the stream is wrapped, not at its first chunk: a mistake shows where
    # it was made, and never in the middle of a stream the caller is reading.
    if not isinstance(key, str):
        raise TypeError(f"key: expected a breaker key (str), got {key!r}")
    if not callable(usage_of):
        raise TypeError("usage_of: expected a callable taking a chunk")
    if estimate is not None and not callable(estimate):
        raise TypeError("estimate: expected None or a callable returning input tokens")
    if not isinstance(cumulative, bool):
        raise TypeError(f"cumulative: expected a bool, got {cumulative!r}")
    if key_of is not None and not callable(key_of):
        raise TypeError("key_of: expected None or a callable taking a chunk")


class Budget:
    """Limits on calls, tokens and dollars, checked before every call.

    Args:
        max_calls: calls allowed (a failed call counts: it used a round, as in the
            reference crate). ``None``: unbounded.
        max_tokens: input plus output tokens allowed. A call is refused when the limit is
            used up, or when the tokens used plus this call's estimated input would pass it.
        max_cost_usd: US dollars allowed, priced from ``prices``; refused likewise. Kept
            exactly, in whole pico-dollars (10**-12 USD) from the decimal written: at
            least one pico-dollar, at most 1,000,000 USD.
        window: ``None`` (the limits are lifetime totals) or a rolling window in seconds
            or a ``timedelta``: the limits then apply to what was spent in the last
            ``window`` seconds, which stops a runaway loop at its rate, not at the end of
            the money. Totals are still reported.
        prices: USD per million tokens by model, as :class:`Price` or ``(input, output)``.
            Keys are a model name (``"gpt-4o-mini"``) or a breaker key
            (``"openai::gpt-4o-mini"``), which wins when both match. Required with
            ``max_cost_usd``; without it, cost is tracked only for the models listed.
        per_key: separate counters (and limits) per breaker key; ``False`` (default)
            shares one set of counters across every key the budget meters.
        store: where the counters live; a fresh in-memory store by default.
        clock: monotonic seconds for the default store's window (inject a fake in tests).
        estimate_tokens: the input-token estimate of a prompt's text (default
            :func:`approx_tokens`: UTF-8 bytes / 4, as the reference crate).

    A bad value raises pydantic's ``ValidationError`` naming the field.

    >>> budget = Budget(max_calls=2, max_tokens=120)
    >>> r = budget.reserve("acme::m1", 10)
    >>> budget.commit(r, Usage(input_tokens=10, output_tokens=90))
    True
    >>> budget.usage().tokens, budget.usage().remaining_calls
    (100, 1)
    >>> try:
    ...     budget.reserve("acme::m1", 30)  # 100 used + ~30 would pass 120
    ... except BudgetExceededError as refusal:
    ...     print(refusal)
    budget exceeded for acme::m1: tokens 100 used of 120; this call needs ~30 more
    """

    def __init__(
        self,
        *,
        max_calls: int | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        window: float | timedelta | None = None,
        prices: Mapping[str, Price | tuple[float, float]] | None = None,
        per_key: bool = False,
        store: BudgetStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        estimate_tokens: Callable[[str], int] = approx_tokens,
    ) -> None:
        options = _BudgetOptions(
            max_calls=max_calls,
            max_tokens=max_tokens,
            max_cost_usd=max_cost_usd,
            window=window,
            prices=prices,  # tuples become Price in the validator
            per_key=per_key,
        )
        if store is not None and not isinstance(store, BudgetStore):
            # A shared store that carries several kinds of state (RedisStore) hands out
            # its budget store, so the same object can be given to every policy.
            as_budget_store = getattr(store, "budget_store", None)
            if not callable(as_budget_store):
                raise TypeError(f"store: {type(store).__name__} does not implement BudgetStore")
            store = as_budget_store()
        if not callable(estimate_tokens):
            raise TypeError("estimate_tokens: expected a callable taking the prompt's text")
        self.max_calls: int | None = options.max_calls
        self.max_tokens: int | None = options.max_tokens
        self.max_cost_usd: float | None = options.max_cost_usd
        self.window: float | None = options.window
        self.per_key: bool = options.per_key
        self.prices: Mapping[str, Price] = dict(options.prices or {})
        self._limits = BudgetLimits(
            max_calls=options.max_calls,
            max_tokens=options.max_tokens,
            max_cost_units=(
                None
                if options.max_cost_usd is None
                else to_units(options.max_cost_usd, COST_UNITS_PER_USD)
            ),
            window=options.window,
        )
        self._store: BudgetStore = store if store is not None else MemoryBudgetStore(clock=clock)
        self._estimate = estimate_tokens
        # Per-token prices in cost units, resolved once per key (None: unpriced).
        self._unit_prices: dict[str, tuple[int, int] | None] = {}
        self._warned_unpriced: set[tuple[str, str]] = set()
        self._warn_lock = threading.Lock()

    # -- configuration -------------------------------------------------------------
    @property
    def store(self) -> BudgetStore:
        return self._store

    @property
    def is_async_native(self) -> bool:
        """True when the ``a*`` methods must be awaited (a network store)."""
        return self._store.is_async_native

    def estimate(self, text: str) -> int:
        """This budget's input-token estimate of a prompt's text."""
        return int(self._estimate(text))

    def price_for(self, key: str) -> Price | None:
        """The price of ``key`` (``provider::model``): the entry for the key, else for the
        model name; None when the table has neither."""
        found = self.prices.get(key)
        if found is None:
            found = self.prices.get(split_key(key)[1])
        return found

    def require_price(self, key: str) -> Price | None:
        """Check, when a wrapper is built, that ``key`` can be metered: with
        ``max_cost_usd`` set, a model missing from the price table raises
        :class:`MissingPriceError` (naming the model) now rather than at its first call."""
        price = self.price_for(key)
        if price is None and self.max_cost_usd is not None:
            raise MissingPriceError(key, tuple(self.prices))
        return price

    def _units(self, key: str) -> tuple[int, int] | None:
        try:
            return self._unit_prices[key]
        except KeyError:
            pass
        price = self.require_price(key)
        units = (
            None
            if price is None
            else (
                _per_token_units(price.input_per_million),
                _per_token_units(price.output_per_million),
            )
        )
        self._unit_prices[key] = units
        return units

    def _scope(self, key: str) -> str:
        return key if self.per_key else SHARED_SCOPE

    # -- the call's lifecycle ------------------------------------------------------
    def reserve(
        self, key: str, estimated_input_tokens: int = 0, *, estimated_output_tokens: int = 0
    ) -> Reservation:
        """Admit one call to ``key`` (``provider::model``) or raise
        :class:`BudgetExceededError` — one atomic step, so concurrent callers never
        overspend. The call is counted and its estimate held (tokens and, priced at
        ``key``'s input and output prices, dollars) until :meth:`commit` or
        :meth:`release`.

        ``estimated_output_tokens`` (default 0, as the reference crate) can hold room for
        the answer too, e.g. the request's ``max_tokens``, for a stricter budget.
        Raises :class:`MissingPriceError` when ``max_cost_usd`` is set and ``key`` has no
        price.
        """
        if estimated_input_tokens < 0 or estimated_output_tokens < 0:
            raise ValueError("estimated tokens must be >= 0")
        units = self._units(key)
        cost = 0
        if units is not None:
            cost = estimated_input_tokens * units[0] + estimated_output_tokens * units[1]
        return self._store.reserve(
            key,
            self._scope(key),
            input_tokens=estimated_input_tokens,
            output_tokens=estimated_output_tokens,
            cost_units=cost,
            limits=self._limits,
        )

    def commit(
        self, reservation: Reservation, usage: Usage | None, *, key: str | None = None
    ) -> bool:
        """Settle a successful call: its held estimate is replaced by ``usage``.

        ``usage=None`` (the model did not report any) keeps the estimate and counts the
        call among ``estimated_calls``, as does a ``Usage(estimated=True)``. ``key`` is the
        model that really answered (a fallback's), for its price; default the reserved
        one. Never raises for pricing: a model with no price is priced at the reserved
        key's price, with a warning, because the answer is already paid for.
        Returns False (and changes nothing) if the reservation was already settled.
        """
        if usage is None:
            return self._store.settle(
                reservation,
                input_tokens=reservation.input_tokens,
                output_tokens=reservation.output_tokens,
                cost_units=reservation.cost_units,
                estimated=True,
                refund_call=False,
            )
        return self._store.settle(
            reservation,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_units=self._cost(key or reservation.key, reservation.key, usage),
            estimated=usage.estimated,
            refund_call=False,
        )

    def release(self, reservation: Reservation, *, refund_call: bool = False) -> bool:
        """Settle a failed call: its held tokens and dollars are freed. The call itself
        still counts (a failed call used a round, as in the reference crate) unless
        ``refund_call=True`` — meant for a call that never reached any model, such as one
        refused by an open circuit with no fallback. Returns False if already settled."""
        return self._store.settle(
            reservation,
            input_tokens=0,
            output_tokens=0,
            cost_units=0,
            estimated=False,
            refund_call=refund_call,
        )

    def record(self, key: str, usage: Usage, *, calls: int = 0) -> None:
        """Count usage without a reservation and without a check: the hook for a stream's
        chunks, called as they pass (they are never altered; :meth:`metered` does it for
        a whole stream). ``calls=1`` also counts the stream as a call; a
        ``Usage(estimated=True)`` (a stream that reported no tokens, its input estimated)
        counts one call among ``estimated_calls``. A stream recorded this way is never
        refused; to refuse one before its first chunk, :meth:`reserve`
        at its start and :meth:`commit` the summed usage at its end instead."""
        if calls < 0:
            raise ValueError(f"calls: expected a count >= 0, got {calls}")
        self._store.record(
            self._scope(key),
            calls=calls,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_units=self._cost(key, None, usage),
            window=self.window,
            estimated=usage.estimated,
        )

    # -- streams -------------------------------------------------------------------
    def metered(
        self,
        chunks: Iterable[T],
        *,
        key: str,
        usage_of: Callable[[T], Usage | None] = Usage.from_report,
        estimate: Callable[[], int] | None = None,
        cumulative: bool = False,
        key_of: Callable[[T], str | None] | None = None,
    ) -> Generator[T, None, None]:
        """``chunks``, each the very same object, with the stream counted as they pass.

        The stream is never refused (see :meth:`record`) and never altered. It counts as
        one call, once (with its first chunk, or at its end if none came), plus the
        tokens its chunks report, read by ``usage_of`` (default
        :meth:`Usage.from_report`; None or zero tokens: no report). With
        ``cumulative=False`` each report is added (deltas, as LangChain's
        ``usage_metadata``); with ``cumulative=True`` reports are running totals (as
        OpenAI's final chunk, Anthropic's and Gemini's growing totals) and only their
        growth is added. A stream that reported no tokens counts ``estimate()`` input
        tokens when it ends (called only then; None: no estimate), or none if it failed.

        ``key`` is the breaker key (``provider::model``) the stream is counted and priced
        under; ``key_of`` can name, per chunk, the key that really answered (a
        fallback's), None meaning ``key``. ``chunks`` is closed (``close()``) when the
        metered stream ends, also when its consumer stops early. Nothing is counted for a
        stream never iterated. Metering never breaks the stream: a failing ``usage_of``,
        ``estimate`` or store is logged as a warning and the chunks go on.

        >>> budget = Budget(max_tokens=1000)
        >>> chunks = [{"text": "Hel"}, {"text": "lo", "usage": {"prompt_tokens": 5,
        ...                                                    "completion_tokens": 2}}]
        >>> [chunk["text"] for chunk in budget.metered(chunks, key="acme::m1")]
        ['Hel', 'lo']
        >>> budget.usage().calls, budget.usage().tokens
        (1, 7)
        >>> _ = list(budget.metered([{"text": "no usage"}], key="acme::m1", estimate=lambda: 12))
        >>> budget.usage().calls, budget.usage().tokens
        (2, 19)
        """
        from ._meter import meter_stream  # not at the top: _meter imports this module

        _check_meter_options(key, usage_of, estimate, cumulative, key_of)
        return meter_stream(
            self,
            chunks,
            key=key,
            usage_of=usage_of,
            estimate=estimate,
            cumulative=cumulative,
            key_of=key_of,
        )

    def ametered(
        self,
        chunks: AsyncIterable[T],
        *,
        key: str,
        usage_of: Callable[[T], Usage | None] = Usage.from_report,
        estimate: Callable[[], int] | None = None,
        cumulative: bool = False,
        key_of: Callable[[T], str | None] | None = None,
    ) -> AsyncGenerator[T, None]:
        """Async :meth:`metered`: ``chunks`` an async iterable, closed with ``aclose()``;
        usage recorded with :meth:`arecord`.

        >>> import asyncio
        >>> async def chunks():
        ...     yield {"text": "hi", "usage": {"input_tokens": 3, "output_tokens": 1}}
        >>> async def consume(budget):
        ...     return [chunk["text"] async for chunk in budget.ametered(chunks(), key="a::m")]
        >>> budget = Budget()
        >>> asyncio.run(consume(budget)), budget.usage().tokens
        (['hi'], 4)
        """
        from ._meter import ameter_stream  # not at the top: _meter imports this module

        _check_meter_options(key, usage_of, estimate, cumulative, key_of)
        return ameter_stream(
            self,
            chunks,
            key=key,
            usage_of=usage_of,
            estimate=estimate,
            cumulative=cumulative,
            key_of=key_of,
        )

    def _cost(self, key: str, stand_in: str | None, usage: Usage) -> int:
        try:
            units = self._units(key)
        except MissingPriceError:
            units = None
        if units is None:
            if stand_in is not None and stand_in != key:
                try:
                    units = self._units(stand_in)
                except MissingPriceError:
                    units = None
            if units is not None:
                assert stand_in is not None
                self._warn_unpriced(key, f"priced as {self._priced_as(stand_in)}")
            elif self.prices:
                self._warn_unpriced(key, "its cost is not counted")
        if units is None:
            return 0
        return usage.input_tokens * units[0] + usage.output_tokens * units[1]

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
        with self._warn_lock:
            if (key, consequence) in self._warned_unpriced:
                return
            self._warned_unpriced.add((key, consequence))
        logger.warning(
            "callpolicy budget: no price for %r in the price table; %s", key, consequence
        )

    # -- async variants (await them only when is_async_native) --------------------
    async def areserve(
        self, key: str, estimated_input_tokens: int = 0, *, estimated_output_tokens: int = 0
    ) -> Reservation:
        """Async :meth:`reserve` (for a network store; the memory store never blocks)."""
        if not self._store.is_async_native:
            return self.reserve(
                key, estimated_input_tokens, estimated_output_tokens=estimated_output_tokens
            )
        if estimated_input_tokens < 0 or estimated_output_tokens < 0:
            raise ValueError("estimated tokens must be >= 0")
        units = self._units(key)
        cost = 0
        if units is not None:
            cost = estimated_input_tokens * units[0] + estimated_output_tokens * units[1]
        return await self._store.areserve(
            key,
            self._scope(key),
            input_tokens=estimated_input_tokens,
            output_tokens=estimated_output_tokens,
            cost_units=cost,
            limits=self._limits,
        )

    async def acommit(
        self, reservation: Reservation, usage: Usage | None, *, key: str | None = None
    ) -> bool:
        """Async :meth:`commit`."""
        if not self._store.is_async_native:
            return self.commit(reservation, usage, key=key)
        if usage is None:
            return await self._store.asettle(
                reservation,
                input_tokens=reservation.input_tokens,
                output_tokens=reservation.output_tokens,
                cost_units=reservation.cost_units,
                estimated=True,
                refund_call=False,
            )
        return await self._store.asettle(
            reservation,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_units=self._cost(key or reservation.key, reservation.key, usage),
            estimated=usage.estimated,
            refund_call=False,
        )

    async def arecord(self, key: str, usage: Usage, *, calls: int = 0) -> None:
        """Async :meth:`record`. :class:`BudgetStore` has no async record, so this awaits
        the store's ``arecord`` (``record``'s arguments) only when the store is
        async-native and has one; otherwise it is :meth:`record` (the memory and Redis
        stores: a lock, or one short round trip, as their ``areserve``)."""
        store = self._store
        native = getattr(store, "arecord", None) if store.is_async_native else None
        if native is None:
            self.record(key, usage, calls=calls)
            return
        if calls < 0:
            raise ValueError(f"calls: expected a count >= 0, got {calls}")
        await native(
            self._scope(key),
            calls=calls,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_units=self._cost(key, None, usage),
            window=self.window,
            estimated=usage.estimated,
        )

    async def arelease(self, reservation: Reservation, *, refund_call: bool = False) -> bool:
        """Async :meth:`release`."""
        if not self._store.is_async_native:
            return self.release(reservation, refund_call=refund_call)
        return await self._store.asettle(
            reservation,
            input_tokens=0,
            output_tokens=0,
            cost_units=0,
            estimated=False,
            refund_call=refund_call,
        )

    # -- inspection ----------------------------------------------------------------
    def usage(self, key: str | None = None) -> BudgetUsage:
        """What is used, and what remains. A per-key budget needs ``key``; a shared one
        ignores it.

        >>> Budget(max_calls=3).usage().to_dict()["remaining_calls"]
        3
        """
        if self.per_key:
            if key is None:
                raise ValueError("usage: a per_key budget needs key= (or use usages())")
            return self._usage(key, key)
        return self._usage(SHARED_SCOPE, None)

    def usages(self) -> dict[str, BudgetUsage]:
        """Every metered key's usage (one entry, ``"*"``, for a shared budget)."""
        if not self.per_key:
            return {SHARED_SCOPE: self._usage(SHARED_SCOPE, None)}
        return {scope: self._usage(scope, scope) for scope in sorted(self._store.scopes())}

    def reset(self, key: str | None = None) -> None:
        """Forget what was used: by ``key`` (per-key budgets), or everything."""
        self._store.reset(None if key is None or not self.per_key else key)

    def _usage(self, scope: str, key: str | None) -> BudgetUsage:
        window = self.window
        tally: Tally = self._store.tally(scope, window=window)
        limits = self._limits
        if window is None:
            used_calls = tally.calls
            used_tokens = tally.input_tokens + tally.output_tokens
            used_cost = tally.cost_units
        else:
            used_calls = tally.window_calls or 0
            used_tokens = tally.window_tokens or 0
            used_cost = tally.window_cost_units or 0

        def left(limit: int | None, used: int) -> int | None:
            return None if limit is None else max(limit - used, 0)

        remaining_cost = left(limits.max_cost_units, used_cost)
        return BudgetUsage(
            key=key,
            calls=tally.calls,
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            cost_usd=tally.cost_units / COST_UNITS_PER_USD,
            estimated_calls=tally.estimated_calls,
            in_flight=tally.in_flight,
            window=window,
            window_calls=tally.window_calls,
            window_tokens=tally.window_tokens,
            window_cost_usd=(
                None
                if tally.window_cost_units is None
                else tally.window_cost_units / COST_UNITS_PER_USD
            ),
            max_calls=self.max_calls,
            max_tokens=self.max_tokens,
            max_cost_usd=self.max_cost_usd,
            remaining_calls=left(limits.max_calls, used_calls),
            remaining_tokens=left(limits.max_tokens, used_tokens),
            remaining_cost_usd=(
                None if remaining_cost is None else remaining_cost / COST_UNITS_PER_USD
            ),
        )

    def __copy__(self) -> Budget:
        # Shared state: a copied model (model_copy, deepcopy of a chain) keeps sharing it.
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Budget:
        return self

    def __repr__(self) -> str:
        limits = ", ".join(
            f"{name}={value!r}"
            for name, value in (
                ("max_calls", self.max_calls),
                ("max_tokens", self.max_tokens),
                ("max_cost_usd", self.max_cost_usd),
                ("window", self.window),
            )
            if value is not None
        )
        return f"Budget({limits or 'unbounded'}{', per_key=True' if self.per_key else ''})"
