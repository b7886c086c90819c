"""``CircuitBreakerLLM(fallback=[b, c])`` with llama-index's real ``OpenAI`` client against
the OpenAI-compatible server: tried in order, each under its own circuit, an open one
skipped without a request, tools on each, every model named when all fail."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.llms import MockLLM
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI

from callpolicy import AllModelsFailedError, CallPolicy, CircuitState
from llamaindex_breaker import CircuitBreakerLLM, served_by
from tests.support.clock import FakeClock
from tests.support.http_clients import HttpClients
from tests.support.openai_server import Fail, OpenAICompatServer, Reply

PRIMARY, BACKUP, SPARE = "gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"
P_KEY, B_KEY, S_KEY = f"openai::{PRIMARY}", f"openai::{BACKUP}", f"openai::{SPARE}"


def client(server: OpenAICompatServer, http: HttpClients, model: str) -> OpenAI:
    return OpenAI(
        model=model,
        api_base=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=10.0,
        **http.llamaindex(),
    )


def guarded(
    server: OpenAICompatServer, http: HttpClients, clock: FakeClock, **options: Any
) -> CircuitBreakerLLM:
    return CircuitBreakerLLM(
        inner=client(server, http, PRIMARY),
        fallback=[client(server, http, BACKUP), client(server, http, SPARE)],
        policy=CallPolicy(clock=clock, **options),
    )


def asked(server: OpenAICompatServer) -> list[str]:
    return [body.get("model", "?") for body in server.requests]


async def ask(llm: Any, mode: str, text: str = "hi") -> ChatResponse:
    messages = [ChatMessage(role="user", content=text)]
    return llm.chat(messages) if mode == "sync" else await llm.achat(messages)


def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


WEATHER = FunctionTool.from_defaults(fn=weather)


async def test_the_second_fallback_answers_when_the_first_is_down_too(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    llm = guarded(openai_server, http_clients, clock, failure_threshold=1)
    openai_server.push(Fail(500), Fail(503), Reply("from the spare"))
    response = await ask(llm, mode)
    assert response.message.content == "from the spare"
    assert served_by(response) == "fallback"
    assert response.additional_kwargs["callpolicy"]["model"] == SPARE
    assert response.additional_kwargs["callpolicy"]["key"] == S_KEY
    assert asked(openai_server) == [PRIMARY, BACKUP, SPARE]
    assert llm.policy is not None
    assert llm.policy.state(B_KEY) is CircuitState.OPEN
    openai_server.push(Reply("spare again"))
    assert (await ask(llm, mode)).message.content == "spare again"
    assert asked(openai_server)[3:] == [SPARE]


async def test_when_every_model_fails_the_error_names_each(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    llm = guarded(openai_server, http_clients, clock)
    openai_server.push(Fail(500), Fail(502), Fail(503))
    with pytest.raises(AllModelsFailedError) as caught:
        await ask(llm, mode)
    assert caught.value.keys == (P_KEY, B_KEY, S_KEY)


async def test_tool_calls_walk_the_list_and_parse_on_the_model_that_answered(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    llm = guarded(openai_server, http_clients, clock)
    openai_server.push(
        Fail(500),
        Fail(500),
        Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Lima"}}]),
    )
    if mode == "sync":
        response = llm.chat_with_tools([WEATHER], user_msg="weather in Lima?")
    else:
        response = await llm.achat_with_tools([WEATHER], user_msg="weather in Lima?")
    assert asked(openai_server) == [PRIMARY, BACKUP, SPARE]
    for body in openai_server.requests:
        assert [t["function"]["name"] for t in body["tools"]] == ["weather"]
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("weather", {"city": "Lima"})]


def test_a_list_of_one_is_the_single_fallback_and_bad_items_are_named() -> None:
    backup = MockLLM()
    llm = CircuitBreakerLLM(inner=OpenAI(model=PRIMARY, api_key="sk-test"), fallback=[backup])
    assert llm.fallback is backup
    with pytest.raises(TypeError, match=r"fallback\[1\]: expected a LlamaIndex LLM"):
        CircuitBreakerLLM(inner=OpenAI(model=PRIMARY, api_key="sk-test"), fallback=[backup, "x"])
