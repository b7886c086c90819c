"""Guarded streams with ``CircuitBreakerChatModel(fallback=[b, c])`` over HTTP with the real
``ChatOpenAI``: down the list until a model delivers its first chunk, each under its own
circuit (an open one skipped without a request), each checked for its own end marker;
every model named when all fail; a fallback failing mid-stream is not followed by another.
"""

from __future__ import annotations

from typing import Any

import openai as openai_sdk

from callpolicy import (
    AllModelsFailedError,
    CallPolicy,
    CircuitState,
    ErrorClass,
    IncompleteStreamError,
)
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.test_fallback_list import (
    B_KEY,
    BACKUP,
    P_KEY,
    PRIMARY,
    S_KEY,
    SPARE,
    asked,
    chat,
)
from tests.support.clock import FakeClock
from tests.support.openai_server import Fail, OpenAICompatServer, Reply, StreamDies, StreamEndsEarly


def guarded(server: OpenAICompatServer, clock: FakeClock) -> CircuitBreakerChatModel:
    return CircuitBreakerChatModel(
        inner=chat(server),
        fallback=[chat(server, BACKUP), chat(server, SPARE)],
        policy=CallPolicy(clock=clock, failure_threshold=1, cooldown=30),
    )


async def consume(model: Any, mode: str) -> tuple[list[Any], BaseException | None]:
    chunks: list[Any] = []
    try:
        if mode == "sync":
            for chunk in model.stream("hi"):
                chunks.append(chunk)
        else:
            async for chunk in model.astream("hi"):
                chunks.append(chunk)
    except Exception as exc:
        return chunks, exc
    return chunks, None


def text(chunks: list[Any]) -> str:
    return "".join(str(chunk.content) for chunk in chunks)


async def test_the_second_fallback_streams_when_the_first_is_down_too(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    openai_server.push(Fail(500), Fail(503), Reply("from the spare"))
    chunks, error = await consume(model, mode)
    assert error is None
    assert text(chunks) == "from the spare"
    assert asked(openai_server) == [PRIMARY, BACKUP, SPARE]
    policy = model.policy
    assert policy is not None
    assert policy.metrics()[B_KEY].failures == {ErrorClass.SERVER: 1}
    assert policy.metrics()[S_KEY].successes == 1
    assert policy.state(B_KEY) is CircuitState.OPEN
    # Both open: straight to the spare's stream, no request to the others.
    before = openai_server.request_count
    openai_server.push(Reply("spare again"))
    chunks, error = await consume(model, mode)
    assert error is None
    assert text(chunks) == "spare again"
    assert asked(openai_server)[before:] == [SPARE]


async def test_when_every_stream_fails_the_error_names_each_model(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    openai_server.push(Fail(500), Fail(503), Fail(502))
    chunks, error = await consume(model, mode)
    assert chunks == []
    assert isinstance(error, AllModelsFailedError)
    assert error.keys == (P_KEY, B_KEY, S_KEY)
    assert isinstance(error.__cause__, openai_sdk.InternalServerError)


async def test_the_serving_fallback_is_checked_for_its_own_end_marker(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    openai_server.push(Fail(500), Fail(503), StreamEndsEarly(after_chunks=2, content="cut short"))
    chunks, error = await consume(model, mode)
    assert chunks
    assert isinstance(error, IncompleteStreamError)
    assert error.key == S_KEY
    assert model.policy is not None
    assert model.policy.metrics()[S_KEY].failures == {ErrorClass.NETWORK: 1}


async def test_a_fallback_failing_midway_is_not_followed_by_another(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = guarded(openai_server, clock)
    openai_server.push(Fail(500), StreamDies(after_chunks=2, content="one two three"), Reply())
    chunks, error = await consume(model, mode)
    assert chunks
    assert error is not None
    assert f"callpolicy: stream of {B_KEY} failed after" in " ".join(error.__notes__)
    assert asked(openai_server) == [PRIMARY, BACKUP]
    assert model.policy is not None
    assert sum(model.policy.metrics()[B_KEY].failures.values()) == 1
