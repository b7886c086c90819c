"""Plain value types shared by every module: states, error classes, outcomes, snapshots."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["CircuitSnapshot", "CircuitState", "ErrorClass", "Outcome", "circuit_key", "split_key"]

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


class CircuitState(str, enum.Enum):
    """State of one circuit (one provider and model)."""

    CLOSED = "closed"
    """Calls pass through; counted failures are tallied."""
    OPEN = "open"
    """Calls are refused with :class:`~callpolicy.CircuitOpenError` until the cooldown ends."""
    HALF_OPEN = "half_open"
    """Cooldown over: up to ``half_open_max_calls`` probes are in flight; the others are refused."""

    def __str__(self) -> str:
        return self.value


class ErrorClass(str, enum.Enum):
    """What kind of failure an exception represents, as :func:`classify_error` sees it."""

    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    NETWORK = "network"
    SERVER = "server"
    CLIENT = "client"
    AUTH = "auth"
    CONTEXT_OVERFLOW = "context_overflow"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


class Outcome(enum.Enum):
    """What a guarded call's result means to the breaker."""

    SUCCESS = "success"
    """The provider answered."""
    FAILURE = "failure"
    """A counted failure (its error class is in ``counted_errors``)."""
    IGNORED = "ignored"
    """Neither: an uncounted error (the caller's fault) or a cancellation. Frees a probe slot."""


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
