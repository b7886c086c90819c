"""The wrapper inside an LCEL chain and inside tool-calling agents, with fake models and
with real ``ChatOpenAI`` clients against the loopback server."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from callpolicy import CallPolicy, CircuitState
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.fakes import ScriptedChatModel, ServerError, tool_call_message
from tests.support.clock import FakeClock
from tests.support.openai_server import Fail, OpenAICompatServer, Reply

PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


async def call(runnable: Any, mode: str, input: Any) -> Any:
    if mode == "sync":
        return runnable.invoke(input)
    return await runnable.ainvoke(input)


def fakes(clock: FakeClock, **options: Any) -> CircuitBreakerChatModel:
    inner = ScriptedChatModel()
    backup = ScriptedChatModel(provider="other", model_name="b1", tool_format="anthropic")
    options.setdefault("failure_threshold", 2)
    return CircuitBreakerChatModel(
        inner=inner, fallback=backup, policy=CallPolicy(clock=clock, **options)
    )


def http(server: OpenAICompatServer, clock: FakeClock) -> CircuitBreakerChatModel:
    def client(model: str) -> ChatOpenAI:
        return ChatOpenAI(
            model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=2
        )

    return CircuitBreakerChatModel(
        inner=client("gpt-4o-mini"),
        fallback=client("backup-model"),
        policy=CallPolicy(clock=clock, failure_threshold=2),
    )


# -- LCEL ---------------------------------------------------------------------------------


async def test_an_lcel_chain_falls_back_and_then_refuses_the_primary(
    clock: FakeClock, mode: str
) -> None:
    model = fakes(clock)
    inner, backup = model.inner, model.fallback
    assert isinstance(inner, ScriptedChatModel)
    assert isinstance(backup, ScriptedChatModel)
    inner.push(ServerError("500"), ServerError("500"))
    backup.default = "from backup"
    chain = PROMPT | model | StrOutputParser()
    for _ in range(3):
        assert await call(chain, mode, {"question": "hi"}) == "from backup"
    assert model.state_for() is CircuitState.OPEN
    assert (inner.calls, backup.calls) == (2, 3)
    clock.advance(30)
    assert await call(chain, mode, {"question": "hi"}) == "ok"
    assert model.state_for() is CircuitState.CLOSED


def test_an_lcel_chain_batches_and_streams_through_the_wrapper(clock: FakeClock) -> None:
    model = fakes(clock)
    chain = PROMPT | model | StrOutputParser()
    assert chain.batch([{"question": "a"}, {"question": "b"}]) == ["ok", "ok"]
    assert model.inner.default == "ok"  # type: ignore[attr-defined]
    model.inner.default = "streamed in words"  # type: ignore[attr-defined]
    assert list(chain.stream({"question": "c"})) == ["streamed ", "in ", "words", ""]


async def test_an_lcel_chain_with_real_clients(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = http(openai_server, clock)
    chain = PROMPT | model | StrOutputParser()
    openai_server.push(Fail(500), Reply("backup answer"), Reply("primary answer"))
    assert await call(chain, mode, {"question": "hi"}) == "backup answer"
    assert await call(chain, mode, {"question": "hi"}) == "primary answer"
    assert [b["model"] for b in openai_server.requests] == [
        "gpt-4o-mini",
        "backup-model",
        "gpt-4o-mini",
    ]
    assert openai_server.requests[0]["messages"][0] == {"role": "system", "content": "Be brief."}


# -- agents -------------------------------------------------------------------------------


async def test_create_agent_with_the_fallback_serving_the_tool_call(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    from langchain.agents import create_agent

    model = http(openai_server, clock)
    agent = create_agent(model, tools=[get_weather])
    openai_server.push(
        Fail(502, "bad gateway"),
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
        Reply("It is sunny in Oslo."),
    )
    state = await call(agent, mode, {"messages": [HumanMessage("Weather in Oslo?")]})
    messages = state["messages"]
    assert [type(m).__name__ for m in messages] == [
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ]
    assert messages[1].tool_calls[0]["args"] == {"city": "Oslo"}
    assert messages[1].response_metadata["model_name"] == "backup-model"
    assert messages[2].content == "sunny in Oslo"
    assert messages[3].content == "It is sunny in Oslo."
    assert messages[3].response_metadata["model_name"] == "gpt-4o-mini"
    requests = openai_server.requests
    assert [b["model"] for b in requests] == ["gpt-4o-mini", "backup-model", "gpt-4o-mini"]
    assert all(b["tools"][0]["function"]["name"] == "get_weather" for b in requests)
    assert requests[2]["messages"][-1]["role"] == "tool"


async def test_create_agent_on_an_open_circuit_runs_on_the_fallback(
    clock: FakeClock, mode: str
) -> None:
    from langchain.agents import create_agent

    model = fakes(clock)
    inner, backup = model.inner, model.fallback
    assert isinstance(inner, ScriptedChatModel)
    assert isinstance(backup, ScriptedChatModel)
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    backup.push(tool_call_message("get_weather", {"city": "Lima"}), "Sunny in Lima.")
    agent = create_agent(model, tools=[get_weather])
    state = await call(agent, mode, {"messages": [HumanMessage("Weather in Lima?")]})
    assert state["messages"][-1].content == "Sunny in Lima."
    assert isinstance(state["messages"][-2], ToolMessage)
    assert inner.calls == 0
    assert backup.call_kwargs[0]["tools"][0]["name"] == "get_weather"  # its own format


async def test_langgraphs_prebuilt_react_agent(clock: FakeClock, mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from langgraph.prebuilt import create_react_agent

        model = fakes(clock)
        inner, backup = model.inner, model.fallback
        assert isinstance(inner, ScriptedChatModel)
        assert isinstance(backup, ScriptedChatModel)
        inner.push(ServerError("500"), "Cloudy in Bergen.")
        backup.push(tool_call_message("get_weather", {"city": "Bergen"}))
        agent = create_react_agent(model, tools=[get_weather])
    state = await call(agent, mode, {"messages": [HumanMessage("Weather in Bergen?")]})
    messages = state["messages"]
    assert isinstance(messages[1], AIMessage)
    assert messages[1].tool_calls[0]["name"] == "get_weather"
    assert messages[2].content == "sunny in Bergen"
    assert messages[3].content == "Cloudy in Bergen."
    assert (inner.calls, backup.calls) == (2, 1)


@pytest.mark.parametrize("prebound", [True, False])
def test_an_agent_accepts_a_model_with_tools_already_bound(
    clock: FakeClock, prebound: bool
) -> None:
    from langchain.agents import create_agent

    model = fakes(clock)
    inner = model.inner
    assert isinstance(inner, ScriptedChatModel)
    inner.push(tool_call_message("get_weather", {"city": "Rome"}), "Warm in Rome.")
    agent_model: Any = model.bind_tools([get_weather]) if prebound else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = create_agent(agent_model, tools=[get_weather])
    state = agent.invoke({"messages": [HumanMessage("Rome?")]})
    assert state["messages"][-1].content == "Warm in Rome."
