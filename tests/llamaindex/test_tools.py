"""Tool calling through the engine: each model prepares its own tools and parses its own
tool calls; agents, predict_and_call and structured_predict work with either model."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from callpolicy import CallPolicy, CircuitState
from llamaindex_breaker import CircuitBreakerLLM, served_by

from .fakes import (
    FakeAPIError,
    Raise,
    ScriptedLLM,
    Text,
    ToolCall,
    primary,
    secondary,
    server_error,
    tool_then_answer,
)


class Weather:
    """A tool that records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def weather(self, city: str) -> str:
        """The weather in a city."""
        self.asked.append(city)
        return f"sunny in {city}"

    def tool(self) -> FunctionTool:
        return FunctionTool.from_defaults(fn=self.weather, name="weather")


async def chat_with_tools(
    llm: CircuitBreakerLLM, mode: str, *args: Any, **kwargs: Any
) -> ChatResponse:
    if mode == "sync":
        return llm.chat_with_tools(*args, **kwargs)
    return await llm.achat_with_tools(*args, **kwargs)


async def test_the_inner_model_prepares_and_parses_its_tool_calls(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    inner.push(ToolCall("weather", {"city": "Oslo"}))
    response = await chat_with_tools(llm, mode, [Weather().tool()], user_msg="weather?")
    assert served_by(response) == "primary"
    assert inner.calls[0].kwargs["tools"] == ["kwargs:weather"]
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("weather", {"city": "Oslo"})]
    assert backup.calls == []


async def test_the_fallback_prepares_and_parses_its_own_tool_calls(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    inner.push(Raise(server_error()))
    backup.push(ToolCall("weather", {"city": "Lima"}))
    response = await chat_with_tools(llm, mode, [Weather().tool()], user_msg="weather?")
    assert served_by(response) == "fallback"
    assert inner.calls[0].kwargs["tools"] == ["kwargs:weather"]
    assert backup.calls[0].kwargs["tools"] == ["blocks:weather"]  # its own format
    # The fallback's tool calls are blocks; the inner model would find none in them.
    assert inner.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("weather", {"city": "Lima"})]


async def test_each_attempt_gets_its_own_history(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    history = [
        ChatMessage(role="user", content="earlier"),
        ChatMessage(role="assistant", content="ok"),
    ]
    inner.push(Raise(server_error()))
    await chat_with_tools(llm, mode, [Weather().tool()], user_msg="now", chat_history=history)
    assert inner.calls[0].messages == ["earlier", "ok", "now"]
    assert backup.calls[0].messages == ["earlier", "ok", "now"]  # "now" once, not twice
    assert [m.content for m in history] == ["earlier", "ok"]  # the caller's list untouched


async def test_tool_calls_count_toward_the_breaker(
    inner: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    for _ in range(5):
        inner.push(Raise(server_error()))
        with pytest.raises(FakeAPIError):
            await chat_with_tools(llm, mode, [Weather().tool()], user_msg="weather?")
    assert llm.state_for() is CircuitState.OPEN


async def test_a_fallback_that_cannot_call_tools_serves_plain_calls_only(
    inner: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    plain = ScriptedLLM(model_name="fake-plain", function_calling=False, default=Text("plain"))
    llm = CircuitBreakerLLM(inner=inner, fallback=plain, policy=policy)
    inner.push(Raise(server_error()))
    with pytest.raises(FakeAPIError):
        await chat_with_tools(llm, mode, [Weather().tool()], user_msg="weather?")
    inner.push(Raise(server_error()))
    response = await (
        llm.achat([ChatMessage(role="user", content="hi")])
        if mode == "async"
        else _now(llm.chat([ChatMessage(role="user", content="hi")]))
    )
    assert response.message.content == "plain"
    assert plain.calls[0].method in ("chat", "achat")


async def _now(value: Any) -> Any:
    return value


def test_an_inner_model_without_tools() -> None:
    from llama_index.core.llms import MockLLM

    llm = CircuitBreakerLLM(inner=MockLLM(), fallback=secondary())
    with pytest.raises(ValueError, match=r"MockLLM .* is not a FunctionCallingLLM"):
        llm.chat_with_tools([Weather().tool()], user_msg="weather?")
    response = ChatResponse(message=ChatMessage(role="assistant", content="x"))
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="not a FunctionCallingLLM"):
        llm.get_tool_calls_from_response(response)


def test_prepare_chat_with_tools_is_the_inner_models() -> None:
    llm = CircuitBreakerLLM(inner=primary(), fallback=secondary())
    prepared = llm._prepare_chat_with_tools([Weather().tool()], user_msg="hi")
    assert prepared["tools"] == ["kwargs:weather"]
    assert [m.content for m in prepared["messages"]] == ["hi"]


async def test_predict_and_call_through_the_fallback(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    policy.force_open(llm.key or "")
    weather = Weather()
    backup.push(ToolCall("weather", {"city": "Quito"}))
    if mode == "sync":
        answer = llm.predict_and_call([weather.tool()], user_msg="weather in Quito?")
    else:
        answer = await llm.apredict_and_call([weather.tool()], user_msg="weather in Quito?")
    assert answer.response == "sunny in Quito"
    assert weather.asked == ["Quito"]
    assert inner.calls == []


class Forecast(BaseModel):
    city: str
    degrees: int


async def test_structured_predict_through_either_model(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    prompt = PromptTemplate("Forecast for {city}")
    inner.push(ToolCall("Forecast", {"city": "Oslo", "degrees": 3}))
    backup.push(ToolCall("Forecast", {"city": "Rome", "degrees": 21}))
    results = []
    for _ in range(2):
        if mode == "sync":
            results.append(llm.structured_predict(Forecast, prompt, city="x"))
        else:
            results.append(await llm.astructured_predict(Forecast, prompt, city="x"))
        policy.force_open(llm.key or "")
    assert results == [Forecast(city="Oslo", degrees=3), Forecast(city="Rome", degrees=21)]
    assert backup.calls[0].kwargs["tools"] == ["blocks:Forecast"]


@pytest.mark.parametrize("served", ["primary", "fallback"])
async def test_function_agent_with_a_tool_call(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, served: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    answering = inner if served == "primary" else backup
    idle = backup if served == "primary" else inner
    answering.default = tool_then_answer("weather", {"city": "Oslo"}, f"{served} says")
    if served == "fallback":
        policy.force_open(llm.key or "")
    weather = Weather()
    agent = FunctionAgent(tools=[weather.tool()], llm=llm, streaming=False)
    output = await agent.run(user_msg="What is the weather in Oslo?")
    assert str(output.response.content) == f"{served} says sunny in Oslo"
    assert weather.asked == ["Oslo"]
    assert [c.method for c in answering.calls] == ["achat", "achat"]  # tool call, then answer
    assert idle.calls == []


async def test_a_streaming_function_agent_streams_from_the_inner_model(
    inner: ScriptedLLM, policy: CallPolicy
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=secondary(), policy=policy)
    inner.default = tool_then_answer("weather", {"city": "Oslo"}, "streamed:")
    weather = Weather()
    agent = FunctionAgent(tools=[weather.tool()], llm=llm)  # streaming=True by default
    output = await agent.run(user_msg="What is the weather in Oslo?")
    assert str(output.response.content) == "streamed: sunny in Oslo"
    assert weather.asked == ["Oslo"]
    assert [c.method for c in inner.calls] == ["astream_chat", "astream_chat"]


async def test_react_agent_served_by_the_fallback(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    inner.default = Raise(server_error())
    backup.default = Text("Thought: I can answer without any tool.\nAnswer: forty-two")
    agent = ReActAgent(tools=[Weather().tool()], llm=llm, streaming=False)
    output = await agent.run(user_msg="What is the answer?")
    assert str(output.response.content) == "forty-two"
    assert [c.method for c in inner.calls] == ["achat"]
    assert [c.method for c in backup.calls] == ["achat"]
