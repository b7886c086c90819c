"""Fixtures of the observability suite (the helpers are in ``support``)."""

from __future__ import annotations

import logging

import pytest

from tests.observability.support import EventLog
from tests.support.clock import FakeClock, FakeSleeper


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
    return str(request.param)


@pytest.fixture
def engine_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of the ``callpolicy`` logger, DEBUG included."""
    caplog.set_level(logging.DEBUG, logger="callpolicy")
    return caplog
