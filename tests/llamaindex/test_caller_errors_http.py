"""The caller's mistakes through llama-index-llms-openai's real ``OpenAI`` client over HTTP:
``chat(None)``, a value the client cannot serialize, a NaN in a tool schema. None reaches
the server, opens a circuit or reaches the fallback; a malformed response still counts."""

from __future__ import annotations

import math
from typing import Any

import pydantic
import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI

from callpolicy import CallPolicy, CircuitState, ErrorClass
from llamaindex_breaker import CircuitBreakerLLM
from tests.support.clock import FakeClock
from tests.support.http_clients import HttpClients
from tests.support.openai_server import OpenAICompatServer, Raw, Reply

PRIMARY, BACKUP = "gpt-4o-mini", "gpt-4o"
HI = [ChatMessage(role="user", content="hi")]


class Opaque:
    """A value no JSON encoder knows."""


def lookup(x: float) -> float:
    """Look a number up."""
    return x


LOOKUP = FunctionTool.from_defaults(fn=lookup)


def client(server: OpenAICompatServer, http: HttpClients, model: str) -> OpenAI:
    return OpenAI(
        model=model,
        api_base=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=5.0,
        **http.llamaindex(),
    )


async def chat(llm: Any, mode: str, messages: Any, **kwargs: Any) -> Any:
    if mode == "sync":
        return llm.chat(messages, **kwargs)
    return await llm.achat(messages, **kwargs)


async def with_tools(llm: Any, mode: str, **kwargs: Any) -> Any:
    if mode == "sync":
        return llm.chat_with_tools([LOOKUP], user_msg="hi", **kwargs)
    return await llm.achat_with_tools([LOOKUP], user_msg="hi", **kwargs)


MISTAKES: dict[str, tuple[type[Exception], Any]] = {
    "chat(None)": (pydantic.ValidationError, lambda llm, mode: chat(llm, mode, None)),
    "unserializable": (
        TypeError,
        lambda llm, mode: chat(llm, mode, HI, extra_body={"x": Opaque()}),
    ),
    "NaN in a tool call": (
        ValueError,
        lambda llm, mode: with_tools(llm, mode, tool_choice={"x": math.nan}),
    ),
}


@pytest.mark.parametrize("fallback_on", ["failure", "error"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
async def test_three_caller_mistakes_never_open_the_circuit_nor_reach_anyone(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    mode: str,
    mistake: str,
    fallback_on: str,
) -> None:
    error, make = MISTAKES[mistake]
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients, PRIMARY),
        fallback=client(openai_server, http_clients, BACKUP),
        policy=CallPolicy(failure_threshold=3, fallback_on=fallback_on, clock=FakeClock()),  # type: ignore[arg-type]
    )
    for _ in range(3):
        with pytest.raises(error):
            await make(llm, mode)
    assert llm.state_for() is CircuitState.CLOSED
    assert llm.policy.state(llm.fallback_key or "") is CircuitState.CLOSED
    assert openai_server.requests == []
    counts = llm.policy.metrics()[llm.key or ""]
    assert counts.ignored == {ErrorClass.CALLER: 3}
    assert counts.fallbacks == 0
    openai_server.push(Reply("hello"))
    assert (await chat(llm, mode, HI)).message.content == "hello"
    assert [body["model"] for body in openai_server.requests] == [PRIMARY]


async def test_a_malformed_response_still_counts_and_falls_back(
    openai_server: OpenAICompatServer, http_clients: HttpClients, mode: str
) -> None:
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients, PRIMARY),
        fallback=client(openai_server, http_clients, BACKUP),
        policy=CallPolicy(failure_threshold=3, clock=FakeClock()),
    )
    for _ in range(3):
        openai_server.push(Raw(b"\xff\xfe not even utf-8"), Reply("from backup"))
        assert (await chat(llm, mode, HI)).message.content == "from backup"
    assert llm.state_for() is CircuitState.OPEN
    assert [body["model"] for body in openai_server.requests] == [PRIMARY, BACKUP] * 3
