"""``guard_streams=False``: streams pass through to the inner model untouched, and the
breaker does not apply. (Guarded streams, the default: test_guarded_streams.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.tools import FunctionTool

from callpolicy import CallPolicy, CircuitState
from llamaindex_breaker import CircuitBreakerLLM

from .fakes import FakeAPIError, Raise, ScriptedLLM, Stream, Text, server_error

STREAMS = ["stream_chat", "astream_chat", "stream_complete", "astream_complete"]
TOOL_STREAMS = ["stream_chat_with_tools", "astream_chat_with_tools"]
ALL_STREAMS = [*STREAMS, *TOOL_STREAMS]


def lookup(city: str) -> str:
    """Look up a city."""
    return city


async def collect(llm: Any, method: str, sink: list[Any]) -> None:
    """Call ``method`` and drain its stream into ``sink`` (so a mid-stream error leaves
    what arrived before it)."""
    if method in TOOL_STREAMS:
        tools = [FunctionTool.from_defaults(fn=lookup)]
        if method == "stream_chat_with_tools":
            sink.extend(llm.stream_chat_with_tools(tools, user_msg="hi"))
        else:
            async for chunk in await llm.astream_chat_with_tools(tools, user_msg="hi"):
                sink.append(chunk)
    elif method in ("stream_chat", "astream_chat"):
        messages = [ChatMessage(role="user", content="hi")]
        if method == "stream_chat":
            sink.extend(llm.stream_chat(messages))
        else:
            async for chunk in await llm.astream_chat(messages):
                sink.append(chunk)
    elif method == "stream_complete":
        sink.extend(llm.stream_complete("hi"))
    else:
        async for chunk in await llm.astream_complete("hi"):
            sink.append(chunk)


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_deltas_arrive_in_order_as_the_inner_model_sends_them(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, guard_streams=False)
    inner.push(Stream(("one", " two", " three")))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert [c.delta for c in chunks] == ["one", " two", " three"]
    assert [c.additional_kwargs for c in chunks] == [{}, {}, {}]  # unmarked, untouched
    assert len(inner.calls) == 1
    assert backup.calls == []


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_a_dying_stream_raises_its_own_error_and_counts_for_nothing(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, guard_streams=False)
    for _ in range(7):
        error = server_error()
        inner.push(Stream(("a", " b", " c"), fail_after=2, error=error))
        chunks: list[Any] = []
        with pytest.raises(FakeAPIError) as raised:
            await collect(llm, method, chunks)
        assert raised.value is error
        assert [c.delta for c in chunks] == ["a", " b"]
    assert llm.state_for() is CircuitState.CLOSED
    assert policy.circuit(llm.key or "").snapshot().failures == 0
    assert backup.calls == []  # no fallback for streams


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_a_stream_that_fails_to_start_raises_and_counts_for_nothing(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, guard_streams=False)
    for _ in range(6):
        inner.push(Raise(server_error()))
        with pytest.raises(FakeAPIError):
            await collect(llm, method, [])
    assert llm.state_for() is CircuitState.CLOSED
    assert backup.calls == []


@pytest.mark.parametrize("method", ALL_STREAMS)
async def test_streams_are_not_refused_by_an_open_circuit(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, guard_streams=False)
    policy.force_open(llm.key or "")
    inner.push(Text("still streaming"))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert "".join(c.delta for c in chunks) == "still streaming"
    assert backup.calls == []


def _tool() -> FunctionTool:
    return FunctionTool.from_defaults(fn=lookup)


async def test_streaming_tool_calls_go_to_the_inner_model(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, guard_streams=False)
    policy.force_open(llm.key or "")
    inner.push(Text("sync words"), Text("async words"))
    chunks = list(llm.stream_chat_with_tools([_tool()], user_msg="go"))
    assert chunks[-1].message.content == "sync words"
    async_chunks = [c async for c in await llm.astream_chat_with_tools([_tool()], user_msg="go")]
    assert async_chunks[-1].message.content == "async words"
    assert [c.kwargs["tools"] for c in inner.calls] == [["kwargs:lookup"]] * 2
    assert [c.method for c in inner.calls] == ["stream_chat", "astream_chat"]
    assert backup.calls == []


def test_streams_are_guarded_by_default(inner: ScriptedLLM) -> None:
    assert CircuitBreakerLLM(inner=inner).guard_streams is True


@pytest.mark.parametrize("value", [True, False])
def test_guard_stream_start_is_a_deprecated_alias(inner: ScriptedLLM, value: bool) -> None:
    with pytest.warns(DeprecationWarning, match="guard_stream_start is deprecated") as caught:
        llm = CircuitBreakerLLM(inner=inner, guard_stream_start=value)
    assert caught[0].filename == __file__  # points at the caller
    assert llm.guard_streams is value
    assert llm.guard_stream_start is value
    with pytest.warns(DeprecationWarning, match="use guard_streams") as caught:
        llm.guard_stream_start = not value
    assert caught[0].filename == __file__
    assert llm.guard_streams is (not value)


def test_guard_stream_start_contradicting_guard_streams_is_refused(inner: ScriptedLLM) -> None:
    with (
        pytest.warns(DeprecationWarning, match="guard_stream_start"),
        pytest.raises(ValueError, match=r"guard_stream_start: False contradicts guard_streams"),
    ):
        CircuitBreakerLLM(inner=inner, guard_stream_start=False, guard_streams=True)
