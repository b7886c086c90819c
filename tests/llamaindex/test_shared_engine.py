"""One engine guards a LangChain model and a LlamaIndex model together: both adapters key
``OpenAI(model="gpt-4o-mini")`` / ``ChatOpenAI(model="gpt-4o-mini")`` as
``openai::gpt-4o-mini``, so an outage seen through one trips the circuit of the other."""

from __future__ import annotations

import openai
import pytest
from langchain_openai import ChatOpenAI
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.openai import OpenAI

from callpolicy import CallPolicy, CircuitOpenError, CircuitState
from langchain_breaker import CircuitBreakerChatModel
from llamaindex_breaker import CircuitBreakerLLM
from tests.support.clock import FakeClock
from tests.support.http_clients import HttpClients
from tests.support.openai_server import Fail, OpenAICompatServer, Reply

HI = [ChatMessage(role="user", content="hi")]


def both(
    server: OpenAICompatServer, http: HttpClients, policy: CallPolicy
) -> tuple[CircuitBreakerLLM, CircuitBreakerChatModel]:
    llama = CircuitBreakerLLM(
        inner=OpenAI(
            model="gpt-4o-mini",
            api_base=server.base_url,
            api_key="sk-test",
            max_retries=0,
            **http.llamaindex(),
        ),
        policy=policy,
    )
    chain = CircuitBreakerChatModel(
        inner=ChatOpenAI(
            model="gpt-4o-mini", base_url=server.base_url, api_key="sk-test", max_retries=0
        ),
        policy=policy,
    )
    assert llama.key == chain.key == "openai::gpt-4o-mini"
    return llama, chain


async def test_an_outage_seen_by_llamaindex_refuses_langchain(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    clock: FakeClock,
    mode: str,
) -> None:
    llama, chain = both(openai_server, http_clients, policy)
    openai_server.set_default(Fail(500))
    for _ in range(5):
        with pytest.raises(openai.InternalServerError):
            llama.chat(HI) if mode == "sync" else await llama.achat(HI)
    assert chain.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        chain.invoke("hi") if mode == "sync" else await chain.ainvoke("hi")
    assert openai_server.request_count == 5  # LangChain's call never left

    # Recovery through LangChain closes the circuit for LlamaIndex too.
    clock.advance(30.0)
    openai_server.set_default(Reply("recovered"))
    message = chain.invoke("hi") if mode == "sync" else await chain.ainvoke("hi")
    assert message.content == "recovered"
    assert llama.state_for() is CircuitState.CLOSED
    assert (llama.chat(HI) if mode == "sync" else await llama.achat(HI)).message.content == (
        "recovered"
    )


async def test_an_outage_seen_by_langchain_refuses_llamaindex(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy, mode: str
) -> None:
    llama, chain = both(openai_server, http_clients, policy)
    openai_server.set_default(Fail(500))
    for _ in range(5):
        with pytest.raises(openai.InternalServerError):
            chain.invoke("hi") if mode == "sync" else await chain.ainvoke("hi")
    assert llama.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        llama.chat(HI) if mode == "sync" else await llama.achat(HI)
    assert openai_server.request_count == 5


def test_any_caller_of_the_same_key_shares_the_circuit(policy: CallPolicy) -> None:
    """The engine alone (a direct ``policy.execute`` under the wrapper's key) and the
    wrapper see one circuit."""
    from llama_index.core.llms import MockLLM

    llm = CircuitBreakerLLM(inner=MockLLM(), policy=policy)

    def down() -> None:
        raise ConnectionError("connection refused")

    for _ in range(5):
        with pytest.raises(ConnectionError):
            policy.execute(llm.key or "", down)
    with pytest.raises(CircuitOpenError):
        llm.complete("hi")
