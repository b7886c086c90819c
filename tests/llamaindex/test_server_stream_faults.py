"""The loopback server's stream faults, as the bare ``openai`` SDK sees them: each fault is
what the guarded-stream tests (LlamaIndex and LangChain) rely on it to be."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.support.openai_server import (
    Fail,
    OpenAICompatServer,
    Reply,
    StreamDies,
    StreamEndsEarly,
    StreamMalformed,
    StreamStalls,
)


def sdk(server: OpenAICompatServer, *, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=timeout
    )


def stream(client: openai.OpenAI, received: list[Any], *, usage: bool = False) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    with client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        **extra,
    ) as chunks:
        for chunk in chunks:
            received.append(chunk)


def finish_reasons(chunks: list[Any]) -> list[str | None]:
    return [c.choices[0].finish_reason if c.choices else None for c in chunks]


@pytest.mark.parametrize("usage", [False, True])
def test_a_healthy_stream_ends_with_a_finish_reason_like_openai(
    openai_server: OpenAICompatServer, usage: bool
) -> None:
    openai_server.push(Reply("one two"))
    received: list[Any] = []
    with sdk(openai_server) as client:
        stream(client, received, usage=usage)
    assert [c.choices[0].delta.content for c in received[:3]] == ["", "one", " two"]
    assert finish_reasons(received)[:4] == [None, None, None, "stop"]
    if usage:
        assert len(received) == 5
        assert received[-1].choices == []
        assert received[-1].usage is not None
        assert received[-1].usage.total_tokens == 15
    else:
        assert len(received) == 4


def test_a_tool_call_stream_ends_with_tool_calls(openai_server: OpenAICompatServer) -> None:
    openai_server.push(Reply(tool_calls=[{"name": "add", "arguments": {"a": 1}}]))
    received: list[Any] = []
    with sdk(openai_server) as client:
        stream(client, received)
    assert finish_reasons(received) == [None, None, "tool_calls"]
    assert received[1].choices[0].delta.tool_calls[0].function.name == "add"


def test_an_error_status_fails_a_stream_before_its_first_byte(
    openai_server: OpenAICompatServer,
) -> None:
    openai_server.push(Fail(503))
    received: list[Any] = []
    with sdk(openai_server) as client, pytest.raises(openai.InternalServerError):
        stream(client, received)
    assert received == []


def test_a_dying_stream_drops_the_connection(openai_server: OpenAICompatServer) -> None:
    openai_server.push(StreamDies(after_chunks=3))
    received: list[Any] = []
    with sdk(openai_server) as client, pytest.raises(httpx.RemoteProtocolError):
        stream(client, received)
    assert [c.choices[0].delta.content for c in received] == ["", "the", " stream"]


def test_a_malformed_chunk_is_an_error_after_the_chunks_before_it(
    openai_server: OpenAICompatServer,
) -> None:
    openai_server.push(StreamMalformed(after_chunks=2))
    received: list[Any] = []
    with sdk(openai_server) as client, pytest.raises(json.JSONDecodeError):
        stream(client, received)
    assert [c.choices[0].delta.content for c in received] == ["", "the"]


def test_a_stall_outlasts_the_read_timeout(openai_server: OpenAICompatServer) -> None:
    openai_server.push(StreamStalls(after_chunks=2, seconds=60.0))
    received: list[Any] = []
    with sdk(openai_server, timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        stream(client, received)
    assert [c.choices[0].delta.content for c in received] == ["", "the"]
    # The server's close releases the stalled handler (the fixture closes it after this).


def test_a_stream_can_end_cleanly_without_a_finish_reason(
    openai_server: OpenAICompatServer,
) -> None:
    openai_server.push(StreamEndsEarly(after_chunks=3, content="half an answer and"))
    received: list[Any] = []
    with sdk(openai_server) as client:
        stream(client, received, usage=True)  # no usage chunk either
    assert [c.choices[0].delta.content for c in received] == ["", "half", " an"]
    assert finish_reasons(received) == [None, None, None]


def test_a_stream_fault_on_a_plain_request_drops_it(openai_server: OpenAICompatServer) -> None:
    openai_server.push(StreamMalformed(), StreamEndsEarly(), Reply("fine"))
    with sdk(openai_server) as client:
        for _ in range(2):
            with pytest.raises(openai.APIConnectionError):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert answer.choices[0].message.content == "fine"
    assert openai_server.request_count == 3


def test_a_fault_after_the_last_event_still_applies(openai_server: OpenAICompatServer) -> None:
    openai_server.push(StreamDies(after_chunks=99, content="short"))
    received: list[Any] = []
    with sdk(openai_server) as client, pytest.raises(httpx.RemoteProtocolError):
        stream(client, received)
    assert finish_reasons(received) == [None, None, "stop"]  # then no [DONE]: dropped
