"""Events: what the engine tells listeners and the ``logging`` module.

Every state change, refusal, retry, fallback, cache hit and budget refusal becomes one
:class:`Event`. Listeners are called outside every lock; one that raises is logged, never
propagated, so observability cannot break a call.

A listener may be ``async def`` (anything whose call returns an awaitable). Where it runs:

- **inside a running event loop** (the event fired in an ``aexecute``, or in a sync call
  made from a coroutine): it is scheduled as a task on that loop and the call goes on at
  once; the engine keeps a reference to the task until it ends
  (``await policy.flush_listeners()`` waits for them);
- **outside any loop** (a plain thread): it runs to completion in that thread, on a
  private event loop, before the call goes on — events arrive in order, as with a sync
  listener.

Either way it is cancelled after ``listener_timeout`` seconds (a ``CallPolicy`` option,
5 s by default), so a hung listener can neither block a thread forever nor pile up
tasks; a timeout or an exception is logged, never raised.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, MutableSet, Sequence
from dataclasses import dataclass
from typing import Any

from ._store import Transition
from ._types import CircuitState, ErrorClass

__all__ = ["DEFAULT_LISTENER_TIMEOUT", "Announcer", "Event", "EventKind", "Listener", "logger"]

DEFAULT_LISTENER_TIMEOUT = 5.0
"""Seconds an async listener may run before it is cancelled."""

logger = logging.getLogger("callpolicy")
# A library leaves output to the application: without its own logging configuration,
# records are dropped rather than printed by logging's last-resort handler.
logger.addHandler(logging.NullHandler())


class EventKind(str, enum.Enum):
    """What an :class:`Event` tells (its string value is the kind's name in logs)."""

    STATE_CHANGE = "state_change"
    """A circuit changed state (``old_state`` -> ``state``, with its ``reason``)."""
    REFUSED = "refused"
    """A call was refused because the circuit is open (before any fallback)."""
    RETRY = "retry"
    """An attempt failed and another follows after ``delay`` seconds."""
    FALLBACK = "fallback"
    """The call was handed to the fallback (after a refusal or the primary's failure)."""
    CACHE_HIT = "cache_hit"
    """An answer served from the response cache (``reason``: hit, shared or stale)."""
    BUDGET_REFUSED = "budget_refused"
    """The budget refused the call before any model was reached."""

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


Listener = Callable[[Event], Awaitable[object] | None]
"""A callable taking an :class:`Event`: a plain function, or an ``async def`` one."""


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


def dispatch(
    event: Event,
    listeners: Sequence[Listener],
    *,
    timeout: float = DEFAULT_LISTENER_TIMEOUT,
    pending: MutableSet[asyncio.Task[None]] | None = None,
) -> None:
    """Log ``event`` and hand it to each listener; a failing listener is logged, not raised.

    An awaitable returned by a listener is run as the module docstring says: as a task
    (added to ``pending`` until it ends) in a running loop, else to completion here.
    """
    level = _level(event)
    if logger.isEnabledFor(level):
        logger.log(level, _describe(event), extra=event.log_extra())
    for listener in listeners:
        try:
            result = listener(event)
        except Exception:
            logger.exception("callpolicy listener %r failed on %s event", listener, event.kind)
            continue
        if result is not None and inspect.isawaitable(result):
            _run_async(result, listener, event, timeout, pending)


def _run_async(
    awaitable: Awaitable[object],
    listener: Listener,
    event: Event,
    timeout: float,
    pending: MutableSet[asyncio.Task[None]] | None,
) -> None:
    guarded = _guarded(awaitable, listener, event, timeout)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        task = loop.create_task(guarded)
        if pending is None:
            pending = _PENDING
        pending.add(task)
        task.add_done_callback(pending.discard)
        return
    # No loop in this thread: a private one, never installed as the thread's current
    # loop (asyncio.run would leave the thread with none set afterwards).
    private = asyncio.new_event_loop()
    try:
        private.run_until_complete(guarded)
        private.run_until_complete(private.shutdown_asyncgens())
    except Exception:  # pragma: no cover - _guarded logs its own failures
        logger.exception("callpolicy async listener %r could not run", listener)
    finally:
        private.close()


_PENDING: set[asyncio.Task[None]] = set()
"""Tasks of async listeners dispatched without a ``pending`` set of their own."""


def _guarded(
    awaitable: Awaitable[object], listener: Listener, event: Event, timeout: float
) -> Coroutine[Any, Any, None]:
    async def run() -> None:
        try:
            await asyncio.wait_for(_awaited(awaitable), timeout)
        except asyncio.TimeoutError:
            logger.error(
                "callpolicy async listener %r timed out after %ss on %s event",
                listener,
                timeout,
                event.kind,
            )
        except Exception:
            logger.exception(
                "callpolicy async listener %r failed on %s event", listener, event.kind
            )

    return run()


async def _awaited(awaitable: Awaitable[object]) -> None:
    await awaitable


EventSink = Callable[[Event], None]


class Announcer:
    """Where one policy's events go: its listeners (changed by replacing the tuple, so
    a dispatch in flight keeps the one it started with) and the ``callpolicy`` logger."""

    __slots__ = ("listeners", "pending", "timeout")

    def __init__(self, listeners: tuple[Listener, ...], timeout: float) -> None:
        self.listeners = listeners
        self.timeout = timeout
        self.pending: set[asyncio.Task[None]] = set()
        """Tasks of async listeners still running (``flush_listeners`` waits for them)."""

    def add(self, listener: Listener) -> None:
        if not callable(listener):
            raise TypeError("listener: expected a callable taking an Event")
        if listener not in self.listeners:
            self.listeners = (*self.listeners, listener)

    def remove(self, listener: Listener) -> None:
        self.listeners = tuple(x for x in self.listeners if x is not listener)

    async def flush(self) -> None:
        """Wait for the async listeners' tasks on the running loop (see the module)."""
        loop = asyncio.get_running_loop()
        while True:
            mine = [t for t in list(self.pending) if t.get_loop() is loop]
            if not mine:
                return
            await asyncio.wait(mine)

    def heard(self, level: int) -> bool:
        """Would an event logged at ``level`` reach anyone? Lets a cold path that fires
        often (an open circuit's refusals) skip building events nobody reads."""
        return bool(self.listeners) or logger.isEnabledFor(level)

    def emit(self, event: Event) -> None:
        dispatch(event, self.listeners, timeout=self.timeout, pending=self.pending)
