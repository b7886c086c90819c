"""Real clients over HTTP: langchain-openai's ``ChatOpenAI`` (``max_retries=0``) against the
OpenAI-compatible server on 127.0.0.1, with real faults: 500s, 429 with Retry-After, a
hang past the client's timeout, a dropped connection, a stream that dies midway.

The primary is ``gpt-4o-mini`` and the fallback ``backup-model`` on the same server, so
the server's log of request bodies tells who was asked what.
"""

from __future__ import annotations

from typing import Any

import openai as openai_sdk
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, RetryPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.fakes import RunRecorder
from tests.support.clock import FakeClock
from tests.support.openai_server import Drop, Fail, Hang, OpenAICompatServer, Reply, StreamDies

PRIMARY, BACKUP = "gpt-4o-mini", "backup-model"
OPEN, CLOSED = CircuitState.OPEN, CircuitState.CLOSED


def chat(server: OpenAICompatServer, model: str = PRIMARY, **kwargs: Any) -> ChatOpenAI:
    kwargs.setdefault("timeout", 2.0)
    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, **kwargs
    )


def guarded(
    server: OpenAICompatServer,
    clock: FakeClock,
    *,
    fallback: bool = True,
    inner_options: dict[str, Any] | None = None,
    **options: Any,
) -> CircuitBreakerChatModel:
    options.setdefault("failure_threshold", 3)
    options.setdefault("cooldown", 30)
    return CircuitBreakerChatModel(
        inner=chat(server, **(inner_options or {})),
        fallback=chat(server, BACKUP) if fallback else None,
        policy=CallPolicy(clock=clock, **options),
    )


def asked(server: OpenAICompatServer) -> list[str]:
    """The model named by each request, in order."""
    return [body.get("model", "?") for body in server.requests]


async def call(runnable: Any, mode: str, input: Any = "hi", **kwargs: Any) -> Any:
    if mode == "sync":
        return runnable.invoke(input, **kwargs)
    return await runnable.ainvoke(input, **kwargs)


FAULTS = {
    "500": (lambda: Fail(500, "internal error"), openai_sdk.InternalServerError, {}),
    "429 with Retry-After": (
        lambda: Fail(429, "slow down", headers={"retry-after": "1"}),
        openai_sdk.RateLimitError,
        {},
    ),
    "hang past the timeout": (lambda: Hang(5.0), openai_sdk.APITimeoutError, {"timeout": 0.3}),
    "dropped connection": (Drop, openai_sdk.APIConnectionError, {}),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_the_breaker_opens_serves_the_fallback_and_a_probe_closes_it(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str, fault: str
) -> None:
    behaviour, error, client_options = FAULTS[fault]
    server = openai_server
    model = guarded(server, clock, inner_options=client_options)
    # Three failures of the primary, each answered by the fallback (the server plays its
    # script in order, so a reply for the fallback follows each fault).
    for _ in range(3):
        server.push(behaviour(), Reply("from backup"))
    for _ in range(3):
        assert (await call(model, mode)).content == "from backup"
    assert model.state_for() is OPEN
    assert asked(server) == [PRIMARY, BACKUP] * 3

    # Open: the primary gets no request; the fallback answers.
    server.push(Reply("still backup"), Reply("still backup"))
    for _ in range(2):
        assert (await call(model, mode)).content == "still backup"
    assert asked(server)[6:] == [BACKUP, BACKUP]

    # After the cooldown a probe reaches the primary, which has recovered.
    clock.advance(30)
    server.push(Reply("primary is back"))
    assert (await call(model, mode)).content == "primary is back"
    assert model.state_for() is CLOSED
    assert asked(server)[8:] == [PRIMARY]

    # Without a fallback the client's own error type surfaces, then the refusal.
    bare = guarded(server, FakeClock(), fallback=False, inner_options=client_options)
    server.push(*(behaviour() for _ in range(3)))
    for _ in range(3):
        with pytest.raises(error):
            await call(bare, mode)
    with pytest.raises(CircuitOpenError):
        await call(bare, mode)
    assert server.request_count == 12


async def test_429_retry_after_is_honoured_by_the_retry_policy(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    model = guarded(
        openai_server,
        clock,
        fallback=False,
        retry=RetryPolicy(max_attempts=3, base_delay=5, jitter=0),
        sleep=waits.append,
        async_sleep=asleep,
    )
    openai_server.push(Fail(429, headers={"retry-after": "1.5"}), Reply("after the wait"))
    assert (await call(model, mode)).content == "after the wait"
    assert waits == [1.5]  # the server's Retry-After, not the 5 s backoff
    assert openai_server.request_count == 2  # one per attempt: the SDK itself did not retry


async def test_a_stream_that_dies_midway_reaches_the_consumer_unchanged_and_counts(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    words = "one two three four five"

    async def consume(model: Any) -> tuple[list[str], type[BaseException] | None]:
        seen: list[str] = []
        try:
            if mode == "sync":
                for chunk in model.stream("hi"):
                    seen.append(str(chunk.content))
            else:
                async for chunk in model.astream("hi"):
                    seen.append(str(chunk.content))
        except Exception as exc:
            return seen, type(exc)
        return seen, None

    openai_server.push(StreamDies(after_chunks=3))
    bare_chunks, bare_error = await consume(chat(openai_server))
    model = guarded(openai_server, clock, failure_threshold=1)
    openai_server.push(StreamDies(after_chunks=3))
    chunks, error = await consume(model)
    assert bare_error is not None
    assert (chunks, error) == (bare_chunks, bare_error)
    assert "".join(chunks).strip()
    assert "".join(chunks) != words
    assert model.state_for() is OPEN  # counted...
    assert asked(openai_server) == [PRIMARY, PRIMARY]  # ...and never followed by the fallback


async def test_an_invoke_that_streams_internally_counts_a_stream_dying_midway(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    recorder = RunRecorder()  # not a streaming handler: the model itself streams
    model = guarded(openai_server, clock, failure_threshold=1, inner_options={"streaming": True})
    openai_server.push(StreamDies(after_chunks=2), Reply("from backup"))
    result = await call(model, mode, config={"callbacks": [recorder]})
    assert result.content == "from backup"
    assert model.state_for() is OPEN
    assert [s["metadata"]["callpolicy_role"] for s in recorder.starts] == ["primary", "fallback"]
    assert len(recorder.errors) == 1


async def test_a_stream_is_the_clients_own_chunk_for_chunk(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    async def chunks_of(model: Any) -> list[AIMessageChunk]:
        if mode == "sync":
            return list(model.stream("hi"))
        return [c async for c in model.astream("hi")]

    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    reply = Reply("a stream of words", usage=usage)
    openai_server.push(reply, reply)
    bare = await chunks_of(chat(openai_server, stream_usage=True))
    wrapped = await chunks_of(guarded(openai_server, clock, inner_options={"stream_usage": True}))

    def seen(chunk: AIMessageChunk) -> tuple[Any, ...]:
        metadata = {k: v for k, v in chunk.response_metadata.items() if k != "id"}
        return (chunk.content, chunk.tool_call_chunks, chunk.usage_metadata, metadata)

    assert len(wrapped) == len(bare) > 3
    assert [seen(c) for c in wrapped] == [seen(c) for c in bare]
    total = wrapped[0]
    for chunk in wrapped[1:]:
        total += chunk
    assert total.usage_metadata is not None
    assert total.usage_metadata["total_tokens"] == 10
    assert openai_server.requests[1]["stream"] is True
    assert openai_server.requests[1]["model"] == PRIMARY


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


async def test_bound_tools_reach_both_models_and_the_fallback_serves_the_tool_call(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock, failure_threshold=2)
    bound = model.bind_tools([get_weather], tool_choice="auto")
    openai_server.push(
        Fail(500),
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
    )
    message = await call(bound, mode)
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Oslo"}
    for body in openai_server.requests:
        assert body["tools"][0]["function"]["name"] == "get_weather"
        assert body["tool_choice"] == "auto"
    assert asked(openai_server) == [PRIMARY, BACKUP]
    assert message.response_metadata["model_name"] == BACKUP


class Person(BaseModel):
    """A person."""

    name: str
    age: int


async def test_structured_output_over_http_with_the_fallback(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock, failure_threshold=1)
    structured = model.with_structured_output(Person, method="json_schema")
    openai_server.push(Fail(503), Reply('{"name": "Ada", "age": 36}'))
    assert await call(structured, mode) == Person(name="Ada", age=36)
    assert model.state_for() is OPEN
    assert all(
        body["response_format"]["json_schema"]["name"] == "Person"
        for body in openai_server.requests
    )
    openai_server.push(Reply('{"name": "Bob", "age": 7}'))
    assert await call(structured, mode) == Person(name="Bob", age=7)
    assert asked(openai_server) == [PRIMARY, BACKUP, BACKUP]


async def test_astream_events_over_an_invoke_streams_the_fallbacks_tokens(
    openai_server: OpenAICompatServer, clock: FakeClock
) -> None:
    from langchain_core.runnables import RunnableLambda

    model = guarded(openai_server, clock)

    async def step(text: str) -> Any:
        return await model.ainvoke(text)  # the config (and its handler) come from context

    openai_server.push(Fail(500), Reply("streamed by the backup"))
    events = [e async for e in RunnableLambda(step).astream_events("hi", version="v2")]
    tokens = [
        (e["metadata"]["callpolicy_role"], e["data"]["chunk"].content)
        for e in events
        if e["event"] == "on_chat_model_stream" and e["data"]["chunk"].content
    ]
    assert tokens == [
        ("fallback", "streamed"),
        ("fallback", " by"),
        ("fallback", " the"),
        ("fallback", " backup"),
    ]
    assert [(b["model"], b.get("stream")) for b in openai_server.requests] == [
        (PRIMARY, True),
        (BACKUP, True),
    ]


async def test_a_per_call_model_override_has_its_own_circuit_over_http(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock, failure_threshold=2)
    openai_server.push(Fail(500), Reply("b1"), Fail(500), Reply("b2"), Reply("b3"))
    for expected in ("b1", "b2", "b3"):
        assert (await call(model, mode, model="gpt-4o")).content == expected
    assert model.state_for("gpt-4o") is OPEN
    assert model.state_for() is CLOSED
    assert asked(openai_server) == ["gpt-4o", BACKUP, "gpt-4o", BACKUP, BACKUP]
    openai_server.push(Reply("mini is fine"))
    assert (await call(model, mode)).content == "mini is fine"
    assert asked(openai_server)[-1] == PRIMARY
