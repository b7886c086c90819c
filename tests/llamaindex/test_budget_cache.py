"""Budget and response cache through ``CircuitBreakerLLM``: the wrapper describes each call
(a ``CallRequest``) and the engine does the rest (cache -> budget -> fallback -> retry ->
breaker -> model). Fake models, and the real ``llama_index.llms.openai.OpenAI`` against the
loopback server for usage, tool calls and the SQLite round trip."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
)
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall
from pydantic import BaseModel, Field

import llamaindex_breaker._calls as calls_module
from callpolicy import (
    Budget,
    BudgetExceededError,
    CallPolicy,
    Event,
    EventKind,
    MemoryCacheBackend,
    MissingPriceError,
    ResponseCache,
    SQLiteCacheBackend,
)
from callpolicy._cache_key import canonical_json
from llamaindex_breaker import CircuitBreakerLLM, cache_status, served_by
from llamaindex_breaker._request import chat_request
from llamaindex_breaker._usage import meter_stream
from tests.support.http_clients import HttpClients
from tests.support.openai_server import OpenAICompatServer, Reply

from .fakes import Raise, ScriptedLLM, Stream, Text, ToolCall, server_error

METHODS = ("chat", "complete", "chat_with_tools")


# -- helpers -------------------------------------------------------------------------------
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


WEATHER = FunctionTool.from_defaults(fn=weather, name="weather")


async def call(
    llm: CircuitBreakerLLM, method: str, mode: str, text: str = "hi", **kwargs: Any
) -> ChatResponse | CompletionResponse:
    """One call through ``method`` (chat, complete or chat_with_tools), sync or async."""
    if method == "chat":
        messages = [ChatMessage(role=MessageRole.USER, content=text)]
        if mode == "sync":
            return llm.chat(messages, **kwargs)
        return await llm.achat(messages, **kwargs)
    if method == "complete":
        if mode == "sync":
            return llm.complete(text, **kwargs)
        return await llm.acomplete(text, **kwargs)
    assert method == "chat_with_tools"
    tools = kwargs.pop("tools", [WEATHER])
    if mode == "sync":
        return llm.chat_with_tools(tools, user_msg=text, **kwargs)
    return await llm.achat_with_tools(tools, user_msg=text, **kwargs)


def unmarked(response: ChatResponse | CompletionResponse) -> ChatResponse | CompletionResponse:
    """``response`` without the cache's entry in its mark (a fallback's entries stay)."""
    extra = dict(response.additional_kwargs)
    mark = dict(extra.pop("callpolicy", {}))
    mark.pop("cache", None)
    if mark:
        extra["callpolicy"] = mark
    return response.model_copy(update={"additional_kwargs": extra})


def client(server: OpenAICompatServer, http: HttpClients, **kwargs: Any) -> OpenAI:
    options: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "api_base": server.base_url,
        "api_key": "sk-test-secret",
        "max_retries": 0,
        "timeout": 10.0,
        **http.llamaindex(),
    }
    options.update(kwargs)
    return OpenAI(**options)


class CountingBackend(MemoryCacheBackend):
    """A memory backend that counts lookups (to know when every caller has missed)."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self._lookups_lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lookups_lock:
            self.lookups += 1
        return super().get(key)


@pytest.fixture
def tmp_cache(tmp_path: Path) -> Path:
    return tmp_path / "llm-cache.sqlite"


# -- construction --------------------------------------------------------------------------
def test_budget_and_cache_of_the_wrong_type_fail_naming_the_argument(
    inner: ScriptedLLM,
) -> None:
    with pytest.raises(TypeError, match=r"^budget: expected a callpolicy\.Budget"):
        CircuitBreakerLLM(inner=inner, budget={"max_calls": 3})
    with pytest.raises(TypeError, match=r"^cache: expected a callpolicy\.ResponseCache"):
        CircuitBreakerLLM(inner=inner, cache=MemoryCacheBackend())


def test_a_cost_budget_without_the_inner_models_price_fails_at_construction(
    inner: ScriptedLLM,
) -> None:
    budget = Budget(max_cost_usd=1.0, prices={"gpt-4o-mini": (0.15, 0.60)})
    with pytest.raises(MissingPriceError, match="'fake-primary'") as raised:
        CircuitBreakerLLM(inner=inner, budget=budget)
    assert raised.value.model == "fake-primary"
    assert any("inner model" in note for note in getattr(raised.value, "__notes__", []))


def test_a_cost_budget_without_the_fallbacks_price_fails_at_construction(
    inner: ScriptedLLM, backup: ScriptedLLM
) -> None:
    budget = Budget(max_cost_usd=1.0, prices={"fake-primary": (1.0, 2.0)})
    with pytest.raises(MissingPriceError, match="'fake-fallback'") as raised:
        CircuitBreakerLLM(inner=inner, fallback=backup, budget=budget)
    assert any("fallback model" in note for note in getattr(raised.value, "__notes__", []))
    # Priced by breaker key or by model name, both models: accepted.
    priced = Budget(
        max_cost_usd=1.0,
        prices={"scriptedllm::fake-primary": (1.0, 2.0), "fake-fallback": (1.0, 2.0)},
    )
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, budget=priced)
    assert llm.budget is priced


def test_without_max_cost_a_price_table_need_not_list_every_model(inner: ScriptedLLM) -> None:
    budget = Budget(max_calls=3, prices={"gpt-4o-mini": (0.15, 0.60)})
    assert CircuitBreakerLLM(inner=inner, budget=budget).budget is budget


async def test_wrappers_share_the_budget_and_cache_they_are_given(
    inner: ScriptedLLM, backup: ScriptedLLM, mode: str
) -> None:
    budget, cache = Budget(max_calls=2), ResponseCache()
    first = CircuitBreakerLLM(inner=inner, budget=budget, cache=cache)
    second = CircuitBreakerLLM(inner=backup, budget=budget, cache=cache)
    copied = copy.deepcopy(first)
    assert second.budget is budget
    assert second.cache is cache
    assert copied.budget is budget
    assert copied.cache is cache
    assert first.model_copy().budget is budget
    await call(first, "chat", mode, "one")
    await call(second, "chat", mode, "two")
    with pytest.raises(BudgetExceededError):
        await call(copied, "chat", mode, "three")
    assert budget.usage().calls == 2
    # The copy reads the cache the original filled.
    hit = await call(copied, "chat", mode, "one")
    assert cache_status(hit) == "hit"


def test_without_budget_or_cache_no_request_is_built(
    inner: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a CallRequest was built on the plain path")

    for name in ("chat_request", "complete_request", "tools_request"):
        monkeypatch.setattr(calls_module, name, refuse)
    llm = CircuitBreakerLLM(inner=inner)
    assert llm.chat([ChatMessage(role="user", content="hi")]).message.content == "ok"
    assert llm.complete("hi").text == "ok"
    assert llm.chat_with_tools([WEATHER], user_msg="hi").message.content == "ok"


# -- budget --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
async def test_the_budget_refuses_before_the_model(
    inner: ScriptedLLM, policy: CallPolicy, method: str, mode: str
) -> None:
    seen: list[Event] = []
    policy.add_listener(seen.append)
    budget = Budget(max_calls=2)
    llm = CircuitBreakerLLM(inner=inner, policy=policy, budget=budget)
    await call(llm, method, mode, "one")
    await call(llm, method, mode, "two")
    with pytest.raises(BudgetExceededError) as refused:
        await call(llm, method, mode, "three")
    assert refused.value.kind == "calls"
    assert len(inner.calls) == 2
    assert budget.usage().calls == 2
    assert [e.kind for e in seen if e.kind is EventKind.BUDGET_REFUSED] == [
        EventKind.BUDGET_REFUSED
    ]


@pytest.mark.parametrize("method", METHODS)
async def test_the_token_limit_counts_this_requests_estimated_input(
    inner: ScriptedLLM, method: str, mode: str
) -> None:
    budget = Budget(max_tokens=50)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    with pytest.raises(BudgetExceededError) as refused:
        await call(llm, method, mode, "x" * 400)  # ~100 tokens of input
    assert refused.value.kind == "tokens"
    assert inner.calls == []
    assert budget.usage().calls == 0


@pytest.mark.parametrize("method", METHODS)
async def test_reported_usage_is_counted_and_priced(
    inner: ScriptedLLM, method: str, mode: str
) -> None:
    inner.usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    budget = Budget(max_cost_usd=1.0, prices={"fake-primary": (1.0, 2.0)})
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    await call(llm, method, mode)
    used = budget.usage()
    assert (used.calls, used.input_tokens, used.output_tokens) == (1, 12, 30)
    assert used.estimated_calls == 0
    assert used.cost_usd == pytest.approx((12 * 1.0 + 30 * 2.0) / 1e6)


@pytest.mark.parametrize("method", METHODS)
async def test_unreported_usage_is_counted_by_its_estimate_and_says_so(
    inner: ScriptedLLM, method: str, mode: str
) -> None:
    budget = Budget(max_tokens=10_000)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    await call(llm, method, mode, "y" * 80)
    used = budget.usage()
    assert used.estimated_calls == 1
    assert used.input_tokens >= 20  # at least the 80 characters' estimate
    assert used.output_tokens == 0


async def test_a_fallbacks_answer_is_priced_at_the_fallbacks_price(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    backup.usage = {"prompt_tokens": 100, "completion_tokens": 10}
    budget = Budget(
        max_cost_usd=10.0, prices={"fake-primary": (1.0, 1.0), "fake-fallback": (5.0, 50.0)}
    )
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, budget=budget)
    inner.push(Raise(server_error()))
    response = await call(llm, "chat", mode)
    assert served_by(response) == "fallback"
    assert budget.usage().cost_usd == pytest.approx((100 * 5.0 + 10 * 50.0) / 1e6)


async def test_usage_of_the_real_openai_client_is_counted(
    openai_server: OpenAICompatServer, http_clients: HttpClients, mode: str
) -> None:
    budget = Budget(max_tokens=1000)
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), budget=budget)
    openai_server.push(
        Reply("a", usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}),
        Reply("b", usage={"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}),
    )
    await call(llm, "chat", mode)
    await call(llm, "complete", mode)
    used = budget.usage()
    assert (used.calls, used.input_tokens, used.output_tokens) == (2, 18, 8)
    assert used.estimated_calls == 0


def test_no_overspend_under_100_concurrent_threads(inner: ScriptedLLM) -> None:
    budget = Budget(max_calls=10)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    start = threading.Barrier(100)

    def one(index: int) -> str:
        start.wait(timeout=30)
        try:
            llm.chat([ChatMessage(role="user", content=f"question {index}")])
        except BudgetExceededError:
            return "refused"
        return "answered"

    with ThreadPoolExecutor(max_workers=100) as pool:
        outcomes = list(pool.map(one, range(100)))
    assert outcomes.count("answered") == 10
    assert outcomes.count("refused") == 90
    assert len(inner.calls) == 10
    assert budget.usage().calls == 10


async def test_no_overspend_under_100_concurrent_tasks(inner: ScriptedLLM) -> None:
    budget = Budget(max_calls=10)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)

    async def one(index: int) -> str:
        try:
            await llm.achat([ChatMessage(role="user", content=f"question {index}")])
        except BudgetExceededError:
            return "refused"
        return "answered"

    outcomes = await asyncio.gather(*(one(index) for index in range(100)))
    assert outcomes.count("answered") == 10
    assert outcomes.count("refused") == 90
    assert len(inner.calls) == 10
    assert budget.usage().calls == 10


# -- streams -------------------------------------------------------------------------------
async def stream(llm: Any, method: str, mode: str, text: str = "hi") -> list[Any]:
    """Every chunk of a stream through ``method``."""
    messages = [ChatMessage(role=MessageRole.USER, content=text)]
    if mode == "sync":
        if method == "stream_chat":
            return list(llm.stream_chat(messages))
        if method == "stream_complete":
            return list(llm.stream_complete(text))
        return list(llm.stream_chat_with_tools([WEATHER], user_msg=text))
    if method == "stream_chat":
        chunks = await llm.astream_chat(messages)
    elif method == "stream_complete":
        chunks = await llm.astream_complete(text)
    else:
        chunks = await llm.astream_chat_with_tools([WEATHER], user_msg=text)
    return [chunk async for chunk in chunks]


@pytest.mark.parametrize("method", ["stream_chat", "stream_complete", "stream_chat_with_tools"])
@pytest.mark.parametrize("guarded", [False, True], ids=["pass-through", "guarded"])
async def test_streams_pass_unchanged_and_their_usage_is_counted(
    method: str, mode: str, guarded: bool
) -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    alone = ScriptedLLM(model_name="fake-primary", usage=usage)
    alone.push(Stream(("one", " two", " three")))
    inner = ScriptedLLM(model_name="fake-primary", usage=usage)
    inner.push(Stream(("one", " two", " three")))
    budget = Budget(max_calls=5)
    llm = CircuitBreakerLLM(inner=inner, budget=budget, guard_streams=guarded)
    expected = await stream(alone, method, mode)
    chunks = await stream(llm, method, mode)
    assert chunks == expected  # the inner model's chunks, as they are
    used = budget.usage()
    assert (used.calls, used.input_tokens, used.output_tokens) == (1, 9, 4)


async def test_streams_are_counted_but_never_refused(inner: ScriptedLLM, mode: str) -> None:
    budget = Budget(max_calls=1)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    await call(llm, "chat", mode)
    with pytest.raises(BudgetExceededError):
        await call(llm, "chat", mode)
    chunks = await stream(llm, "stream_chat", mode)
    assert "".join(chunk.delta for chunk in chunks) == "ok"
    assert budget.usage().calls == 2


@pytest.mark.parametrize("method", ["stream_chat", "stream_complete", "stream_chat_with_tools"])
async def test_a_stream_reporting_no_usage_counts_its_estimated_input(
    inner: ScriptedLLM, method: str, mode: str
) -> None:
    budget = Budget(max_tokens=10_000)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    await stream(llm, method, mode, "z" * 80)
    used = budget.usage()
    assert used.calls == 1
    assert used.input_tokens >= 20  # the 80 characters' estimate (and the tools' schemas)
    assert used.output_tokens == 0


async def test_a_failed_stream_counts_the_call_but_no_tokens(inner: ScriptedLLM, mode: str) -> None:
    budget = Budget(max_tokens=10_000)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    inner.push(Stream(("a", " b"), fail_after=1, error=server_error()))
    with pytest.raises(Exception, match="internal error"):
        await stream(llm, "stream_chat", mode, "z" * 80)
    used = budget.usage()
    assert (used.calls, used.input_tokens, used.output_tokens) == (1, 0, 0)


def test_a_stream_closed_early_counts_once_and_closes_the_models_stream() -> None:
    closed: list[str] = []
    made: list[Iterator[ChatResponse]] = []

    class Tracked(ScriptedLLM):
        def stream_chat(self, messages: Any, **kwargs: Any) -> Any:
            chunks = super().stream_chat(messages, **kwargs)

            def tracked() -> Iterator[ChatResponse]:
                try:
                    yield from chunks
                finally:
                    closed.append("closed")

            stream = tracked()
            made.append(stream)  # kept alive: only an explicit close() closes it
            return stream

    inner = Tracked(model_name="fake-primary")
    inner.push(Stream(("a", " b", " c")))
    budget = Budget(max_calls=5)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    chunks = llm.stream_chat([ChatMessage(role="user", content="hi")])
    assert next(chunks).delta == "a"
    chunks.close()
    assert closed == ["closed"]
    assert budget.usage().calls == 1
    # It reported no usage before it was stopped: its input is estimated, and says so.
    assert budget.usage().estimated_calls == 1


async def test_running_usage_totals_are_counted_once() -> None:
    # Some providers repeat the running totals in every chunk: only increases count.
    inner = ScriptedLLM(model_name="fake-primary")
    budget = Budget(max_tokens=1000)
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    totals = [(5, 1), (5, 2), (5, 3)]

    def chunks() -> Iterator[ChatResponse]:
        for prompt, completion in totals:
            yield ChatResponse(
                message=ChatMessage(role="assistant", content="x"),
                delta="x",
                raw={"usage": {"prompt_tokens": prompt, "completion_tokens": completion}},
            )

    metered = meter_stream(chunks(), budget, llm.key or "", lambda: "x", asynchronous=False)
    passed = list(metered)
    assert len(passed) == 3
    used = budget.usage()
    assert (used.calls, used.input_tokens, used.output_tokens) == (1, 5, 3)


async def test_openai_stream_usage_is_counted(
    openai_server: OpenAICompatServer, http_clients: HttpClients, mode: str
) -> None:
    budget = Budget(max_tokens=1000)
    inner = client(
        openai_server, http_clients, additional_kwargs={"stream_options": {"include_usage": True}}
    )
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    openai_server.push(Reply("streamed words", usage={"prompt_tokens": 6, "completion_tokens": 2}))
    chunks = await stream(llm, "stream_chat", mode)
    assert "".join(chunk.delta or "" for chunk in chunks) == "streamed words"
    used = budget.usage()
    assert (used.calls, used.input_tokens, used.output_tokens) == (1, 6, 2)


# -- cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
async def test_a_hit_returns_the_full_answer_marked(
    inner: ScriptedLLM, method: str, mode: str
) -> None:
    inner.usage = {"prompt_tokens": 3, "completion_tokens": 4}
    if method == "chat_with_tools":
        inner.push(ToolCall("weather", {"city": "Oslo"}))
    else:
        inner.push(Text("the answer"))
    cache = ResponseCache()
    llm = CircuitBreakerLLM(inner=inner, cache=cache)
    first = await call(llm, method, mode, "question")
    second = await call(llm, method, mode, "question")
    assert len(inner.calls) == 1
    assert cache_status(first) is None
    assert cache_status(second) == "hit"
    assert second.additional_kwargs["callpolicy"] == {"cache": "hit"}
    assert type(second) is type(first)
    assert unmarked(second) == first
    assert second is not first
    if method == "chat_with_tools":
        assert isinstance(first, ChatResponse)
        assert isinstance(second, ChatResponse)
        assert llm.get_tool_calls_from_response(second) == llm.get_tool_calls_from_response(first)


@pytest.mark.parametrize("method", METHODS)
async def test_errors_are_never_cached(inner: ScriptedLLM, method: str, mode: str) -> None:
    cache = ResponseCache()
    llm = CircuitBreakerLLM(inner=inner, cache=cache)
    inner.push(Raise(server_error()), Text("recovered"))
    with pytest.raises(Exception, match="internal error"):
        await call(llm, method, mode)
    answer = await call(llm, method, mode)
    assert cache_status(answer) is None
    assert len(inner.calls) == 2
    assert cache.stats().errors == 1


async def test_a_hit_costs_no_budget(inner: ScriptedLLM, mode: str) -> None:
    budget = Budget(max_calls=1)
    llm = CircuitBreakerLLM(inner=inner, budget=budget, cache=ResponseCache())
    await call(llm, "chat", mode, "same")
    hit = await call(llm, "chat", mode, "same")
    assert cache_status(hit) == "hit"
    with pytest.raises(BudgetExceededError):
        await call(llm, "chat", mode, "different")
    assert budget.usage().calls == 1
    assert len(inner.calls) == 1


async def test_a_fallbacks_cached_answer_keeps_its_mark_and_its_tool_calls(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    cache = ResponseCache(cache_fallback_answers=True)  # by default it is not stored
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, cache=cache)
    inner.push(Raise(server_error()))
    backup.push(ToolCall("weather", {"city": "Lima"}))
    first = await call(llm, "chat_with_tools", mode)
    hit = await call(llm, "chat_with_tools", mode)
    assert isinstance(first, ChatResponse)
    assert isinstance(hit, ChatResponse)
    assert served_by(hit) == "fallback"
    assert cache_status(hit) == "hit"
    assert unmarked(hit) == first
    # The fallback's block-style tool calls are still parsed by the fallback.
    calls = llm.get_tool_calls_from_response(hit)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("weather", {"city": "Lima"})]
    assert (len(inner.calls), len(backup.calls)) == (1, 1)


async def test_the_key_covers_messages_blocks_tools_and_parameters(
    inner: ScriptedLLM, mode: str
) -> None:
    cache = ResponseCache()
    llm = CircuitBreakerLLM(inner=inner, cache=cache)

    async def ask_chat(*blocks: Any, **kwargs: Any) -> str | None:
        message = ChatMessage(role=MessageRole.USER, blocks=list(blocks))
        if mode == "sync":
            return cache_status(llm.chat([message], **kwargs))
        return cache_status(await llm.achat([message], **kwargs))

    text = TextBlock(text="what is in the picture?")
    cat = ImageBlock(url="https://example.com/cat.png")
    dog = ImageBlock(url="https://example.com/dog.png")
    assert await ask_chat(text, cat) is None
    assert await ask_chat(text, cat) == "hit"
    assert await ask_chat(text, dog) is None  # another block: another request
    assert await ask_chat(text, cat, temperature=0.2) is None
    assert await ask_chat(text, cat, temperature=0.2) == "hit"
    assert await ask_chat(text, cat, temperature=0.3) is None
    assert await ask_chat(text, cat, stop=["\n"]) is None

    class Opinion(BaseModel):
        verdict: str

    class Rating(BaseModel):
        verdict: int

    assert await ask_chat(text, cat, output_cls=Opinion) is None
    assert await ask_chat(text, cat, output_cls=Opinion) == "hit"
    assert await ask_chat(text, cat, output_cls=Rating) is None  # another schema
    # complete and chat of the same text are different requests.
    assert cache_status(await call(llm, "complete", mode, "what is in the picture?")) is None


async def test_a_changed_tool_schema_or_choice_misses(inner: ScriptedLLM, mode: str) -> None:
    llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache())

    def weather_in(city: str, unit: str = "C") -> str:
        return city

    def weather_described(city: str = Field(description="A city name")) -> str:
        return city

    def weather_typed(city: int) -> str:
        return str(city)

    def tool(fn: Any, description: str = "The weather in a city.") -> FunctionTool:
        # One description for all: only the schema differs (or only the description).
        return FunctionTool.from_defaults(fn=fn, name="weather", description=description)

    assert cache_status(await call(llm, "chat_with_tools", mode, tools=[tool(weather)])) is None
    assert cache_status(await call(llm, "chat_with_tools", mode, tools=[tool(weather)])) == "hit"
    for changed in (
        tool(weather_in),
        tool(weather_described),
        tool(weather_typed),
        tool(weather, "The weather in a city, tomorrow."),
    ):
        assert cache_status(await call(llm, "chat_with_tools", mode, tools=[changed])) is None
    assert cache_status(await call(llm, "chat_with_tools", mode)) is None  # WEATHER: own text
    assert cache_status(await call(llm, "chat_with_tools", mode, tool_required=True)) is None
    assert cache_status(await call(llm, "chat_with_tools", mode, tool_choice="weather")) is None
    assert (
        cache_status(await call(llm, "chat_with_tools", mode, allow_parallel_tool_calls=True))
        is None
    )
    # verbose only prints: the same request.
    assert cache_status(await call(llm, "chat_with_tools", mode, verbose=True)) == "hit"
    assert len(inner.calls) == 9


async def test_model_settings_change_the_key_but_secrets_and_transport_do_not(
    openai_server: OpenAICompatServer, http_clients: HttpClients, mode: str
) -> None:
    cache = ResponseCache()

    def wrapped(**kwargs: Any) -> CircuitBreakerLLM:
        return CircuitBreakerLLM(inner=client(openai_server, http_clients, **kwargs), cache=cache)

    assert cache_status(await call(wrapped(temperature=0.1), "chat", mode)) is None
    again = wrapped(temperature=0.1, api_key="sk-another-key", timeout=3.0, default_headers={})
    assert cache_status(await call(again, "chat", mode)) == "hit"
    assert cache_status(await call(wrapped(temperature=0.7), "chat", mode)) is None
    assert cache_status(await call(wrapped(temperature=0.1, max_tokens=5), "chat", mode)) is None
    other_model = wrapped(temperature=0.1, model="gpt-4o")
    assert cache_status(await call(other_model, "chat", mode)) is None
    assert openai_server.request_count == 4


def test_the_description_holds_no_secret(
    openai_server: OpenAICompatServer, http_clients: HttpClients
) -> None:
    inner = client(
        openai_server,
        http_clients,
        api_key="sk-very-secret",
        api_base="http://someone:pw-secret@127.0.0.1:8000/v1?api-key=query-secret",
        default_headers={"Authorization": "Bearer sk-header-secret"},
        additional_kwargs={"user": "u1"},
    )
    request = chat_request(inner, [ChatMessage(role="user", content="hi")], {"seed": 7})
    text = canonical_json(request.describe())
    for secret in ("sk-very-secret", "pw-secret", "someone", "query-secret", "sk-header"):
        assert secret not in text
    # The endpoint stays (another server may answer differently), without credentials.
    assert '"api_base":"http://127.0.0.1:8000/v1"' in text
    assert '"seed":7' in text
    assert '"user":"u1"' in text
    assert '"gpt-4o-mini"' in text


async def test_a_tool_parameter_named_like_a_secret_still_changes_the_key(
    inner: ScriptedLLM, mode: str
) -> None:
    # The key drops entries named like secrets; a tool's schema must not lose a part.
    def login(user: str, password: str) -> str:
        """Log in."""
        return user

    def login_pin(user: str, password: int) -> str:
        """Log in."""
        return user

    llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache())
    for fn, expected in ((login, None), (login, "hit"), (login_pin, None)):
        tool = FunctionTool.from_defaults(fn=fn, name="login", description="Log in.")
        assert cache_status(await call(llm, "chat_with_tools", mode, tools=[tool])) == expected


async def test_single_flight_through_the_wrapper_threads(inner: ScriptedLLM) -> None:
    backend = CountingBackend()
    llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache(backend=backend))
    release = threading.Event()
    callers = 20

    def slow(messages: Any) -> Text:
        assert release.wait(timeout=30), "never released"
        return Text("shared answer")

    inner.push(slow)

    def one() -> ChatResponse:
        return llm.chat([ChatMessage(role="user", content="same question")])

    with ThreadPoolExecutor(max_workers=callers) as pool:
        futures = [pool.submit(one) for _ in range(callers)]
        # Release the model once every caller has looked the key up and missed.
        for _ in range(3000):
            if backend.lookups >= callers:
                break
            await asyncio.sleep(0.01)
        release.set()
        answers = [future.result(timeout=30) for future in futures]
    assert len(inner.calls) == 1
    assert {answer.message.content for answer in answers} == {"shared answer"}
    statuses = sorted(str(cache_status(answer)) for answer in answers)
    assert statuses.count("None") == 1  # the leader's own answer
    assert set(statuses) - {"None"} <= {"shared", "hit"}
    assert "shared" in statuses


async def test_single_flight_through_the_wrapper_tasks(inner: ScriptedLLM) -> None:
    backend = CountingBackend()
    llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache(backend=backend))
    entered = inner.hold()
    callers = 20
    tasks = [
        asyncio.ensure_future(llm.achat([ChatMessage(role="user", content="same")]))
        for _ in range(callers)
    ]
    await asyncio.wait_for(entered.wait(), timeout=30)
    for _ in range(1000):
        if backend.lookups >= callers:
            break
        await asyncio.sleep(0)
    inner.release()
    answers = await asyncio.gather(*tasks)
    assert len(inner.calls) == 1
    statuses = [cache_status(answer) for answer in answers]
    assert statuses.count(None) == 1
    assert statuses.count("shared") == callers - 1
    assert len({id(answer) for answer in answers}) == callers  # each its own copy


async def test_a_raw_with_no_json_form_is_cached_without_it(mode: str) -> None:
    class OddRaw(ScriptedLLM):
        def _chat(self, method: str, messages: Any, kwargs: dict[str, Any]) -> ChatResponse:
            response = super()._chat(method, messages, kwargs)
            return response.model_copy(update={"raw": threading.Lock()})

    inner = OddRaw(model_name="fake-primary")
    llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache())
    first = await call(llm, "chat", mode)
    hit = await call(llm, "chat", mode)
    assert cache_status(hit) == "hit"
    assert hit.raw is None
    assert unmarked(hit) == first.model_copy(update={"raw": None})


# -- the real OpenAI client, tool calls and SQLite -------------------------------------------
async def test_sqlite_cache_survives_reopening_with_openai_tool_calls(
    openai_server: OpenAICompatServer, http_clients: HttpClients, tmp_cache: Path, mode: str
) -> None:
    openai_server.push(
        Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Paris"}}]),
    )
    with SQLiteCacheBackend(tmp_cache) as backend:
        llm = CircuitBreakerLLM(
            inner=client(openai_server, http_clients), cache=ResponseCache(backend=backend)
        )
        original = await call(llm, "chat_with_tools", mode, "weather in Paris?")
    assert openai_server.request_count == 1

    # A new process, in effect: a new backend on the same file, a new client and wrapper.
    with SQLiteCacheBackend(tmp_cache) as reopened:
        inner = client(openai_server, http_clients)
        llm = CircuitBreakerLLM(inner=inner, cache=ResponseCache(backend=reopened))
        cached = await call(llm, "chat_with_tools", mode, "weather in Paris?")
    assert openai_server.request_count == 1  # served from the file
    assert isinstance(original, ChatResponse)
    assert isinstance(cached, ChatResponse)
    assert cache_status(cached) == "hit"
    assert unmarked(cached) == original
    # The SDK objects are rebuilt: raw and the message's tool calls read as fresh ones.
    assert isinstance(cached.raw, ChatCompletion)
    [tool_call] = cached.message.additional_kwargs["tool_calls"]
    assert isinstance(tool_call, ChatCompletionMessageFunctionToolCall)
    expected = inner.get_tool_calls_from_response(original)
    assert inner.get_tool_calls_from_response(cached) == expected
    assert llm.get_tool_calls_from_response(cached) == expected
    assert [(c.tool_name, c.tool_kwargs) for c in expected] == [("weather", {"city": "Paris"})]


async def test_a_cached_tool_call_continues_the_conversation_like_the_original(
    openai_server: OpenAICompatServer, http_clients: HttpClients, mode: str
) -> None:
    cache = ResponseCache()
    llm = CircuitBreakerLLM(inner=client(openai_server, http_clients), cache=cache)
    openai_server.push(Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Rome"}}]))
    original = await call(llm, "chat_with_tools", mode, "weather in Rome?")
    cached = await call(llm, "chat_with_tools", mode, "weather in Rome?")
    assert isinstance(original, ChatResponse)
    assert isinstance(cached, ChatResponse)
    assert cache_status(cached) == "hit"
    [selection] = llm.get_tool_calls_from_response(cached)

    def follow_up(message: ChatMessage) -> list[ChatMessage]:
        return [
            ChatMessage(role="user", content="weather in Rome?"),
            message,
            ChatMessage(
                role="tool",
                content=weather(**selection.tool_kwargs),
                additional_kwargs={"tool_call_id": selection.tool_id},
            ),
        ]

    # No cache: both reach the server.
    plain = CircuitBreakerLLM(inner=client(openai_server, http_clients))
    openai_server.push(Reply("it is sunny"), Reply("it is sunny"))
    for message in (original.message, cached.message):
        if mode == "sync":
            plain.chat(follow_up(message))
        else:
            await plain.achat(follow_up(message))
    from_original, from_cached = openai_server.requests[-2:]
    assert from_cached["messages"] == from_original["messages"]
    assert from_cached["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"


async def test_a_changed_tool_schema_misses_the_sqlite_cache(
    openai_server: OpenAICompatServer, http_clients: HttpClients, tmp_cache: Path, mode: str
) -> None:
    def weather_with_unit(city: str, unit: str = "C") -> str:
        """The weather in a city."""
        return city

    changed = FunctionTool.from_defaults(fn=weather_with_unit, name="weather")
    with SQLiteCacheBackend(tmp_cache) as backend:
        llm = CircuitBreakerLLM(
            inner=client(openai_server, http_clients), cache=ResponseCache(backend=backend)
        )
        openai_server.push(
            Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Oslo"}}]),
            Reply(tool_calls=[{"name": "weather", "arguments": {"city": "Oslo", "unit": "F"}}]),
        )
        first = await call(llm, "chat_with_tools", mode, "weather?")
        second = await call(llm, "chat_with_tools", mode, "weather?", tools=[changed])
        third = await call(llm, "chat_with_tools", mode, "weather?", tools=[changed])
    assert (cache_status(first), cache_status(second), cache_status(third)) == (
        None,
        None,
        "hit",
    )
    assert openai_server.request_count == 2
    assert "unit" in openai_server.requests[1]["tools"][0]["function"]["parameters"]["properties"]


# -- odds and ends ---------------------------------------------------------------------------
async def test_a_per_call_model_without_a_price_is_refused_before_the_call(
    inner: ScriptedLLM, mode: str
) -> None:
    budget = Budget(max_cost_usd=1.0, prices={"fake-primary": (1.0, 1.0)})
    llm = CircuitBreakerLLM(inner=inner, budget=budget)
    with pytest.raises(MissingPriceError, match="'fake-other'"):
        await call(llm, "chat", mode, model="fake-other")
    assert inner.calls == []


async def test_a_stale_answer_is_served_marked_while_the_circuit_is_open(
    inner: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    now = [1_000_000.0]
    cache = ResponseCache(ttl=60, serve_stale_when_open=True, clock=lambda: now[0])
    llm = CircuitBreakerLLM(inner=inner, policy=policy, cache=cache)
    inner.push(Text("fresh then"))
    first = await call(llm, "chat", mode, "question")
    now[0] += 120  # expired
    policy.force_open(llm.key or "")
    stale = await call(llm, "chat", mode, "question")
    assert cache_status(stale) == "stale"
    assert unmarked(stale) == first
    assert len(inner.calls) == 1


@pytest.mark.parametrize("method", ["stream_chat", "stream_complete", "stream_chat_with_tools"])
async def test_a_stream_the_fallback_serves_is_counted_under_the_fallbacks_key(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, method: str, mode: str
) -> None:
    # Per key: the fallback's stream, its usage and (with no usage) its estimate all
    # belong to the fallback's key, none to the primary whose circuit refused it.
    budget = Budget(max_tokens=10_000, per_key=True)
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy, budget=budget)
    policy.force_open(llm.key_for())
    backup.push(Stream(("from", " backup")))
    chunks = await stream(llm, method, mode, "z" * 80)
    assert served_by(chunks[0]) == "fallback"
    assert inner.calls == []
    assert llm.fallback_key is not None
    usages = budget.usages()
    assert set(usages) == {llm.fallback_key}, usages
    used = usages[llm.fallback_key]
    assert used.calls == 1
    assert used.input_tokens >= 20  # the 80 characters' estimate
