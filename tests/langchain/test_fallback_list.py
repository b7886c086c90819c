"""``CircuitBreakerChatModel(fallback=[b, c])`` over HTTP with the real ``ChatOpenAI``: tried
in order, each under its own circuit, tools and structured output bound on each, the
answer marked with the model that served it and why, and every model named when all fail.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from callpolicy import AllModelsFailedError, CallPolicy, CircuitState
from langchain_breaker import META_SERVED_BY, CircuitBreakerChatModel, served_by
from tests.support.clock import FakeClock
from tests.support.openai_server import Fail, OpenAICompatServer, Reply

PRIMARY, BACKUP, SPARE = "gpt-4o-mini", "backup-model", "spare-model"
P_KEY, B_KEY, S_KEY = f"openai::{PRIMARY}", f"openai::{BACKUP}", f"openai::{SPARE}"


def chat(server: OpenAICompatServer, model: str = PRIMARY) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=2.0
    )


def guarded(
    server: OpenAICompatServer, clock: FakeClock, **options: Any
) -> CircuitBreakerChatModel:
    return CircuitBreakerChatModel(
        inner=chat(server),
        fallback=[chat(server, BACKUP), chat(server, SPARE)],
        policy=CallPolicy(clock=clock, **options),
    )


def asked(server: OpenAICompatServer) -> list[str]:
    return [body.get("model", "?") for body in server.requests]


async def call(runnable: Any, mode: str, input: Any = "hi") -> Any:
    if mode == "sync":
        return runnable.invoke(input)
    return await runnable.ainvoke(input)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class Weather(BaseModel):
    city: str
    sky: str


async def test_the_second_fallback_answers_when_the_first_is_down_too(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock, failure_threshold=1)
    openai_server.push(Fail(500), Fail(503), Reply("from the spare"))
    answer = await call(model, mode)
    assert answer.content == "from the spare"
    assert asked(openai_server) == [PRIMARY, BACKUP, SPARE]
    mark = answer.response_metadata[META_SERVED_BY]
    assert (mark["model"], mark["key"], mark["primary"]) == (SPARE, S_KEY, P_KEY)
    assert mark["reason"] == "failure"
    assert mark["error_type"] == "OpenAIAPIError"  # the class name of the primary's error
    policy = model.policy
    assert policy is not None
    assert policy.state(P_KEY) is CircuitState.OPEN
    assert policy.state(B_KEY) is CircuitState.OPEN
    # Both open: the next call goes straight to the spare, no request to the others.
    openai_server.push(Reply("spare again"))
    again = await call(model, mode)
    assert again.content == "spare again"
    assert asked(openai_server)[3:] == [SPARE]
    assert again.response_metadata[META_SERVED_BY]["reason"] == "circuit_open"


async def test_when_every_model_fails_the_error_names_each(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    openai_server.push(Fail(500), Fail(502), Fail(503))
    with pytest.raises(AllModelsFailedError) as caught:
        await call(model, mode)
    assert caught.value.keys == (P_KEY, B_KEY, S_KEY)
    for key in (P_KEY, B_KEY, S_KEY):
        assert key in str(caught.value)
    assert caught.value.__cause__ is caught.value.errors[-1]


async def test_tools_are_bound_on_every_fallback(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    bound = model.bind_tools([get_weather])
    openai_server.push(
        Fail(500),
        Fail(500),
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Rome"}}]),
    )
    answer = await call(bound, mode, "weather in Rome?")
    assert answer.tool_calls[0]["args"] == {"city": "Rome"}
    assert served_by(answer) == "fallback"
    for body in openai_server.requests:
        assert [t["function"]["name"] for t in body["tools"]] == ["get_weather"]


async def test_structured_output_binds_on_every_fallback(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    structured = model.with_structured_output(Weather, method="function_calling")
    openai_server.push(
        Fail(500),
        Fail(500),
        Reply(tool_calls=[{"name": "Weather", "arguments": {"city": "Oslo", "sky": "grey"}}]),
    )
    assert await call(structured, mode) == Weather(city="Oslo", sky="grey")
    assert asked(openai_server) == [PRIMARY, BACKUP, SPARE]
    assert all(body["tools"][0]["function"]["name"] == "Weather" for body in openai_server.requests)


async def test_the_legacy_generate_path_walks_the_list_too(
    openai_server: OpenAICompatServer, clock: FakeClock
) -> None:
    model = guarded(openai_server, clock)
    model.policy.trip(P_KEY)  # type: ignore[union-attr]
    model.policy.trip(B_KEY)  # type: ignore[union-attr]
    openai_server.push(Reply("legacy spare"))
    result = model.generate([[HumanMessage("hi")]])
    message = result.generations[0][0].message  # type: ignore[attr-defined]
    assert message.content == "legacy spare"
    assert message.response_metadata[META_SERVED_BY]["model"] == SPARE
    assert asked(openai_server) == [SPARE]


def test_a_primary_answer_carries_no_mark() -> None:
    model = CircuitBreakerChatModel(
        inner=FakeListChatModel(responses=["hi"]),
        fallback=[ChatOpenAI(model=BACKUP, api_key="sk-test")],
    )
    answer = model.invoke("hello")
    assert served_by(answer) == "primary"
    assert META_SERVED_BY not in answer.response_metadata
    assert isinstance(model.fallback, ChatOpenAI), "a list of one is the single fallback"


def test_construction_names_the_bad_fallback() -> None:
    inner = FakeListChatModel(responses=["hi"])
    with pytest.raises(TypeError, match=r"fallback\[1\]: expected a LangChain chat model"):
        CircuitBreakerChatModel(
            inner=inner, fallback=[ChatOpenAI(model=BACKUP, api_key="x"), "gpt-4o"]
        )
    with pytest.raises(ValueError, match=r"fallback\[1\]: its circuit key"):
        CircuitBreakerChatModel(
            inner=inner,
            fallback=[ChatOpenAI(model=BACKUP, api_key="x"), ChatOpenAI(model=BACKUP, api_key="y")],
        )
    with pytest.raises(TypeError, match="fallback_key"):
        CircuitBreakerChatModel(
            inner=inner,
            fallback=[ChatOpenAI(model=BACKUP, api_key="x"), ChatOpenAI(model=SPARE, api_key="y")],
            fallback_key="b::x",
        )


async def test_an_open_first_fallback_is_skipped_without_a_request(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    model.policy.force_open(B_KEY)  # type: ignore[union-attr]
    openai_server.push(Fail(500), Reply("spare"))
    assert (await call(model, mode)).content == "spare"
    assert asked(openai_server) == [PRIMARY, SPARE]
    assert model.policy.metrics()[B_KEY].refusals == 1  # type: ignore[union-attr]
