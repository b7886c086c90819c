"""This policy's counts per key (:meth:`CallPolicy.metrics <callpolicy.CallPolicy.metrics>`).

A policy may see many keys (one per model, and a circuit per key), most of them only
ever called successfully, so a key's record is small: its circuit and its successes. The
other counts are made on the first one a key needs (:class:`_Counts`).

Successes, refusals and fallbacks are bumped without a lock (a plain ``+=`` on a slot:
under heavy threading a rare increment may be lost), so neither the healthy call nor an
open circuit's refusal or hand-over takes one; every other count changes under the
tallies' lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace

from ._config import BreakerConfig
from ._store import Circuit, CircuitStore, TransitionListener
from ._types import CircuitSnapshot, ErrorClass, KeyMetrics, split_key

__all__ = ["Tallies"]


class _Counts:
    """A key's counts besides its successes, made when the key first needs one."""

    __slots__ = (
        "budget_refusals",
        "cache_hits",
        "cache_misses",
        "cancelled",
        "failures",
        "fallbacks",
        "ignored",
        "refusals",
        "retries",
    )

    def __init__(self) -> None:
        self.failures: dict[ErrorClass, int] = {}
        self.ignored: dict[ErrorClass, int] = {}
        self.cancelled = self.refusals = self.retries = self.fallbacks = 0
        self.cache_hits = self.cache_misses = self.budget_refusals = 0


_PLAIN = (
    "cancelled",
    "refusals",
    "retries",
    "fallbacks",
    "cache_hits",
    "cache_misses",
    "budget_refusals",
)
"""The counts that are one number each, named as :class:`KeyMetrics` names them."""

_NONE = _Counts()
"""What a key that never needed a count reads as (never written to)."""


class _Tally:
    """One key's circuit and this policy's counts for it."""

    __slots__ = ("circuit", "more", "successes")

    def __init__(self, circuit: Circuit) -> None:
        self.circuit = circuit
        self.successes = 0
        self.more: _Counts | None = None

    def metrics(self) -> KeyMetrics:
        circuit = self.circuit
        more = self.more or _NONE
        failures, ignored = dict(more.failures), dict(more.ignored)
        return KeyMetrics(
            key=circuit.key,
            provider=circuit.provider,
            model=circuit.model,
            calls=self.successes + sum(failures.values()) + sum(ignored.values()) + more.cancelled,
            successes=self.successes,
            failures=failures,
            ignored=ignored,
            **{name: getattr(more, name) for name in _PLAIN},
        )


class Tallies:
    """The keys this policy has seen: each one's circuit (from the store) and counts."""

    __slots__ = ("by_key", "config", "lock", "on_transition", "store")

    def __init__(
        self, store: CircuitStore, config: BreakerConfig, on_transition: TransitionListener
    ) -> None:
        self.by_key: dict[str, _Tally] = {}
        """Read without the lock (a dict lookup is atomic): the hot path's one step."""
        self.lock = threading.Lock()
        self.store = store
        self.config = config
        self.on_transition = on_transition

    def get(self, key: str) -> _Tally:
        return self.by_key.get(key) or self.create(key)

    def create(self, key: str) -> _Tally:
        with self.lock:
            tally = self.by_key.get(key)
            if tally is not None:
                return tally
        provider, model = split_key(key)
        circuit = self.store.circuit(  # outside the lock: a store may do I/O
            key,
            provider=provider,
            model=model,
            config=self.config,
            on_transition=self.on_transition,
        )
        with self.lock:
            # The store hands out one circuit per key, so a racing creator built the same.
            return self.by_key.setdefault(key, _Tally(circuit))

    def more(self, tally: _Tally) -> _Counts:
        """``tally``'s counts besides its successes, made on first use."""
        more = tally.more
        if more is None:
            with self.lock:
                if tally.more is None:
                    tally.more = _Counts()
                more = tally.more
        return more

    def count_error(self, tally: _Tally, error_class: ErrorClass, counted: bool) -> int:
        """One more error of ``error_class`` (a counted failure, or an ignored error);
        how many of that class the key has had."""
        more = self.more(tally)
        counts = more.failures if counted else more.ignored
        with self.lock:
            seen = counts[error_class] = counts.get(error_class, 0) + 1
        return seen

    def add(self, tally: _Tally, name: str) -> None:
        """One more of the locked count ``name`` (cancelled, retries, cache_hits, ...)."""
        more = self.more(tally)
        with self.lock:
            setattr(more, name, getattr(more, name) + 1)

    def metrics(self) -> dict[str, KeyMetrics]:
        with self.lock:
            return {key: tally.metrics() for key, tally in sorted(self.by_key.items())}

    def snapshot(self, stored: Iterable[Circuit]) -> dict[str, CircuitSnapshot]:
        """The ``stored`` circuits and this policy's, by key, each with its counts."""
        found = {circuit.key: circuit for circuit in stored}
        found.update((key, tally.circuit) for key, tally in list(self.by_key.items()))
        counts = self.metrics()
        return {
            key: replace(
                circuit.snapshot(),
                metrics=counts.get(key)
                or KeyMetrics(key=key, provider=circuit.provider, model=circuit.model),
            )
            for key, circuit in sorted(found.items())
        }

    def fallback_served(self) -> dict[str, int]:
        with self.lock:
            found = ((key, tally.more) for key, tally in self.by_key.items())
            return {key: more.fallbacks for key, more in found if more and more.fallbacks}
