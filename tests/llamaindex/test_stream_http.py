"""Guarded streams with the real ``llama_index.llms.openai.OpenAI`` client over HTTP,
against the loopback server's stream faults: what the caller receives, what the circuit
counts, that an open circuit sends nothing to the primary and the fallback serves where
it can, that a healthy stream's chunks are the client's own, and that an early stop or a
cancelled task frees the probe slot. Also through what calls the streams: a streaming
``FunctionAgent`` and ``ReActAgent``, a streaming query engine and a chat engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI
from pydantic import PrivateAttr

from callpolicy import Budget, CallPolicy, CircuitOpenError, CircuitState, IncompleteStreamError
from llamaindex_breaker import CircuitBreakerLLM, anthropic_finished, openai_finished, served_by
from llamaindex_breaker._markers import end_marker
from tests.support.clock import FakeClock
from tests.support.http_clients import HttpClients
from tests.support.openai_server import (
    Behaviour,
    Fail,
    Hang,
    OpenAICompatServer,
    Reply,
    StreamDies,
    StreamEndsEarly,
    StreamMalformed,
    StreamStalls,
)

from .test_streams import ALL_STREAMS, collect

PRIMARY, BACKUP = "gpt-4o-mini", "gpt-4o"
KEY = f"openai::{PRIMARY}"
SHORT_TIMEOUT = 1.0
"""The clients' timeout where a test waits for it: what StreamStalls and Hang outlast
(the server holds them 60 s, or until the test closes it). Elsewhere the clients wait 10 s:
a connection that a loaded machine is slow to accept must not time out there."""


def client(
    server: OpenAICompatServer, http: HttpClients, model: str = PRIMARY, timeout: float = 10.0
) -> OpenAI:
    return OpenAI(
        model=model,
        api_base=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=timeout,
        **http.llamaindex(),
    )


def wrapper(
    server: OpenAICompatServer, http: HttpClients, policy: CallPolicy, behaviour: Behaviour
) -> CircuitBreakerLLM:
    """The primary and its fallback, with a short timeout when ``behaviour`` needs one."""
    timeout = SHORT_TIMEOUT if isinstance(behaviour, StreamStalls | Hang) else 10.0
    return CircuitBreakerLLM(
        inner=client(server, http, timeout=timeout),
        fallback=client(server, http, BACKUP, timeout=timeout),
        policy=policy,
    )


@pytest.fixture
def llm(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy
) -> CircuitBreakerLLM:
    return wrapper(openai_server, http_clients, policy, Reply())


def models(server: OpenAICompatServer) -> list[str]:
    return [request["model"] for request in server.requests]


def test_openai_streams_are_checked_for_finish_reason(llm: CircuitBreakerLLM) -> None:
    assert end_marker(llm.inner, "auto") is openai_finished
    assert llm.fallback is not None
    assert end_marker(llm.fallback, "auto") is openai_finished
    assert end_marker(llm.inner, None) is None


async def test_a_server_without_finish_reason_can_be_told_apart(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy
) -> None:
    # stream_finished=None: an OpenAI-compatible server that never sends finish_reason.
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients), policy=policy, stream_finished=None
    )
    openai_server.push(StreamEndsEarly(after_chunks=99, content="all of it"))
    chunks: list[Any] = []
    await collect(llm, "astream_chat", chunks)
    assert "".join(c.delta or "" for c in chunks) == "all of it"
    assert policy.circuit(KEY).snapshot().failures == 0


def test_anthropic_marker_is_its_message_delta_stop_reason() -> None:
    # The raw shape llama-index-llms-anthropic (>= 0.10.2) gives its chunks: dict(event).
    def chunk(raw: Any) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", content="x"), raw=raw)

    delta = SimpleNamespace(stop_reason="end_turn", stop_sequence=None)
    assert anthropic_finished(chunk({"type": "message_delta", "delta": delta, "usage": None}))
    text = SimpleNamespace(type="text_delta", text="x")
    assert not anthropic_finished(chunk({"type": "content_block_delta", "delta": text}))
    unset = SimpleNamespace(stop_reason=None)
    assert not anthropic_finished(chunk({"type": "message_delta", "delta": unset}))
    assert not anthropic_finished(chunk(None))
    assert not openai_finished(chunk(None))


# -- the faults, one by one ------------------------------------------------------------------
# (fault, the deltas the caller receives before the error, the error it receives)
MID_STREAM: dict[str, tuple[Behaviour, list[str], type[BaseException]]] = {
    "connection dropped": (StreamDies(after_chunks=3), ["", "the", " stream"], httpx.HTTPError),
    "malformed chunk": (StreamMalformed(after_chunks=2), ["", "the"], json.JSONDecodeError),
    "stall past the read timeout": (
        StreamStalls(after_chunks=2, seconds=60),
        ["", "the"],
        httpx.ReadTimeout,
    ),
    "ends without finish_reason": (
        StreamEndsEarly(after_chunks=3),
        ["", "the", " stream"],
        IncompleteStreamError,
    ),
}


@pytest.mark.parametrize(
    ("fault", "method"),
    [
        (fault, method)
        for fault in MID_STREAM
        # A stall waits for the timeout five times: two methods show it.
        for method in (
            ["stream_chat", "astream_chat_with_tools"] if "stall" in fault else ALL_STREAMS
        )
    ],
)
async def test_a_stream_failing_after_its_first_chunk(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    fault: str,
    method: str,
) -> None:
    behaviour, received, error = MID_STREAM[fault]
    llm = wrapper(openai_server, http_clients, policy, behaviour)
    for round in range(5):  # the threshold
        openai_server.push(behaviour)
        chunks: list[Any] = []
        with pytest.raises(error) as raised:
            await collect(llm, method, chunks)
        # The chunks that came, then the error: never replayed, never the fallback's.
        assert [c.delta for c in chunks] == received
        assert {served_by(c) for c in chunks} == {"primary"}
        if error is IncompleteStreamError:
            assert isinstance(raised.value, IncompleteStreamError)
            assert (raised.value.key, raised.value.chunks) == (KEY, len(received))
        else:
            note = f"callpolicy: stream of {KEY} failed after {len(received)} chunks"
            assert note in getattr(raised.value, "__notes__", [])
        assert policy.circuit(KEY).snapshot().failures == round + 1
    assert llm.state_for() is CircuitState.OPEN
    assert models(openai_server) == [PRIMARY] * 5

    # Open: nothing reaches the primary; the fallback's stream serves.
    openai_server.push(Reply("the fallback answers"))
    chunks = []
    await collect(llm, method, chunks)
    assert "".join(c.delta or "" for c in chunks) == "the fallback answers"
    assert {served_by(c) for c in chunks} == {"fallback"}
    assert models(openai_server) == [PRIMARY] * 5 + [BACKUP]


BEFORE_FIRST_CHUNK: dict[str, tuple[Behaviour, type[BaseException]]] = {
    "error status": (Fail(503), openai.InternalServerError),
    "timeout before the first byte": (Hang(seconds=60), openai.APITimeoutError),
    "connection dropped before the first chunk": (StreamDies(after_chunks=0), httpx.HTTPError),
    "ends before the first chunk": (StreamEndsEarly(after_chunks=0), IncompleteStreamError),
}


@pytest.mark.parametrize("method", ["stream_chat", "astream_chat", "astream_chat_with_tools"])
@pytest.mark.parametrize("fault", list(BEFORE_FIRST_CHUNK))
async def test_a_stream_failing_before_its_first_chunk_is_served_by_the_fallback(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    fault: str,
    method: str,
) -> None:
    behaviour, _ = BEFORE_FIRST_CHUNK[fault]
    llm = wrapper(openai_server, http_clients, policy, behaviour)
    openai_server.push(behaviour, Reply("the fallback answers"))
    chunks: list[Any] = []
    await collect(llm, method, chunks)
    assert "".join(c.delta or "" for c in chunks) == "the fallback answers"
    assert {served_by(c) for c in chunks} == {"fallback"}
    assert models(openai_server) == [PRIMARY, BACKUP]
    assert policy.circuit(KEY).snapshot().failures == 1


# (Not astream_complete: llama-index-core's own completion callback fails an empty async
# stream with a pydantic ValidationError, bare client or not.)
@pytest.mark.parametrize("method", ["stream_chat", "astream_chat"])
@pytest.mark.parametrize("fault", list(BEFORE_FIRST_CHUNK))
async def test_without_a_fallback_a_failed_start_raises_and_counts(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    fault: str,
    method: str,
) -> None:
    behaviour, error = BEFORE_FIRST_CHUNK[fault]
    timeout = SHORT_TIMEOUT if isinstance(behaviour, Hang) else 10.0
    llm = CircuitBreakerLLM(
        inner=client(openai_server, http_clients, timeout=timeout), policy=policy
    )
    for _ in range(5):
        openai_server.push(behaviour)
        with pytest.raises(error):
            await collect(llm, method, [])
    assert llm.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await collect(llm, method, [])
    assert openai_server.request_count == 5  # none while open


# -- a healthy stream is the client's own ------------------------------------------------------
class RecordingOpenAI(OpenAI):
    """The OpenAI client, keeping every chunk object its streams yield."""

    _yielded: list[Any] = PrivateAttr(default_factory=list)

    def stream_chat(self, messages: Any, **kwargs: Any) -> Any:
        for chunk in super().stream_chat(messages, **kwargs):
            self._yielded.append(chunk)
            yield chunk

    async def astream_chat(self, messages: Any, **kwargs: Any) -> Any:
        chunks = await super().astream_chat(messages, **kwargs)
        yielded = self._yielded

        async def gen() -> AsyncIterator[Any]:
            async for chunk in chunks:
                yielded.append(chunk)
                yield chunk

        return gen()


def comparable(chunk: Any) -> Any:
    """A chunk without what differs between two requests (the completion's id and time)."""
    raw = chunk.raw.model_dump()
    assert raw["id"].startswith("chatcmpl-")
    return (
        type(chunk),
        type(chunk.raw),
        chunk.delta,
        chunk.message.model_dump(),
        chunk.additional_kwargs,
        {k: v for k, v in raw.items() if k not in ("id", "created")},
    )


@pytest.mark.parametrize("reply", ["text", "tool call"])
async def test_a_healthy_stream_is_the_bare_clients_chunk_for_chunk(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    mode: str,
    reply: str,
) -> None:
    answer = (
        Reply("one two three four")
        if reply == "text"
        else Reply(tool_calls=[{"id": "call_1", "name": "weather", "arguments": {"city": "Oslo"}}])
    )
    messages = [ChatMessage(role="user", content="hi")]
    bare = client(openai_server, http_clients)
    inner = RecordingOpenAI(
        model=PRIMARY,
        api_base=openai_server.base_url,
        api_key="sk-test",
        max_retries=0,
        **http_clients.llamaindex(),
    )
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    openai_server.push(answer, answer)
    if mode == "sync":
        expected = list(bare.stream_chat(messages))
        chunks = list(llm.stream_chat(messages))
    else:
        expected = [c async for c in await bare.astream_chat(messages)]
        chunks = [c async for c in await llm.astream_chat(messages)]
    assert len(chunks) == len(expected) >= 3
    assert [comparable(c) for c in chunks] == [comparable(c) for c in expected]
    assert len({c.raw.id for c in chunks}) == 1  # one completion, in order
    assert all(a is b for a, b in zip(chunks, inner._yielded, strict=True))  # the same objects
    assert chunks[-1].raw.choices[0].finish_reason in ("stop", "tool_calls")
    assert policy.circuit(KEY).snapshot().failures == 0


# -- early stops and cancellation free the probe slot -----------------------------------------
@pytest.fixture
def lonely(
    openai_server: OpenAICompatServer, http_clients: HttpClients, policy: CallPolicy
) -> CircuitBreakerLLM:
    """A wrapper without a fallback, whose circuit is open with its cooldown passed."""
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), policy=policy)
    for _ in range(5):
        openai_server.push(Fail(503))
        with pytest.raises(openai.InternalServerError):
            llm.chat([ChatMessage(role="user", content="hi")])
    assert llm.state_for() is CircuitState.OPEN
    return llm


async def test_a_break_frees_the_probe_slot(
    lonely: CircuitBreakerLLM, openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    clock.advance(31)
    openai_server.push(Reply("a long answer that nobody reads to its end"))
    messages = [ChatMessage(role="user", content="hi")]
    if mode == "sync":
        stream = lonely.stream_chat(messages)
        for _chunk in stream:
            break
        with pytest.raises(CircuitOpenError):  # the one probe is in flight
            next(iter(lonely.stream_chat(messages)))
        stream.close()
    else:
        astream = await lonely.astream_chat(messages)
        async for _chunk in astream:
            break
        with pytest.raises(CircuitOpenError):
            await anext(aiter(await lonely.astream_chat(messages)))
        await astream.aclose()
    assert lonely.state_for() is CircuitState.HALF_OPEN
    openai_server.push(Reply("the probe"))
    chunks: list[Any] = []
    await collect(lonely, "stream_chat" if mode == "sync" else "astream_chat", chunks)
    assert "".join(c.delta or "" for c in chunks) == "the probe"
    assert lonely.state_for() is CircuitState.CLOSED
    assert openai_server.request_count == 5 + 2


async def test_a_task_cancelled_while_the_stream_waits_frees_the_probe_slot(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    clock: FakeClock,
) -> None:
    patient = OpenAI(
        model=PRIMARY,
        api_base=openai_server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=60,
        **http_clients.llamaindex(),
    )
    llm = CircuitBreakerLLM(inner=patient, policy=policy)
    for _ in range(5):
        openai_server.push(Fail(503))
        with pytest.raises(openai.InternalServerError):
            await llm.achat([ChatMessage(role="user", content="hi")])
    clock.advance(31)
    openai_server.push(StreamStalls(after_chunks=2, seconds=60))
    received: list[Any] = []
    second = asyncio.Event()

    async def consume() -> None:
        async for chunk in await llm.astream_chat([ChatMessage(role="user", content="hi")]):
            received.append(chunk)
            if len(received) == 2:
                second.set()  # the next chunk never comes: the task waits in the stream

    task = asyncio.create_task(consume())
    await second.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [c.delta for c in received] == ["", "the"]
    assert llm.state_for() is CircuitState.HALF_OPEN
    assert policy.circuit(KEY).snapshot().failures == 5  # the cancel counted for nothing
    openai_server.push(Reply("the probe"))
    chunks: list[Any] = []
    await collect(llm, "astream_chat", chunks)
    assert "".join(c.delta or "" for c in chunks) == "the probe"
    assert llm.state_for() is CircuitState.CLOSED


# -- what calls the streams: agents, query engines, chat engines ------------------------------
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


WEATHER_CALL = Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Oslo"}}])


async def test_a_function_agent_streams_through_the_guard(
    llm: CircuitBreakerLLM, openai_server: OpenAICompatServer, policy: CallPolicy
) -> None:
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=weather)], llm=llm)
    assert agent.streaming  # the default
    # The primary fails before its first chunk: the fallback's stream calls the tool;
    # the primary (closed again) streams the answer.
    openai_server.push(Fail(503), WEATHER_CALL, Reply("It is sunny in Oslo."))
    output = await agent.run(user_msg="What is the weather in Oslo?")
    assert str(output.response.content) == "It is sunny in Oslo."
    assert models(openai_server) == [PRIMARY, BACKUP, PRIMARY]
    assert policy.circuit(KEY).snapshot().failures == 0  # the answer's success reset it

    # A stream cut short mid-answer: the agent fails rather than answer with half of it.
    openai_server.push(StreamEndsEarly(after_chunks=3, content="It is raining"))
    with pytest.raises(IncompleteStreamError):
        await agent.run(user_msg="And now?")
    assert policy.circuit(KEY).snapshot().failures == 1

    # Open: every step is streamed by the fallback, none reaches the primary.
    policy.force_open(KEY)
    sent = openai_server.request_count
    openai_server.push(WEATHER_CALL, Reply("Sunny, says the fallback."))
    output = await agent.run(user_msg="What is the weather in Oslo?")
    assert str(output.response.content) == "Sunny, says the fallback."
    assert models(openai_server)[sent:] == [BACKUP, BACKUP]


async def test_a_react_agent_streams_through_the_guard(
    llm: CircuitBreakerLLM, openai_server: OpenAICompatServer, policy: CallPolicy
) -> None:
    agent = ReActAgent(tools=[FunctionTool.from_defaults(fn=weather)], llm=llm)
    assert agent.streaming
    answer = "Thought: I can answer without using any more tools.\nAnswer: forty-two"
    openai_server.push(Fail(503), Reply(answer))
    output = await agent.run(user_msg="What is the answer?")
    assert str(output.response.content) == "forty-two"
    assert models(openai_server) == [PRIMARY, BACKUP]

    # The case: a stream the server ends early, without a finish reason, must not
    # become the agent's final answer.
    openai_server.push(StreamEndsEarly(after_chunks=12, content=answer + " and more"))
    with pytest.raises(IncompleteStreamError):
        await agent.run(user_msg="What is the answer?")
    assert policy.circuit(KEY).snapshot().failures == 2


@pytest.fixture
def index() -> VectorStoreIndex:
    docs = [
        Document(text="Oslo is the capital of Norway."),
        Document(text="Lima is the capital of Peru."),
    ]
    return VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))


async def test_a_streaming_query_engine(
    llm: CircuitBreakerLLM,
    openai_server: OpenAICompatServer,
    policy: CallPolicy,
    index: VectorStoreIndex,
    mode: str,
) -> None:
    engine = index.as_query_engine(llm=llm, streaming=True)

    async def tokens() -> list[str]:
        if mode == "sync":
            return list(engine.query("Capital of Norway?").response_gen)  # type: ignore[union-attr]
        response = await engine.aquery("Capital of Norway?")
        return [t async for t in response.async_response_gen()]  # type: ignore[union-attr]

    openai_server.push(Fail(503), Reply("Oslo, says the fallback."))
    assert "".join(await tokens()) == "Oslo, says the fallback."
    assert models(openai_server) == [PRIMARY, BACKUP]
    assert "Oslo is the capital of Norway." in json.dumps(openai_server.requests[1]["messages"])

    openai_server.push(StreamDies(after_chunks=3))
    with pytest.raises(httpx.HTTPError):
        await tokens()
    assert policy.circuit(KEY).snapshot().failures == 2

    policy.force_open(KEY)
    openai_server.push(Reply("Oslo, while open."))
    assert "".join(await tokens()) == "Oslo, while open."
    assert models(openai_server)[3:] == [BACKUP]


async def test_a_chat_engine_streams_through_the_guard(
    llm: CircuitBreakerLLM, openai_server: OpenAICompatServer, policy: CallPolicy, mode: str
) -> None:
    engine = SimpleChatEngine.from_defaults(llm=llm)
    try:

        async def tokens(message: str) -> list[str]:
            if mode == "sync":
                return list(engine.stream_chat(message).response_gen)
            response = await engine.astream_chat(message)
            return [t async for t in response.async_response_gen()]

        openai_server.push(Fail(503), Reply("hello from the fallback"))
        assert "".join(await tokens("hello")) == "hello from the fallback"
        assert models(openai_server) == [PRIMARY, BACKUP]
        assert policy.circuit(KEY).snapshot().failures == 1

        policy.force_open(KEY)
        openai_server.push(Reply("still the fallback"))
        assert "".join(await tokens("and now?")) == "still the fallback"
        assert models(openai_server)[2:] == [BACKUP]
        # The history holds the fallback's answers, as the caller saw them.
        history = [str(m.content) for m in engine.chat_history]
        assert history == ["hello", "hello from the fallback", "and now?", "still the fallback"]

        if mode == "async":
            # Cut short mid-answer: the caller gets the error, the circuit counts it. (The
            # sync engine drains the stream in a thread of its own, which re-raises the
            # error there too, as it does with a bare client.)
            policy.reset(KEY)
            openai_server.push(StreamEndsEarly(after_chunks=3))
            with pytest.raises(IncompleteStreamError):
                await tokens("once more?")
            assert policy.circuit(KEY).snapshot().failures == 1
            assert models(openai_server)[3:] == [PRIMARY]
    finally:
        await _close_memory(engine)


async def _close_memory(engine: object) -> None:
    """Dispose of a chat engine's default memory store (see test_pipelines.py)."""
    store = getattr(getattr(engine, "_memory", None), "sql_store", None)
    async_engine = getattr(store, "_async_engine", None)
    if async_engine is not None:
        await async_engine.dispose()


@pytest.mark.parametrize("fault", ["ends without finish_reason", "connection dropped"])
async def test_a_stream_cut_short_is_settled_with_what_it_used(
    openai_server: OpenAICompatServer,
    http_clients: HttpClients,
    policy: CallPolicy,
    mode: str,
    fault: str,
) -> None:
    budget = Budget(max_calls=10)
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), policy=policy, budget=budget)
    behaviour, received, error = MID_STREAM[fault]
    openai_server.push(behaviour)
    chunks: list[Any] = []
    with pytest.raises(error):
        await collect(llm, "stream_chat" if mode == "sync" else "astream_chat", chunks)
    assert [c.delta for c in chunks] == received
    used = budget.usage()
    assert (used.calls, used.tokens) == (1, 0)  # one call; no usage was reported, no estimate
    assert policy.circuit(KEY).snapshot().failures == 1
