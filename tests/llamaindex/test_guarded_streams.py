"""``guard_stream_start=True``: the breaker guards a stream's start (admission, and a
failure before the first chunk); after the first chunk, the stream is untouched."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, RetryPolicy
from llamaindex_breaker import CircuitBreakerLLM, served_by
from tests.support.clock import FakeClock, FakeSleeper
from tests.support.http_clients import HttpClients
from tests.support.openai_server import Fail, OpenAICompatServer, Reply, StreamDies

from .fakes import (
    FakeAPIError,
    Raise,
    ScriptedLLM,
    Stream,
    Text,
    server_error,
    tool_then_answer,
)
from .test_streams import STREAMS, collect


def guarded(
    inner: ScriptedLLM, backup: ScriptedLLM | None, policy: CallPolicy
) -> CircuitBreakerLLM:
    return CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, guard_stream_start=True)


@pytest.mark.parametrize("method", STREAMS)
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
    assert policy.circuit(llm.key or "").snapshot().failures == 1


@pytest.mark.parametrize("method", STREAMS)
async def test_a_failure_at_the_first_chunk_counts(
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
    assert len(inner.calls) == 5


@pytest.mark.parametrize("method", STREAMS)
async def test_after_the_first_chunk_the_stream_is_untouched(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str
) -> None:
    llm = guarded(inner, backup, policy)
    for _ in range(6):
        error = server_error()
        inner.push(Stream(("a", " b", " c"), fail_after=2, error=error))
        chunks: list[Any] = []
        with pytest.raises(FakeAPIError) as raised:
            await collect(llm, method, chunks)
        assert raised.value is error
        assert [c.delta for c in chunks] == ["a", " b"]
        assert {served_by(c) for c in chunks} == {"primary"}
    assert llm.state_for() is CircuitState.CLOSED
    assert policy.circuit(llm.key or "").snapshot().failures == 0
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
    assert policy.circuit(llm.key or "").snapshot().failures == 0


def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


async def test_a_streaming_agent_is_served_by_the_fallback(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy
) -> None:
    llm = guarded(inner, backup, policy)
    policy.force_open(llm.key or "")
    backup.default = tool_then_answer("weather", {"city": "Oslo"}, "fallback streamed:")
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=weather)], llm=llm)
    output = await agent.run(user_msg="What is the weather in Oslo?")
    # The fallback's streamed tool call was parsed by the fallback (ToolCallBlocks).
    assert str(output.response.content) == "fallback streamed: sunny in Oslo"
    assert [c.method for c in backup.calls] == ["astream_chat", "astream_chat"]
    assert inner.calls == []


async def test_a_real_stream_that_fails_to_start_goes_to_the_fallback(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    def client(model: str) -> OpenAI:
        return OpenAI(
            model=model,
            api_base=openai_server.base_url,
            api_key="sk",
            max_retries=0,
            **http_clients.llamaindex(),
        )

    llm = CircuitBreakerLLM(
        inner=client("gpt-4o-mini"),
        fallback=client("gpt-4o"),
        policy=policy,
        guard_stream_start=True,
    )
    openai_server.push(Fail(502), Reply("served by the fallback"))
    chunks: list[Any] = []
    await collect(llm, "stream_chat" if mode == "sync" else "astream_chat", chunks)
    assert "".join(c.delta or "" for c in chunks) == "served by the fallback"
    assert [r["model"] for r in openai_server.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert policy.circuit(llm.key or "").snapshot().failures == 1  # the 502

    openai_server.push(StreamDies(after_chunks=3))  # dies after the first chunk: untouched
    chunks = []
    with pytest.raises(Exception, match=r"(?i)incomplete|peer closed|chunked"):
        await collect(llm, "stream_chat" if mode == "sync" else "astream_chat", chunks)
    assert {served_by(c) for c in chunks} == {"primary"}
    # Its start succeeded (which resets the count); its death was not counted.
    assert policy.circuit(llm.key or "").snapshot().failures == 0
    assert len(openai_server.requests) == 3
