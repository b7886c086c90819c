"""The seam between the breaker's rules and where its state lives.

A :class:`CircuitStore` hands out one :class:`Circuit` per key. A circuit makes each
decision in one atomic step — :meth:`Circuit.admit` before a call and
:meth:`Circuit.record` after it — so a store backed by a server (Redis, in its own
module) does each in one round trip. The in-memory store is the default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from ._config import BreakerConfig
from ._types import CircuitSnapshot, CircuitState, Outcome

__all__ = [
    "Circuit",
    "CircuitStore",
    "CircuitTable",
    "Permit",
    "Transition",
    "TransitionListener",
]


class Permit:
    """Admission to make one call. Handed back to :meth:`Circuit.record` with its outcome.

    ``generation`` identifies the circuit's state period the call was admitted in, so an
    outcome that arrives after the circuit has moved on (a slow call admitted while
    closed finishing after the circuit opened) does not disturb the new state.
    """

    __slots__ = ("generation", "probe")

    def __init__(self, generation: int, probe: bool) -> None:
        self.generation = generation
        self.probe = probe

    def __repr__(self) -> str:
        return f"Permit(generation={self.generation}, probe={self.probe})"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a circuit's state, reported to listeners."""

    key: str
    provider: str
    model: str
    old: CircuitState
    new: CircuitState
    failures: int
    reason: str
    """``threshold``, ``failure_rate``, ``probe_failed``, ``probe_succeeded``,
    ``cooldown_elapsed``, or ``manual``."""
    cooldown: float | None = None
    """Seconds until the next probe, when the new state is OPEN."""


TransitionListener = Callable[[Transition], None]


@runtime_checkable
class Circuit(Protocol):
    """One key's breaker state and rules. Every method is safe from any thread."""

    key: str

    @property
    def provider(self) -> str:
        """The provider part of the key (``Transition.provider``, ``CircuitOpenError.provider``)."""

    @property
    def model(self) -> str:
        """The model part of the key."""

    is_async_native: bool
    """True when :meth:`aadmit`/:meth:`arecord` must be awaited to avoid blocking (a network
    store); False when the sync methods never block and async callers may use them."""

    def admit(self) -> Permit:
        """Admit one call, or raise :class:`~callpolicy.CircuitOpenError`."""

    def record(self, permit: Permit, outcome: Outcome) -> CircuitState:
        """Record the outcome of an admitted call (releases a probe slot); returns the
        state after it, so a retry loop can stop as soon as its failure opened the circuit."""

    async def aadmit(self) -> Permit:
        """Async :meth:`admit`."""

    async def arecord(self, permit: Permit, outcome: Outcome) -> CircuitState:
        """Async :meth:`record`."""

    def snapshot(self) -> CircuitSnapshot:
        """The circuit's state now."""

    def force(self, state: CircuitState | None, *, hold: bool) -> None:
        """Set the state by hand. ``state=None`` resets to closed and clears any hold;
        ``hold=True`` keeps the state until the next reset (no probes, no trips)."""


_Notify = TransitionListener  # a short name: the signatures below fit on one line


@runtime_checkable
class CircuitStore(Protocol):
    """Where circuits live: in this process (:class:`MemoryStore`) or on a server."""

    def circuit(
        self, key: str, *, provider: str, model: str, config: BreakerConfig, on_transition: _Notify
    ) -> Circuit:
        """The circuit of ``key``, created on first use. Repeated calls return one object."""

    def circuits(self) -> Iterable[Circuit]:
        """Every circuit this store holds."""


C = TypeVar("C", bound=Circuit)


class CircuitTable(Generic[C]):
    """A store's table of circuits, one per key: :meth:`circuit` makes a key's circuit
    on first use (with :meth:`_make`), once even when threads race for it, and hands
    out the same object ever after. A store subclasses it and writes ``_make``."""

    def __init__(self) -> None:
        self._circuits: dict[str, C] = {}
        self._lock = threading.Lock()

    def circuit(
        self, key: str, *, provider: str, model: str, config: BreakerConfig, on_transition: _Notify
    ) -> C:
        found = self._circuits.get(key)
        if found is None:
            with self._lock:
                found = self._circuits.get(key)
                if found is None:
                    found = self._make(key, provider, model, config, on_transition)
                    self._circuits[key] = found
        return found

    def _make(
        self, key: str, provider: str, model: str, config: BreakerConfig, notify: _Notify
    ) -> C:
        """A new circuit for ``key`` (called under the table's lock, once per key)."""
        raise NotImplementedError

    def circuits(self) -> Iterable[C]:
        return list(self._circuits.values())
