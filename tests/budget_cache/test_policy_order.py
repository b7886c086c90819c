"""The outer policies through ``CallPolicy.execute``: cache -> budget -> fallback -> retry ->
breaker -> model, sync and async."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from callpolicy import (
    Budget,
    BudgetExceededError,
    CallPolicy,
    CallRequest,
    CircuitOpenError,
    Event,
    EventKind,
    ResponseCache,
)
from tests.support.clock import FakeClock

KEY = "acme::m1"
FALLBACK_KEY = "backup::m2"


def _request(text: str = "hello", **params: Any) -> CallRequest[dict[str, Any]]:
    return CallRequest(
        describe=lambda: {"messages": [text], **params},
        input_text=lambda: text,
        encode=lambda result: result,
        decode=lambda payload: payload,
        mark=lambda result, status: {**result, "cache": status},
        usage=lambda result: result.get("usage"),
    )


class Model:
    def __init__(self, name: str = "primary", *, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("connection refused")
        return {"text": self.name, "usage": {"input_tokens": 10, "output_tokens": 5}}

    async def acall(self) -> dict[str, Any]:
        return self()


def test_a_cache_hit_costs_no_budget_and_reaches_no_model() -> None:
    policy, model = CallPolicy(), Model()
    budget, cache = Budget(max_calls=10), ResponseCache()
    first = policy.execute(KEY, model, budget=budget, cache=cache, request=_request())
    second = policy.execute(KEY, model, budget=budget, cache=cache, request=_request())
    assert first == {"text": "primary", "usage": {"input_tokens": 10, "output_tokens": 5}}
    assert second == {**first, "cache": "hit"}
    assert model.calls == 1
    assert budget.usage().calls == 1
    assert budget.usage().input_tokens == 10


def test_a_different_request_or_key_misses() -> None:
    policy, model, cache = CallPolicy(), Model(), ResponseCache()
    policy.execute(KEY, model, cache=cache, request=_request(temperature=0))
    policy.execute(KEY, model, cache=cache, request=_request(temperature=1))
    policy.execute("acme::other", model, cache=cache, request=_request(temperature=0))
    assert model.calls == 3


def test_the_budget_refuses_before_the_model_and_before_the_fallback() -> None:
    policy, model, fallback = CallPolicy(), Model(), Model("fallback")
    budget = Budget(max_calls=1)
    seen: list[Event] = []
    policy.add_listener(seen.append)
    policy.execute(KEY, model, fallback=fallback, budget=budget, request=_request())
    with pytest.raises(BudgetExceededError) as refused:
        policy.execute(KEY, model, fallback=fallback, budget=budget, request=_request())
    assert (refused.value.kind, refused.value.consumed, refused.value.limit) == ("calls", 1, 1)
    assert (model.calls, fallback.calls) == (1, 0)
    assert [e.kind for e in seen] == [EventKind.BUDGET_REFUSED]


def test_a_call_the_fallback_answered_is_charged_to_the_fallback() -> None:
    policy = CallPolicy(failure_threshold=1)
    primary, fallback = Model(fail=True), Model("fallback")
    budget = Budget(max_calls=10, per_key=True)
    answer = policy.execute(
        KEY,
        primary,
        fallback=fallback,
        fallback_key=FALLBACK_KEY,
        budget=budget,
        request=_request(),
    )
    assert answer["text"] == "fallback"
    assert budget.usage(KEY).calls == 1  # the call was made under the primary's key
    assert budget.usage(KEY).output_tokens == 5


def test_an_open_circuit_without_fallback_refunds_the_call() -> None:
    policy, model = CallPolicy(), Model()
    budget = Budget(max_calls=1)
    policy.force_open(KEY)
    with pytest.raises(CircuitOpenError):
        policy.execute(KEY, model, budget=budget, request=_request())
    assert budget.usage().calls == 0
    policy.reset(KEY)
    assert policy.execute(KEY, model, budget=budget, request=_request())["text"] == "primary"


def test_a_failed_call_still_counts_but_holds_no_tokens() -> None:
    policy, model = CallPolicy(), Model(fail=True)
    budget = Budget(max_calls=5, max_tokens=1_000)
    with pytest.raises(ConnectionError):
        policy.execute(KEY, model, budget=budget, request=_request("x" * 400))
    assert budget.usage().calls == 1
    assert budget.usage().tokens == 0


def test_errors_are_never_cached() -> None:
    policy, cache = CallPolicy(), ResponseCache()
    model = Model(fail=True)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            policy.execute(KEY, model, cache=cache, request=_request())
    assert model.calls == 2


def test_a_stale_answer_is_served_when_the_circuit_is_open_and_there_is_no_fallback() -> None:
    clock = FakeClock(1_000.0)
    policy, model = CallPolicy(), Model()
    cache = ResponseCache(ttl=60, serve_stale_when_open=True, clock=clock)
    policy.execute(KEY, model, cache=cache, request=_request())
    clock.advance(120)  # expired
    policy.force_open(KEY)
    stale = policy.execute(KEY, model, cache=cache, request=_request())
    assert stale["cache"] == "stale"
    assert model.calls == 1


def test_a_request_is_required_with_a_cache_or_budget() -> None:
    with pytest.raises(TypeError, match="request"):
        CallPolicy().execute(KEY, Model(), cache=ResponseCache())
    no_codec = CallRequest[dict[str, Any]](describe=lambda: {})
    with pytest.raises(TypeError, match="encode and decode"):
        CallPolicy().execute(KEY, Model(), cache=ResponseCache(), request=no_codec)


async def test_async_identical_misses_collapse_into_one_model_call() -> None:
    policy, cache, budget = CallPolicy(), ResponseCache(), Budget(max_calls=100)
    gate = asyncio.Event()
    calls = 0

    async def slow_model() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return {"text": "once"}

    tasks = [
        asyncio.create_task(
            policy.aexecute(KEY, slow_model, cache=cache, budget=budget, request=_request())
        )
        for _ in range(50)
    ]
    await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(*tasks)
    assert calls == 1
    assert budget.usage().calls == 1
    assert sorted(a.get("cache", "miss") for a in answers) == ["miss"] + ["shared"] * 49


async def test_async_budget_refusal_and_fallback_accounting() -> None:
    policy = CallPolicy(failure_threshold=1)
    primary, fallback = Model(fail=True), Model("fallback")
    budget = Budget(max_calls=1)
    answer = await policy.aexecute(
        KEY, primary.acall, fallback=fallback.acall, budget=budget, request=_request()
    )
    assert answer["text"] == "fallback"
    with pytest.raises(BudgetExceededError):
        await policy.aexecute(KEY, primary.acall, budget=budget, request=_request())
    assert primary.calls == 1
