"""``CallPolicy.stream`` / ``astream`` with a list of fallbacks (``Fallbacks``): each
step under its own circuit, an open one skipped without a call, a failure before a
step's first chunk handed to the next per ``fallback_on``, ``AllModelsFailedError``
naming every model tried; once a step has delivered a chunk it alone serves the stream.

Fake streams (the scripted ``Source`` of test_stream.py); every test runs through the
sync and the async driver (the ``mode`` fixture).
"""

from __future__ import annotations

from typing import Any

import pytest

from callpolicy import (
    AllModelsFailedError,
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    ErrorClass,
    EventKind,
    Fallbacks,
    IncompleteStreamError,
)
from tests.engine.conftest import EventLog
from tests.engine.test_stream import (
    END,
    KEY,
    BadRequest,
    Chunk,
    ServerError,
    Source,
    finished,
    make_policy,
)
from tests.support.clock import FakeClock, FakeSleeper

B, C = "backup::m2", "spare::m3"


def chain(mode: str, *steps: tuple[str | None, Source]) -> Fallbacks[Any]:
    return Fallbacks([(key, source.opener(mode)) for key, source in steps])


async def consume(
    policy: CallPolicy, mode: str, primary: Source, **options: Any
) -> tuple[list[Chunk], BaseException | None]:
    """The chunks the guarded stream delivered, and the error it ended with."""
    got: list[Chunk] = []
    try:
        if mode == "sync":
            for chunk in policy.stream(KEY, primary.opener(mode), **options):
                got.append(chunk)
        else:
            async for chunk in policy.astream(KEY, primary.opener(mode), **options):
                got.append(chunk)
    except Exception as exc:
        return got, exc
    return got, None


async def test_an_open_first_fallback_is_skipped_without_a_call(
    clock: FakeClock, sleeper: FakeSleeper, mode: str, events: EventLog
) -> None:
    policy = make_policy(clock, sleeper, listeners=[events])
    policy.force_open(KEY)
    policy.force_open(B)
    b, c = Source(), Source(["x", END])
    got, error = await consume(
        policy, mode, Source(), fallback=chain(mode, (B, b), (C, c)), fallback_finished=finished
    )
    assert error is None
    assert got == c.made
    assert b.opened == 0
    assert policy.metrics()[C].successes == 1
    start = c.started[0]
    assert (start.key, start.state) == (KEY, CircuitState.OPEN)
    fell_back = [event.key for event in events.events if event.kind is EventKind.FALLBACK]
    assert fell_back == [KEY, B]


async def test_a_first_fallback_failing_before_its_first_chunk_hands_over_to_the_second(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    primary = Source([ServerError("primary")])
    b = Source([ServerError("b")])
    c = Source(["x", "y", END])
    got, error = await consume(
        policy,
        mode,
        primary,
        fallback=chain(mode, (B, b), (C, c)),
        finished=finished,
        fallback_finished=finished,
    )
    assert error is None
    assert got == c.made
    assert [chunk.text for chunk in got] == ["x", "y", END]
    assert (b.opened, b.closed, c.opened) == (1, 1, 1)
    assert policy.metrics()[KEY].failures == {ErrorClass.SERVER: 1}
    assert policy.metrics()[B].failures == {ErrorClass.SERVER: 1}
    assert policy.metrics()[C].successes == 1


async def test_an_empty_stream_without_its_marker_hands_over_too(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.force_open(KEY)
    b, c = Source([]), Source(["x"])
    # Per-step markers: b reports an end marker (so its empty stream was cut short), c none.
    got, error = await consume(
        policy,
        mode,
        Source(),
        fallback=chain(mode, (B, b), (C, c)),
        fallback_finished=[finished, None],
    )
    assert error is None
    assert got == c.made
    assert policy.metrics()[B].failures == {ErrorClass.NETWORK: 1}
    assert policy.metrics()[C].successes == 1


async def test_when_every_model_fails_the_error_names_each_one(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.force_open(B)
    primary = Source([ServerError("primary")])
    b, c = Source(), Source([ServerError("c")])
    got, error = await consume(policy, mode, primary, fallback=chain(mode, (B, b), (C, c)))
    assert got == []
    assert isinstance(error, AllModelsFailedError)
    assert error.keys == (KEY, B, C)
    assert [type(e) for e in error.errors] == [ServerError, CircuitOpenError, ServerError]
    assert isinstance(error.__cause__, ServerError)
    assert b.opened == 0
    assert policy.metrics()[C].failures == {ErrorClass.SERVER: 1}


async def test_a_callers_mistake_from_a_fallback_does_not_hand_over(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.force_open(KEY)
    b, c = Source([BadRequest("400")]), Source()
    got, error = await consume(policy, mode, Source(), fallback=chain(mode, (B, b), (C, c)))
    assert got == []
    assert isinstance(error, AllModelsFailedError)
    assert error.keys == (KEY, B)
    assert c.opened == 0


async def test_a_fallback_failing_midway_is_counted_and_not_followed_by_another(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.force_open(KEY)
    b = Source(["x", ServerError("503")])
    c = Source()
    got, error = await consume(
        policy, mode, Source(), fallback=chain(mode, (B, b), (C, c)), fallback_finished=finished
    )
    assert got == b.made
    assert isinstance(error, ServerError)
    assert "callpolicy: stream of backup::m2 failed after 1 chunks" in error.__notes__
    assert c.opened == 0
    assert policy.metrics()[B].failures == {ErrorClass.SERVER: 1}
    assert C not in policy.metrics()


async def test_each_step_has_its_own_end_marker(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.force_open(KEY)
    policy.force_open(B)
    c = Source(["x", "y"])  # never sends the marker its own check looks for
    got, error = await consume(
        policy,
        mode,
        Source(),
        fallback=chain(mode, (B, Source()), (C, c)),
        fallback_finished=[None, finished],
    )
    assert got == c.made
    assert isinstance(error, IncompleteStreamError)
    assert policy.metrics()[C].failures == {ErrorClass.NETWORK: 1}


async def test_an_unguarded_step_serves_without_a_circuit(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.force_open(KEY)
    policy.force_open(B)
    c = Source(["x", END])
    got, error = await consume(
        policy, mode, Source(), fallback=chain(mode, (B, Source()), (None, c))
    )
    assert error is None
    assert got == c.made
    assert set(policy.metrics()) <= {KEY, B}


def test_per_step_markers_must_match_the_steps(clock: FakeClock, sleeper: FakeSleeper) -> None:
    policy = make_policy(clock, sleeper)
    steps = chain("sync", (B, Source()), (C, Source()))
    with pytest.raises(ValueError, match="fallback_finished: 1 checks for 2 fallbacks"):
        policy.stream(KEY, Source(), fallback=steps, fallback_finished=[finished])
    with pytest.raises(TypeError, match=r"fallback_finished\[1\]"):
        policy.astream(KEY, Source().astart, fallback=steps, fallback_finished=[None, "x"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="only with a Fallbacks list"):
        policy.stream(KEY, Source(), fallback=Source(), fallback_finished=[finished])
