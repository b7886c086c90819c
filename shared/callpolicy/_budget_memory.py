"""The default :class:`~callpolicy.BudgetStore`: a budget's counters in this process.

Also the Redis budget store's counting while Redis cannot be reached (fail open), so the
limit rules written here are the only copy in Python (Redis applies the same ones in its
script, on the server).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ._budget_store import BudgetLimits, BudgetStoreBase, Reservation, Tally, Window, refusal

__all__ = ["MemoryBudgetStore"]


class _Entry:
    """One call (or one recorded usage) in a rolling window."""

    __slots__ = ("at", "calls", "cost_units", "counters", "live", "tokens")

    def __init__(
        self, counters: _Counters, at: float, calls: int, tokens: int, cost_units: int
    ) -> None:
        self.counters = counters
        """The counters whose window it is in (a reservation's entry leads to them)."""
        self.at = at
        self.calls = calls
        self.tokens = tokens
        self.cost_units = cost_units
        self.live = True
        """False once it fell out of the window (its amounts no longer in the sums)."""


class _Counters:
    """One scope's lifetime totals, and its window's entries and their sums (``w_*``)."""

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
        self.calls = self.input_tokens = self.output_tokens = self.cost_units = 0
        self.estimated_calls = self.in_flight = 0
        self.w_calls = self.w_tokens = self.w_cost_units = 0
        self.entries: deque[_Entry] = deque()

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
        entry = _Entry(self, now, calls, tokens, cost_units)
        self.entries.append(entry)
        self.w_calls += calls
        self.w_tokens += tokens
        self.w_cost_units += cost_units
        return entry

    def tally(self, window: float | None) -> Tally:
        totals = (self.calls, self.input_tokens, self.output_tokens, self.cost_units)
        if window is None:
            return Tally(*totals, self.estimated_calls, self.in_flight)
        sums = (self.w_calls, self.w_tokens, self.w_cost_units)
        return Tally(*totals, self.estimated_calls, self.in_flight, *sums)


class MemoryBudgetStore(BudgetStoreBase):
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

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not callable(clock):
            raise TypeError("clock: expected a callable returning seconds")
        self._clock = clock
        self._lock = threading.Lock()
        self._scopes: dict[str, _Counters] = {}

    def _reserve(
        self, key: str, scope: str, tin: int, tout: int, cost: int, limits: BudgetLimits
    ) -> Reservation:
        tokens = tin + tout
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
                raise refusal("calls", used_calls, limits.max_calls, None, key, window)
            limit = limits.max_tokens
            if limit is not None and (used_tokens >= limit or used_tokens + tokens > limit):
                asked = tokens if used_tokens < limit else None
                raise refusal("tokens", used_tokens, limit, asked, key, window)
            limit = limits.max_cost_units
            if limit is not None and (used_cost >= limit or used_cost + cost > limit):
                asked = cost if used_cost < limit else None
                raise refusal("cost", used_cost, limit, asked, key, window)
            counters.calls += 1
            counters.input_tokens += tin
            counters.output_tokens += tout
            counters.cost_units += cost
            counters.in_flight += 1
            # What settle() needs, in the reservation's store-private handle: its window
            # entry (which knows its counters), or its counters when there is no window.
            handle = counters if window is None else counters.add_entry(now, 1, tokens, cost)
        return Reservation(key, scope, tin, tout, cost, handle)

    def _settle(
        self, reservation: Reservation, tin: int, tout: int, cost: int, est: bool, refund: bool
    ) -> bool:
        handle = reservation.handle
        if type(handle) is _Counters:
            counters, entry = handle, None
        elif type(handle) is _Entry:
            counters, entry = handle.counters, handle
        else:
            raise TypeError("reservation: not one handed out by this kind of store")
        with self._lock:
            if reservation.settled:
                return False
            reservation.settled = True
            d_input = tin - reservation.input_tokens
            d_output = tout - reservation.output_tokens
            d_cost = cost - reservation.cost_units
            # The counters object is the one the call was reserved in; after a reset() it
            # is orphaned, and settling it changes nothing anyone reads.
            counters.input_tokens += d_input
            counters.output_tokens += d_output
            counters.cost_units += d_cost
            counters.in_flight -= 1
            if est:
                counters.estimated_calls += 1
            if refund:
                counters.calls -= 1
            if entry is not None:
                if entry.live:  # still in the window: correct it in place
                    entry.tokens += d_input + d_output
                    entry.cost_units += d_cost
                    counters.w_tokens += d_input + d_output
                    counters.w_cost_units += d_cost
                    if refund:
                        entry.calls -= 1
                        counters.w_calls -= 1
                elif tin + tout or cost:
                    # The call outlived the window its start fell in: what it used is
                    # known now, so it counts now.
                    counters.add_entry(self._clock(), 0, tin + tout, cost)
        return True

    def _record(
        self, scope: str, calls: int, tin: int, tout: int, cost: int, window: Window, est: bool
    ) -> None:
        with self._lock:
            counters = self._scopes.get(scope)
            if counters is None:
                counters = self._scopes[scope] = _Counters()
            counters.calls += calls
            if est:
                counters.estimated_calls += 1
            counters.input_tokens += tin
            counters.output_tokens += tout
            counters.cost_units += cost
            if window is not None:
                counters.expire(now := self._clock(), window)
                counters.add_entry(now, calls, tin + tout, cost)

    def tally(self, scope: str, *, window: float | None = None) -> Tally:
        """The counters of ``scope``; with ``window``, also what fell in the last
        ``window`` seconds."""
        with self._lock:
            counters = self._scopes.get(scope)
            if counters is None:
                counters = _Counters()
            if window is not None:
                counters.expire(self._clock(), window)
            return counters.tally(window)

    def scopes(self) -> list[str]:
        return list(self._scopes)

    def reset(self, scope: str | None) -> None:
        with self._lock:
            if scope is None:
                self._scopes.clear()
            else:
                self._scopes.pop(scope, None)
