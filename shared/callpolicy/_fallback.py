"""What the fallback is answering for, readable from inside the fallback while it runs.

The engine calls a fallback with no arguments (its signature is the primary's), yet the
fallback may want to say why it was called: an adapter labels the fallback's run with
the primary circuit's state, a user's fallback may log the primary's error. The engine
knows both at no cost as it hands over (the refusal, or the state the failure left the
circuit in), so it publishes them in a context variable for the duration of the call:
reading the circuit again would cost a lock, or with a shared store a round trip, on
every call of an outage.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ._types import CircuitState

__all__ = ["FallbackStart", "fallback_start"]


@dataclass(frozen=True)
class FallbackStart:
    """Why the fallback now running was called.

    Attributes:
        key: the primary's circuit key (``provider::model``).
        state: the primary circuit's state as the fallback started: ``OPEN`` (the call
            was refused, or this failure opened it), ``HALF_OPEN`` (its probes were all
            in flight), or ``CLOSED`` (a failure below the threshold, with
            ``fallback_on="error"``).
        cause: the refusal (:class:`~callpolicy.CircuitOpenError`) or the primary's error.
    """

    key: str
    state: CircuitState
    cause: BaseException


_current: ContextVar[FallbackStart | None] = ContextVar("callpolicy_fallback", default=None)


def fallback_start() -> FallbackStart | None:
    """Inside a fallback the engine is running: why it was called; elsewhere None.

    >>> from callpolicy import CallPolicy, fallback_start
    >>> policy = CallPolicy()
    >>> policy.force_open("acme::m1")
    >>> def backup() -> str:
    ...     start = fallback_start()
    ...     return f"backup, as {start.key} is {start.state.value}"
    >>> policy.execute("acme::m1", lambda: "primary", fallback=backup)
    'backup, as acme::m1 is open'
    >>> fallback_start() is None
    True
    """
    return _current.get()
