"""A real client: llama-index-llms-openai's ``OpenAI`` (``max_retries=0``) against the
OpenAI-compatible server on 127.0.0.1, with faults: 500, 429 + Retry-After, a hang, a
dropped connection and a dying stream. The breaker sees the SDK's own exceptions."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, ErrorClass, Event, RetryPolicy
from llamaindex_breaker import CircuitBreakerLLM, served_by
from tests.support.clock import FakeClock, FakeSleeper
from tests.support.http_clients import HttpClients
from tests.support.openai_server import Drop, Fail, Hang, OpenAICompatServer, Reply, StreamDies


def client(
    server: OpenAICompatServer,
    http: HttpClients,
    model: str = "gpt-4o-mini",
    timeout: float = 10.0,
) -> OpenAI:
    return OpenAI(
        model=model,
        api_base=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=timeout,
        **http.llamaindex(),
    )


async def ask(llm: Any, mode: str, text: str = "hi") -> ChatResponse:
    messages = [ChatMessage(role="user", content=text)]
    return llm.chat(messages) if mode == "sync" else await llm.achat(messages)


def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


WEATHER = FunctionTool.from_defaults(fn=weather)


async def test_a_healthy_call(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), policy=policy)
    openai_server.push(Reply("hello from the server"))
    response = await ask(llm, mode, "greet me")
    assert response.message.content == "hello from the server"
    assert llm.key == "openai::gpt-4o-mini"
    assert llm.metadata.model_name == "gpt-4o-mini"
    assert llm.metadata.is_function_calling_model
    [request] = openai_server.requests
    assert request["model"] == "gpt-4o-mini"
    assert request["messages"] == [{"role": "user", "content": "greet me"}]


async def test_server_errors_open_the_circuit(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), policy=policy)
    openai_server.set_default(Fail(500))
    for _ in range(5):
        with pytest.raises(openai.InternalServerError):
            await ask(llm, mode)
    assert llm.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await ask(llm, mode)
    assert openai_server.request_count == 5  # the refused call sent nothing


async def test_a_429_is_retried_after_its_retry_after(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    clock: FakeClock,
    sleeper: FakeSleeper,
    mode: str,
) -> None:
    policy = CallPolicy(
        retry=RetryPolicy(max_attempts=3, jitter=0),
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
    )
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), policy=policy)
    openai_server.push(
        Fail(429, "slow down", headers={"retry-after": "1"}), Reply("after the wait")
    )
    assert (await ask(llm, mode)).message.content == "after the wait"
    assert sleeper.delays == [1.0]  # the server's Retry-After, not the backoff
    assert openai_server.request_count == 2


async def test_a_429_without_retry_is_a_counted_failure_the_fallback_answers(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    seen: list[Event] = []
    policy.add_listener(seen.append)
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients),
        fallback=client(openai_server, http_clients, "gpt-4o"),
        policy=policy,
    )
    openai_server.push(Fail(429, headers={"retry-after": "1"}), Reply("fallback here"))
    response = await ask(llm, mode)
    assert (response.message.content, served_by(response)) == ("fallback here", "fallback")
    assert [r["model"] for r in openai_server.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert [e.error_class for e in seen] == [ErrorClass.RATE_LIMITED]
    assert policy.circuit(llm.key or "").snapshot().failures == 1


async def test_a_hang_times_out_and_the_fallback_answers(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    seen: list[Event] = []
    policy.add_listener(seen.append)
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients, timeout=0.3),
        fallback=client(openai_server, http_clients, "gpt-4o"),
        policy=policy,
    )
    openai_server.push(Hang(5.0), Reply("fallback on time"))
    response = await ask(llm, mode)
    assert (response.message.content, served_by(response)) == ("fallback on time", "fallback")
    assert [e.error_class for e in seen] == [ErrorClass.TIMEOUT]
    assert seen[0].error_type == "APITimeoutError"


async def test_a_dropped_connection_counts(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    seen: list[Event] = []
    policy.add_listener(seen.append)
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients),
        fallback=client(openai_server, http_clients, "gpt-4o"),
        policy=policy,
    )
    openai_server.push(Drop(), Reply("fallback after the drop"))
    response = await ask(llm, mode)
    assert served_by(response) == "fallback"
    assert [e.error_class for e in seen] == [ErrorClass.NETWORK]
    assert policy.circuit(llm.key or "").snapshot().failures == 1


async def stream_into(llm: Any, mode: str, sink: list[str]) -> None:
    messages = [ChatMessage(role="user", content="tell me")]
    if mode == "sync":
        for chunk in llm.stream_chat(messages):
            sink.append(chunk.delta)
    else:
        async for chunk in await llm.astream_chat(messages):
            sink.append(chunk.delta)


async def test_a_dying_stream_reaches_the_caller_as_the_bare_client_raises_it(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    bare = client(openai_server, http_clients)
    openai_server.push(StreamDies(after_chunks=3))
    bare_deltas: list[str] = []
    with pytest.raises(Exception) as bare_error:  # noqa: PT011 - compared below
        await stream_into(bare, mode, bare_deltas)

    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients),
        fallback=client(openai_server, http_clients, "gpt-4o"),
        policy=policy,
    )
    for _ in range(5):  # the threshold: each dying stream counts
        openai_server.push(StreamDies(after_chunks=3))
        deltas: list[str] = []
        with pytest.raises(type(bare_error.value)):
            await stream_into(llm, mode, deltas)
        assert deltas == bare_deltas  # never followed by the fallback's
    assert bare_deltas == ["", "the", " stream"]
    assert llm.state_for() is CircuitState.OPEN
    openai_server.push(Reply("from the fallback"))
    deltas = []
    await stream_into(llm, mode, deltas)
    assert "".join(deltas) == "from the fallback"
    assert [r["model"] for r in openai_server.requests[1:]] == ["gpt-4o-mini"] * 5 + ["gpt-4o"]


async def test_a_healthy_stream_is_the_clients_own(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    bare_deltas: list[str] = []
    openai_server.push(Reply("one two three"))
    await stream_into(client(openai_server, http_clients), mode, bare_deltas)
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), policy=policy)
    openai_server.push(Reply("one two three"))
    deltas: list[str] = []
    await stream_into(llm, mode, deltas)
    assert deltas == bare_deltas
    assert "".join(deltas) == "one two three"
    assert all(r["stream"] is True for r in openai_server.requests)


async def test_tool_calls_through_the_real_client(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), policy=policy)
    openai_server.push(Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Oslo"}}]))
    if mode == "sync":
        response = llm.chat_with_tools([WEATHER], user_msg="weather in Oslo?")
    else:
        response = await llm.achat_with_tools([WEATHER], user_msg="weather in Oslo?")
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("weather", {"city": "Oslo"})]
    [request] = openai_server.requests
    assert [t["function"]["name"] for t in request["tools"]] == ["weather"]


async def test_a_failed_tool_call_goes_to_the_fallback_with_the_history_intact(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients),
        fallback=client(openai_server, http_clients, "gpt-4o"),
        policy=policy,
    )
    openai_server.push(
        Fail(503), Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Lima"}}])
    )
    history = [ChatMessage(role="system", content="Be brief.")]
    kwargs: dict[str, Any] = {"user_msg": "weather in Lima?", "chat_history": history}
    if mode == "sync":
        response = llm.chat_with_tools([WEATHER], **kwargs)
    else:
        response = await llm.achat_with_tools([WEATHER], **kwargs)
    assert served_by(response) == "fallback"
    assert [c.tool_kwargs for c in llm.get_tool_calls_from_response(response)] == [{"city": "Lima"}]
    first, second = openai_server.requests
    assert (first["model"], second["model"]) == ("gpt-4o-mini", "gpt-4o")
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather in Lima?"},
    ]
    assert first["messages"] == expected
    assert second["messages"] == expected  # the question once, not appended twice
    assert len(history) == 1


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_function_agent_on_the_real_client(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    streaming: bool,
) -> None:
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients),
        fallback=client(openai_server, http_clients, "gpt-4o"),
        policy=policy,
    )
    tool_call = Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Oslo"}}])
    if streaming:  # streams go to the inner model only
        openai_server.push(tool_call, Reply("It is sunny in Oslo."))
    else:  # the primary fails each step; the fallback answers each
        openai_server.push(Fail(500), tool_call, Fail(500), Reply("It is sunny in Oslo."))
    agent = FunctionAgent(tools=[WEATHER], llm=llm, streaming=streaming)
    output = await agent.run(user_msg="What is the weather in Oslo?")
    assert str(output.response.content) == "It is sunny in Oslo."
    models = [r["model"] for r in openai_server.requests]
    if streaming:
        assert models == ["gpt-4o-mini", "gpt-4o-mini"]
    else:
        assert models == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]
    tool_result = openai_server.requests[-1]["messages"][-1]
    assert tool_result["role"] == "tool"
    assert tool_result["content"] == "sunny in Oslo"
