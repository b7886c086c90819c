"""The in-process store: small circuits, one lock per store, and lock-free common cases.

Two cases take no lock. A closed circuit with no failure on record admits a call and
records its success without one: under the GIL the state attribute is read atomically,
and nothing needs writing. An open circuit cooling down refuses without one: it reads
one immutable record of its open period (:class:`_Cooling`), which exists only while
the state is OPEN (see :meth:`_MemoryCircuit.admit`). Every other decision happens
under the store's lock, and listeners are called after it is released.

A circuit is sized for the common case, thousands of keys that never fail: seven
slots and no object of its own. What a circuit that has failed needs (its period's
number, trips, probes, the trip's reason, the window's count) is allocated on its first
failure or manual change and kept; a failure-rate window on its first recorded call.
Provider and model are read from the key. The options, clock, listener and lock live
once per store and policy (:class:`_Rules`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ._config import BreakerConfig
from ._errors import refusal
from ._store import CircuitTable, Permit, Transition, TransitionListener
from ._types import CircuitSnapshot, CircuitState, Outcome, split_key

__all__ = ["MemoryStore"]

_CLOSED, _OPEN, _HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
_SUCCESS, _FAILURE, _IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED

_FIRST_PERMIT = Permit(0, probe=False)
"""Every circuit's closed permit until its first change of state (then one of its own)."""

_NO_CALLS: tuple[bool, ...] = ()
"""A failure-rate window before its first call: not None, so a success takes the locked
path that records it, and empty, so it reads as a window of no calls."""


@dataclass(frozen=True, slots=True, eq=False)
class _Rules:
    """What the circuits made by one store for one policy share: options, clock, the
    listener, and the store's lock, under which every locked decision is made."""

    config: BreakerConfig
    clock: Callable[[], float]
    notify: TransitionListener
    lock: threading.Lock


@dataclass(frozen=True, slots=True, eq=False)
class _Cooling:
    """One open period, as a refusal without the lock reads it: set after the state
    becomes OPEN and cleared before it leaves OPEN, never changed in between, so whoever
    reads it sees the circuit open with exactly these figures at that moment."""

    provider: str
    model: str
    failures: int
    reason: str | None
    until: float
    """When the cooldown ends (``inf`` while held)."""
    held: bool


@dataclass(slots=True, eq=False)
class _Past:
    """What a circuit needs once it has failed or been changed by hand."""

    generation: int = 0
    cooling: _Cooling | None = None
    """Set exactly while the state is OPEN."""
    consecutive_trips: int = 0
    trips: int = 0
    in_flight: int = 0
    probe_successes: int = 0
    hold: bool = False
    reason: str | None = None
    """The reason of the last trip (``Transition.reason``), told to refused callers."""
    window_failures: int = 0
    names: tuple[str, str] | None = None
    """Provider and model when they are not the key's two parts (a store's caller may
    name them so)."""


class _MemoryCircuit:
    is_async_native = False

    __slots__ = ("_closed_permit", "_failures", "_past", "_rules", "_state", "_window", "key")

    def __init__(self, key: str, provider: str, model: str, rules: _Rules) -> None:
        self.key = key
        self._rules = rules
        self._state = _CLOSED
        self._closed_permit = _FIRST_PERMIT
        self._failures = 0
        self._window: deque[bool] | tuple[bool, ...] | None = (
            _NO_CALLS if rules.config.failure_rate_threshold else None
        )
        self._past: _Past | None = None
        if (provider, model) != split_key(key):
            self._grown().names = (provider, model)

    @property
    def provider(self) -> str:
        return self._names()[0]

    @property
    def model(self) -> str:
        return self._names()[1]

    def _names(self) -> tuple[str, str]:
        past = self._past
        if past is not None and past.names is not None:
            return past.names
        return split_key(self.key)

    def _grown(self) -> _Past:
        past = self._past
        if past is None:
            past = self._past = _Past()
        return past

    # -- admission ---------------------------------------------------------------
    # admit() and record() keep their common case free of locals: every local of a
    # function costs instructions at each call, and these run on every guarded call.
    def admit(self) -> Permit:
        if self._state is _CLOSED:
            return self._closed_permit
        return self._admit_not_closed()

    def _admit_not_closed(self) -> Permit:
        past = self._past
        # Not closed, so grown: a circuit leaves CLOSED only through a trip.
        cooling = None if past is None else past.cooling
        if cooling is not None:
            # Read once: the open period it describes was current when it was read, and
            # the clock only moves on, so a refusal now is one the lock would also give.
            if cooling.held:
                raise refusal(
                    cooling.provider, cooling.model, cooling.failures, None, cooling.reason
                )
            wait = cooling.until - self._rules.clock()
            if wait > 0:
                raise refusal(
                    cooling.provider, cooling.model, cooling.failures, wait, cooling.reason
                )
        return self._admit_slow()

    async def aadmit(self) -> Permit:
        return self.admit()

    def _admit_slow(self) -> Permit:
        rules = self._rules
        transition = None
        with rules.lock:
            if self._state is _CLOSED:
                return self._closed_permit
            past = self._grown()
            if self._state is _OPEN:
                cooling = past.cooling  # under the lock, set whenever the state is OPEN
                assert cooling is not None
                now = rules.clock()
                if cooling.held or now < cooling.until:
                    raise refusal(
                        cooling.provider,
                        cooling.model,
                        cooling.failures,
                        None if cooling.held else cooling.until - now,
                        cooling.reason,
                    )
                past.cooling = None  # before the state leaves OPEN
                transition = self._move(past, _HALF_OPEN, "cooldown_elapsed")
                past.in_flight = 0
                past.probe_successes = 0
            if past.in_flight >= rules.config.half_open_max_calls:
                raise refusal(self.provider, self.model, self._failures, 0.0, past.reason)
            past.in_flight += 1
            permit = Permit(past.generation, probe=True)
        if transition is not None:
            rules.notify(transition)
        return permit

    # -- outcomes ----------------------------------------------------------------
    def record(self, permit: Permit, outcome: Outcome) -> CircuitState:
        if (
            outcome is _SUCCESS
            and permit is self._closed_permit
            and self._failures == 0
            and self._window is None
        ):
            return _CLOSED  # closed and clean: nothing to write
        if outcome is _IGNORED and not permit.probe:
            # Neither success nor failure outside a probe writes nothing below (a stream
            # its consumer closed early: the time to its first chunk is measured).
            return self._state
        return self._record_locked(permit, outcome)

    def _record_locked(self, permit: Permit, outcome: Outcome) -> CircuitState:
        rules = self._rules
        transition = None
        with rules.lock:
            past = self._past
            generation = 0 if past is None else past.generation
            if permit.generation == generation:  # else: admitted in an earlier period
                if permit.probe:
                    transition = self._record_probe(self._grown(), outcome)
                elif self._state is _CLOSED and not (past is not None and past.hold):
                    transition = self._record_closed(outcome)
            state = self._state
        if transition is not None:
            rules.notify(transition)
        return state

    async def arecord(self, permit: Permit, outcome: Outcome) -> CircuitState:
        return self.record(permit, outcome)

    def _record_probe(self, past: _Past, outcome: Outcome) -> Transition | None:
        past.in_flight -= 1
        if outcome is _SUCCESS:
            past.probe_successes += 1
            if past.probe_successes >= self._rules.config.success_threshold:
                return self._close("probe_succeeded")
        elif outcome is _FAILURE:
            self._failures += 1
            return self._trip("probe_failed")
        return None

    def _record_closed(self, outcome: Outcome) -> Transition | None:
        config = self._rules.config
        if outcome is _SUCCESS:
            self._failures = 0
            if self._window is not None:
                self._push(failed=False)
            return None
        if outcome is not _FAILURE:
            return None
        self._failures += 1
        if self._failures >= config.failure_threshold:
            return self._trip("threshold")
        if self._window is not None:
            window = self._push(failed=True)
            rate = config.failure_rate_threshold
            if (
                rate is not None
                and len(window) >= config.minimum_calls
                and self._grown().window_failures >= rate * len(window)
            ):
                return self._trip("failure_rate")
        return None

    def _push(self, *, failed: bool) -> deque[bool]:
        window = self._window
        if not isinstance(window, deque):  # the first call this window sees
            window = self._window = deque(maxlen=self._rules.config.window_size)
        past = self._grown()
        if len(window) == window.maxlen and window[0]:
            past.window_failures -= 1
        window.append(failed)
        if failed:
            past.window_failures += 1
        return window

    # -- transitions (called with the lock held) ---------------------------------------
    def _move(
        self, past: _Past, new: CircuitState, reason: str, cooldown: float | None = None
    ) -> Transition:
        old = self._state
        self._state = new
        past.generation += 1
        return Transition(
            self.key, self.provider, self.model, old, new, self._failures, reason, cooldown
        )

    def _trip(self, reason: str) -> Transition:
        past = self._grown()
        past.consecutive_trips += 1
        past.trips += 1
        past.reason = reason
        cooldown = self._rules.config.cooldown_for(past.consecutive_trips)
        until = math.inf if past.hold else self._rules.clock() + cooldown
        past.in_flight = 0
        self._clear_window(past)
        past.cooling = None  # a trip while open (by hand) starts a new period
        transition = self._move(past, _OPEN, reason, cooldown)
        # After the state: whoever reads a cooling record finds the circuit open.
        provider, model = self._names()
        past.cooling = _Cooling(provider, model, self._failures, reason, until, past.hold)
        return transition

    def _close(self, reason: str) -> Transition:
        past = self._grown()
        past.cooling = None  # before the state leaves OPEN
        self._failures = 0
        past.consecutive_trips = 0
        past.in_flight = 0
        self._clear_window(past)
        # The new period's permit before the state: admit() reads the state without the
        # lock, and a call that sees CLOSED must get a permit of this period, not the last.
        self._closed_permit = Permit(past.generation + 1, probe=False)
        return self._move(past, _CLOSED, reason)

    def _clear_window(self, past: _Past) -> None:
        window = self._window
        if isinstance(window, deque):
            window.clear()
        past.window_failures = 0

    # -- inspection and manual control ------------------------------------------------
    def snapshot(self) -> CircuitSnapshot:
        with self._rules.lock:
            state = self._state
            past = self._past or _Past()
            retry_in: float | None = None
            cooling = past.cooling
            if cooling is not None and not cooling.held:
                retry_in = max(cooling.until - self._rules.clock(), 0.0)
            elif state is _HALF_OPEN:
                retry_in = 0.0
            return CircuitSnapshot(
                key=self.key,
                provider=self.provider,
                model=self.model,
                state=state,
                failures=self._failures,
                retry_in=retry_in,
                trips=past.trips,
                probes_in_flight=past.in_flight,
                forced=state if past.hold else None,
                calls_in_window=len(self._window or ()),
                failures_in_window=past.window_failures,
                opened_by=None if state is _CLOSED else past.reason,
            )

    def force(self, state: CircuitState | None, *, hold: bool) -> None:
        if state is _HALF_OPEN:
            raise ValueError(f"state: cannot force a circuit to {state!s}")
        with self._rules.lock:
            before = self._state
            self._grown().hold = hold and state is not None
            if state is None or state is _CLOSED:
                transition = self._close("manual")
            elif state is _OPEN:
                transition = self._trip("manual")
            else:
                raise ValueError(f"state: cannot force a circuit to {state!s}")
        if before is not transition.new:
            self._rules.notify(transition)


class MemoryStore(CircuitTable[_MemoryCircuit]):
    """Circuits in this process's memory (the default store).

    Share one store (or one :class:`~callpolicy.CallPolicy`) between wrappers to share
    circuit state; state is lost when the process ends.

    >>> from callpolicy import CallPolicy, MemoryStore
    >>> policy = CallPolicy(store=MemoryStore())
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._rules: dict[tuple[int, TransitionListener], _Rules] = {}

    def _make(
        self, key: str, provider: str, model: str, config: BreakerConfig, notify: TransitionListener
    ) -> _MemoryCircuit:
        return _MemoryCircuit(key, provider, model, self._rules_for(config, notify))

    def _rules_for(self, config: BreakerConfig, notify: TransitionListener) -> _Rules:
        """One :class:`_Rules` per policy (its options and its listener, a bound method
        made anew at each access, equal each time), not one per key. Their lock is the
        table's: each decision under it is a few attribute writes, and a lock per key
        would cost more memory than it could ever save in waiting."""
        try:
            found = self._rules.get((id(config), notify))
        except TypeError:  # a listener that cannot be hashed: rules of its own
            return _Rules(config, self._clock, notify, self._lock)
        if found is None:
            # The rules keep ``config`` alive, so its id is not reused while listed.
            found = _Rules(config, self._clock, notify, self._lock)
            self._rules[id(config), notify] = found
        return found
