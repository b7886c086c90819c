"""Fixtures of the LlamaIndex adapter suite. No test waits on real time: cooldowns pass by
advancing a fake clock, and retry delays are recorded by a fake sleeper."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llama_index.core.instrumentation import root_dispatcher
from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler

from callpolicy import CallPolicy
from tests.support.clock import FakeClock, FakeSleeper

from .fakes import EventRecorder, ScriptedLLM, primary, secondary


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeper(clock: FakeClock) -> FakeSleeper:
    return FakeSleeper(clock)


@pytest.fixture
def policy(clock: FakeClock, sleeper: FakeSleeper) -> CallPolicy:
    """The reference breaker (5 failures, 30 s cooldown, one probe) on the fake clock."""
    return CallPolicy(
        failure_threshold=5,
        cooldown=30.0,
        half_open_max_calls=1,
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
    )


@pytest.fixture
def inner() -> ScriptedLLM:
    return primary()


@pytest.fixture
def backup() -> ScriptedLLM:
    return secondary()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run a test through the sync methods and again through the async ones."""
    return str(request.param)


@pytest.fixture
def events() -> Iterator[EventRecorder]:
    """Every LlamaIndex instrumentation event fired during the test."""
    recorder = EventRecorder()
    root_dispatcher.add_event_handler(recorder)
    try:
        yield recorder
    finally:
        root_dispatcher.event_handlers.remove(recorder)


@pytest.fixture
def spans() -> Iterator[SimpleSpanHandler]:
    """Every dispatcher span opened during the test (completed and dropped)."""
    handler = SimpleSpanHandler()
    root_dispatcher.add_span_handler(handler)
    try:
        yield handler
    finally:
        root_dispatcher.span_handlers.remove(handler)
