"""One engine shared by the LangChain and the LlamaIndex wrappers: one circuit per
``provider::model``, whichever framework's client hits it."""

from __future__ import annotations

import openai
import pytest
from langchain_openai import ChatOpenAI
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai import OpenAI

from callpolicy import CallPolicy, CircuitOpenError, CircuitState
from langchain_breaker import CircuitBreakerChatModel
from llamaindex_breaker import CircuitBreakerLLM
from tests.support.clock import FakeClock
from tests.support.http_clients import HttpClients
from tests.support.openai_server import Fail, OpenAICompatServer, Reply


def test_a_trip_through_langchain_refuses_the_llamaindex_wrapper(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock
) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=2, cooldown=30)
    chat_model = CircuitBreakerChatModel(
        inner=ChatOpenAI(
            model="gpt-4o-mini", base_url=openai_server.base_url, api_key="sk-test", max_retries=0
        ),
        policy=policy,
    )
    llm = CircuitBreakerLLM(
        inner=OpenAI(
            model="gpt-4o-mini",
            api_base=openai_server.base_url,
            api_key="sk-test",
            max_retries=0,
            **http_clients.llamaindex(),
        ),
        policy=policy,
    )
    assert chat_model.key == llm.key == "openai::gpt-4o-mini"

    openai_server.push(Fail(500), Fail(500))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            chat_model.invoke("hi")
    assert llm.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        llm.chat([ChatMessage(role="user", content="hi")])
    assert openai_server.request_count == 2  # LlamaIndex's client sent nothing

    clock.advance(30)
    openai_server.push(Reply("back"))
    assert llm.chat([ChatMessage(role="user", content="hi")]).message.content == "back"
    assert chat_model.state_for() is CircuitState.CLOSED
