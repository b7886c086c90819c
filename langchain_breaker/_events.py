"""The engine's events as LangChain custom events, for LangSmith and ``astream_events``.

A guarded call's refusals, retries, fallbacks, cache hits and state changes become
custom events (``callpolicy_<kind>``, e.g. ``callpolicy_fallback``) on the caller's run,
through ``dispatch_custom_event``. They are collected while the engine decides and handed
to LangChain just before the next model run starts (so a fallback's event comes before the
fallback's run) and when the call ends. Only calls whose config carries callbacks collect
anything: without a listener there is nothing to do, and the hot path stays as it was.
"""

from __future__ import annotations

import contextvars
import uuid
from typing import Any, Final

from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableConfig

from callpolicy import CallPolicy, Event, EventKind

__all__ = ["EVENT_PREFIX", "EventRelay"]

EVENT_PREFIX: Final = "callpolicy_"
"""Custom event names are this prefix and the event kind: ``callpolicy_state_change``,
``callpolicy_refused``, ``callpolicy_retry``, ``callpolicy_fallback``,
``callpolicy_cache_hit``, ``callpolicy_budget_refused``."""

_NAMES_THE_FAILED_RUN: Final = (EventKind.RETRY, EventKind.FALLBACK)

_pending: contextvars.ContextVar[list[Event] | None] = contextvars.ContextVar(
    "callpolicy_langchain_events", default=None
)


def _collect(event: Event) -> None:
    """The policy listener: keep the event for the LangChain call in this context."""
    sink = _pending.get()
    if sink is not None:
        sink.append(event)


def _payload(event: Event) -> dict[str, Any]:
    return {name.removeprefix("callpolicy_"): value for name, value in event.log_extra().items()}


def _no_parent_run(exc: RuntimeError) -> bool:
    # LangChain refuses custom events outside a run (a bare model.invoke with handlers).
    return "parent run id" in str(exc)


class EventRelay:
    """Collects one call's events and hands them to its LangChain callbacks.

    It also names each attempt's run (:meth:`run_started`), so that the retry or fallback
    event that follows a failed attempt carries that run's id (``failed_run_id``): a UI
    that showed the attempt's streamed tokens (``astream_events``, LangGraph's
    ``"messages"`` mode) knows which to drop.
    """

    __slots__ = ("_config", "_events", "_last_run", "_token")

    def __init__(self, config: RunnableConfig, *, active: bool = True) -> None:
        self._config = config
        self._events: list[Event] = []
        self._last_run: uuid.UUID | None = None
        self._token: contextvars.Token[list[Event] | None] | None = (
            _pending.set(self._events) if active else None
        )

    def activate(self) -> None:
        """Start collecting this context's events (a relay built with ``active=False``)."""
        self._token = _pending.set(self._events)

    @staticmethod
    def wanted(policy: CallPolicy, config: RunnableConfig) -> bool:
        """True when someone may listen (the config has callbacks); registers the
        collector on ``policy`` (once)."""
        if config.get("callbacks") is None:
            return False
        policy.add_listener(_collect)
        return True

    def run_started(self, config: RunnableConfig) -> None:
        """An attempt's run is about to start with ``config``: give it its id now (the
        caller's own ``run_id`` on the first attempt, if any), to name it if it fails."""
        run_id = config.get("run_id")
        if run_id is None:
            run_id = config["run_id"] = uuid.uuid4()
        self._last_run = run_id

    def _payload(self, event: Event) -> dict[str, Any]:
        payload = _payload(event)
        if self._last_run is not None and event.kind in _NAMES_THE_FAILED_RUN:
            payload["failed_run_id"] = str(self._last_run)
        return payload

    def flush(self) -> None:
        events, self._events[:] = list(self._events), []
        for event in events:
            try:
                dispatch_custom_event(
                    EVENT_PREFIX + event.kind.value, self._payload(event), config=self._config
                )
            except RuntimeError as exc:
                if not _no_parent_run(exc):
                    raise
                return

    async def aflush(self) -> None:
        events, self._events[:] = list(self._events), []
        for event in events:
            try:
                await adispatch_custom_event(
                    EVENT_PREFIX + event.kind.value, self._payload(event), config=self._config
                )
            except RuntimeError as exc:
                if not _no_parent_run(exc):
                    raise
                return

    def finish(self) -> None:
        """Hand the events left to the callbacks, then stop collecting (also when handing
        them over failed: the context variable must not outlive the call)."""
        try:
            self.flush()
        finally:
            self.close()

    async def afinish(self) -> None:
        """Async :meth:`finish`."""
        try:
            await self.aflush()
        finally:
            self.close()

    def close(self) -> None:
        if self._token is not None:
            _pending.reset(self._token)
            self._token = None
