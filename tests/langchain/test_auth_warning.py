"""A provider's 401/403 behind a fallback is logged at WARNING, once per key, with no secret."""

from __future__ import annotations

import logging

import openai
import pytest
from langchain_openai import ChatOpenAI

from callpolicy import CallPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.support.clock import FakeClock
from tests.support.openai_server import Fail, OpenAICompatServer, Reply

SECRET = "sk-live-0123456789abcdef"


def chat(server: OpenAICompatServer, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key=SECRET, max_retries=0, timeout=2.0
    )


def auth_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "callpolicy_event", None) == "auth_failed"]


@pytest.mark.parametrize("status", [401, 403])
async def test_a_revoked_key_behind_a_fallback_is_warned_once_per_key(
    openai_server: OpenAICompatServer, caplog: pytest.LogCaptureFixture, mode: str, status: int
) -> None:
    policy = CallPolicy(failure_threshold=100, clock=FakeClock())
    model = CircuitBreakerChatModel(
        inner=chat(openai_server, "gpt-4o-mini"),
        fallback=chat(openai_server, "backup-model"),
        policy=policy,
    )
    other = CircuitBreakerChatModel(inner=chat(openai_server, "gpt-4o"), policy=policy)
    message = f"Incorrect API key provided: {SECRET}"
    with caplog.at_level(logging.INFO, logger="callpolicy"):
        for _ in range(3):  # the fallback answers every time: the caller sees nothing wrong
            openai_server.push(Fail(status, message), Reply("from backup"))
            answer = model.invoke("hi") if mode == "sync" else await model.ainvoke("hi")
            assert answer.content == "from backup"
        openai_server.push(Fail(status, message))
        with pytest.raises((openai.AuthenticationError, openai.PermissionDeniedError)):
            other.invoke("hi") if mode == "sync" else await other.ainvoke("hi")
    records = auth_records(caplog)
    assert [(r.levelno, r.callpolicy_key) for r in records] == [  # type: ignore[attr-defined]
        (logging.WARNING, "openai::gpt-4o-mini"),
        (logging.WARNING, "openai::gpt-4o"),
    ]
    assert f"HTTP {status}" in records[0].getMessage()
    assert SECRET not in caplog.text
    assert "Incorrect API key" not in caplog.text
