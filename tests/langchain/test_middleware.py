"""``CircuitBreakerMiddleware`` in ``langchain.agents.create_agent``, over HTTP with the real
``ChatOpenAI`` against the OpenAI-compatible server on 127.0.0.1: an outage, a tool loop on
the fallback, structured output, a list of fallbacks, composition with LangChain's own
middleware, and interrupts passing through.

Every model is on the same server; the log of request bodies says who was asked what.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware
from langchain.agents.structured_output import ToolStrategy
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.errors import GraphInterrupt
from pydantic import BaseModel

from callpolicy import AllModelsFailedError, CallPolicy, CircuitOpenError, CircuitState, RetryPolicy
from langchain_breaker import META_SERVED_BY, CircuitBreakerMiddleware, served_by
from tests.support.clock import FakeClock
from tests.support.openai_server import Fail, OpenAICompatServer, Reply

PRIMARY, BACKUP, SPARE = "gpt-4o-mini", "backup-model", "spare-model"
P_KEY, B_KEY, S_KEY = f"openai::{PRIMARY}", f"openai::{BACKUP}", f"openai::{SPARE}"


def chat(server: OpenAICompatServer, model: str = PRIMARY) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=2.0
    )


def asked(server: OpenAICompatServer) -> list[str]:
    return [body.get("model", "?") for body in server.requests]


async def run(agent: Any, mode: str, text: str = "hi") -> dict[str, Any]:
    state = {"messages": [HumanMessage(text)]}
    if mode == "sync":
        return agent.invoke(state)  # type: ignore[no-any-return]
    return await agent.ainvoke(state)  # type: ignore[no-any-return]


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class Weather(BaseModel):
    city: str
    sky: str


async def test_an_outage_trips_the_circuit_and_the_fallback_answers(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    guard = CircuitBreakerMiddleware(
        fallback=chat(server, BACKUP), policy=CallPolicy(clock=clock, failure_threshold=2)
    )
    agent = create_agent(model=chat(server), middleware=[guard])
    server.push(Fail(500), Reply("b1"), Fail(503), Reply("b2"), Reply("b3"))
    answers = [await run(agent, mode) for _ in range(3)]
    assert [a["messages"][-1].content for a in answers] == ["b1", "b2", "b3"]
    # The third call never reached the primary: its circuit was open.
    assert asked(server) == [PRIMARY, BACKUP, PRIMARY, BACKUP, BACKUP]
    assert guard.state_for(chat(server)) is CircuitState.OPEN
    last = answers[-1]["messages"][-1]
    assert served_by(last) == "fallback"
    mark = last.response_metadata[META_SERVED_BY]
    assert mark["model"] == BACKUP
    assert mark["key"] == B_KEY
    assert mark["primary"] == P_KEY
    assert mark["reason"] == "circuit_open"
    first = answers[0]["messages"][-1].response_metadata[META_SERVED_BY]
    assert first["reason"] == "failure"
    assert first["error_type"].endswith("Error")  # the class name: langchain's own wrapper

    # After the cooldown a probe reaches the primary again, and closes the circuit.
    clock.advance(31)
    server.push(Reply("primary is back"))
    answer = (await run(agent, mode))["messages"][-1]
    assert answer.content == "primary is back"
    assert served_by(answer) == "primary"
    assert META_SERVED_BY not in answer.response_metadata
    assert guard.state_for(P_KEY) is CircuitState.CLOSED


async def test_a_tool_loop_runs_on_the_fallback_with_the_tools_bound_on_it(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    guard = CircuitBreakerMiddleware(fallback=chat(server, BACKUP), policy=CallPolicy(clock=clock))
    guard.policy.trip(P_KEY)
    agent = create_agent(model=chat(server), tools=[get_weather], middleware=[guard])
    server.push(
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]),
        Reply("It is sunny in Paris."),
    )
    result = await run(agent, mode, "weather in Paris?")
    messages = result["messages"]
    assert messages[-1].content == "It is sunny in Paris."
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.content for m in tool_results] == ["sunny in Paris"]
    assert asked(server) == [BACKUP, BACKUP]
    for body in server.requests:  # bound on the fallback, in OpenAI's format
        assert [t["function"]["name"] for t in body["tools"]] == ["get_weather"]
    ai = [m for m in messages if isinstance(m, AIMessage)]
    assert all(served_by(m) == "fallback" for m in ai)


async def test_structured_output_is_bound_on_the_fallback(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    guard = CircuitBreakerMiddleware(fallback=chat(server, BACKUP), policy=CallPolicy(clock=clock))
    agent = create_agent(
        model=chat(server), response_format=ToolStrategy(Weather), middleware=[guard]
    )
    server.push(
        Fail(500),
        Reply(tool_calls=[{"name": "Weather", "arguments": {"city": "Oslo", "sky": "grey"}}]),
    )
    result = await run(agent, mode, "weather in Oslo?")
    assert result["structured_response"] == Weather(city="Oslo", sky="grey")
    assert asked(server) == [PRIMARY, BACKUP]
    assert "Weather" in [t["function"]["name"] for t in server.requests[1]["tools"]]


async def test_a_list_of_fallbacks_where_the_first_is_down_too(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    guard = CircuitBreakerMiddleware(
        fallback=[chat(server, BACKUP), chat(server, SPARE)],
        policy=CallPolicy(clock=clock, failure_threshold=1),
    )
    agent = create_agent(model=chat(server), middleware=[guard])
    server.push(Fail(500), Fail(502), Reply("from the spare"))
    answer = (await run(agent, mode))["messages"][-1]
    assert answer.content == "from the spare"
    assert answer.response_metadata[META_SERVED_BY]["model"] == SPARE
    assert asked(server) == [PRIMARY, BACKUP, SPARE]
    # Both open now: the next call goes straight to the spare.
    server.push(Reply("spare again"))
    assert (await run(agent, mode))["messages"][-1].content == "spare again"
    assert asked(server)[3:] == [SPARE]

    # All down: the error names every model tried, in order.
    server.push(Fail(500))
    with pytest.raises(AllModelsFailedError) as caught:
        await run(agent, mode)
    assert caught.value.keys == (P_KEY, B_KEY, S_KEY)
    opened, *_, last = caught.value.errors
    assert isinstance(opened, CircuitOpenError)
    assert isinstance(caught.value.errors[1], CircuitOpenError)
    assert not isinstance(last, CircuitOpenError)


async def test_fallback_strings_are_built_with_init_chat_model(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_BASE", openai_server.base_url)
    guard = CircuitBreakerMiddleware(fallback=f"openai:{BACKUP}", policy=CallPolicy(clock=clock))
    assert isinstance(guard.fallbacks[0], ChatOpenAI)
    guard.policy.trip(P_KEY)
    agent = create_agent(model=chat(openai_server), middleware=[guard])
    openai_server.push(Reply("built from a string"))
    assert (await run(agent, mode))["messages"][-1].content == "built from a string"
    assert asked(openai_server) == [BACKUP]


async def test_retries_pass_through_the_breaker(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    from tests.support.clock import FakeSleeper

    sleeper = FakeSleeper(clock)
    guard = CircuitBreakerMiddleware(
        policy=CallPolicy(
            clock=clock,
            sleep=sleeper,
            async_sleep=sleeper.asleep,
            retry=RetryPolicy(max_attempts=3, jitter=0),
        )
    )
    agent = create_agent(model=chat(openai_server), middleware=[guard])
    openai_server.push(Fail(503), Fail(429), Reply("third time"))
    assert (await run(agent, mode))["messages"][-1].content == "third time"
    metrics = guard.policy.metrics()[P_KEY]
    assert (metrics.calls, metrics.retries, metrics.successes) == (3, 2, 1)


async def test_inside_model_fallback_middleware_each_model_has_its_own_circuit(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    guard = CircuitBreakerMiddleware(policy=CallPolicy(clock=clock, failure_threshold=1))
    agent = create_agent(
        model=chat(server),
        middleware=[ModelFallbackMiddleware(chat(server, BACKUP)), guard],
    )
    server.push(Fail(500), Reply("b1"), Reply("b2"))
    assert (await run(agent, mode))["messages"][-1].content == "b1"
    assert (await run(agent, mode))["messages"][-1].content == "b2"
    # The primary's circuit opened on its first failure: the second call failed fast
    # (CircuitOpenError, no request), and LangChain's middleware moved on to the backup.
    assert asked(server) == [PRIMARY, BACKUP, BACKUP]
    assert guard.state_for(P_KEY) is CircuitState.OPEN
    assert guard.state_for(B_KEY) is CircuitState.CLOSED


async def test_an_open_circuit_without_fallback_fails_fast(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    guard = CircuitBreakerMiddleware(failure_threshold=1, cooldown=30)
    guard.policy.trip(P_KEY)
    agent = create_agent(model=chat(openai_server), middleware=[guard])
    with pytest.raises(CircuitOpenError):
        await run(agent, mode)
    assert openai_server.request_count == 0


async def test_an_interrupt_is_neither_a_failure_nor_a_reason_to_fall_back(mode: str) -> None:
    backup_calls: list[Any] = []

    class Request:
        model = ChatOpenAI(model=PRIMARY, api_key="sk-test", base_url="http://127.0.0.1:9/v1")

        def override(self, **changes: Any) -> Any:
            backup_calls.append(changes)
            return self

    guard = CircuitBreakerMiddleware(
        fallback=ChatOpenAI(model=BACKUP, api_key="sk-test", base_url="http://127.0.0.1:9/v1"),
        fallback_on="error",
    )
    interrupt = GraphInterrupt(())

    def handler(request: Any) -> Any:
        raise interrupt

    async def ahandler(request: Any) -> Any:
        raise interrupt

    async def guarded_call() -> Any:
        if mode == "sync":
            return guard.wrap_model_call(Request(), handler)  # type: ignore[arg-type]
        return await guard.awrap_model_call(Request(), ahandler)  # type: ignore[arg-type]

    with pytest.raises(GraphInterrupt) as caught:
        await guarded_call()
    assert caught.value is interrupt
    assert backup_calls == []
    metrics = guard.policy.metrics()[P_KEY]
    assert (metrics.failure_count, metrics.cancelled) == (0, 1)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match=r"fallback\[1\]: expected a chat model"):
        CircuitBreakerMiddleware(
            fallback=[ChatOpenAI(model=BACKUP, api_key="sk-test"), 42]  # type: ignore[list-item]
        )
    with pytest.raises(TypeError, match="not both"):
        CircuitBreakerMiddleware(policy=CallPolicy(), failure_threshold=3)
    with pytest.raises(ValueError, match="earlier fallback"):
        CircuitBreakerMiddleware(
            fallback=[
                ChatOpenAI(model=BACKUP, api_key="sk-test"),
                ChatOpenAI(model=BACKUP, api_key="sk-test"),
            ]
        )


async def test_model_call_limit_counts_a_call_the_fallback_served_once(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    from langchain.agents.middleware import ModelCallLimitMiddleware
    from langchain.agents.middleware.model_call_limit import ModelCallLimitExceededError

    server = openai_server
    guard = CircuitBreakerMiddleware(fallback=chat(server, BACKUP), policy=CallPolicy(clock=clock))
    limit = ModelCallLimitMiddleware(run_limit=2, exit_behavior="error")
    agent = create_agent(model=chat(server), tools=[get_weather], middleware=[limit, guard])
    # Two model-node runs, each a primary failure served by the fallback: within the limit.
    server.push(
        Fail(500),
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Nice"}}]),
        Fail(500),
        Reply("sunny"),
    )
    assert (await run(agent, mode))["messages"][-1].content == "sunny"
    assert asked(server) == [PRIMARY, BACKUP, PRIMARY, BACKUP]
    # A third model call in one run is over the limit, however the calls were served.
    server.push(
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "A"}}]),
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "B"}}]),
        Reply("done"),
    )
    with pytest.raises(ModelCallLimitExceededError):
        await run(agent, mode)
