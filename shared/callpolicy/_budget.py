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

The pieces, one job each: :class:`Usage` and the token estimate in ``_usage``, prices in
``_prices``, the store seam in ``_budget_store`` (the memory store in ``_budget_memory``),
stream metering in ``_meter``, the report in ``_budget_usage``. Each sync method and its
async twin share one body that works out the store call; they differ only in calling or
awaiting it.
"""

from __future__ import annotations

import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Generator,
    Iterable,
    Mapping,
)
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

from ._budget_memory import MemoryBudgetStore
from ._budget_store import (
    COST_UNITS_PER_USD,
    BudgetExceededError,
    BudgetLimits,
    BudgetStore,
    Reservation,
)
from ._budget_usage import BudgetUsage
from ._meter import StreamMeter, ameter_stream, meter_stream
from ._numbers import MAX_COST_USD, Count, Number, Seconds, to_units
from ._prices import MissingPriceError, Price, Pricing
from ._usage import Usage, approx_tokens

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

T = TypeVar("T")
R = TypeVar("R")

SHARED_SCOPE = "*"
"""The store scope of a budget shared across keys (``per_key=False``)."""

_RELEASED = Usage()
"""What :meth:`Budget.release` settles: nothing used, and nothing to price."""


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
        # None without a table: nothing to price, so a call skips pricing altogether.
        self._pricing: Pricing | None = (
            Pricing(self.prices, required=options.max_cost_usd is not None) if self.prices else None
        )

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
        return None if self._pricing is None else self._pricing.price_for(key)

    def require_price(self, key: str) -> Price | None:
        """Check, when a wrapper is built, that ``key`` can be metered: with
        ``max_cost_usd`` set, a model missing from the price table raises
        :class:`MissingPriceError` (naming the model) now rather than at its first call."""
        return None if self._pricing is None else self._pricing.require(key)

    # -- the call's lifecycle ------------------------------------------------------
    # Each sync method and its async twin hand the store's method (sync or async) to
    # one body that works out its arguments: the async twin awaits what it returns.
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
        return self._reserve(
            self._store.reserve, key, estimated_input_tokens, estimated_output_tokens
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
        return self._settle(self._store.settle, reservation, usage, key, False)

    def release(self, reservation: Reservation, *, refund_call: bool = False) -> bool:
        """Settle a failed call: its held tokens and dollars are freed. The call itself
        still counts (a failed call used a round, as in the reference crate) unless
        ``refund_call=True`` — meant for a call that never reached any model, such as one
        refused by an open circuit with no fallback. Returns False if already settled."""
        return self._settle(self._store.settle, reservation, _RELEASED, None, refund_call)

    def record(self, key: str, usage: Usage, *, calls: int = 0) -> None:
        """Count usage without a reservation and without a check: the hook for a stream's
        chunks, called as they pass (they are never altered; :meth:`metered` does it for
        a whole stream). ``calls=1`` also counts the stream as a call; a
        ``Usage(estimated=True)`` (a stream that reported no tokens, its input estimated)
        counts one call among ``estimated_calls``. A stream recorded this way is never
        refused; to refuse one before its first chunk, :meth:`reserve`
        at its start and :meth:`commit` the summed usage at its end instead."""
        self._record(self._store.record, key, usage, calls)

    async def areserve(
        self, key: str, estimated_input_tokens: int = 0, *, estimated_output_tokens: int = 0
    ) -> Reservation:
        """Async :meth:`reserve` (for a network store; the memory store never blocks)."""
        store = self._store
        if not store.is_async_native:
            return self.reserve(
                key, estimated_input_tokens, estimated_output_tokens=estimated_output_tokens
            )
        return await self._reserve(
            store.areserve, key, estimated_input_tokens, estimated_output_tokens
        )

    async def acommit(
        self, reservation: Reservation, usage: Usage | None, *, key: str | None = None
    ) -> bool:
        """Async :meth:`commit`."""
        if not self._store.is_async_native:
            return self.commit(reservation, usage, key=key)
        return await self._settle(self._store.asettle, reservation, usage, key, False)

    async def arelease(self, reservation: Reservation, *, refund_call: bool = False) -> bool:
        """Async :meth:`release`."""
        if not self._store.is_async_native:
            return self.release(reservation, refund_call=refund_call)
        return await self._settle(self._store.asettle, reservation, _RELEASED, None, refund_call)

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
        await self._record(native, key, usage, calls)

    def _reserve(self, reserve: Callable[..., R], key: str, tokens_in: int, tokens_out: int) -> R:
        """``reserve`` (the store's, sync or async) called for this budget's estimate."""
        if tokens_in < 0 or tokens_out < 0:
            raise ValueError("estimated tokens must be >= 0")
        cost = 0
        pricing = self._pricing
        if pricing is not None:
            # The key's price, resolved (or refused: MissingPriceError) on its first call.
            units = pricing.resolved.get(key) or pricing.units(key)
            if units is not None:
                cost = tokens_in * units[0] + tokens_out * units[1]
        return reserve(
            key,
            key if self.per_key else SHARED_SCOPE,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_units=cost,
            limits=self._limits,
        )

    def _settle(
        self,
        settle: Callable[..., R],
        reservation: Reservation,
        usage: Usage | None,
        key: str | None,
        refund_call: bool,
    ) -> R:
        """``settle`` (the store's, sync or async) called for a commit of ``usage`` (None:
        unknown, so the estimate stays and counts as one) or a release (``_RELEASED``)."""
        if usage is None:
            tokens_in, tokens_out = reservation.input_tokens, reservation.output_tokens
            cost, estimated = reservation.cost_units, True
        else:
            tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
            estimated, cost = usage.estimated, 0
            pricing = self._pricing
            if pricing is not None and usage is not _RELEASED:
                answered = key or reservation.key
                units = pricing.resolved.get(answered)
                if units is not None:
                    cost = tokens_in * units[0] + tokens_out * units[1]
                else:  # not resolved yet, or no price: priced as the reserved key, or not
                    cost = pricing.cost(answered, reservation.key, usage)
        return settle(
            reservation,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_units=cost,
            estimated=estimated,
            refund_call=refund_call,
        )

    def _record(self, record: Callable[..., R], key: str, usage: Usage, calls: int) -> R:
        """``record`` (the store's, or an async-native store's ``arecord``) called for
        ``usage`` of ``key``, unchecked."""
        if calls < 0:
            raise ValueError(f"calls: expected a count >= 0, got {calls}")
        pricing = self._pricing
        return record(
            key if self.per_key else SHARED_SCOPE,
            calls=calls,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_units=0 if pricing is None else pricing.cost(key, None, usage),
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
        meter = StreamMeter(self, key, usage_of, estimate, cumulative, key_of)
        return meter_stream(meter, chunks)

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
        meter = StreamMeter(self, key, usage_of, estimate, cumulative, key_of)
        return ameter_stream(meter, chunks)

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
        tally = self._store.tally(scope, window=self.window)
        return BudgetUsage.of(key, tally, self._limits, max_cost_usd=self.max_cost_usd)

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
