"""The seam between a :class:`~callpolicy.Budget`'s rules and where its counters live.

A :class:`BudgetStore` makes each decision in one atomic step: :meth:`~BudgetStore.reserve`
checks every limit and, if none would be exceeded, counts the call and holds its estimate;
:meth:`~BudgetStore.settle` swaps the held estimate for what the call really used. A store
backed by a server (Redis, in its own issue) does each in one round trip. Amounts are
integers — tokens, and cost in :data:`COST_UNITS_PER_USD` units (pico-dollars) — so sums are
exact under any interleaving, with no float drift, and a server can add them atomically.

:class:`BudgetExceededError` lives here because the store is what refuses.
"""

from __future__ import annotations

import threading
import time
from collections import deque
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
    "MemoryBudgetStore",
    "Reservation",
    "Tally",
]

COST_UNITS_PER_USD = 10**12
"""Cost is counted in pico-dollars: a price of $0.075 per million tokens is 75 000 units a
token, still an exact integer."""

BudgetKind = Literal["calls", "tokens", "cost"]


def _usd(units: int) -> float:
    return units / COST_UNITS_PER_USD


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
    server. Every method is safe from any thread; ``reserve`` and ``settle`` are atomic."""

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


class _Entry:
    """One call (or one recorded usage) in a rolling window."""

    __slots__ = ("at", "calls", "cost_units", "live", "tokens")

    def __init__(self, at: float, calls: int, tokens: int, cost_units: int) -> None:
        self.at = at
        self.calls = calls
        self.tokens = tokens
        self.cost_units = cost_units
        self.live = True
        """False once it fell out of the window (its amounts no longer in the sums)."""


class _Counters:
    __slots__ = (
        "calls",
        "cost_units",
        "entries",
        "estimated_calls",
        "in_flight",
        "input_tokens",
        "output_tokens",
        "w_calls",
        "w_cost_units",
        "w_tokens",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_units = 0
        self.estimated_calls = 0
        self.in_flight = 0
        self.entries: deque[_Entry] = deque()
        self.w_calls = 0
        self.w_tokens = 0
        self.w_cost_units = 0

    def expire(self, now: float, window: float) -> None:
        entries = self.entries
        horizon = now - window
        while entries and entries[0].at <= horizon:
            entry = entries.popleft()
            entry.live = False
            self.w_calls -= entry.calls
            self.w_tokens -= entry.tokens
            self.w_cost_units -= entry.cost_units

    def add_entry(self, now: float, calls: int, tokens: int, cost_units: int) -> _Entry:
        entry = _Entry(now, calls, tokens, cost_units)
        self.entries.append(entry)
        self.w_calls += calls
        self.w_tokens += tokens
        self.w_cost_units += cost_units
        return entry


class _MemoryReservation(Reservation):
    """A reservation that knows its counters and window entry (one object a call)."""

    __slots__ = ("counters", "entry")

    def __init__(
        self,
        key: str,
        scope: str,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        counters: _Counters,
        entry: _Entry | None,
    ) -> None:
        super().__init__(key, scope, input_tokens, output_tokens, cost_units)
        self.counters = counters
        self.entry = entry


class MemoryBudgetStore:
    """Budget counters in this process's memory (the default store).

    One lock guards every scope: a reservation is a handful of integer additions, so the
    lock is held for well under a microsecond and a finer grain would cost more than it
    saves. Window entries are kept in a deque per scope and fall out as time passes
    (amortised O(1) a call).

    Args:
        clock: monotonic seconds for the rolling window; inject a fake one in tests.

    >>> store = MemoryBudgetStore()
    >>> limits = BudgetLimits(max_calls=1)
    >>> r = store.reserve("a::m", "*", input_tokens=0, output_tokens=0, cost_units=0,
    ...                   limits=limits)
    >>> store.tally("*").calls
    1
    """

    is_async_native = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not callable(clock):
            raise TypeError("clock: expected a callable returning seconds")
        self._clock = clock
        self._lock = threading.Lock()
        self._scopes: dict[str, _Counters] = {}

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
        tokens = input_tokens + output_tokens
        window = limits.window
        with self._lock:
            counters = self._scopes.get(scope)
            if counters is None:
                counters = self._scopes[scope] = _Counters()
            now = 0.0
            if window is None:
                used_calls = counters.calls
                used_tokens = counters.input_tokens + counters.output_tokens
                used_cost = counters.cost_units
            else:
                now = self._clock()
                counters.expire(now, window)
                used_calls = counters.w_calls
                used_tokens = counters.w_tokens
                used_cost = counters.w_cost_units
            # The reference's rules: a used-up limit refuses; so does a call whose
            # estimate would carry it past the limit.
            if limits.max_calls is not None and used_calls + 1 > limits.max_calls:
                raise BudgetExceededError(
                    "calls", used_calls, limits.max_calls, key=key, window=window
                )
            if limits.max_tokens is not None and (
                used_tokens >= limits.max_tokens or used_tokens + tokens > limits.max_tokens
            ):
                raise BudgetExceededError(
                    "tokens",
                    used_tokens,
                    limits.max_tokens,
                    key=key,
                    requested=tokens if used_tokens < limits.max_tokens else None,
                    window=window,
                )
            if limits.max_cost_units is not None and (
                used_cost >= limits.max_cost_units or used_cost + cost_units > limits.max_cost_units
            ):
                raise BudgetExceededError(
                    "cost",
                    _usd(used_cost),
                    _usd(limits.max_cost_units),
                    key=key,
                    requested=_usd(cost_units) if used_cost < limits.max_cost_units else None,
                    window=window,
                )
            counters.calls += 1
            counters.input_tokens += input_tokens
            counters.output_tokens += output_tokens
            counters.cost_units += cost_units
            counters.in_flight += 1
            entry = None if window is None else counters.add_entry(now, 1, tokens, cost_units)
        return _MemoryReservation(
            key, scope, input_tokens, output_tokens, cost_units, counters, entry
        )

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
        if not isinstance(reservation, _MemoryReservation):
            raise TypeError("reservation: not one handed out by this kind of store")
        counters, entry = reservation.counters, reservation.entry
        with self._lock:
            if reservation.settled:
                return False
            reservation.settled = True
            d_input = input_tokens - reservation.input_tokens
            d_output = output_tokens - reservation.output_tokens
            d_cost = cost_units - reservation.cost_units
            # The counters object is the one the call was reserved in; after a reset() it
            # is orphaned, and settling it changes nothing anyone reads.
            counters.input_tokens += d_input
            counters.output_tokens += d_output
            counters.cost_units += d_cost
            counters.in_flight -= 1
            if estimated:
                counters.estimated_calls += 1
            if refund_call:
                counters.calls -= 1
            if entry is not None:
                if entry.live:  # still in the window: correct it in place
                    entry.tokens += d_input + d_output
                    entry.cost_units += d_cost
                    counters.w_tokens += d_input + d_output
                    counters.w_cost_units += d_cost
                    if refund_call:
                        entry.calls -= 1
                        counters.w_calls -= 1
                elif input_tokens + output_tokens or cost_units:
                    # The call outlived the window its start fell in: what it used is
                    # known now, so it counts now.
                    counters.add_entry(self._clock(), 0, input_tokens + output_tokens, cost_units)
        return True

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
        with self._lock:
            counters = self._scopes.get(scope)
            if counters is None:
                counters = self._scopes[scope] = _Counters()
            counters.calls += calls
            if estimated:
                counters.estimated_calls += 1
            counters.input_tokens += input_tokens
            counters.output_tokens += output_tokens
            counters.cost_units += cost_units
            if window is not None:
                counters.expire(now := self._clock(), window)
                counters.add_entry(now, calls, input_tokens + output_tokens, cost_units)

    def tally(self, scope: str, *, window: float | None = None) -> Tally:
        """The counters of ``scope``; with ``window``, also what fell in the last
        ``window`` seconds."""
        with self._lock:
            counters = self._scopes.get(scope)
            if counters is None:
                counters = _Counters()
            if window is not None:
                counters.expire(self._clock(), window)
            return Tally(
                calls=counters.calls,
                input_tokens=counters.input_tokens,
                output_tokens=counters.output_tokens,
                cost_units=counters.cost_units,
                estimated_calls=counters.estimated_calls,
                in_flight=counters.in_flight,
                window_calls=None if window is None else counters.w_calls,
                window_tokens=None if window is None else counters.w_tokens,
                window_cost_units=None if window is None else counters.w_cost_units,
            )

    def scopes(self) -> list[str]:
        return list(self._scopes)

    def reset(self, scope: str | None) -> None:
        with self._lock:
            if scope is None:
                self._scopes.clear()
            else:
                self._scopes.pop(scope, None)

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
        return self.reserve(
            key,
            scope,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_units=cost_units,
            limits=limits,
        )

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
        return self.settle(
            reservation,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_units=cost_units,
            estimated=estimated,
            refund_call=refund_call,
        )
