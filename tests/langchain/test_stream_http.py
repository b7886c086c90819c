"""Guarded streams over HTTP: the real ``ChatOpenAI`` against the loopback server's stream
faults, through ``stream``, ``astream``, ``astream_events``, an LCEL chain and a LangGraph
agent (``create_agent``) streaming tokens.

For each fault: what the consumer receives (the bare model's chunks, then the error, or a
fallback's stream where nothing had reached it), what the circuit counts, that an open
circuit sends no request to the primary, and that a healthy stream's chunks are the inner
model's own objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai as openai_sdk
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, ErrorClass, IncompleteStreamError
from langchain_breaker import CircuitBreakerChatModel
from tests.support.clock import FakeClock
from tests.support.openai_server import (
    Behaviour,
    Fail,
    OpenAICompatServer,
    Reply,
    StreamDies,
    StreamEndsEarly,
    StreamMalformed,
    StreamStalls,
)

PRIMARY, BACKUP = "gpt-4o-mini", "backup-model"
KEY, BACKUP_KEY = "openai::gpt-4o-mini", "openai::backup-model"
OPEN, HALF_OPEN, CLOSED = CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED
WORDS = "one two three four five"


def chat(server: OpenAICompatServer, model: str = PRIMARY, **kwargs: Any) -> ChatOpenAI:
    kwargs.setdefault("timeout", 2.0)
    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, **kwargs
    )


def guarded(
    server: OpenAICompatServer, clock: FakeClock, *, fallback: bool = True, **options: Any
) -> CircuitBreakerChatModel:
    timeout = options.pop("timeout", 2.0)
    options.setdefault("failure_threshold", 1)
    options.setdefault("cooldown", 30)
    return CircuitBreakerChatModel(
        inner=chat(server, timeout=timeout),
        fallback=chat(server, BACKUP) if fallback else None,
        policy=CallPolicy(clock=clock, **options),
    )


def asked(server: OpenAICompatServer) -> list[str]:
    return [body.get("model", "?") for body in server.requests]


async def consume(
    model: Any, mode: str, input: Any = "hi", **kwargs: Any
) -> tuple[list[Any], BaseException | None]:
    chunks: list[Any] = []
    try:
        if mode == "sync":
            for chunk in model.stream(input, **kwargs):
                chunks.append(chunk)
        else:
            async for chunk in model.astream(input, **kwargs):
                chunks.append(chunk)
    except Exception as exc:
        return chunks, exc
    return chunks, None


def texts(chunks: list[Any]) -> list[str]:
    return [str(chunk.content) for chunk in chunks]


def visible(chunk: AIMessageChunk) -> dict[str, Any]:
    """What a consumer sees in a chunk, but its id (new per run)."""
    return {
        "content": chunk.content,
        "tool_call_chunks": chunk.tool_call_chunks,
        "usage_metadata": chunk.usage_metadata,
        "response_metadata": {
            k: v for k, v in chunk.response_metadata.items() if k not in ("id", "created")
        },
        "chunk_position": chunk.chunk_position,
    }


class Yielded(BaseCallbackHandler):
    """The chunk objects a model yielded, as its run announced them (on_llm_new_token)."""

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.chunks.append(chunk.message)


# fault -> (behaviour, the error the consumer gets, its class as counted)
FAULTS: dict[str, tuple[Callable[[], Behaviour], type[BaseException], ErrorClass]] = {
    "drop after chunks": (
        lambda: StreamDies(after_chunks=3, content=WORDS),
        httpx.RemoteProtocolError,
        ErrorClass.NETWORK,
    ),
    "malformed chunk": (
        lambda: StreamMalformed(after_chunks=3, content=WORDS),
        Exception,
        ErrorClass.UNKNOWN,
    ),
    "stall past the read timeout": (
        lambda: StreamStalls(after_chunks=3, seconds=30, content=WORDS),
        httpx.ReadTimeout,
        ErrorClass.TIMEOUT,
    ),
    "ends early without finish_reason": (
        lambda: StreamEndsEarly(after_chunks=3, content=WORDS),
        IncompleteStreamError,
        ErrorClass.NETWORK,
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_fault_after_the_first_chunk_reaches_the_consumer_counted(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str, fault: str
) -> None:
    behaviour, error_type, error_class = FAULTS[fault]
    openai_server.push(behaviour())
    bare_chunks, bare_error = await consume(chat(openai_server, timeout=0.5), mode)
    model = guarded(openai_server, clock, timeout=0.5)
    openai_server.push(behaviour())
    chunks, error = await consume(model, mode)
    # The bare model's chunks, one for one; then its error (or, cut short, ours).
    assert texts(chunks) == texts(bare_chunks)
    assert "".join(texts(chunks)) == "one two"
    assert isinstance(error, error_type)
    if fault == "ends early without finish_reason":
        assert bare_error is None  # the bare model takes half an answer for a whole one
        assert (error.key, error.chunks) == (KEY, len(chunks))
    else:
        assert type(error) is type(bare_error)
        assert f"callpolicy: stream of {KEY} failed after {len(chunks)} chunks" in (error.__notes__)
    assert model.policy is not None
    assert model.policy.metrics()[KEY].failures == {error_class: 1}
    assert model.state_for() is OPEN
    assert asked(openai_server) == [PRIMARY, PRIMARY]  # never followed by the fallback
    # Open: the next stream never reaches the primary; the fallback's stream serves.
    chunks, error = await consume(model, mode)
    assert error is None
    assert "".join(texts(chunks)) == "ok"
    assert asked(openai_server)[2:] == [BACKUP]


@pytest.mark.parametrize("fallback", [True, False], ids=["fallback", "no fallback"])
async def test_a_failure_before_the_first_byte_is_served_by_the_fallback_stream(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str, fallback: bool
) -> None:
    model = guarded(openai_server, clock, fallback=fallback)
    openai_server.push(Fail(503, "overloaded"), Reply("backup says hi"))
    chunks, error = await consume(model, mode)
    if fallback:
        assert error is None
        assert "".join(texts(chunks)) == "backup says hi"
        assert asked(openai_server) == [PRIMARY, BACKUP]
    else:
        assert isinstance(error, openai_sdk.InternalServerError)
        assert chunks == []
    assert model.policy is not None
    assert model.policy.metrics()[KEY].failures == {ErrorClass.SERVER: 1}
    # Open: zero requests to the primary.
    before = openai_server.request_count
    chunks, error = await consume(model, mode)
    if fallback:
        assert error is None
        assert asked(openai_server)[before:] == [BACKUP]
    else:
        assert isinstance(error, CircuitOpenError)
        assert openai_server.request_count == before


async def test_a_healthy_stream_is_the_inner_models_own_chunk_objects(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    openai_server.set_default(Reply(WORDS))
    bare_chunks, _ = await consume(chat(openai_server, stream_usage=True), mode)
    model = CircuitBreakerChatModel(
        inner=chat(openai_server, stream_usage=True),
        fallback=chat(openai_server, BACKUP),
        policy=CallPolicy(clock=clock),
    )
    spy = Yielded()
    chunks, error = await consume(model, mode, config={"callbacks": [spy]})
    assert error is None
    assert len(chunks) == len(spy.chunks) == len(bare_chunks) > 5
    assert all(got is made for got, made in zip(chunks, spy.chunks, strict=True))
    assert [visible(c) for c in chunks] == [visible(c) for c in bare_chunks]
    assert model.policy is not None
    assert model.policy.metrics()[KEY].successes == 1


async def test_a_probe_slot_is_freed_by_an_early_break(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock, fallback=False)
    openai_server.push(Fail(500))
    await consume(model, mode)
    clock.advance(30)  # half-open: one probe
    openai_server.set_default(Reply(WORDS))
    if mode == "sync":
        for _chunk in model.stream("hi"):
            break
    else:
        astream = model.astream("hi")
        async for _chunk in astream:
            break
        await astream.aclose()  # type: ignore[attr-defined]
    assert model.state_for() is HALF_OPEN
    assert model.policy is not None
    assert model.policy.metrics()[KEY].cancelled == 1
    chunks, error = await consume(model, mode)  # the slot is free: admitted
    assert error is None
    assert "".join(texts(chunks)) == WORDS
    assert model.state_for() is CLOSED


async def test_astream_events_carries_the_fallback_runs_tokens(
    openai_server: OpenAICompatServer, clock: FakeClock
) -> None:
    model = guarded(openai_server, clock)
    openai_server.push(Fail(503), Reply("from the backup"))
    tokens: dict[str, list[str]] = {}
    errors = []
    async for event in model.astream_events("hi", version="v2"):
        if event["event"] == "on_chat_model_stream":
            role = event["metadata"]["callpolicy_role"]
            tokens.setdefault(role, []).append(event["data"]["chunk"].content)
        errors += [event] if event["event"] == "on_chat_model_error" else []
    assert "".join(tokens["fallback"]) == "from the backup"
    # Called on the model itself, the event stream taps the caller's run id, which the
    # failed first attempt took: LangChain never ends an errored chat-model run there, so
    # the fallback's chunks are reported again under that run (docs/langchain.md).
    assert set(tokens) <= {"fallback", "primary"}
    # Cut short: the error reaches the event stream's consumer.
    clock.advance(30)
    openai_server.push(StreamEndsEarly(after_chunks=3, content=WORDS))
    with pytest.raises(IncompleteStreamError):
        async for _event in model.astream_events("hi", version="v2"):
            pass


async def test_an_lcel_chain_streams_through_the_guard(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model | StrOutputParser()
    openai_server.push(Fail(500), Reply("served by the backup"))
    pieces, error = await consume(chain, mode, {"question": "hi"})
    assert error is None
    assert "".join(pieces) == "served by the backup"
    assert asked(openai_server) == [PRIMARY, BACKUP]
    pieces, error = await consume(chain, mode, {"question": "again"})  # open: backup only
    assert "".join(pieces) == "ok"
    assert asked(openai_server)[2:] == [BACKUP]
    clock.advance(30)
    openai_server.push(StreamEndsEarly(after_chunks=3, content=WORDS))
    pieces, error = await consume(chain, mode, {"question": "cut"})
    assert isinstance(error, IncompleteStreamError)
    assert "".join(pieces) == "one two"


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


async def test_a_langgraph_agent_streams_the_fallbacks_tokens(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    from langchain.agents import create_agent

    model = guarded(openai_server, clock)
    agent = create_agent(model=model, tools=[add])
    openai_server.push(
        Fail(503),  # the primary, before its first byte
        Reply(tool_calls=[{"name": "add", "arguments": {"a": 1, "b": 2}}]),  # the backup
        Reply("the sum is 3"),  # the backup again: the primary's circuit is open
    )
    inputs = {"messages": [HumanMessage("what is 1 + 2?")]}
    tokens: list[str] = []
    roles: set[str] = set()
    if mode == "sync":
        for message, metadata in agent.stream(inputs, stream_mode="messages"):
            if isinstance(message, AIMessageChunk):
                tokens.append(str(message.content))
                roles.add(metadata["callpolicy_role"])
    else:
        async for message, metadata in agent.astream(inputs, stream_mode="messages"):
            if isinstance(message, AIMessageChunk):
                tokens.append(str(message.content))
                roles.add(metadata["callpolicy_role"])
    assert "".join(tokens) == "the sum is 3"
    assert roles == {"fallback"}
    assert asked(openai_server) == [PRIMARY, BACKUP, BACKUP]
    assert model.policy is not None
    assert model.policy.metrics()[KEY].fallbacks == 2
