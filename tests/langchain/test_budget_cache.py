"""``budget=`` and ``cache=`` on the LangChain wrapper (issue 5, LangChain half).

The engine applies them (cache -> budget -> fallback -> retry -> breaker -> model); these
tests check what the wrapper hands it: a budget checked before every call (refused before
the model), usage read from ``usage_metadata``, streams metered chunk by chunk without
being touched; a cache key that covers everything that changes the answer, a hit that is
the full answer marked in its metadata, single flight, a SQLite cache that survives
reopening, and the LangChain code paths (``generate``, ``batch``, ``stream``, bound copies,
structured output) that must not trip on a cache that is not LangChain's.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import FakeListChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ValidationError

from callpolicy import (
    Budget,
    BudgetExceededError,
    CallPolicy,
    CircuitOpenError,
    IncompleteStreamError,
    MissingPriceError,
    ResponseCache,
    SQLiteCacheBackend,
)
from langchain_breaker import META_CACHE, CircuitBreakerChatModel
from tests.langchain.fakes import (
    FixedChunksChatModel,
    ScriptedChatModel,
    ServerError,
    SlowChatModel,
    tool_call_message,
)
from tests.support.clock import FakeClock
from tests.support.openai_server import OpenAICompatServer, Reply

MARK = "callpolicy_cache"
assert MARK == META_CACHE


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool("add")
def add_strings(a: int, b: str) -> int:
    """Add two integers."""
    return a + len(b)


@tool("login")
def login(user: str, password: str) -> str:
    """Log in."""
    return user


@tool("login")
def login_by_pin(user: str, password: int) -> str:
    """Log in."""
    return user


@tool("add")
def add_again(a: int, b: int) -> int:
    """Add two integers."""
    return b + a


class Person(BaseModel):
    """A person."""

    name: str
    age: int


class Pet(BaseModel):
    """A pet."""

    name: str
    legs: int


async def call(runnable: Any, mode: str, input: Any = "hi", **kwargs: Any) -> Any:
    if mode == "sync":
        return runnable.invoke(input, **kwargs)
    return await runnable.ainvoke(input, **kwargs)


async def stream(runnable: Any, mode: str, input: Any = "hi", **kwargs: Any) -> list[Any]:
    if mode == "sync":
        return list(runnable.stream(input, **kwargs))
    return [chunk async for chunk in runnable.astream(input, **kwargs)]


def guarded(inner: Any | None = None, **options: Any) -> CircuitBreakerChatModel:
    return CircuitBreakerChatModel(inner=inner or ScriptedChatModel(), **options)


def scripted(model: CircuitBreakerChatModel) -> ScriptedChatModel:
    assert isinstance(model.inner, ScriptedChatModel)
    return model.inner


def budget_of(model: CircuitBreakerChatModel) -> Budget:
    assert model.budget is not None
    return model.budget


def unmarked(message: AIMessage) -> AIMessage:
    metadata = dict(message.response_metadata)
    metadata.pop(MARK, None)
    return message.model_copy(update={"response_metadata": metadata})


# -- construction: bad input refused, clearly ---------------------------------------------


def test_a_cost_budget_without_the_inner_models_price_fails_at_construction() -> None:
    budget = Budget(max_cost_usd=5.0, prices={"gpt-4o": (2.5, 10.0)})
    with pytest.raises(MissingPriceError, match="no price for model 'm1'") as caught:
        guarded(budget=budget)
    assert caught.value.key == "acme::m1"


def test_a_cost_budget_without_the_fallbacks_price_fails_at_construction() -> None:
    budget = Budget(max_cost_usd=5.0, prices={"m1": (1.0, 2.0)})
    backup = ScriptedChatModel(provider="other", model_name="b1")
    with pytest.raises(MissingPriceError, match="no price for model 'b1'"):
        guarded(fallback=backup, budget=budget)


def test_a_cost_budget_pricing_both_models_by_name_or_key_is_accepted() -> None:
    budget = Budget(max_cost_usd=5.0, prices={"acme::m1": (1.0, 2.0), "b1": (3.0, 4.0)})
    backup = ScriptedChatModel(provider="other", model_name="b1")
    model = guarded(fallback=backup, budget=budget)
    assert model.budget is budget


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"max_calls": -1}, "max_calls"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_cost_usd": -5.0, "prices": {"m1": (1, 1)}}, "max_cost_usd"),
        ({"window": -60}, "window"),
        ({"max_calls": True}, "max_calls"),
        ({"prices": {"m1": (-1.0, 2.0)}}, "input_per_million"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(limits: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        guarded(budget=Budget(**limits))


def test_a_cost_limit_without_a_price_table_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_cost_usd needs prices"):
        Budget(max_cost_usd=5.0)


@pytest.mark.parametrize("value", ["1000 calls", 1000, {"max_calls": 10}])
def test_a_budget_that_is_not_a_budget_is_refused_naming_it(value: Any) -> None:
    with pytest.raises(TypeError, match=r"budget: expected a callpolicy\.Budget"):
        guarded(budget=value)


@pytest.mark.parametrize(
    ("value", "said"),
    [(InMemoryCache(), "a LangChain InMemoryCache"), (True, "LangChain's global cache")],
)
def test_a_langchain_cache_is_refused_pointing_at_the_inner_model(value: Any, said: str) -> None:
    with pytest.raises(TypeError, match="cache: got") as caught:
        guarded(cache=value)
    message = str(caught.value)
    assert said in message
    assert "ResponseCache" in message
    assert "inner=ChatOpenAI(..., cache=InMemoryCache())" in message


def test_a_cache_of_another_kind_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"cache: expected a callpolicy\.ResponseCache"):
        guarded(cache={"ttl": 60})


async def test_cache_false_or_none_means_no_cache(mode: str) -> None:
    for value in (False, None):
        model = guarded(cache=value)
        await call(model, mode)
        await call(model, mode)
        assert scripted(model).calls == 2


@pytest.mark.parametrize("field", ["budget", "cache"])
def test_budget_and_cache_are_fixed_at_construction(field: str) -> None:
    model = guarded()
    with pytest.raises(AttributeError, match=f"{field}: fixed at construction"):
        setattr(model, field, Budget(max_calls=1) if field == "budget" else ResponseCache())


def test_a_deep_copy_shares_the_budget_and_the_cache() -> None:
    model = guarded(budget=Budget(max_calls=2), cache=ResponseCache())
    copied = copy.deepcopy(model)
    assert copied.budget is model.budget
    assert copied.cache is model.cache
    copied.invoke("hi")
    assert budget_of(model).usage().calls == 1
    assert model.invoke("hi").response_metadata[MARK] == "hit"
    structured = copy.deepcopy(model.with_structured_output(Person))
    scripted(model).push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    model.with_structured_output(Person).invoke("who?")
    assert structured.invoke("who?") == Person(name="Ada", age=36)
    assert budget_of(model).usage().calls == 2


# -- the budget ---------------------------------------------------------------------------


async def test_a_call_past_the_budget_is_refused_before_the_model(mode: str) -> None:
    model = guarded(budget=Budget(max_calls=2))
    assert (await call(model, mode, "one")).content == "ok"
    assert (await call(model, mode, "two")).content == "ok"
    with pytest.raises(BudgetExceededError) as refused:
        await call(model, mode, "three")
    assert refused.value.kind == "calls"
    assert refused.value.key == "acme::m1"
    assert scripted(model).calls == 2


async def test_a_prompt_whose_estimate_passes_the_token_limit_is_refused(mode: str) -> None:
    model = guarded(budget=Budget(max_tokens=10))
    with pytest.raises(BudgetExceededError) as refused:
        await call(model, mode, "x" * 60)  # ~15 tokens (UTF-8 bytes / 4)
    assert refused.value.kind == "tokens"
    assert refused.value.requested == 15
    assert scripted(model).calls == 0


async def test_usage_comes_from_the_answers_usage_metadata(mode: str) -> None:
    model = guarded(budget=Budget(max_tokens=1000))
    for text in ("one", "two"):
        await call(model, mode, text)
    usage = budget_of(model).usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (2, 6, 4)
    assert usage.estimated_calls == 0
    assert usage.in_flight == 0


async def test_a_call_whose_usage_is_unknown_counts_by_its_estimate_and_says_so(
    mode: str,
) -> None:
    model = guarded(FakeListChatModel(responses=["no usage here"]), budget=Budget(max_calls=5))
    await call(model, mode, "y" * 40)
    usage = budget_of(model).usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (1, 10, 0)
    assert usage.estimated_calls == 1


async def test_cost_is_priced_from_the_table(mode: str) -> None:
    budget = Budget(max_cost_usd=1.0, prices={"m1": (1.0, 2.0)})  # USD per million
    model = guarded(budget=budget)
    await call(model, mode, "one")
    await call(model, mode, "two")
    # 3 input tokens at $1/M and 2 output tokens at $2/M, twice.
    assert budget.usage().cost_usd == pytest.approx(2 * (3 * 1.0 + 2 * 2.0) / 1e6)


async def test_an_answer_of_the_fallback_is_priced_at_the_fallbacks_price(mode: str) -> None:
    budget = Budget(max_cost_usd=1.0, prices={"m1": (1.0, 1.0), "b1": (10.0, 10.0)})
    inner = ScriptedChatModel(script=[ServerError("500")])
    backup = ScriptedChatModel(provider="other", model_name="b1", default="backup")
    model = guarded(inner, fallback=backup, budget=budget)
    assert (await call(model, mode)).content == "backup"
    assert budget.usage().calls == 1
    assert budget.usage().cost_usd == pytest.approx((3 + 2) * 10.0 / 1e6)


async def test_a_per_call_model_without_a_price_is_refused_before_the_model(mode: str) -> None:
    model = guarded(budget=Budget(max_cost_usd=1.0, prices={"m1": (1.0, 1.0)}))
    with pytest.raises(MissingPriceError, match="'m2'"):
        await call(model, mode, model="m2")
    assert scripted(model).calls == 0


async def test_bound_copies_and_structured_output_share_the_budget(mode: str) -> None:
    budget = Budget(max_calls=3)
    model = guarded(budget=budget)
    inner = scripted(model)
    inner.push("plain", tool_call_message("add", {"a": 1, "b": 2}))
    inner.push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    await call(model, mode, "one")
    await call(model.bind_tools([add]), mode, "two")
    assert await call(model.with_structured_output(Person), mode, "three") == Person(
        name="Ada", age=36
    )
    assert budget.usage().calls == 3
    with pytest.raises(BudgetExceededError):
        await call(model.bind_tools([add]), mode, "four")
    with pytest.raises(BudgetExceededError):
        await call(model.with_structured_output(Person), mode, "five")
    assert inner.calls == 3


def test_no_overspend_under_100_threads_through_batch() -> None:
    model = guarded(SlowChatModel(delay=0.05), budget=Budget(max_calls=10))
    inputs: list[LanguageModelInput] = [f"question {i}" for i in range(100)]
    results = model.batch(inputs, config={"max_concurrency": 100}, return_exceptions=True)
    answered = [r for r in results if isinstance(r, AIMessage)]
    refused = [r for r in results if isinstance(r, BudgetExceededError)]
    assert (len(answered), len(refused)) == (10, 90)
    assert scripted(model).calls == 10
    usage = budget_of(model).usage()
    assert (usage.calls, usage.in_flight) == (10, 0)


async def test_no_overspend_under_100_tasks_through_gather_and_abatch() -> None:
    budget = Budget(max_calls=10, max_tokens=1_000_000)
    model = guarded(SlowChatModel(delay=0.05), budget=budget)
    gathered = await asyncio.gather(
        *(model.ainvoke(f"question {i}") for i in range(100)), return_exceptions=True
    )
    assert sum(isinstance(r, AIMessage) for r in gathered) == 10
    assert sum(isinstance(r, BudgetExceededError) for r in gathered) == 90
    budget.reset()
    batched = await model.abatch(
        [f"again {i}" for i in range(100)],
        config={"max_concurrency": 100},
        return_exceptions=True,
    )
    assert sum(isinstance(r, AIMessage) for r in batched) == 10
    assert scripted(model).calls == 20
    assert budget.usage().calls == 10


# -- the budget on streams: counted as the chunks pass, never altered ----------------------


def chunks_with_usage() -> list[AIMessageChunk]:
    return [
        AIMessageChunk(
            content="Hello",
            usage_metadata={"input_tokens": 7, "output_tokens": 0, "total_tokens": 7},
        ),
        AIMessageChunk(content=" there"),
        AIMessageChunk(
            content="!",
            usage_metadata={"input_tokens": 0, "output_tokens": 4, "total_tokens": 4},
            response_metadata={"finish_reason": "stop"},
        ),
    ]


async def test_a_stream_passes_the_very_same_chunks_and_counts_their_usage(mode: str) -> None:
    inner = FixedChunksChatModel()
    given = chunks_with_usage()
    inner.set_chunks(given)
    model = guarded(inner, budget=Budget(max_calls=5))
    received = await stream(model, mode)
    assert len(received) == len(given)
    assert all(got is sent for got, sent in zip(received, given, strict=True))
    usage = budget_of(model).usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (1, 7, 4)


async def test_a_stream_without_usage_counts_as_one_call_by_its_estimate(mode: str) -> None:
    model = guarded(FakeListChatModel(responses=["streamed"]), budget=Budget(max_calls=5))
    received = await stream(model, mode, "z" * 40)
    assert "".join(str(c.content) for c in received) == "streamed"
    usage = budget_of(model).usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (1, 10, 0)


async def test_a_scripted_stream_counts_the_usage_of_its_last_chunk(mode: str) -> None:
    model = guarded(budget=Budget(max_calls=5))
    scripted(model).push("three words here")
    received = await stream(model, mode)
    assert "".join(str(c.content) for c in received) == "three words here"
    usage = budget_of(model).usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (1, 3, 2)


async def test_a_stream_never_started_counts_nothing(mode: str) -> None:
    model = guarded(budget=Budget(max_calls=5))
    if mode == "sync":
        model.stream("hi")
    else:
        model.astream("hi")
    assert budget_of(model).usage().calls == 0
    assert scripted(model).calls == 0


async def test_a_stream_failing_at_once_counts_one_call_and_no_tokens(mode: str) -> None:
    model = guarded(budget=Budget(max_calls=5))
    scripted(model).push(ServerError("500"))
    with pytest.raises(ServerError):
        await stream(model, mode, "w" * 40)
    usage = budget_of(model).usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (1, 0, 0)


async def test_a_stream_is_not_refused_by_a_spent_budget(mode: str) -> None:
    # Streams are metered (Budget.record), never refused: the documented contract.
    model = guarded(budget=Budget(max_calls=1))
    await call(model, mode)
    with pytest.raises(BudgetExceededError):
        await call(model, mode, "again")
    received = await stream(model, mode)
    assert "".join(str(c.content) for c in received) == "ok"
    assert budget_of(model).usage().calls == 2


async def test_a_stream_the_fallback_serves_is_counted_under_the_fallbacks_key(mode: str) -> None:
    backup = ScriptedChatModel(provider="other")
    model = guarded(fallback=backup, budget=Budget(max_calls=5, per_key=True))
    scripted(model).push(ServerError("500"))
    backup.push("from the backup")
    received = await stream(model, mode)
    assert "".join(str(c.content) for c in received) == "from the backup"
    budget = budget_of(model)
    assert model.fallback_key is not None
    assert budget.usage(model.fallback_key).calls == 1
    assert budget.usage(model.key_for()).calls == 0


async def test_a_stream_cut_short_is_settled_with_what_it_reported(mode: str) -> None:
    inner = FixedChunksChatModel()
    given = chunks_with_usage()[:2]  # no end marker, and only the input's usage
    inner.set_chunks(given)
    model = guarded(
        inner,
        budget=Budget(max_calls=5),
        stream_finished=lambda chunk: bool(chunk.response_metadata.get("finish_reason")),
    )
    with pytest.raises(IncompleteStreamError):
        await stream(model, mode)
    usage = budget_of(model).usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (1, 7, 0)


# -- the cache: a hit is the full answer, marked -------------------------------------------


async def test_a_hit_returns_the_full_answer_marked_as_a_hit(mode: str) -> None:
    cache = ResponseCache()
    model = guarded(cache=cache)
    original = AIMessage(
        content=[{"type": "text", "text": "Let me add."}],
        tool_calls=[{"name": "add", "args": {"a": 1, "b": [2, 3]}, "id": "call_9"}],
        usage_metadata={
            "input_tokens": 11,
            "output_tokens": 5,
            "total_tokens": 16,
            "input_token_details": {"cache_read": 4},
        },
        response_metadata={"model_name": "m1", "finish_reason": "tool_calls"},
        id="run-123",
    )
    scripted(model).push(original)
    bound = model.bind_tools([add])
    first = await call(bound, mode, "add 1 and 2")
    second = await call(bound, mode, "add 1 and 2")
    assert scripted(model).calls == 1
    assert MARK not in first.response_metadata
    assert second.response_metadata[MARK] == "hit"
    assert isinstance(second, AIMessage)
    assert second.tool_calls == first.tool_calls == original.tool_calls
    assert second.content == first.content
    assert second.usage_metadata == first.usage_metadata
    assert second.id == first.id
    assert unmarked(second) == first
    assert cache.stats().hits == 1


async def test_each_hit_is_a_fresh_copy(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    await call(model, mode)
    one = await call(model, mode)
    two = await call(model, mode)
    assert one == two
    assert one is not two
    one.response_metadata["edited"] = True
    assert "edited" not in (await call(model, mode)).response_metadata


async def test_a_hit_costs_no_budget(mode: str) -> None:
    model = guarded(cache=ResponseCache(), budget=Budget(max_calls=1))
    await call(model, mode, "cached")
    assert (await call(model, mode, "cached")).response_metadata[MARK] == "hit"
    with pytest.raises(BudgetExceededError):
        await call(model, mode, "another question")
    assert budget_of(model).usage().calls == 1


async def test_errors_are_never_cached(mode: str) -> None:
    cache = ResponseCache()
    model = guarded(cache=cache)
    scripted(model).push(ServerError("500"))
    with pytest.raises(ServerError):
        await call(model, mode)
    assert (await call(model, mode)).content == "ok"
    assert scripted(model).calls == 2
    assert cache.stats().errors == 1


Call = Callable[[CircuitBreakerChatModel], tuple[Any, Any, dict[str, Any]]]


def plain(model: CircuitBreakerChatModel) -> tuple[Any, Any, dict[str, Any]]:
    return model, "hi", {}


def with_tools(model: CircuitBreakerChatModel) -> tuple[Any, Any, dict[str, Any]]:
    return model.bind_tools([add]), "hi", {}


# Each: a call, and the same call with one thing changed (which must miss).
VARIATIONS: dict[str, tuple[Call, Call]] = {
    "other text": (plain, lambda m: (m, "hi!", {})),
    "another content block": (
        plain,
        lambda m: (
            m,
            [
                HumanMessage(
                    content=[
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    ]
                )
            ],
            {},
        ),
    ),
    "a system message": (plain, lambda m: (m, [SystemMessage("be brief"), HumanMessage("hi")], {})),
    "stop": (plain, lambda m: (m, "hi", {"stop": ["\n"]})),
    "temperature": (plain, lambda m: (m, "hi", {"temperature": 0.9})),
    "max_tokens": (plain, lambda m: (m, "hi", {"max_tokens": 12})),
    "per-call model": (plain, lambda m: (m, "hi", {"model": "m2"})),
    "bound parameters": (plain, lambda m: (m.bind(temperature=0.1), "hi", {})),
    "bound tools": (plain, with_tools),
    "tool_choice": (with_tools, lambda m: (m.bind_tools([add], tool_choice="add"), "hi", {})),
    "parallel_tool_calls": (
        with_tools,
        lambda m: (m.bind_tools([add], parallel_tool_calls=False), "hi", {}),
    ),
    "response_format": (plain, lambda m: (m.bind(response_format=Person), "hi", {})),
    "response_format schema": (
        lambda m: (m.bind(response_format=Person), "hi", {}),
        lambda m: (m.bind(response_format=Pet), "hi", {}),
    ),
}


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
async def test_the_key_covers_what_changes_the_answer(mode: str, variation: str) -> None:
    model = guarded(cache=ResponseCache())
    base, varied = VARIATIONS[variation]
    runnable, input, kwargs = base(model)
    await call(runnable, mode, input, **kwargs)
    runnable, input, kwargs = varied(model)
    answer = await call(runnable, mode, input, **kwargs)
    assert MARK not in answer.response_metadata
    assert scripted(model).calls == 2
    again = await call(runnable, mode, input, **kwargs)  # the control: the same call hits
    assert again.response_metadata[MARK] == "hit"
    assert scripted(model).calls == 2


async def test_a_changed_tool_schema_misses_and_an_equal_one_hits(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    await call(model.bind_tools([add]), mode, "add")
    assert (await call(model.bind_tools([add_again]), mode, "add")).response_metadata[MARK] == "hit"
    changed = await call(model.bind_tools([add_strings]), mode, "add")
    assert MARK not in changed.response_metadata
    assert scripted(model).calls == 2


async def test_secrets_never_change_the_key(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    await call(model, mode, "hi", api_key="sk-one", extra_headers={"Authorization": "Bearer a"})
    again = await call(
        model, mode, "hi", api_key="sk-two", extra_headers={"Authorization": "Bearer b"}
    )
    assert again.response_metadata[MARK] == "hit"
    assert scripted(model).calls == 1


async def test_a_tool_parameter_named_like_a_secret_is_still_in_the_key(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    await call(model.bind_tools([login]), mode, "log me in")
    changed = await call(model.bind_tools([login_by_pin]), mode, "log me in")
    assert MARK not in changed.response_metadata
    assert scripted(model).calls == 2


async def test_message_ids_do_not_change_the_key(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    await call(model, mode, [HumanMessage("hi", id="first-run")])
    again = await call(model, mode, [HumanMessage("hi", id="second-run")])
    assert again.response_metadata[MARK] == "hit"


async def test_bound_copies_share_the_cache(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    await call(model.bind_tools([add]), mode, "hi")
    assert (await call(model.bind_tools([add]), mode, "hi")).response_metadata[MARK] == "hit"
    assert scripted(model).calls == 1


async def test_a_fallback_answer_is_cached_under_the_request_when_asked(mode: str) -> None:
    backup = ScriptedChatModel(provider="other", model_name="b1", default="backup")
    cache = ResponseCache(cache_fallback_answers=True)  # by default it is not stored
    model = guarded(ScriptedChatModel(script=[ServerError("500")]), fallback=backup, cache=cache)
    assert (await call(model, mode)).content == "backup"
    hit = await call(model, mode)
    assert (hit.content, hit.response_metadata[MARK]) == ("backup", "hit")
    assert (scripted(model).calls, backup.calls) == (1, 1)


# -- single flight through the wrapper -----------------------------------------------------


async def test_concurrent_identical_calls_make_one_model_call_on_a_loop() -> None:
    model = guarded(SlowChatModel(delay=0.2), cache=ResponseCache())
    answers = await asyncio.gather(*(model.ainvoke("same question") for _ in range(20)))
    assert scripted(model).calls == 1
    statuses = [a.response_metadata.get(MARK, "miss") for a in answers]
    assert statuses.count("miss") == 1
    assert "shared" in statuses
    assert {a.content for a in answers} == {"ok"}


def test_concurrent_identical_calls_make_one_model_call_across_threads() -> None:
    model = guarded(SlowChatModel(delay=0.2), cache=ResponseCache())
    answers = model.batch(["same question"] * 20, config={"max_concurrency": 20})
    assert scripted(model).calls == 1
    statuses = [a.response_metadata.get(MARK, "miss") for a in answers]
    assert statuses.count("miss") == 1
    assert set(statuses) <= {"miss", "shared", "hit"}


# -- stale answers (off by default) --------------------------------------------------------


async def test_an_open_circuit_serves_a_stale_answer_only_when_asked(mode: str) -> None:
    wall = FakeClock(1_000_000.0)
    for serve_stale in (False, True):
        policy = CallPolicy()
        cache = ResponseCache(ttl=60, serve_stale_when_open=serve_stale, clock=wall)
        model = guarded(policy=policy, cache=cache)
        await call(model, mode, "weather?")
        wall.advance(120)  # expired
        policy.force_open(model.key_for())
        if not serve_stale:
            with pytest.raises(CircuitOpenError):
                await call(model, mode, "weather?")
            continue
        stale = await call(model, mode, "weather?")
        assert (stale.content, stale.response_metadata[MARK]) == ("ok", "stale")
        assert scripted(model).calls == 1


# -- LangChain's other paths: generate(), stream, structured output -----------------------


async def test_the_legacy_generate_path_uses_the_response_cache(mode: str) -> None:
    model = guarded(cache=ResponseCache(), budget=Budget(max_calls=5))
    messages: list[list[BaseMessage]] = [[HumanMessage("hi")]]
    if mode == "sync":
        first, second = model.generate(messages), model.generate(messages)
    else:
        first, second = await model.agenerate(messages), await model.agenerate(messages)
    one, two = first.generations[0][0], second.generations[0][0]
    assert isinstance(two, ChatGeneration)
    assert two.message.response_metadata[MARK] == "hit"
    assert two.text == one.text == "ok"
    assert scripted(model).calls == 1
    assert budget_of(model).usage().calls == 1
    # An entry written by invoke serves generate(), and the other way round.
    assert (await call(model, mode, "hi")).response_metadata[MARK] == "hit"


async def test_generate_with_a_global_langchain_cache_uses_only_the_response_cache(
    mode: str,
) -> None:
    model = guarded(ScriptedChatModel(cache=False), cache=ResponseCache())
    set_llm_cache(InMemoryCache())
    try:
        messages: list[list[BaseMessage]] = [[HumanMessage("hi")]]
        if mode == "sync":
            model.generate(messages)
            again = model.generate(messages)
        else:
            await model.agenerate(messages)
            again = await model.agenerate(messages)
    finally:
        set_llm_cache(None)
    generation = again.generations[0][0]
    assert isinstance(generation, ChatGeneration)
    assert generation.message.response_metadata[MARK] == "hit"
    assert scripted(model).calls == 1


async def test_a_stream_is_the_inner_models_own_even_with_a_cache(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    await call(model, mode)
    received = await stream(model, mode)
    assert "".join(str(c.content) for c in received) == "ok"
    assert all(MARK not in c.response_metadata for c in received)
    assert scripted(model).calls == 2


async def test_a_model_with_streaming_disabled_streams_through_the_cache(mode: str) -> None:
    model = guarded(cache=ResponseCache(), disable_streaming=True)
    await call(model, mode)
    received = await stream(model, mode)
    assert [c.response_metadata[MARK] for c in received] == ["hit"]
    assert scripted(model).calls == 1


async def test_structured_output_is_cached_as_the_parsed_object(mode: str) -> None:
    model = guarded(cache=ResponseCache(), budget=Budget(max_calls=5))
    scripted(model).push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    structured = model.with_structured_output(Person)
    first = await call(structured, mode, "who?")
    second = await call(model.with_structured_output(Person), mode, "who?")
    assert first == second == Person(name="Ada", age=36)
    assert first is not second
    assert scripted(model).calls == 1
    assert budget_of(model).usage().calls == 1


async def test_structured_output_with_raw_is_cached_and_marked(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    scripted(model).push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    structured = model.with_structured_output(Person, include_raw=True)
    first = await call(structured, mode, "who?")
    second = await call(structured, mode, "who?")
    assert second["parsed"] == first["parsed"] == Person(name="Ada", age=36)
    assert second["parsing_error"] is None
    assert second["raw"].response_metadata[MARK] == "hit"
    assert unmarked(second["raw"]) == first["raw"]
    assert scripted(model).calls == 1


async def test_a_changed_output_schema_misses(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    inner = scripted(model)
    inner.push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    inner.push(tool_call_message("Pet", {"name": "Rex", "legs": 4}))
    assert await call(model.with_structured_output(Person), mode, "who?") == Person(
        name="Ada", age=36
    )
    assert await call(model.with_structured_output(Pet), mode, "who?") == Pet(name="Rex", legs=4)
    assert inner.calls == 2


async def test_an_answer_that_failed_to_parse_is_not_cached(mode: str) -> None:
    model = guarded(cache=ResponseCache())
    inner = scripted(model)
    inner.push(tool_call_message("Person", {"name": "no age"}))
    inner.push(tool_call_message("Person", {"name": "Ada", "age": 36}))
    structured = model.with_structured_output(Person, include_raw=True)
    failed = await call(structured, mode, "who?")
    assert failed["parsing_error"] is not None
    fixed = await call(structured, mode, "who?")
    assert fixed["parsed"] == Person(name="Ada", age=36)
    assert inner.calls == 2


# -- a real provider client, and a cache in a file -----------------------------------------


@tool
def get_weather(city: str, days: int) -> str:
    """The forecast for a city."""
    return f"sunny in {city} for {days} days"


@tool("get_weather")
def get_weather_by_zip(city: str, days: int, zip_code: str) -> str:
    """The forecast for a city."""
    return f"sunny in {city} {zip_code} for {days} days"


def everything_in(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in folder.iterdir())


def openai_model(
    server: OpenAICompatServer, backend: SQLiteCacheBackend, api_key: str
) -> CircuitBreakerChatModel:
    inner = ChatOpenAI(
        model="gpt-4o-mini", base_url=server.base_url, api_key=api_key, max_retries=0, timeout=2
    )
    return CircuitBreakerChatModel(inner=inner, cache=ResponseCache(backend=backend))


async def test_a_tool_calling_answer_from_sqlite_survives_reopening_and_equals_the_original(
    openai_server: OpenAICompatServer, tmp_path: Path, mode: str
) -> None:
    path = tmp_path / "llm-cache.sqlite"
    openai_server.push(
        Reply(
            tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}],
            usage={"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49},
        )
    )
    question = "Weather in Paris for 3 days?"
    backend = SQLiteCacheBackend(path)
    try:
        first = await call(
            openai_model(openai_server, backend, "sk-first").bind_tools([get_weather]),
            mode,
            question,
        )
    finally:
        backend.close()
    assert first.tool_calls[0]["args"] == {"city": "Paris", "days": 3}
    assert first.usage_metadata is not None
    assert first.usage_metadata["input_tokens"] == 42

    reopened = SQLiteCacheBackend(path)
    try:
        # Another process, another API key: the key never depends on who pays.
        model = openai_model(openai_server, reopened, "sk-second")
        second = await call(model.bind_tools([get_weather]), mode, question)
        assert openai_server.request_count == 1
        assert second.tool_calls == first.tool_calls
        assert second.content == first.content
        assert second.usage_metadata == first.usage_metadata
        assert second.id == first.id
        metadata = dict(second.response_metadata)
        assert metadata.pop(MARK) == "hit"
        assert metadata == first.response_metadata
        assert unmarked(second) == first

        # A tool of the same name with another schema is another request.
        openai_server.push(Reply("no tools needed"))
        changed = await call(model.bind_tools([get_weather_by_zip]), mode, question)
        assert changed.content == "no tools needed"
        assert openai_server.request_count == 2
        sent = openai_server.requests[-1]["tools"][0]["function"]["parameters"]["properties"]
        assert "zip_code" in sent
    finally:
        reopened.close()
    stored = everything_in(tmp_path)
    assert b"sk-first" not in stored
    assert b"sk-second" not in stored
