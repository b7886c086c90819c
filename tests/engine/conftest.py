"""Shared fixtures of the engine suite: a clock and a sleeper that only move when told.

No engine test waits on real time: cooldowns pass by advancing :class:`FakeClock`
(tests/support/clock.py), and retry delays are recorded by :class:`FakeSleeper` (which
advances the clock instead).
"""

from __future__ import annotations

import pytest

from callpolicy import Event, EventKind
from tests.support.clock import FakeClock, FakeSleeper


class EventLog:
    """A listener that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: EventKind) -> list[Event]:
        return [event for event in self.events if event.kind is kind]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeper(clock: FakeClock) -> FakeSleeper:
    return FakeSleeper(clock)


@pytest.fixture
def events() -> EventLog:
    return EventLog()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run a test through ``execute`` and again through ``aexecute``."""
    return str(request.param)
