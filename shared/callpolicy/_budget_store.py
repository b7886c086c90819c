"""The seam between a :class:`~callpolicy.Budget`'s rules and where its counters live.

A :class:`BudgetStore` makes each decision in one atomic step: :meth:`~BudgetStore.reserve`
checks every limit and, if none would be exceeded, counts the call and holds its estimate;
:meth:`~BudgetStore.settle` swaps the held estimate for what the call really used. A store
backed by a server (``callpolicy.redis``) does each in one round trip. Amounts are
integers — tokens, and cost in :data:`COST_UNITS_PER_USD` units (pico-dollars) — so sums are
exact under any interleaving, with no float drift, and a server can add them atomically.

:class:`BudgetExceededError` lives here because the store is what refuses; :func:`refusal`
builds it from the amounts a store counts, so every store words a refusal alike. The
in-process store is in ``_budget_memory``, the Redis one in ``callpolicy.redis``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from ._errors import CallPolicyError

__all__ = [
    "COST_UNITS_PER_USD",
    "BudgetExceededError",
    "BudgetKind",
    "BudgetLimits",
    "BudgetStore",
    "BudgetStoreBase",
    "Reservation",
    "Tally",
    "Window",
    "refusal",
]

COST_UNITS_PER_USD = 10**12
"""Cost is counted in pico-dollars: a price of $0.075 per million tokens is 75 000 units a
token, still an exact integer."""

BudgetKind = Literal["calls", "tokens", "cost"]

Window = float | None
"""A rolling window in seconds, or None: the limits apply to lifetime totals."""


class BudgetExceededError(CallPolicyError):
    """Raised instead of calling the model when the call would exceed a budget limit.

    Attributes:
        kind: ``"calls"``, ``"tokens"`` or ``"cost"``.
        consumed: what was used before this call (in the window, when the budget has one):
            calls, tokens, or US dollars. Includes the estimates held by calls in flight.
        limit: the limit that refused (same unit).
        requested: what this call would have added (1 call, its estimated tokens or
            dollars), or ``None`` when the limit was already used up.
        key: the breaker key of the refused call (``provider::model``).
        window: the rolling window in seconds, or ``None`` for a lifetime total.

    >>> err = BudgetExceededError("tokens", 200, 120, key="acme::m1")
    >>> (err.kind, err.consumed, err.limit)
    ('tokens', 200, 120)
    >>> str(err)
    'budget exceeded for acme::m1: tokens 200 used of 120'
    """

    def __init__(
        self,
        kind: BudgetKind,
        consumed: float,
        limit: float,
        *,
        key: str | None = None,
        requested: float | None = None,
        window: float | None = None,
    ) -> None:
        self.kind: BudgetKind = kind
        self.consumed = consumed
        self.limit = limit
        self.requested = requested
        self.key = key
        self.window = window

        def fmt(value: float) -> str:
            return f"${value:.6g}" if kind == "cost" else f"{value:g}"

        text = f"budget exceeded for {key or 'every key'}: {kind} {fmt(consumed)} used of "
        text += fmt(limit)
        if window is not None:
            text += f" in the last {window:g}s"
        if requested is not None:
            text += f"; this call needs ~{fmt(requested)} more"
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        # Copyable and picklable with its fields (the keyword fields go through a helper).
        return (
            _rebuild_budget_error,
            (self.kind, self.consumed, self.limit, self.key, self.requested, self.window),
        )


def _rebuild_budget_error(
    kind: BudgetKind,
    consumed: float,
    limit: float,
    key: str | None,
    requested: float | None,
    window: float | None,
) -> BudgetExceededError:
    return BudgetExceededError(kind, consumed, limit, key=key, requested=requested, window=window)


def refusal(
    kind: str, consumed: int, limit: int, requested: int | None, key: str, window: float | None
) -> BudgetExceededError:
    """The refusal of a store that counted ``consumed`` of ``limit`` (cost in units) and was
    asked for ``requested`` more (None: the limit was already used up)."""
    if kind == "cost":
        per_usd = COST_UNITS_PER_USD
        return BudgetExceededError(
            "cost",
            consumed / per_usd,
            limit / per_usd,
            key=key,
            requested=None if requested is None else requested / per_usd,
            window=window,
        )
    counted: BudgetKind = "calls" if kind == "calls" else "tokens"
    return BudgetExceededError(
        counted, consumed, limit, key=key, requested=requested, window=window
    )


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """The limits a store checks, handed to every :meth:`BudgetStore.reserve`.

    ``None`` is unbounded. With a ``window``, the limits apply to what was spent in the
    last ``window`` seconds; without one, to the lifetime totals.
    """

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost_units: int | None = None
    window: float | None = None


class Reservation:
    """A call admitted by :meth:`~callpolicy.Budget.reserve`, holding its estimate.

    Hand it back to :meth:`~callpolicy.Budget.commit` with the usage the model reported,
    or to :meth:`~callpolicy.Budget.release` if the call failed. Settling twice is a no-op.
    """

    __slots__ = (
        "cost_units",
        "handle",
        "input_tokens",
        "key",
        "output_tokens",
        "scope",
        "settled",
    )

    def __init__(
        self,
        key: str,
        scope: str,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        handle: object = None,
    ) -> None:
        self.key = key
        self.scope = scope
        self.input_tokens = input_tokens
        """Estimated input tokens held while the call is in flight."""
        self.output_tokens = output_tokens
        self.cost_units = cost_units
        self.handle = handle
        """Store-private bookkeeping (a server store's reservation id, say)."""
        self.settled = False
        """Set, under the store's guard, by the settlement that counts."""

    def __repr__(self) -> str:
        return (
            f"Reservation(key={self.key!r}, input_tokens={self.input_tokens}, "
            f"output_tokens={self.output_tokens}, settled={self.settled})"
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """A store's counters for one scope, at one moment (amounts include in-flight holds)."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_units: int = 0
    estimated_calls: int = 0
    """Calls whose usage was unknown and stayed counted at their estimate."""
    in_flight: int = 0
    window_calls: int | None = None
    """Within the rolling window (None when the budget has none)."""
    window_tokens: int | None = None
    window_cost_units: int | None = None


@runtime_checkable
class BudgetStore(Protocol):
    """Where a budget's counters live: in this process (:class:`MemoryBudgetStore`) or on a
    server. Every method is safe from any thread; ``reserve`` and ``settle`` are atomic.

    A store whose sync methods never block can subclass :class:`BudgetStoreBase` and
    write only positional ``_reserve``, ``_settle`` and ``_record``."""

    is_async_native: bool
    """True when the ``a*`` methods must be awaited to avoid blocking (a network store);
    False when the sync methods never block and async callers may use them."""

    def reserve(
        self,
        key: str,
        scope: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        limits: BudgetLimits,
    ) -> Reservation:
        """In one atomic step: raise :class:`BudgetExceededError` if one more call, holding
        these amounts, would exceed ``limits`` for ``scope``; else count the call and hold
        the amounts."""

    def settle(
        self,
        reservation: Reservation,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        estimated: bool,
        refund_call: bool,
    ) -> bool:
        """Replace the held amounts with these (zeros release them); ``estimated`` counts the
        call among those known only by estimate; ``refund_call`` un-counts the call itself.
        Returns False, changing nothing, when the reservation was already settled."""

    def record(
        self,
        scope: str,
        *,
        calls: int,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        window: float | None,
        estimated: bool = False,
    ) -> None:
        """Add usage without a check (streamed chunks); ``window`` is the budget's.
        ``estimated``: these tokens are an estimate (a stream that reported none), so
        one more call counts among ``estimated_calls``."""

    def tally(self, scope: str, *, window: float | None = None) -> Tally:
        """The counters of ``scope`` (zeros for a scope never used); with ``window``, also
        what was spent in the last ``window`` seconds."""

    def scopes(self) -> Iterable[str]:
        """Every scope with counters."""

    def reset(self, scope: str | None) -> None:
        """Forget the counters of ``scope``, or of every scope when None."""

    async def areserve(
        self,
        key: str,
        scope: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        limits: BudgetLimits,
    ) -> Reservation:
        """Async :meth:`reserve`."""

    async def asettle(
        self,
        reservation: Reservation,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        estimated: bool,
        refund_call: bool,
    ) -> bool:
        """Async :meth:`settle`."""


class BudgetStoreBase(BudgetStore):
    """The keyword face of a store whose sync methods never block (``is_async_native``
    False): the ``a*`` methods are the sync ones, and every method hands its amounts on
    positionally to the store's ``_reserve``, ``_settle`` and ``_record``, written once.
    The memory store and the Redis store (one short round trip) are such stores."""

    is_async_native = False

    def reserve(
        self,
        key: str,
        scope: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        limits: BudgetLimits,
    ) -> Reservation:
        return self._reserve(key, scope, input_tokens, output_tokens, cost_units, limits)

    def settle(
        self,
        reservation: Reservation,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        estimated: bool,
        refund_call: bool,
    ) -> bool:
        return self._settle(
            reservation, input_tokens, output_tokens, cost_units, estimated, refund_call
        )

    def record(
        self,
        scope: str,
        *,
        calls: int,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        window: float | None,
        estimated: bool = False,
    ) -> None:
        self._record(scope, calls, input_tokens, output_tokens, cost_units, window, estimated)

    async def areserve(
        self,
        key: str,
        scope: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        limits: BudgetLimits,
    ) -> Reservation:
        return self._reserve(key, scope, input_tokens, output_tokens, cost_units, limits)

    async def asettle(
        self,
        reservation: Reservation,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        estimated: bool,
        refund_call: bool,
    ) -> bool:
        return self._settle(
            reservation, input_tokens, output_tokens, cost_units, estimated, refund_call
        )

    # What a subclass writes: the same arguments, positionally (tin, tout: input and
    # output tokens; cost in units; est: estimated), so the keyword face above is
    # written once for every store.
    _reserve: Callable[[str, str, int, int, int, BudgetLimits], Reservation]
    _settle: Callable[[Reservation, int, int, int, bool, bool], bool]
    _record: Callable[[str, int, int, int, int, Window, bool], None]
