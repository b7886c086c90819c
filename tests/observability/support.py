"""Helpers of the observability suite: a fake sleeper, an event log, fake calls.

The clock is :class:`tests.support.clock.FakeClock`, which the sleeper advances.

No test here waits on real time except the listener-timeout tests, which wait a few
hundredths of a second and assert nothing about how long anything took.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from callpolicy import CallPolicy, Event, EventKind

KEY = "acme::m1"
FALLBACK_KEY = "backup::m2"


class EventLog:
    """A sync listener that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: EventKind) -> list[Event]:
        return [event for event in self.events if event.kind is kind]


class ServerError(Exception):
    status_code = 503


class BadRequest(Exception):
    status_code = 400


class Model:
    """A fake model: answers ``name``, or raises the next of ``errors`` (then answers)."""

    def __init__(self, name: str = "primary", errors: list[BaseException] | None = None) -> None:
        self.name = name
        self.errors = list(errors or [])
        self.always: type[BaseException] | None = None
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.always is not None:
            raise self.always("always failing")
        if self.errors:
            raise self.errors.pop(0)
        return self.name

    async def acall(self) -> str:
        return self()


def guarded(model: Model | None, mode: str) -> Callable[[], Any] | None:
    if model is None:
        return None
    return model if mode == "sync" else model.acall


async def invoke(
    policy: CallPolicy,
    key: str,
    model: Model,
    mode: str,
    *,
    fallback: Model | None = None,
    **options: Any,
) -> Any:
    """``policy.execute`` or ``await policy.aexecute`` of ``model``, per ``mode``."""
    if mode == "sync":
        return policy.execute(key, model, fallback=fallback, **options)
    call: Callable[[], Awaitable[str]] = model.acall
    return await policy.aexecute(
        key, call, fallback=None if fallback is None else fallback.acall, **options
    )
