"""``bind_tools`` and ``with_structured_output``: bound on both models, each in its own
provider's format, and still under the wrapper's policy and circuits."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableBinding, RunnableLambda
from langchain_core.tools import tool
from pydantic import BaseModel

from callpolicy import CallPolicy, CircuitOpenError, CircuitState
from langchain_breaker import CircuitBreakerChatModel, GuardedRunnable
from tests.langchain.fakes import ScriptedChatModel, ServerError, tool_call_message
from tests.support.clock import FakeClock


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    """A person."""

    name: str
    age: int


async def call(runnable: Any, mode: str, input: Any = "hi", **kwargs: Any) -> Any:
    if mode == "sync":
        return runnable.invoke(input, **kwargs)
    return await runnable.ainvoke(input, **kwargs)


def pair(clock: FakeClock, **inner_options: Any) -> CircuitBreakerChatModel:
    inner = ScriptedChatModel(tool_format="openai", **inner_options)
    backup = ScriptedChatModel(provider="other", model_name="b1", tool_format="anthropic")
    return CircuitBreakerChatModel(
        inner=inner, fallback=backup, policy=CallPolicy(clock=clock, failure_threshold=2)
    )


def scripted(model: CircuitBreakerChatModel) -> tuple[ScriptedChatModel, ScriptedChatModel]:
    inner, backup = model.inner, model.fallback
    assert isinstance(inner, ScriptedChatModel)
    assert isinstance(backup, ScriptedChatModel)
    return inner, backup


# -- bind_tools ---------------------------------------------------------------------------


async def test_bind_tools_binds_each_model_in_its_own_format(clock: FakeClock, mode: str) -> None:
    model = pair(clock)
    inner, backup = scripted(model)
    inner.push(ServerError("500"))
    backup.push(tool_call_message("add", {"a": 1, "b": 2}))
    bound = model.bind_tools([add], tool_choice="any")
    assert isinstance(bound, RunnableBinding)
    message = await call(bound, mode)
    assert message.tool_calls == [
        {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}
    ]
    (sent,) = inner.call_kwargs
    assert sent["tools"][0]["type"] == "function"  # OpenAI's format
    assert sent["tools"][0]["function"]["name"] == "add"
    assert sent["tool_choice"] == "any"
    (received,) = backup.call_kwargs
    assert received["tools"][0]["name"] == "add"  # Anthropic's format
    assert "input_schema" in received["tools"][0]
    assert received["tool_choice"] == "any"


async def test_a_trip_through_the_bound_copy_shows_in_the_wrapper(
    clock: FakeClock, mode: str
) -> None:
    model = pair(clock, script=[ServerError("500")] * 2)
    bound = model.bind_tools([add])
    for _ in range(2):
        await call(bound, mode)
    assert model.state_for() is CircuitState.OPEN
    inner, backup = scripted(model)
    await call(model, mode)  # the unbound wrapper is refused too
    assert (inner.calls, backup.calls) == (2, 3)


async def test_the_bound_copy_is_refused_by_a_circuit_the_wrapper_opened(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 2)
    model = CircuitBreakerChatModel(
        inner=inner, policy=CallPolicy(clock=clock, failure_threshold=2)
    )
    bound = model.bind_tools([add])
    for _ in range(2):
        with pytest.raises(ServerError):
            await call(model, mode)
    with pytest.raises(CircuitOpenError):
        await call(bound, mode)
    assert inner.calls == 2


def test_binding_again_replaces_the_tools_and_keeps_the_key(clock: FakeClock) -> None:
    @tool
    def mul(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    model = pair(clock)
    inner, _ = scripted(model)
    rebound = model.bind_tools([add]).bind_tools([mul])  # as LangGraph may do
    rebound.invoke("hi")
    assert [t["function"]["name"] for t in inner.call_kwargs[0]["tools"]] == ["mul"]
    assert rebound.key == model.key == "acme::m1"  # type: ignore[attr-defined]
    assert rebound.state_for() is CircuitState.CLOSED  # type: ignore[attr-defined]


async def test_a_bound_copy_streams_the_inner_models_bound_stream(
    clock: FakeClock, mode: str
) -> None:
    model = pair(clock)
    inner, _ = scripted(model)
    inner.push(tool_call_message("add", {"a": 2, "b": 3}))
    bound = model.bind_tools([add])
    chunks = list(bound.stream("hi")) if mode == "sync" else [c async for c in bound.astream("hi")]
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.tool_calls[0]["args"] == {"a": 2, "b": 3}
    assert inner.call_kwargs[0]["tools"][0]["function"]["name"] == "add"


def test_a_fallback_without_tool_support_is_named() -> None:
    model = CircuitBreakerChatModel(
        inner=ScriptedChatModel(), fallback=FakeListChatModel(responses=["x"])
    )
    with pytest.raises(NotImplementedError, match="fallback: FakeListChatModel does not support"):
        model.bind_tools([add])


async def test_a_tool_bound_copy_with_streaming_disabled_for_tools_invokes(
    clock: FakeClock, mode: str
) -> None:
    model = pair(clock)
    model.disable_streaming = "tool_calling"
    inner, backup = scripted(model)
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    backup.push(tool_call_message("add", {"a": 1, "b": 1}))
    bound = model.bind_tools([add])
    chunks = list(bound.stream("hi")) if mode == "sync" else [c async for c in bound.astream("hi")]
    assert [type(c) for c in chunks] == [AIMessage]
    assert chunks[0].tool_calls[0]["name"] == "add"
    assert inner.calls == 0


# -- with_structured_output ---------------------------------------------------------------


async def test_structured_output_is_the_fallbacks_when_the_primary_fails(
    clock: FakeClock, mode: str
) -> None:
    model = pair(clock)
    inner, backup = scripted(model)
    inner.push(ServerError("500"))
    backup.push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    structured = model.with_structured_output(Person)
    assert isinstance(structured, GuardedRunnable)
    assert await call(structured, mode) == Person(name="Ada", age=36)
    assert inner.call_kwargs[0]["tools"][0]["function"]["name"] == "Person"
    assert backup.call_kwargs[0]["tools"][0]["name"] == "Person"


async def test_structured_output_answers_from_the_primary_when_it_is_well(
    clock: FakeClock, mode: str
) -> None:
    model = pair(clock)
    inner, backup = scripted(model)
    inner.push(tool_call_message("Person", {"name": "Grace", "age": 45}))
    result = await call(model.with_structured_output(Person, include_raw=True), mode)
    assert result["parsed"] == Person(name="Grace", age=45)
    assert isinstance(result["raw"], AIMessage)
    assert backup.calls == 0


async def test_a_trip_through_structured_output_shows_in_the_wrapper(
    clock: FakeClock, mode: str
) -> None:
    model = pair(clock, script=[ServerError("500")] * 2)
    _, backup = scripted(model)
    backup.default = "unused"
    backup.push(*[tool_call_message("Person", {"name": "B", "age": 1})] * 3)
    structured = model.with_structured_output(Person)
    for _ in range(3):
        assert (await call(structured, mode)).name == "B"
    assert model.state_for() is CircuitState.OPEN
    inner, _ = scripted(model)
    assert inner.calls == 2


class StrictParsing(ScriptedChatModel):
    """Structured output whose parser raises ``OutputParserException`` on a bad answer."""

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        def parse(message: AIMessage) -> Any:
            try:
                return schema(**message.tool_calls[0]["args"])
            except Exception as exc:
                raise OutputParserException(f"not a {schema.__name__}: {exc}") from exc

        return self.bind_tools([schema]) | RunnableLambda(parse)


async def test_a_parsing_failure_neither_counts_nor_falls_back(clock: FakeClock, mode: str) -> None:
    inner = StrictParsing(script=[tool_call_message("Person", {"name": "no age"})] * 3)
    backup = StrictParsing(provider="other")
    model = CircuitBreakerChatModel(
        inner=inner, fallback=backup, policy=CallPolicy(clock=clock, failure_threshold=2)
    )
    structured = model.with_structured_output(Person)
    for _ in range(3):
        with pytest.raises(OutputParserException, match="not a Person"):
            await call(structured, mode)
    assert model.state_for() is CircuitState.CLOSED
    assert backup.calls == 0


async def test_structured_output_streams_the_primarys_parsed_stream(
    clock: FakeClock, mode: str
) -> None:
    model = pair(clock)
    inner, _ = scripted(model)
    inner.push(tool_call_message("Person", {"name": "Lin", "age": 30}))
    structured = model.with_structured_output(Person)
    if mode == "sync":
        parts = list(structured.stream("hi"))
    else:
        parts = [p async for p in structured.astream("hi")]
    assert parts[-1] == Person(name="Lin", age=30)


def test_a_fallback_without_structured_output_is_named() -> None:
    model = CircuitBreakerChatModel(
        inner=ScriptedChatModel(), fallback=FakeListChatModel(responses=["x"])
    )
    with pytest.raises(NotImplementedError, match="fallback: FakeListChatModel"):
        model.with_structured_output(Person)
