"""Plain value types shared by every module: states, error classes, outcomes, snapshots."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CircuitSnapshot",
    "CircuitState",
    "ErrorClass",
    "KeyMetrics",
    "Outcome",
    "circuit_key",
    "split_key",
]

KEY_SEPARATOR = "::"


def circuit_key(provider: str, model: str) -> str:
    """The breaker key of a provider and model, ``provider::model`` as in the reference crate.

    >>> circuit_key("openai", "gpt-4o-mini")
    'openai::gpt-4o-mini'
    """
    return f"{provider}{KEY_SEPARATOR}{model}"


def split_key(key: str) -> tuple[str, str]:
    """Split ``provider::model`` back into its parts (a key without ``::`` is all provider)."""
    provider, _, model = key.partition(KEY_SEPARATOR)
    return provider, model


class TextEnum(str, enum.Enum):
    """An enum of strings that prints as its value (``str(CircuitState.OPEN) == "open"``),
    so logs, tables and JSON show the word, not ``CircuitState.OPEN``."""

    def __str__(self) -> str:
        return str(self.value)


class CircuitState(TextEnum):
    """State of one circuit (one provider and model)."""

    CLOSED = "closed"
    """Calls pass through; counted failures are tallied."""
    OPEN = "open"
    """Calls are refused with :class:`~callpolicy.CircuitOpenError` until the cooldown ends."""
    HALF_OPEN = "half_open"
    """Cooldown over: up to ``half_open_max_calls`` probes are in flight; the others are refused."""


class ErrorClass(TextEnum):
    """What kind of failure an exception represents, as :func:`classify_error` sees it."""

    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    NETWORK = "network"
    SERVER = "server"
    CLIENT = "client"
    """The provider refused the request as invalid (a 4xx other than 401, 403, 408, 429)."""
    AUTH = "auth"
    CONTEXT_OVERFLOW = "context_overflow"
    CALLER = "caller"
    """The caller's own mistake: invalid input or a programming error (``TypeError``,
    ``ValueError``, pydantic's ``ValidationError``, ...) raised before any request left
    the process. Never counted, retried or handed to the fallback."""
    UNKNOWN = "unknown"


class Outcome(enum.Enum):
    """What a guarded call's result means to the breaker."""

    SUCCESS = "success"
    """The provider answered."""
    FAILURE = "failure"
    """A counted failure (its error class is in ``counted_errors``)."""
    IGNORED = "ignored"
    """Neither: an uncounted error (the caller's fault) or a cancellation. Frees a probe slot."""


@dataclass(frozen=True, slots=True)
class KeyMetrics:
    """What one :class:`~callpolicy.CallPolicy` did for one key, in this process, since the
    policy was created (``CallPolicy.metrics()``, ``CircuitSnapshot.metrics``).

    Every count only grows (``reset`` of a circuit does not clear them), so they export
    as monotonic counters. Each admitted attempt ends as exactly one of a success, a
    counted failure, an ignored error or a cancellation; ``calls`` is their sum, so an
    attempt still in flight is not in it yet.
    """

    key: str
    provider: str
    model: str
    calls: int = 0
    """Attempts admitted to the model that have finished (retries and probes included)."""
    successes: int = 0
    failures: Mapping[ErrorClass, int] = field(default_factory=dict)
    """Counted failures (their class is in ``counted_errors``), by error class."""
    ignored: Mapping[ErrorClass, int] = field(default_factory=dict)
    """Errors the breaker did not count (the caller's fault), by error class."""
    cancelled: int = 0
    """Attempts ended by a cancellation, an interrupt or another ``BaseException``."""
    refusals: int = 0
    """Calls and retries refused because the circuit was open (or its probes all taken)."""
    retries: int = 0
    """Retries scheduled (one per wait before another attempt)."""
    fallbacks: int = 0
    """Calls of this key handed to the fallback (whether or not the fallback then answered)."""
    cache_hits: int = 0
    """Answers from the response cache: fresh hits, shared single-flight answers, stale ones."""
    cache_misses: int = 0
    """Cache lookups that ran the call themselves (a stale answer served after a failed
    call counts as a miss and a hit)."""
    budget_refusals: int = 0
    """Calls the budget refused (budget usage itself: ``Budget.usage()``)."""

    @property
    def failure_count(self) -> int:
        """Counted failures of every class."""
        return sum(self.failures.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: error classes as their string values."""
        return {
            "key": self.key,
            "provider": self.provider,
            "model": self.model,
            "calls": self.calls,
            "successes": self.successes,
            "failures": {str(c): n for c, n in self.failures.items()},
            "ignored": {str(c): n for c, n in self.ignored.items()},
            "cancelled": self.cancelled,
            "refusals": self.refusals,
            "retries": self.retries,
            "fallbacks": self.fallbacks,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "budget_refusals": self.budget_refusals,
        }


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """A point-in-time view of one circuit, as returned by ``CallPolicy.snapshot()``."""

    key: str
    provider: str
    model: str
    state: CircuitState
    failures: int
    """Consecutive counted failures (the count that opened the circuit, while open)."""
    retry_in: float | None
    """Seconds until a probe is admitted (0.0 once it may be; None when closed or forced open)."""
    trips: int
    """How many times this circuit has opened since it was created."""
    probes_in_flight: int
    forced: CircuitState | None = None
    """Set when the state was forced by hand (``force_open``/``force_closed``)."""
    calls_in_window: int = 0
    failures_in_window: int = 0
    opened_by: str | None = None
    """What opened the circuit, while it is open or half-open (``"threshold"``,
    ``"failure_rate"``, ``"probe_failed"``, ``"manual"``; the ``reason`` a refused call's
    :class:`~callpolicy.CircuitOpenError` carries); None while closed."""
    metrics: KeyMetrics | None = field(default=None, compare=False)
    """This policy's counts for the key in this process (set by ``CallPolicy.snapshot()``;
    None from a store's own snapshot, as in ``python -m callpolicy status``). Not part of
    equality: two snapshots of the same circuit state are equal whatever was counted."""
