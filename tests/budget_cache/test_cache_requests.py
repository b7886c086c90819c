"""What a cached call's key is made of, through the real wrappers, and what is stored.

- no false hit: a call argument with no JSON form (an opaque object, a plain function where
  no tool is expected) makes the call uncacheable, with one warning per kind; a plain
  function given as a tool counts by its schema; both adapters describe values with the
  engine's one walker and treat the same argument names as schemas;
- the key is what the provider receives: a follow-up turn whose history holds a cached
  (marked) answer is the same request as one whose history holds the fresh answer;
- a fallback's answer is not stored under the primary's request unless asked.
"""

from __future__ import annotations

import datetime
import enum
import logging
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.llms.openai import OpenAI
from pydantic import BaseModel, ValidationError

from callpolicy import (
    SCHEMA_ARGUMENTS,
    CallPolicy,
    CallRequest,
    ResponseCache,
    UncacheableRequestError,
)
from langchain_breaker import META_CACHE, CircuitBreakerChatModel
from langchain_breaker._outer import describe_value
from llamaindex_breaker import CircuitBreakerLLM, cache_status, served_by
from llamaindex_breaker._request import jsonable
from tests.langchain.fakes import ScriptedChatModel, ServerError
from tests.llamaindex.fakes import Raise, ScriptedLLM, Text, primary, secondary, server_error
from tests.support.http_clients import HttpClients
from tests.support.openai_server import OpenAICompatServer, Reply


class Opaque:
    """A value with no JSON form (a client object, a handle): every instance looks alike
    from the outside, but two of them may change the answer differently."""

    def __init__(self, secret_state: int) -> None:
        self.secret_state = secret_state


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def lc_call(model: Any, mode: str, input: Any = "hi", **kwargs: Any) -> Any:
    if mode == "sync":
        return model.invoke(input, **kwargs)
    return await model.ainvoke(input, **kwargs)


async def li_chat(llm: Any, mode: str, messages: list[ChatMessage], **kwargs: Any) -> Any:
    if mode == "sync":
        return llm.chat(messages, **kwargs)
    return await llm.achat(messages, **kwargs)


def warnings_about(caplog: pytest.LogCaptureFixture, kind: str) -> int:
    return sum(
        1 for r in caplog.records if "not cached" in r.getMessage() and kind in r.getMessage()
    )


# -- item: no false hits ----------------------------------------------------------------------
async def test_langchain_an_opaque_argument_is_never_another_calls_hit(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    inner = ScriptedChatModel()
    inner.push("for handle 1", "for handle 2", "for handle 1 again")
    model = CircuitBreakerChatModel(inner=inner, cache=ResponseCache())
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        first = await lc_call(model, mode, "hi", handle=Opaque(1))
        second = await lc_call(model, mode, "hi", handle=Opaque(2))
        third = await lc_call(model, mode, "hi", handle=Opaque(1))
    assert [first.content, second.content, third.content] == [
        "for handle 1",
        "for handle 2",
        "for handle 1 again",
    ]
    assert META_CACHE not in second.response_metadata
    assert inner.calls == 3
    assert warnings_about(caplog, "Opaque") == 1  # one warning per kind, naming where
    assert "['kwargs']['handle']" in caplog.text


async def test_langchain_a_plain_function_as_a_tool_counts_by_its_schema(mode: str) -> None:
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return city

    def get_time(zone: str, hour24: bool) -> str:
        """The time in a zone."""
        return zone

    inner = ScriptedChatModel()
    model = CircuitBreakerChatModel(inner=inner, cache=ResponseCache())
    await lc_call(model.bind(tools=[get_weather]), mode)
    await lc_call(model.bind(tools=[get_time]), mode)  # another tool: another request
    assert inner.calls == 2
    again = await lc_call(model.bind(tools=[get_weather]), mode)
    assert again.response_metadata[META_CACHE] == "hit"  # the same schema: the same request
    assert inner.calls == 2


async def test_llamaindex_an_opaque_argument_is_never_another_calls_hit(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    inner = primary()
    inner.push(Text("for handle 1"), Text("for handle 2"), Text("a tool function"))
    llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache())
    question = [ChatMessage(role=MessageRole.USER, content="hi")]
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        first = await li_chat(llm, mode, question, handle=Opaque(1))
        second = await li_chat(llm, mode, question, handle=Opaque(2))
        third = await li_chat(llm, mode, question, tools=[len])
    assert [str(r.message.content) for r in (first, second, third)] == [
        "for handle 1",
        "for handle 2",
        "a tool function",
    ]
    assert cache_status(second) is None
    assert len(inner.calls) == 3
    assert warnings_about(caplog, "Opaque") == 1
    assert warnings_about(caplog, "builtin_function_or_method") == 1


@pytest.mark.parametrize("name", sorted(SCHEMA_ARGUMENTS))
def test_both_adapters_treat_every_schema_argument_as_a_whole(name: str) -> None:
    # A schema property called "password" is part of the schema, not a secret to drop.
    as_text = {"properties": {"password": {"type": "string"}}}
    as_number = {"properties": {"password": {"type": "integer"}}}

    lc_inner = ScriptedChatModel()
    lc_model = CircuitBreakerChatModel(inner=lc_inner, cache=ResponseCache())
    lc_model.invoke("hi", **{name: as_text})
    lc_model.invoke("hi", **{name: as_number})
    assert lc_inner.calls == 2

    li_inner = primary()
    llm = CircuitBreakerLLM(inner=li_inner, cache=ResponseCache())
    question = [ChatMessage(role=MessageRole.USER, content="hi")]
    llm.chat(question, **{name: as_text})
    llm.chat(question, **{name: as_number})
    assert len(li_inner.calls) == 2


class Colour(enum.Enum):
    RED = "red"


class Person(BaseModel):
    name: str
    password: str


def test_both_adapters_describe_values_alike() -> None:
    value = {
        "schema": Person,
        "who": Person(name="Ada", password="x"),
        "tags": {"b", "a"},
        "blob": b"\x00\x01",
        "when": datetime.date(2024, 1, 2),
        "colour": Colour.RED,
        "pair": (1, 2.0),
    }
    assert describe_value(value) == jsonable(value)
    with pytest.raises(UncacheableRequestError):
        describe_value({"handle": Opaque(1)})
    with pytest.raises(UncacheableRequestError):
        jsonable({"handle": Opaque(1)})


# -- item: the key is what the provider receives ----------------------------------------------
async def test_langchain_a_follow_up_after_a_cached_answer_is_a_hit(
    openai_server: OpenAICompatServer, mode: str
) -> None:
    inner = ChatOpenAI(
        model="gpt-4o-mini", base_url=openai_server.base_url, api_key="sk-x", max_retries=0
    )
    model = CircuitBreakerChatModel(inner=inner, cache=ResponseCache())
    openai_server.push(Reply("Paris."), Reply("About 2 million."))
    question = HumanMessage("Capital of France?")
    fresh = await lc_call(model, mode, [question])
    cached = await lc_call(model, mode, [question])
    assert cached.response_metadata[META_CACHE] == "hit"
    follow_up = HumanMessage("How many people live there?")
    answer = await lc_call(model, mode, [question, fresh, follow_up])
    assert answer.content == "About 2 million."
    assert openai_server.request_count == 2
    # The same conversation, with the cached (marked) answer in its history.
    again = await lc_call(model, mode, [question, cached, follow_up])
    assert again.response_metadata[META_CACHE] == "hit"
    assert again.content == "About 2 million."
    assert openai_server.request_count == 2


async def test_llamaindex_a_follow_up_after_a_cached_answer_is_a_hit(
    openai_server: OpenAICompatServer, http_clients: HttpClients, mode: str
) -> None:
    inner = OpenAI(
        model="gpt-4o-mini",
        api_base=openai_server.base_url,
        api_key="sk-x",
        max_retries=0,
        **http_clients.llamaindex(),
    )
    llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache())
    openai_server.push(Reply("Paris."), Reply("About 2 million."))
    question = ChatMessage(role=MessageRole.USER, content="Capital of France?")
    fresh = await li_chat(llm, mode, [question])
    cached = await li_chat(llm, mode, [question])
    assert cache_status(cached) == "hit"
    follow_up = ChatMessage(role=MessageRole.USER, content="How many people live there?")
    answer = await li_chat(llm, mode, [question, fresh.message, follow_up])
    assert answer.message.content == "About 2 million."
    assert openai_server.request_count == 2
    # A history message carrying callpolicy's mark (copied from the cached response).
    marked = fresh.message.model_copy(
        update={
            "additional_kwargs": {
                **fresh.message.additional_kwargs,
                "callpolicy": cached.additional_kwargs["callpolicy"],
            }
        }
    )
    again = await li_chat(llm, mode, [question, marked, follow_up])
    assert cache_status(again) == "hit"
    assert openai_server.request_count == 2


# -- item: a fallback's answer does not outlive the outage --------------------------------------
async def test_langchain_a_fallbacks_answer_is_not_served_once_the_primary_is_back(
    mode: str,
) -> None:
    backup = ScriptedChatModel(provider="other", model_name="b1", default="from the fallback")
    inner = ScriptedChatModel(script=[ServerError("500")], default="from the primary")
    model = CircuitBreakerChatModel(inner=inner, fallback=backup, cache=ResponseCache())
    assert (await lc_call(model, mode)).content == "from the fallback"
    back = await lc_call(model, mode)  # the primary is back: its own answer
    assert (back.content, META_CACHE in back.response_metadata) == ("from the primary", False)
    hit = await lc_call(model, mode)
    assert (hit.content, hit.response_metadata[META_CACHE]) == ("from the primary", "hit")
    assert (inner.calls, backup.calls) == (2, 1)


async def test_llamaindex_a_fallbacks_answer_is_not_served_once_the_primary_is_back(
    mode: str,
) -> None:
    inner: ScriptedLLM = primary()
    backup: ScriptedLLM = secondary()
    inner.push(Raise(server_error()), Text("from the primary"))
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, cache=ResponseCache())
    question = [ChatMessage(role=MessageRole.USER, content="hi")]
    first = await li_chat(llm, mode, question)
    assert served_by(first) == "fallback"
    back = await li_chat(llm, mode, question)
    assert isinstance(back, ChatResponse)
    assert (served_by(back), cache_status(back)) == ("primary", None)
    assert back.message.content == "from the primary"
    hit = await li_chat(llm, mode, question)
    assert (served_by(hit), cache_status(hit)) == ("primary", "hit")
    assert (len(inner.calls), len(backup.calls)) == (2, 1)


def _request() -> CallRequest[str]:
    return CallRequest(
        describe=lambda: {"messages": ["hi"]},
        encode=lambda answer: {"answer": answer},
        decode=lambda payload: str(payload["answer"]),
    )


def _down() -> str:
    raise ConnectionError("the primary is down")


def test_the_option_keeps_a_fallbacks_answer() -> None:
    for keep, expected in ((False, "primary"), (True, "fallback")):
        cache = ResponseCache(cache_fallback_answers=keep)
        policy = CallPolicy()
        served = policy.execute(
            "acme::m1", _down, fallback=lambda: "fallback", cache=cache, request=_request()
        )
        assert served == "fallback"
        after = policy.execute(
            "acme::m1",
            lambda: "primary",
            fallback=lambda: "fallback",
            cache=cache,
            request=_request(),
        )
        assert after == expected
        assert cache.cache_fallback_answers is keep


async def test_concurrent_callers_still_share_a_fallbacks_answer() -> None:
    import asyncio

    cache = ResponseCache()
    policy = CallPolicy()
    gate = asyncio.Event()
    fallbacks = 0

    async def down() -> str:
        await gate.wait()
        raise ConnectionError("down")

    async def fallback() -> str:
        nonlocal fallbacks
        fallbacks += 1
        return "fallback"

    request = CallRequest(
        describe=lambda: {"messages": ["hi"]},
        encode=lambda answer: {"answer": answer},
        decode=lambda payload: str(payload["answer"]),
    )
    tasks = [
        asyncio.ensure_future(
            policy.aexecute("acme::m1", down, fallback=fallback, cache=cache, request=request)
        )
        for _ in range(5)
    ]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == ["fallback"] * 5
    assert fallbacks == 1  # one fallback call, shared
    assert cache.stats().entries == 0  # and not stored


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_the_option_is_validated_at_construction(value: Any) -> None:
    with pytest.raises(ValidationError, match="cache_fallback_answers"):
        ResponseCache(cache_fallback_answers=value)


def test_langchain_keeps_the_response_id_when_the_provider_receives_it() -> None:
    from langchain_core.messages import AIMessage

    from langchain_breaker._outer import ChatCodec, _messages_described

    def history(response_id: str) -> list[Any]:
        answer = AIMessage("Paris.", id="run-1", response_metadata={"id": response_id})
        return [HumanMessage("Capital?"), answer, HumanMessage("And Spain?")]

    # Chat Completions: the response id is not sent, so it is not in the key.
    assert _messages_described(history("resp_1")) == _messages_described(history("resp_2"))
    # Responses API with use_previous_response_id: it is sent (previous_response_id).
    assert _messages_described(history("resp_1"), response_ids=True) != _messages_described(
        history("resp_2"), response_ids=True
    )
    for chained in (False, True):
        codec = ChatCodec(
            ChatOpenAI(model="gpt-4o", api_key="sk-x", use_previous_response_id=chained)
        )
        first = codec.legacy_request(history("resp_1"), None, {}).describe()
        second = codec.legacy_request(history("resp_2"), None, {}).describe()
        assert (first != second) is chained
