"""The in-process store: one lock per circuit, and a lock-free path for the common case.

A closed circuit with no failures on record admits a call and records its success
without taking a lock: under the GIL the state attribute is read atomically, and
nothing needs writing. Every other decision happens under the circuit's lock, and
listeners are called after it is released.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from ._config import BreakerConfig
from ._errors import CircuitOpenError
from ._store import Permit, Transition, TransitionListener
from ._types import CircuitSnapshot, CircuitState, Outcome

__all__ = ["MemoryStore"]

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_SUCCESS = Outcome.SUCCESS
_FAILURE = Outcome.FAILURE
_IGNORED = Outcome.IGNORED


class _MemoryCircuit:
    is_async_native = False

    __slots__ = (
        "_clock",
        "_closed_permit",
        "_config",
        "_consecutive_trips",
        "_failures",
        "_generation",
        "_hold",
        "_in_flight",
        "_lock",
        "_notify",
        "_open_until",
        "_probe_successes",
        "_reason",
        "_state",
        "_trips",
        "_window",
        "_window_failures",
        "key",
        "model",
        "provider",
    )

    def __init__(
        self,
        key: str,
        provider: str,
        model: str,
        config: BreakerConfig,
        clock: Callable[[], float],
        notify: TransitionListener,
    ) -> None:
        self.key = key
        self.provider = provider
        self.model = model
        self._config = config
        self._clock = clock
        self._notify = notify
        self._lock = threading.Lock()
        self._state = _CLOSED
        self._generation = 0
        self._closed_permit = Permit(0, probe=False)
        self._failures = 0
        self._open_until = 0.0
        self._consecutive_trips = 0
        self._trips = 0
        self._in_flight = 0
        self._probe_successes = 0
        self._hold = False
        self._reason: str | None = None
        """The reason of the last trip (``Transition.reason``), told to refused callers."""
        self._window: deque[bool] | None = (
            deque(maxlen=config.window_size) if config.failure_rate_threshold else None
        )
        self._window_failures = 0

    # -- admission ---------------------------------------------------------------
    def admit(self) -> Permit:
        if self._state is _CLOSED:
            return self._closed_permit
        return self._admit_slow()

    async def aadmit(self) -> Permit:
        return self.admit()

    def _admit_slow(self) -> Permit:
        transition = None
        with self._lock:
            if self._state is _CLOSED:
                return self._closed_permit
            now = self._clock()
            if self._state is _OPEN:
                if self._hold:
                    raise CircuitOpenError(
                        self.provider, self.model, self._failures, None, reason=self._reason
                    )
                if now < self._open_until:
                    raise CircuitOpenError(
                        self.provider,
                        self.model,
                        self._failures,
                        self._open_until - now,
                        reason=self._reason,
                    )
                transition = self._move(_HALF_OPEN, "cooldown_elapsed")
                self._in_flight = 0
                self._probe_successes = 0
            if self._in_flight >= self._config.half_open_max_calls:
                raise CircuitOpenError(
                    self.provider, self.model, self._failures, 0.0, reason=self._reason
                )
            self._in_flight += 1
            permit = Permit(self._generation, probe=True)
        if transition is not None:
            self._notify(transition)
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
        transition = None
        with self._lock:
            if permit.generation == self._generation:  # else: admitted in an earlier period
                if permit.probe:
                    transition = self._record_probe(outcome)
                elif self._state is _CLOSED and not self._hold:
                    transition = self._record_closed(outcome)
            state = self._state
        if transition is not None:
            self._notify(transition)
        return state

    async def arecord(self, permit: Permit, outcome: Outcome) -> CircuitState:
        return self.record(permit, outcome)

    def _record_probe(self, outcome: Outcome) -> Transition | None:
        self._in_flight -= 1
        if outcome is _SUCCESS:
            self._probe_successes += 1
            if self._probe_successes >= self._config.success_threshold:
                return self._close("probe_succeeded")
        elif outcome is _FAILURE:
            self._failures += 1
            return self._trip("probe_failed")
        return None

    def _record_closed(self, outcome: Outcome) -> Transition | None:
        window = self._window
        if outcome is _SUCCESS:
            self._failures = 0
            if window is not None:
                self._push(window, failed=False)
            return None
        if outcome is not _FAILURE:
            return None
        self._failures += 1
        if self._failures >= self._config.failure_threshold:
            return self._trip("threshold")
        if window is not None:
            self._push(window, failed=True)
            rate = self._config.failure_rate_threshold
            if (
                rate is not None
                and len(window) >= self._config.minimum_calls
                and self._window_failures >= rate * len(window)
            ):
                return self._trip("failure_rate")
        return None

    def _push(self, window: deque[bool], *, failed: bool) -> None:
        if len(window) == window.maxlen and window[0]:
            self._window_failures -= 1
        window.append(failed)
        if failed:
            self._window_failures += 1

    # -- transitions (called with the lock held) ---------------------------------------
    def _move(self, new: CircuitState, reason: str, cooldown: float | None = None) -> Transition:
        old = self._state
        self._state = new
        self._generation += 1
        return Transition(
            self.key, self.provider, self.model, old, new, self._failures, reason, cooldown
        )

    def _trip(self, reason: str) -> Transition:
        self._consecutive_trips += 1
        self._trips += 1
        self._reason = reason
        cooldown = self._config.cooldown_for(self._consecutive_trips)
        self._open_until = self._clock() + cooldown
        self._in_flight = 0
        self._clear_window()
        return self._move(_OPEN, reason, cooldown)

    def _close(self, reason: str) -> Transition:
        self._failures = 0
        self._consecutive_trips = 0
        self._in_flight = 0
        self._clear_window()
        # The new period's permit before the state: admit() reads the state without the
        # lock, and a call that sees CLOSED must get a permit of this period, not the last.
        self._closed_permit = Permit(self._generation + 1, probe=False)
        return self._move(_CLOSED, reason)

    def _clear_window(self) -> None:
        if self._window is not None:
            self._window.clear()
            self._window_failures = 0

    # -- inspection and manual control ------------------------------------------------
    def snapshot(self) -> CircuitSnapshot:
        with self._lock:
            state = self._state
            retry_in: float | None = None
            if state is _OPEN and not self._hold:
                retry_in = max(self._open_until - self._clock(), 0.0)
            elif state is _HALF_OPEN:
                retry_in = 0.0
            return CircuitSnapshot(
                key=self.key,
                provider=self.provider,
                model=self.model,
                state=state,
                failures=self._failures,
                retry_in=retry_in,
                trips=self._trips,
                probes_in_flight=self._in_flight,
                forced=state if self._hold else None,
                calls_in_window=len(self._window) if self._window is not None else 0,
                failures_in_window=self._window_failures,
                opened_by=None if state is _CLOSED else self._reason,
            )

    def force(self, state: CircuitState | None, *, hold: bool) -> None:
        if state is _HALF_OPEN:
            raise ValueError(f"state: cannot force a circuit to {state!s}")
        with self._lock:
            before = self._state
            self._hold = hold and state is not None
            if state is None or state is _CLOSED:
                transition = self._close("manual")
            elif state is _OPEN:
                transition = self._trip("manual")
                if self._hold:
                    self._open_until = math.inf
            else:
                raise ValueError(f"state: cannot force a circuit to {state!s}")
        if before is not transition.new:
            self._notify(transition)


class MemoryStore:
    """Circuits in this process's memory (the default store).

    Share one store (or one :class:`~callpolicy.CallPolicy`) between wrappers to share
    circuit state; state is lost when the process ends.

    >>> from callpolicy import CallPolicy, MemoryStore
    >>> policy = CallPolicy(store=MemoryStore())
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._circuits: dict[str, _MemoryCircuit] = {}
        self._lock = threading.Lock()

    def circuit(
        self,
        key: str,
        *,
        provider: str,
        model: str,
        config: BreakerConfig,
        on_transition: TransitionListener,
    ) -> _MemoryCircuit:
        found = self._circuits.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._circuits.get(key)
            if found is None:
                found = _MemoryCircuit(key, provider, model, config, self._clock, on_transition)
                self._circuits[key] = found
            return found

    def circuits(self) -> Iterable[_MemoryCircuit]:
        return list(self._circuits.values())
