"""The caller's mistakes through a real ``ChatOpenAI`` over HTTP: ``invoke(None)``, a value
the client cannot serialize, a NaN in a tool schema. None of them reaches the server,
opens a circuit or reaches the fallback; a malformed response still counts."""

from __future__ import annotations

import math
from typing import Any

import pytest
from langchain_openai import ChatOpenAI

from callpolicy import CallPolicy, CircuitState, ErrorClass
from langchain_breaker import CircuitBreakerChatModel
from tests.support.clock import FakeClock
from tests.support.openai_server import OpenAICompatServer, Raw, Reply

PRIMARY, BACKUP = "gpt-4o-mini", "backup-model"


class Opaque:
    """A value no JSON encoder knows."""


NAN_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a number up.",
        "parameters": {
            "type": "object",
            "properties": {"x": {"type": "number", "maximum": math.nan}},
        },
    },
}


def chat(server: OpenAICompatServer, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=2.0
    )


def guarded(server: OpenAICompatServer, fallback_on: str) -> CircuitBreakerChatModel:
    return CircuitBreakerChatModel(
        inner=chat(server, PRIMARY),
        fallback=chat(server, BACKUP),
        policy=CallPolicy(failure_threshold=3, fallback_on=fallback_on, clock=FakeClock()),  # type: ignore[arg-type]
    )


async def call(runnable: Any, mode: str, input: Any, **kwargs: Any) -> Any:
    if mode == "sync":
        return runnable.invoke(input, **kwargs)
    return await runnable.ainvoke(input, **kwargs)


MISTAKES: dict[str, tuple[type[Exception], Any]] = {
    "invoke(None)": (ValueError, lambda model: (model, None, {})),
    "unserializable": (TypeError, lambda model: (model, "hi", {"extra_body": {"x": Opaque()}})),
    "unserializable message": (ValueError, lambda model: (model, [("user", Opaque())], {})),
    "NaN in a tool schema": (ValueError, lambda model: (model.bind_tools([NAN_TOOL]), "hi", {})),
}


@pytest.mark.parametrize("fallback_on", ["failure", "error"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
async def test_three_caller_mistakes_never_open_the_circuit_nor_reach_anyone(
    openai_server: OpenAICompatServer, mode: str, mistake: str, fallback_on: str
) -> None:
    error, make = MISTAKES[mistake]
    model = guarded(openai_server, fallback_on)
    for _ in range(3):
        runnable, input, kwargs = make(model)
        with pytest.raises(error):
            await call(runnable, mode, input, **kwargs)
    assert model.state_for() is CircuitState.CLOSED
    assert model.policy.state(model.fallback_key or "") is CircuitState.CLOSED
    assert openai_server.requests == []  # neither the primary nor the fallback was asked
    counts = model.policy.metrics()[model.key or ""]
    assert counts.ignored == {ErrorClass.CALLER: 3}
    assert counts.fallbacks == 0
    # A valid call goes straight through.
    openai_server.push(Reply("hello"))
    assert (await call(model, mode, "hi")).content == "hello"
    assert [body["model"] for body in openai_server.requests] == [PRIMARY]


async def test_a_malformed_response_still_counts_and_falls_back(
    openai_server: OpenAICompatServer, mode: str
) -> None:
    model = guarded(openai_server, "failure")
    for _ in range(3):
        openai_server.push(Raw(b"<html>502 from a proxy</html>"), Reply("from backup"))
        assert (await call(model, mode, "hi")).content == "from backup"
    assert model.state_for() is CircuitState.OPEN
    assert [body["model"] for body in openai_server.requests] == [PRIMARY, BACKUP] * 3
