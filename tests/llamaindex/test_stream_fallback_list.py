"""Guarded streams with ``CircuitBreakerLLM(fallback=[b, c])`` and llama-index's real
``OpenAI`` client against the loopback server: down the list until a model delivers its
first chunk, each under its own circuit (an open one skipped without a request), the
chunks marked with the model that served them; every model named when all fail; a
fallback failing mid-stream is not followed by another."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import ChatMessage

from callpolicy import AllModelsFailedError, CallPolicy, CircuitState, ErrorClass
from llamaindex_breaker import CircuitBreakerLLM, served_by
from tests.llamaindex.test_fallback_list import (
    B_KEY,
    BACKUP,
    P_KEY,
    PRIMARY,
    S_KEY,
    SPARE,
    WEATHER,
    asked,
    client,
)
from tests.support.clock import FakeClock
from tests.support.http_clients import HttpClients
from tests.support.openai_server import Fail, OpenAICompatServer, Reply, StreamDies


def guarded(server: OpenAICompatServer, http: HttpClients, clock: FakeClock) -> CircuitBreakerLLM:
    return CircuitBreakerLLM(
        inner=client(server, http, PRIMARY),
        fallback=[client(server, http, BACKUP), client(server, http, SPARE)],
        policy=CallPolicy(clock=clock, failure_threshold=1, cooldown=30),
    )


async def consume(llm: Any, mode: str, how: str = "chat") -> tuple[list[Any], Exception | None]:
    chunks: list[Any] = []
    messages = [ChatMessage(role="user", content="hi")]
    try:
        if mode == "sync":
            stream = llm.stream_chat(messages) if how == "chat" else llm.stream_complete("hi")
            for chunk in stream:
                chunks.append(chunk)
        else:
            astream = (
                await llm.astream_chat(messages)
                if how == "chat"
                else await llm.astream_complete("hi")
            )
            async for chunk in astream:
                chunks.append(chunk)
    except Exception as exc:
        return chunks, exc
    return chunks, None


async def test_the_second_fallback_streams_when_the_first_is_down_too(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    llm = guarded(openai_server, http_clients, clock)
    openai_server.push(Fail(500), Fail(503), Reply("from the spare"))
    chunks, error = await consume(llm, mode)
    assert error is None
    assert chunks[-1].message.content == "from the spare"
    assert {served_by(chunk) for chunk in chunks} == {"fallback"}
    assert {chunk.additional_kwargs["callpolicy"]["key"] for chunk in chunks} == {S_KEY}
    assert asked(openai_server) == [PRIMARY, BACKUP, SPARE]
    policy = llm.policy
    assert policy.metrics()[B_KEY].failures == {ErrorClass.SERVER: 1}
    assert policy.metrics()[S_KEY].successes == 1
    assert policy.state(B_KEY) is CircuitState.OPEN
    # Both open: straight to the spare's stream (a completion this time), no other request.
    before = openai_server.request_count
    openai_server.push(Reply("spare again"))
    chunks, error = await consume(llm, mode, how="complete")
    assert error is None
    assert chunks[-1].text == "spare again"
    assert asked(openai_server)[before:] == [SPARE]


async def test_when_every_stream_fails_the_error_names_each_model(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    llm = guarded(openai_server, http_clients, clock)
    openai_server.push(Fail(500), Fail(503), Fail(502))
    chunks, error = await consume(llm, mode)
    assert chunks == []
    assert isinstance(error, AllModelsFailedError)
    assert error.keys == (P_KEY, B_KEY, S_KEY)


async def test_a_fallback_failing_midway_is_not_followed_by_another(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    llm = guarded(openai_server, http_clients, clock)
    openai_server.push(Fail(500), StreamDies(after_chunks=2, content="one two three"), Reply())
    chunks, error = await consume(llm, mode)
    assert chunks
    assert error is not None
    assert f"callpolicy: stream of {B_KEY} failed after" in " ".join(error.__notes__)
    assert asked(openai_server) == [PRIMARY, BACKUP]


async def test_a_tool_stream_walks_the_tool_calling_fallbacks(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    llm = guarded(openai_server, http_clients, clock)
    openai_server.push(
        Fail(500),
        Fail(500),
        Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Lima"}}]),
    )
    chunks: list[Any] = []
    if mode == "sync":
        chunks = list(llm.stream_chat_with_tools([WEATHER], user_msg="weather in Lima?"))
    else:
        stream = await llm.astream_chat_with_tools([WEATHER], user_msg="weather in Lima?")
        chunks = [chunk async for chunk in stream]
    assert asked(openai_server) == [PRIMARY, BACKUP, SPARE]
    for body in openai_server.requests:
        assert [t["function"]["name"] for t in body["tools"]] == ["weather"]
    assert chunks[-1].additional_kwargs["callpolicy"]["key"] == S_KEY
    calls = llm.get_tool_calls_from_response(chunks[-1])
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("weather", {"city": "Lima"})]
