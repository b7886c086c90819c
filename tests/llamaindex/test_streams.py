"""Streams pass through to the inner model untouched, and the breaker does not apply."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.tools import FunctionTool

from callpolicy import CallPolicy, CircuitState
from llamaindex_breaker import CircuitBreakerLLM

from .fakes import FakeAPIError, Raise, ScriptedLLM, Stream, Text, server_error

STREAMS = ["stream_chat", "astream_chat", "stream_complete", "astream_complete"]


async def collect(llm: Any, method: str, sink: list[Any]) -> None:
    """Call ``method`` and drain its stream into ``sink`` (so a mid-stream error leaves
    what arrived before it)."""
    if method in ("stream_chat", "astream_chat"):
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


@pytest.mark.parametrize("method", STREAMS)
async def test_deltas_arrive_in_order_as_the_inner_model_sends_them(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    inner.push(Stream(("one", " two", " three")))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert [c.delta for c in chunks] == ["one", " two", " three"]
    assert [c.additional_kwargs for c in chunks] == [{}, {}, {}]  # unmarked, untouched
    assert len(inner.calls) == 1
    assert backup.calls == []


@pytest.mark.parametrize("method", STREAMS)
async def test_a_dying_stream_raises_its_own_error_and_counts_for_nothing(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
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


@pytest.mark.parametrize("method", STREAMS)
async def test_a_stream_that_fails_to_start_raises_and_counts_for_nothing(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    for _ in range(6):
        inner.push(Raise(server_error()))
        with pytest.raises(FakeAPIError):
            await collect(llm, method, [])
    assert llm.state_for() is CircuitState.CLOSED
    assert backup.calls == []


@pytest.mark.parametrize("method", STREAMS)
async def test_streams_are_not_refused_by_an_open_circuit(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    policy.force_open(llm.key or "")
    inner.push(Text("still streaming"))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert "".join(c.delta for c in chunks) == "still streaming"
    assert backup.calls == []


def _tool() -> FunctionTool:
    def lookup(city: str) -> str:
        """Look up a city."""
        return city

    return FunctionTool.from_defaults(fn=lookup)


async def test_streaming_tool_calls_go_to_the_inner_model(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    policy.force_open(llm.key or "")
    inner.push(Text("sync words"), Text("async words"))
    chunks = list(llm.stream_chat_with_tools([_tool()], user_msg="go"))
    assert chunks[-1].message.content == "sync words"
    async_chunks = [c async for c in await llm.astream_chat_with_tools([_tool()], user_msg="go")]
    assert async_chunks[-1].message.content == "async words"
    assert [c.kwargs["tools"] for c in inner.calls] == [["kwargs:lookup"]] * 2
    assert [c.method for c in inner.calls] == ["stream_chat", "astream_chat"]
    assert backup.calls == []
