"""Streams are guarded by default, and their chunks pass through untouched: the inner
model's own chunk objects, and its own errors (counted, with a note).

``guard_streams=False`` passes streams through as they are; ``guard_stream_start`` is its
deprecated alias. The engine's rules are tested in tests/engine/test_stream.py; these
tests pin what the LangChain wrapper adds (runs, kwargs, markers, structured output).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk
from pydantic import BaseModel

from callpolicy import (
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    IncompleteStreamError,
    RetryPolicy,
)
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.fakes import DiesMidStream, ScriptedChatModel, ServerError, tool_call_message
from tests.support.clock import FakeClock

OPEN, CLOSED = CircuitState.OPEN, CircuitState.CLOSED


async def collect(model: Any, mode: str, input: Any = "hi", **kwargs: Any) -> list[Any]:
    if mode == "sync":
        return list(model.stream(input, **kwargs))
    return [chunk async for chunk in model.astream(input, **kwargs)]


async def collect_until_error(model: Any, mode: str) -> tuple[list[Any], BaseException]:
    chunks: list[Any] = []
    try:
        if mode == "sync":
            for chunk in model.stream("hi"):
                chunks.append(chunk)
        else:
            async for chunk in model.astream("hi"):
                chunks.append(chunk)
    except Exception as exc:
        return chunks, exc
    raise AssertionError("the stream did not fail")


def text(chunks: list[Any]) -> str:
    return "".join(str(chunk.content) for chunk in chunks)


def visible(chunk: AIMessageChunk) -> dict[str, Any]:
    """Everything a consumer sees in a chunk, but its id (the run's id, new per run)."""
    return {
        "type": type(chunk).__name__,
        "content": chunk.content,
        "tool_call_chunks": chunk.tool_call_chunks,
        "tool_calls": chunk.tool_calls,
        "usage_metadata": chunk.usage_metadata,
        "response_metadata": chunk.response_metadata,
        "additional_kwargs": chunk.additional_kwargs,
        "chunk_position": chunk.chunk_position,
    }


SCRIPTS: dict[str, Callable[[], list[Any]]] = {
    "text": lambda: ["the quick brown fox jumps"],
    "tool calls": lambda: [tool_call_message("add", {"a": 1, "b": 2})],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
async def test_a_stream_is_the_inner_models_own_chunk_for_chunk(mode: str, script: str) -> None:
    bare = ScriptedChatModel(script=SCRIPTS[script]())
    wrapped = ScriptedChatModel(script=SCRIPTS[script]())
    model = CircuitBreakerChatModel(
        inner=wrapped, fallback=ScriptedChatModel(provider="other"), failure_threshold=1
    )
    expected = await collect(bare, mode)
    got = await collect(model, mode)
    assert len(got) == len(expected) > 1
    assert [visible(c) for c in got] == [visible(c) for c in expected]
    assert wrapped.calls == 1


async def test_the_last_chunk_carries_the_inner_models_usage_and_metadata(mode: str) -> None:
    model = CircuitBreakerChatModel(inner=ScriptedChatModel(default="a b"))
    chunks = await collect(model, mode)
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.content == "a b"
    assert total.usage_metadata == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    assert total.response_metadata["model_name"] == "m1"


async def test_an_error_mid_stream_is_counted_and_reraised_after_the_chunks_before_it(
    mode: str,
) -> None:
    error = ServerError("connection dropped")
    inner = ScriptedChatModel(script=[DiesMidStream("one two three four", 2, error)])
    backup = ScriptedChatModel(provider="other")
    model = CircuitBreakerChatModel(inner=inner, fallback=backup, failure_threshold=1)
    chunks, raised = await collect_until_error(model, mode)
    assert [c.content for c in chunks] == ["one ", "two "]
    assert raised is error  # the inner model's own error, with a note
    assert f"callpolicy: stream of {model.key} failed after 2 chunks" in error.__notes__
    assert backup.calls == 0  # never another model's chunks after the first
    assert model.state_for() is OPEN  # counted


async def test_with_guard_streams_off_the_breaker_does_not_see_streams(
    mode: str, clock: FakeClock
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 3)
    model = CircuitBreakerChatModel(
        inner=inner,
        policy=CallPolicy(clock=clock, failure_threshold=1, retry=RetryPolicy(base_delay=0)),
        guard_streams=False,
    )
    for _ in range(3):
        with pytest.raises(ServerError):
            await collect(model, mode)
    assert inner.calls == 3  # no retries either
    assert model.state_for() is CLOSED
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    assert text(await collect(model, mode)) == "ok"  # an open circuit too


async def test_stop_and_kwargs_reach_the_inner_stream(mode: str) -> None:
    inner = ScriptedChatModel()
    model = CircuitBreakerChatModel(inner=inner)
    await collect(model, mode, stop=["END"], temperature=0.5)
    assert inner.call_kwargs == [{"temperature": 0.5}]


# -- guarded streams (the default) -------------------------------------------------------


def guarded_streams(
    clock: FakeClock, inner: ScriptedChatModel, fallback: ScriptedChatModel | None = None
) -> CircuitBreakerChatModel:
    return CircuitBreakerChatModel(
        inner=inner,
        fallback=fallback,
        policy=CallPolicy(clock=clock, failure_threshold=2, cooldown=30),
    )


async def test_a_guarded_start_counts_failures_before_the_first_chunk(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 2)
    model = guarded_streams(clock, inner)
    for _ in range(2):
        with pytest.raises(ServerError):
            await collect(model, mode)
    assert model.state_for() is OPEN
    with pytest.raises(CircuitOpenError):
        await collect(model, mode)
    assert inner.calls == 2
    clock.advance(30)
    assert text(await collect(model, mode)) == "ok"
    assert model.state_for() is CLOSED


async def test_a_guarded_start_streams_the_fallback_when_open(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 2)
    backup = ScriptedChatModel(provider="other", default="backup says hi")
    model = guarded_streams(clock, inner, backup)
    bare_backup = ScriptedChatModel(provider="other", default="backup says hi")
    expected = [visible(c) for c in await collect(bare_backup, mode)]
    for _ in range(3):  # two failures, then an open circuit
        assert [visible(c) for c in await collect(model, mode)] == expected
    assert (inner.calls, backup.calls) == (2, 3)


async def test_an_error_after_the_first_chunk_is_counted_and_not_served_by_the_fallback(
    clock: FakeClock, mode: str
) -> None:
    error = ServerError("late")
    inner = ScriptedChatModel(script=[DiesMidStream("a b c", 1, error)])
    backup = ScriptedChatModel(provider="other")
    model = guarded_streams(clock, inner, backup)
    chunks, raised = await collect_until_error(model, mode)
    assert [c.content for c in chunks] == ["a "]
    assert raised is error
    assert backup.calls == 0
    assert model.policy is not None
    assert model.policy.circuit(model.key_for()).snapshot().failures == 1


async def test_a_guarded_stream_abandoned_early_closes_the_inner_stream(
    clock: FakeClock, mode: str
) -> None:
    model = guarded_streams(clock, ScriptedChatModel(default="a b c d"))
    if mode == "sync":
        stream = model.stream("hi")
        assert next(stream).content == "a "
        stream.close()  # type: ignore[attr-defined]
    else:
        astream = model.astream("hi")
        assert (await anext(astream)).content == "a "
        await astream.aclose()  # type: ignore[attr-defined]
    assert model.state_for() is CLOSED
    assert model.policy is not None
    assert model.policy.metrics()[model.key_for()].cancelled == 1


def test_guard_stream_start_is_a_deprecated_alias_of_guard_streams() -> None:
    with pytest.warns(DeprecationWarning, match="guard_streams"):
        model = CircuitBreakerChatModel(inner=ScriptedChatModel(), guard_stream_start=False)
    assert model.guard_streams is False
    with (
        pytest.warns(DeprecationWarning, match="deprecated"),
        pytest.raises(ValueError, match="contradicts"),
    ):
        CircuitBreakerChatModel(
            inner=ScriptedChatModel(), guard_stream_start=False, guard_streams=True
        )


def test_a_bad_stream_finished_option_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match="fallback_stream_finished"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), fallback_stream_finished="yes")


# -- disable_streaming: streams through invoke, so through the engine --------------------


async def test_with_streaming_disabled_a_stream_goes_through_the_engine(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(default="unused")
    backup = ScriptedChatModel(provider="other", default="from backup")
    model = CircuitBreakerChatModel(
        inner=inner,
        fallback=backup,
        policy=CallPolicy(clock=clock),
        disable_streaming=True,
    )
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    chunks = await collect(model, mode)
    assert [c.content for c in chunks] == ["from backup"]  # one "chunk": the message
    assert inner.calls == 0


@pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
def test_stream_events_v3_is_the_inner_models_stream() -> None:
    model = CircuitBreakerChatModel(inner=ScriptedChatModel(default="a b"), failure_threshold=1)
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    stream = model.stream_events("hi", version="v3")
    assert "".join(stream.text) == "a b"


# -- cancellation and end markers --------------------------------------------------------


class StallsAfterOneChunk(ScriptedChatModel):
    """Streams one chunk, then waits for ever (a provider that stalls)."""

    async def astream(  # type: ignore[override]
        self, input: Any, config: Any = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        yield AIMessageChunk(content="first")
        await asyncio.Event().wait()


async def test_a_cancelled_consumer_frees_the_probe_slot(clock: FakeClock) -> None:
    model = CircuitBreakerChatModel(
        inner=StallsAfterOneChunk(),
        policy=CallPolicy(clock=clock, failure_threshold=1, cooldown=30),
    )
    assert model.policy is not None
    model.policy.trip(model.key_for())
    clock.advance(30)  # half-open: one probe
    first = asyncio.Event()

    async def reader() -> None:
        async for _chunk in model.astream("hi"):
            first.set()

    task = asyncio.create_task(reader())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert model.policy.metrics()[model.key_for()].cancelled == 1
    assert model.state_for() is CircuitState.HALF_OPEN
    # The slot is free: the next stream is the probe.
    assert model.policy.circuit(model.key_for()).admit() is not None


async def test_a_stream_finished_option_makes_a_stream_without_the_marker_cut_short(
    mode: str,
) -> None:
    model = CircuitBreakerChatModel(
        inner=ScriptedChatModel(default="a b"),
        failure_threshold=1,
        stream_finished=lambda chunk: chunk.response_metadata.get("done") is True,
    )
    chunks, raised = await collect_until_error(model, mode)
    assert text(chunks) == "a b"
    assert isinstance(raised, IncompleteStreamError)
    assert raised.chunks == len(chunks)
    assert model.state_for() is OPEN


async def test_a_model_that_reports_no_marker_is_not_checked(mode: str) -> None:
    model = CircuitBreakerChatModel(inner=ScriptedChatModel(default="a b"), failure_threshold=1)
    assert text(await collect(model, mode)) == "a b"
    assert model.state_for() is CLOSED


async def test_a_structured_output_stream_is_guarded(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")])
    backup = ScriptedChatModel(provider="other")
    backup.push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    model = CircuitBreakerChatModel(
        inner=inner, fallback=backup, policy=CallPolicy(clock=clock, failure_threshold=1)
    )
    got = await collect(model.with_structured_output(Person), mode)
    assert got[-1] == Person(name="Ada", age=36)  # the fallback's stream, parsed
    assert (inner.calls, backup.calls) == (1, 1)
    assert model.state_for() is OPEN


class Person(BaseModel):
    name: str
    age: int
