"""Events: what the engine tells listeners and the ``logging`` module.

Every state change, refusal, retry and fallback becomes one :class:`Event`. Listeners
are called synchronously, outside every lock; one that raises is logged, never
propagated, so observability cannot break a call.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._store import Transition
from ._types import CircuitState, ErrorClass

__all__ = ["Event", "EventKind", "Listener", "logger"]

logger = logging.getLogger("callpolicy")
# A library leaves output to the application: without its own logging configuration,
# records are dropped rather than printed by logging's last-resort handler.
logger.addHandler(logging.NullHandler())


class EventKind(str, enum.Enum):
    STATE_CHANGE = "state_change"
    REFUSED = "refused"
    """A call was refused because the circuit is open (before any fallback)."""
    RETRY = "retry"
    FALLBACK = "fallback"
    CACHE_HIT = "cache_hit"
    """An answer served from the response cache (``reason``: hit, shared or stale)."""
    BUDGET_REFUSED = "budget_refused"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    key: str
    provider: str
    model: str
    state: CircuitState | None = None
    """The new state (state changes) or the state that refused (refusals)."""
    old_state: CircuitState | None = None
    reason: str | None = None
    failures: int | None = None
    error_class: ErrorClass | None = None
    error_type: str | None = None
    """Class name of the error behind a retry or fallback (never its message: messages
    can carry request data)."""
    attempt: int | None = None
    delay: float | None = None
    """Seconds before the next attempt (retries) or until a probe (open-state events)."""

    @classmethod
    def from_transition(cls, transition: Transition) -> Event:
        return cls(
            EventKind.STATE_CHANGE,
            transition.key,
            transition.provider,
            transition.model,
            state=transition.new,
            old_state=transition.old,
            reason=transition.reason,
            failures=transition.failures,
            delay=transition.cooldown,
        )

    def log_extra(self) -> dict[str, object]:
        """Structured fields for a ``logging`` record (``extra=``), all prefixed."""
        return {
            f"callpolicy_{name}": (value.value if isinstance(value, enum.Enum) else value)
            for name, value in (
                ("event", self.kind),
                ("key", self.key),
                ("provider", self.provider),
                ("model", self.model),
                ("state", self.state),
                ("old_state", self.old_state),
                ("reason", self.reason),
                ("failures", self.failures),
                ("error_class", self.error_class),
                ("error_type", self.error_type),
                ("attempt", self.attempt),
                ("delay", self.delay),
            )
        }


Listener = Callable[[Event], None]


def _level(event: Event) -> int:
    if event.kind is EventKind.STATE_CHANGE:
        return logging.WARNING if event.state is CircuitState.OPEN else logging.INFO
    if event.kind in (EventKind.REFUSED, EventKind.CACHE_HIT):
        return logging.DEBUG
    if event.kind is EventKind.BUDGET_REFUSED:
        return logging.WARNING
    return logging.INFO


def _describe(event: Event) -> str:
    where = f"{event.provider}/{event.model}"
    if event.kind is EventKind.STATE_CHANGE:
        text = f"circuit {where} {event.old_state} -> {event.state} ({event.reason}"
        if event.state is CircuitState.OPEN:
            when = "held open" if event.delay is None else f"probe in {event.delay:.1f}s"
            text += f", {event.failures} failures, {when}"
        return text + ")"
    if event.kind is EventKind.RETRY:
        return (
            f"retrying {where} after attempt {event.attempt} failed with {event.error_type} "
            f"({event.error_class}); waiting {event.delay:.3f}s"
        )
    if event.kind is EventKind.FALLBACK:
        cause = event.error_type or "open circuit"
        return f"fallback serving {where} ({cause}, {event.error_class or event.state})"
    if event.kind is EventKind.CACHE_HIT:
        return f"cache {event.reason} for {where}"
    if event.kind is EventKind.BUDGET_REFUSED:
        return f"budget refused {where}: {event.reason}"
    return f"refused {where}: circuit {event.state}"


def dispatch(event: Event, listeners: Sequence[Listener]) -> None:
    """Log ``event`` and hand it to each listener; a failing listener is logged, not raised."""
    level = _level(event)
    if logger.isEnabledFor(level):
        logger.log(level, _describe(event), extra=event.log_extra())
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            logger.exception("callpolicy listener %r failed on %s event", listener, event.kind)


EventSink = Callable[[Event], None]
