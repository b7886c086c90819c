"""``CallPolicy.stream`` / ``astream``: a stream guarded as one call.

Fake streams (scripted generators) and an injected clock; every test runs through the
sync and the async driver (the ``mode`` fixture).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from callpolicy import (
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    ErrorClass,
    EventKind,
    IncompleteStreamError,
    RetryPolicy,
    fallback_start,
)
from tests.engine.conftest import EventLog
from tests.support.clock import FakeClock, FakeSleeper

KEY = "acme::m1"
FALLBACK_KEY = "backup::m2"
END = "<end>"


class ServerError(Exception):
    status_code = 503


class BadRequest(Exception):
    status_code = 400


class Chunk:
    """A chunk object: identity matters (the guard must yield the very same objects)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Chunk({self.text!r})"


def finished(chunk: Chunk) -> bool:
    return chunk.text == END


class Source:
    """A model's stream, scripted per attempt: each script is a list of chunk texts,
    optionally ending in an exception (raised there). Keeps every chunk it made, how
    often it was opened and whether its streams were closed."""

    def __init__(self, *scripts: list[Any], forever: list[Any] | None = None) -> None:
        self.scripts = list(scripts)
        self.forever = forever if forever is not None else ["a", "b", END]
        self.opened = 0
        self.made: list[Chunk] = []
        self.closed = 0
        self.started: list[Any] = []
        self.gate: asyncio.Event | None = None
        """Async only: wait on this before each chunk after the first."""

    def _script(self) -> list[Any]:
        self.opened += 1
        self.started.append(fallback_start())
        return self.scripts.pop(0) if self.scripts else list(self.forever)

    def __call__(self) -> Iterator[Chunk]:
        return self._run(self._script())

    def _run(self, script: list[Any]) -> Iterator[Chunk]:
        try:
            for item in script:
                if isinstance(item, BaseException):
                    raise item
                chunk = Chunk(item)
                self.made.append(chunk)
                yield chunk
        finally:
            self.closed += 1

    def astart(self) -> AsyncIterator[Chunk]:
        return self._arun(self._script())

    async def _arun(self, script: list[Any]) -> AsyncIterator[Chunk]:
        try:
            for index, item in enumerate(script):
                if index and self.gate is not None:
                    await self.gate.wait()
                if isinstance(item, BaseException):
                    raise item
                chunk = Chunk(item)
                self.made.append(chunk)
                yield chunk
        finally:
            self.closed += 1

    def opener(self, mode: str) -> Callable[[], Any]:
        return self if mode == "sync" else self.astart


def make_policy(clock: FakeClock, sleeper: FakeSleeper, **options: Any) -> CallPolicy:
    return CallPolicy(
        clock=clock, sleep=sleeper, async_sleep=sleeper.asleep, rng=random.Random(7), **options
    )


async def consume(
    policy: CallPolicy,
    mode: str,
    primary: Source,
    *,
    fallback: Source | None = None,
    stop_after: int | None = None,
    **options: Any,
) -> tuple[list[Chunk], BaseException | None]:
    """Iterate the guarded stream: the chunks received, and the error it ended with.
    ``stop_after``: the consumer stops (close/aclose) after that many chunks."""
    got: list[Chunk] = []
    if fallback is not None:
        options["fallback"] = fallback.opener(mode)
    try:
        if mode == "sync":
            stream = policy.stream(KEY, primary.opener(mode), **options)
            for chunk in stream:
                got.append(chunk)
                if stop_after is not None and len(got) >= stop_after:
                    stream.close()  # type: ignore[attr-defined]
                    break
        else:
            astream = policy.astream(KEY, primary.opener(mode), **options)
            async for chunk in astream:
                got.append(chunk)
                if stop_after is not None and len(got) >= stop_after:
                    await astream.aclose()  # type: ignore[attr-defined]
                    break
    except Exception as exc:
        return got, exc
    return got, None


async def test_healthy_stream_yields_the_very_same_chunks_and_counts_one_success(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    source = Source(["a", "b", "c", END])
    got, error = await consume(policy, mode, source, finished=finished)
    assert error is None
    assert len(got) == len(source.made) == 4
    assert all(mine is theirs for mine, theirs in zip(got, source.made, strict=True))
    metrics = policy.metrics()[KEY]
    assert (metrics.calls, metrics.successes, metrics.failures) == (1, 1, {})
    assert source.closed == 1


async def test_nothing_happens_until_the_stream_is_iterated(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    source = Source()
    if mode == "sync":
        policy.stream(KEY, source)
    else:
        policy.astream(KEY, source.astart)
    assert source.opened == 0
    assert KEY not in policy.metrics()


async def test_an_open_circuit_never_opens_the_primary_stream(
    clock: FakeClock, sleeper: FakeSleeper, mode: str, events: EventLog
) -> None:
    policy = make_policy(clock, sleeper, listeners=[events])
    policy.trip(KEY)
    primary = Source()
    got, error = await consume(policy, mode, primary)
    assert isinstance(error, CircuitOpenError)
    assert got == []
    assert primary.opened == 0
    # With a fallback: its stream serves, told why.
    backup = Source(["x", "y"])
    got, error = await consume(policy, mode, primary, fallback=backup)
    assert error is None
    assert [c.text for c in got] == ["x", "y"]
    assert primary.opened == 0
    start = backup.started[0]
    assert (start.key, start.state) == (KEY, CircuitState.OPEN)
    assert isinstance(start.cause, CircuitOpenError)
    assert fallback_start() is None
    metrics = policy.metrics()[KEY]
    assert (metrics.refusals, metrics.fallbacks) == (2, 1)
    assert len(events.of(EventKind.FALLBACK)) == 1


async def test_half_open_probe_limit_holds_for_the_life_of_a_stream(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1, cooldown=10)
    await consume(policy, mode, Source([ServerError("503")]))
    assert policy.state(KEY) is CircuitState.OPEN
    clock.advance(10)
    probe = Source(["a", "b", END])
    second = Source()
    if mode == "sync":
        stream = policy.stream(KEY, probe, finished=finished)
        first = next(stream)
        _, error = await consume(policy, mode, second)  # the probe slot is taken
        assert isinstance(error, CircuitOpenError)
        assert error.retry_in == 0.0
        assert second.opened == 0
        rest = list(stream)
    else:
        astream = policy.astream(KEY, probe.astart, finished=finished)
        first = await anext(astream)
        _, error = await consume(policy, mode, second)
        assert isinstance(error, CircuitOpenError)
        assert error.retry_in == 0.0
        rest = [chunk async for chunk in astream]
    assert [first, *rest] == probe.made
    assert policy.state(KEY) is CircuitState.CLOSED


async def test_a_failure_before_the_first_chunk_is_retried(
    clock: FakeClock, sleeper: FakeSleeper, mode: str, events: EventLog
) -> None:
    policy = make_policy(
        clock, sleeper, retry=RetryPolicy(max_attempts=3, jitter=0.0), listeners=[events]
    )
    source = Source([ServerError("503")], [ConnectionError("reset")], ["a", END])
    got, error = await consume(policy, mode, source, finished=finished)
    assert error is None
    assert [c.text for c in got] == ["a", END]
    assert source.opened == 3
    assert len(sleeper.delays) == 2
    metrics = policy.metrics()[KEY]
    assert metrics.retries == 2
    assert metrics.successes == 1
    assert metrics.failures == {ErrorClass.SERVER: 1, ErrorClass.NETWORK: 1}
    assert len(events.of(EventKind.RETRY)) == 2


async def test_the_fallback_stream_serves_a_failed_start_under_its_own_circuit(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1)
    primary = Source([ServerError("503")])
    backup = Source(["x", END])
    got, error = await consume(
        policy,
        mode,
        primary,
        fallback=backup,
        fallback_key=FALLBACK_KEY,
        finished=finished,
        fallback_finished=finished,
    )
    assert error is None
    assert got == backup.made
    start = backup.started[0]
    assert (start.key, start.state) == (KEY, CircuitState.OPEN)
    assert isinstance(start.cause, ServerError)
    assert policy.metrics()[KEY].failures == {ErrorClass.SERVER: 1}
    assert policy.metrics()[FALLBACK_KEY].successes == 1
    assert primary.closed == 1


async def test_a_failing_fallback_is_counted_and_names_the_primary_failure(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    primary = Source([ServerError("primary")])
    backup = Source([ServerError("backup")])
    got, error = await consume(policy, mode, primary, fallback=backup, fallback_key=FALLBACK_KEY)
    assert got == []
    assert isinstance(error, ServerError)
    assert str(error) == "backup"
    assert isinstance(error.__context__, ServerError)
    assert any("the fallback failed" in note for note in error.__notes__)
    assert policy.metrics()[FALLBACK_KEY].failures == {ErrorClass.SERVER: 1}


async def test_an_uncounted_error_is_not_served_by_the_fallback(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    backup = Source()
    _got, error = await consume(policy, mode, Source([BadRequest("400")]), fallback=backup)
    assert isinstance(error, BadRequest)
    assert backup.opened == 0
    assert policy.metrics()[KEY].ignored == {ErrorClass.CLIENT: 1}


async def test_a_failure_after_the_first_chunk_is_counted_noted_and_never_replayed(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1, retry=RetryPolicy(max_attempts=3))
    primary = Source(["a", "b", ConnectionResetError("connection reset")])
    backup = Source()
    got, error = await consume(policy, mode, primary, fallback=backup, finished=finished)
    assert got == primary.made
    assert len(got) == 2
    assert isinstance(error, ConnectionResetError)
    assert "callpolicy: stream of acme::m1 failed after 2 chunks" in error.__notes__
    assert primary.opened == 1
    assert backup.opened == 0
    assert sleeper.delays == []
    assert policy.metrics()[KEY].failures == {ErrorClass.NETWORK: 1}
    assert policy.state(KEY) is CircuitState.OPEN
    assert primary.closed == 1


async def test_a_fallback_stream_failing_midway_counts_against_the_fallback(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.trip(KEY)
    backup = Source(["x", ServerError("503")])
    got, error = await consume(policy, mode, Source(), fallback=backup, fallback_key=FALLBACK_KEY)
    assert got == backup.made
    assert isinstance(error, ServerError)
    assert "callpolicy: stream of backup::m2 failed after 1 chunks" in error.__notes__
    assert policy.metrics()[FALLBACK_KEY].failures == {ErrorClass.SERVER: 1}


async def test_a_stream_cut_short_raises_after_its_last_chunk_and_counts(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1)
    source = Source(["a", "b"])
    got, error = await consume(policy, mode, source, finished=finished)
    assert got == source.made
    assert len(got) == 2
    assert isinstance(error, IncompleteStreamError)
    assert (error.key, error.chunks) == (KEY, 2)
    assert policy.metrics()[KEY].failures == {ErrorClass.NETWORK: 1}
    assert policy.state(KEY) is CircuitState.OPEN


async def test_the_end_marker_may_come_before_the_last_chunks(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    # OpenAI sends the usage chunk after the one with the finish reason.
    policy = make_policy(clock, sleeper)
    source = Source(["a", END, "usage"])
    got, error = await consume(policy, mode, source, finished=finished)
    assert error is None
    assert got == source.made
    assert policy.metrics()[KEY].successes == 1


async def test_without_finished_a_short_stream_is_a_success(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    got, error = await consume(policy, mode, Source(["a"]))
    assert error is None
    assert len(got) == 1
    assert policy.metrics()[KEY].successes == 1


async def test_an_empty_stream_without_its_marker_is_a_failure_before_the_first_chunk(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    backup = Source(["x", END])
    got, error = await consume(
        policy, mode, Source([]), fallback=backup, finished=finished, fallback_finished=finished
    )
    assert error is None
    assert got == backup.made
    assert isinstance(backup.started[0].cause, IncompleteStreamError)
    assert backup.started[0].cause.chunks == 0


@pytest.mark.parametrize("stop_after", [1, 2])
async def test_a_consumer_that_stops_early_frees_the_probe_slot(
    clock: FakeClock, sleeper: FakeSleeper, mode: str, stop_after: int
) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1, cooldown=10)
    await consume(policy, mode, Source([ServerError("503")]))
    clock.advance(10)  # half-open: one probe
    probe = Source(["a", "b", "c", END])
    got, error = await consume(policy, mode, probe, finished=finished, stop_after=stop_after)
    assert error is None
    assert len(got) == stop_after
    assert probe.closed == 1  # the model's stream was closed
    metrics = policy.metrics()[KEY]
    assert metrics.cancelled == 1
    assert metrics.successes == 0
    assert policy.state(KEY) is CircuitState.HALF_OPEN
    # The slot is free again: the next stream is admitted, and closes the circuit.
    got, error = await consume(policy, mode, Source(["a", END]), finished=finished)
    assert error is None
    assert policy.state(KEY) is CircuitState.CLOSED


def test_a_break_frees_the_slot_once_the_generator_is_collected(
    clock: FakeClock, sleeper: FakeSleeper
) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1, cooldown=10)
    policy.trip(KEY)
    clock.advance(10)
    got = []
    for chunk in policy.stream(KEY, Source(["a", "b", END]), finished=finished):
        got.append(chunk)
        break  # CPython closes the dropped generator at once
    assert [c.text for c in got] == ["a"]
    assert policy.metrics()[KEY].cancelled == 1
    assert list(policy.stream(KEY, Source(["a", END]), finished=finished))
    assert policy.state(KEY) is CircuitState.CLOSED


async def test_a_cancelled_consumer_frees_the_probe_slot(
    clock: FakeClock, sleeper: FakeSleeper
) -> None:
    policy = make_policy(clock, sleeper, failure_threshold=1, cooldown=10)
    policy.trip(KEY)
    clock.advance(10)
    source = Source(["a", "b", END])
    source.gate = asyncio.Event()  # never set: the second chunk never comes
    got: list[Chunk] = []
    first = asyncio.Event()

    async def reader() -> None:
        async for chunk in policy.astream(KEY, source.astart, finished=finished):
            got.append(chunk)
            first.set()

    task = asyncio.create_task(reader())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed == 1
    assert policy.metrics()[KEY].cancelled == 1
    assert policy.state(KEY) is CircuitState.HALF_OPEN
    source.gate = None
    assert [c async for c in policy.astream(KEY, source.astart, finished=finished)]
    assert policy.state(KEY) is CircuitState.CLOSED


def test_an_error_thrown_in_by_the_consumer_is_not_the_providers_failure(
    clock: FakeClock, sleeper: FakeSleeper
) -> None:
    policy = make_policy(clock, sleeper)
    source = Source(["a", "b", END])
    stream = policy.stream(KEY, source, finished=finished)
    next(stream)
    with pytest.raises(ServerError):
        stream.throw(ServerError("the consumer's"))  # type: ignore[attr-defined]
    metrics = policy.metrics()[KEY]
    assert metrics.failures == {}
    assert metrics.cancelled == 1
    assert source.closed == 1


async def test_astream_accepts_a_coroutine_that_returns_the_stream(
    clock: FakeClock, sleeper: FakeSleeper
) -> None:
    policy = make_policy(clock, sleeper)
    source = Source(["a", END])

    async def start() -> AsyncIterator[Chunk]:
        return source.astart()

    got = [chunk async for chunk in policy.astream(KEY, start, finished=finished)]
    assert got == source.made


async def test_without_a_fallback_key_the_fallback_stream_is_not_counted(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = make_policy(clock, sleeper)
    policy.trip(KEY)
    backup = Source(["x"])
    got, error = await consume(policy, mode, Source(), fallback=backup, fallback_finished=finished)
    # Cut short: raised, named after the primary's key, counted nowhere.
    assert got == backup.made
    assert isinstance(error, IncompleteStreamError)
    assert error.key == KEY
    assert policy.metrics()[KEY].failures == {}


def test_incomplete_stream_error_survives_a_copy() -> None:
    import copy

    error = copy.copy(IncompleteStreamError(KEY, 3))
    assert (error.key, error.chunks) == (KEY, 3)
    assert "after 3 chunks" in str(error)
