"""Guarded streams (the default), with fake models: every stream method goes through the
engine's stream guard (admission, a failure before the first chunk counted, retried or
served by the fallback's stream; after it counted and re-raised; an early stop neither).
Over HTTP with the real OpenAI client: test_stream_http.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse
from llama_index.core.tools import FunctionTool

from callpolicy import (
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    IncompleteStreamError,
    RetryPolicy,
)
from llamaindex_breaker import CircuitBreakerLLM, served_by
from llamaindex_breaker._markers import end_marker
from tests.support.clock import FakeClock, FakeSleeper

from .fakes import (
    FakeAPIError,
    Raise,
    ScriptedLLM,
    Stream,
    Text,
    secondary,
    server_error,
    tool_then_answer,
)
from .test_streams import ALL_STREAMS, STREAMS, collect, lookup

KEY = "scriptedllm::fake-primary"


def guarded(
    inner: ScriptedLLM, backup: ScriptedLLM | None, policy: CallPolicy
) -> CircuitBreakerLLM:
    return CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)


def failures(policy: CallPolicy, key: str = KEY) -> int:
    return policy.circuit(key).snapshot().failures


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_a_stream_that_fails_to_start_counts_and_the_fallback_streams(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = guarded(inner, backup, policy)
    inner.push(Raise(server_error()))
    backup.push(Text("fallback streams this"))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert "".join(c.delta for c in chunks) == "fallback streams this"
    assert {served_by(c) for c in chunks} == {"fallback"}
    assert failures(policy) == 1


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_failures_at_the_first_chunk_open_the_circuit_which_then_refuses(
    inner: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = guarded(inner, None, policy)
    for _ in range(5):
        error = server_error()
        inner.push(Stream(("never", " sent"), fail_after=0, error=error))
        with pytest.raises(FakeAPIError) as raised:
            await collect(llm, method, [])
        assert raised.value is error
    assert llm.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await collect(llm, method, [])
    assert len(inner.calls) == 5  # the refused stream never reached the model


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_an_open_circuit_sends_the_stream_to_the_fallback(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = guarded(inner, backup, policy)
    policy.force_open(KEY)
    backup.push(Text("served while open"))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert "".join(c.delta for c in chunks) == "served while open"
    assert {served_by(c) for c in chunks} == {"fallback"}
    assert inner.calls == []


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_a_failure_after_the_first_chunk_counts_and_is_never_replayed(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = guarded(inner, backup, policy)
    for round in range(5):
        error = server_error()
        inner.push(Stream(("a", " b", " c"), fail_after=2, error=error))
        chunks: list[Any] = []
        with pytest.raises(FakeAPIError) as raised:
            await collect(llm, method, chunks)
        assert raised.value is error  # the model's own exception, noted
        assert f"callpolicy: stream of {KEY} failed after 2 chunks" in raised.value.__notes__
        assert [c.delta for c in chunks] == ["a", " b"]  # no fallback chunks after them
        assert {served_by(c) for c in chunks} == {"primary"}
        assert failures(policy) == round + 1
    assert llm.state_for() is CircuitState.OPEN
    assert backup.calls == []


@pytest.mark.parametrize("method", STREAMS)
async def test_a_stream_start_is_retried(
    inner: ScriptedLLM, clock: FakeClock, sleeper: FakeSleeper, method: str
) -> None:
    policy = CallPolicy(
        retry=RetryPolicy(max_attempts=2, base_delay=0.25, jitter=0),
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
    )
    llm = guarded(inner, None, policy)
    inner.push(Raise(server_error()), Text("second try"))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert "".join(c.delta for c in chunks) == "second try"
    assert sleeper.delays == [0.25]


async def test_an_empty_stream_is_a_success(inner: ScriptedLLM, policy: CallPolicy) -> None:
    llm = guarded(inner, None, policy)
    inner.push(Stream(()))
    assert list(llm.stream_chat([ChatMessage(role="user", content="hi")])) == []
    assert failures(policy) == 0
    assert policy.circuit(KEY).snapshot().state is CircuitState.CLOSED


async def test_nothing_is_sent_until_the_stream_is_iterated(
    inner: ScriptedLLM, policy: CallPolicy
) -> None:
    llm = guarded(inner, None, policy)
    chunks = llm.stream_chat([ChatMessage(role="user", content="hi")])
    assert inner.calls == []
    assert [c.delta for c in chunks] == ["ok"]
    assert len(inner.calls) == 1


# -- early stops free the half-open probe slot -----------------------------------------------
def half_open(llm: CircuitBreakerLLM, inner: ScriptedLLM, clock: FakeClock) -> None:
    """Trip the circuit (5 failed calls), then let its cooldown pass: one probe slot."""
    for _ in range(5):
        inner.push(Raise(server_error()))
        with pytest.raises(FakeAPIError):
            llm.chat([ChatMessage(role="user", content="hi")])
    clock.advance(31)  # the next admission is the probe


def test_a_break_frees_the_probe_slot(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock
) -> None:
    llm = guarded(inner, None, policy)
    half_open(llm, inner, clock)
    inner.push(Stream(("a", " b", " c")), Text("probe passes"))
    stream = llm.stream_chat([ChatMessage(role="user", content="hi")])
    for chunk in stream:
        assert chunk.delta == "a"
        break
    with pytest.raises(CircuitOpenError):  # the one probe slot is still held
        list(llm.stream_chat([ChatMessage(role="user", content="again")]))
    stream.close()  # what a break does once the generator is collected
    assert llm.state_for() is CircuitState.HALF_OPEN
    assert "".join(c.delta for c in llm.stream_chat([ChatMessage(role="user", content="hi")]))
    assert llm.state_for() is CircuitState.CLOSED  # the freed slot admitted a probe


def test_a_bare_break_frees_the_probe_slot(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock
) -> None:
    # No reference kept: the loop's generator is collected at the break (CPython), which
    # closes it.
    llm = guarded(inner, None, policy)
    half_open(llm, inner, clock)
    inner.push(Stream(("a", " b", " c")), Text("probe passes"))
    for chunk in llm.stream_chat([ChatMessage(role="user", content="hi")]):
        assert chunk.delta == "a"
        break
    assert llm.state_for() is CircuitState.HALF_OPEN
    assert "".join(c.delta for c in llm.stream_chat([ChatMessage(role="user", content="hi")]))
    assert llm.state_for() is CircuitState.CLOSED


@pytest.mark.parametrize("method", ["astream_chat", "astream_chat_with_tools"])
async def test_aclose_frees_the_probe_slot(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock, method: str
) -> None:
    llm = guarded(inner, None, policy)
    half_open(llm, inner, clock)
    inner.push(Stream(("a", " b", " c")), Text("probe passes"))
    if method == "astream_chat":
        stream = await llm.astream_chat([ChatMessage(role="user", content="hi")])
    else:
        tools = [FunctionTool.from_defaults(fn=lookup)]
        stream = await llm.astream_chat_with_tools(tools, user_msg="hi")
    async for chunk in stream:
        assert chunk.delta == "a"
        break
    await stream.aclose()
    assert llm.state_for() is CircuitState.HALF_OPEN
    chunks: list[Any] = []
    await collect(llm, "astream_chat", chunks)
    assert "".join(c.delta for c in chunks) == "probe passes"
    assert llm.state_for() is CircuitState.CLOSED


async def test_a_cancelled_consumer_frees_the_probe_slot(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock
) -> None:
    llm = guarded(inner, None, policy)
    half_open(llm, inner, clock)
    inner.push(Stream(("a", " b", " c")), Text("probe passes"))
    first = asyncio.Event()

    async def consume() -> None:
        async for _chunk in await llm.astream_chat([ChatMessage(role="user", content="hi")]):
            first.set()
            await asyncio.Event().wait()  # a consumer stuck until cancelled

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The task left its stream suspended at a chunk: the event loop's async-generator
    # finalizer closes it (aclose) once the task lets go of it. (Cancelled while waiting
    # for the model's next chunk instead: test_stream_http.py.)
    for _ in range(5):
        await asyncio.sleep(0)
    assert llm.state_for() is CircuitState.HALF_OPEN
    chunks: list[Any] = []
    await collect(llm, "astream_chat", chunks)
    assert "".join(c.delta for c in chunks) == "probe passes"
    assert llm.state_for() is CircuitState.CLOSED


# -- end markers -----------------------------------------------------------------------------
def dot(chunk: ChatResponse | CompletionResponse) -> bool:
    """A fake integration's end marker: a chunk whose delta is ``"."``."""
    return chunk.delta == "."


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_a_stream_without_its_end_marker_is_cut_short(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, stream_finished=dot)
    inner.push(Stream(("half", " an")), Stream(("whole", " answer", ".")))
    chunks: list[Any] = []
    with pytest.raises(IncompleteStreamError) as raised:
        await collect(llm, method, chunks)
    assert (raised.value.key, raised.value.chunks) == (KEY, 2)
    assert [c.delta for c in chunks] == ["half", " an"]  # raised after the last chunk
    assert failures(policy) == 1
    chunks = []
    await collect(llm, method, chunks)
    assert [c.delta for c in chunks] == ["whole", " answer", "."]
    assert failures(policy) == 0  # a success resets the count
    assert backup.calls == []


async def test_markers_are_chosen_per_model(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy
) -> None:
    # Fakes report no marker: nothing checked unless told.
    assert end_marker(inner, "auto") is None
    assert end_marker(inner, dot) is dot
    # The primary's streams are checked, the fallback's (no marker) are not.
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, stream_finished=dot)
    policy.force_open(KEY)
    backup.push(Stream(("no", " marker")))
    chunks: list[Any] = []
    await collect(llm, "stream_chat", chunks)
    assert [c.delta for c in chunks] == ["no", " marker"]
    # And the other way round.
    llm = CircuitBreakerLLM(
        inner=inner, fallback=backup, policy=policy, fallback_stream_finished=dot
    )
    backup.push(Stream(("no", " marker")))
    with pytest.raises(IncompleteStreamError) as raised:
        await collect(llm, "stream_chat", [])
    assert raised.value.key == "scriptedllm::fake-fallback"


def test_stream_finished_is_checked_at_construction(inner: ScriptedLLM) -> None:
    for name in ("stream_finished", "fallback_stream_finished"):
        with pytest.raises(TypeError, match=f'{name}: expected "auto", None or a function'):
            CircuitBreakerLLM(inner=inner, fallback=secondary(), **{name: "finish_reason"})


# -- agents ---------------------------------------------------------------------------------
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


async def test_a_streaming_agent_is_served_by_the_fallback(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy
) -> None:
    llm = guarded(inner, backup, policy)
    policy.force_open(KEY)
    backup.default = tool_then_answer("weather", {"city": "Oslo"}, "fallback streamed:")
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=weather)], llm=llm)
    output = await agent.run(user_msg="What is the weather in Oslo?")
    # The fallback's streamed tool call was parsed by the fallback (ToolCallBlocks).
    assert str(output.response.content) == "fallback streamed: sunny in Oslo"
    assert [c.method for c in backup.calls] == ["astream_chat", "astream_chat"]
    assert inner.calls == []


@pytest.mark.parametrize(
    ("version", "checked"),
    [("0.10.1", False), ("0.10.2", True), ("0.12.3", True), ("1.0.0rc1", True), ("dev", False)],
)
def test_anthropic_streams_are_checked_from_the_release_that_reports_stop_reason(
    monkeypatch: pytest.MonkeyPatch, version: str, checked: bool
) -> None:
    from llamaindex_breaker import _markers

    def installed(name: str) -> str:
        assert name == "llama-index-llms-anthropic"
        return version

    monkeypatch.setattr(_markers.metadata, "version", installed)
    found = _markers._KNOWN["llama_index.llms.anthropic.base.Anthropic"]()
    assert (found is _markers.anthropic_finished) is checked
