"""``ModelGuard`` and ``EngineOptions``: what both adapters build once per wrapper."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest

from callpolicy import (
    ENGINE_OPTIONS,
    AllModelsFailedError,
    Budget,
    CallPolicy,
    CallRequest,
    CircuitOpenError,
    EngineOptions,
    Fallbacks,
    IncompleteStreamError,
    MissingPriceError,
    ModelGuard,
    Price,
    ResponseCache,
    UncacheableRequestError,
    describe_arguments,
    policy_from_options,
    takes_engine_options,
)


class Model:
    """A model as the guard sees one: something ``identity`` can name."""

    def __init__(self, name: str) -> None:
        self.name = name


def identity(model: Any) -> tuple[str, str]:
    return "acme", model.name


def guard(*fallbacks: str, **options: Any) -> ModelGuard:
    return ModelGuard(
        Model("m1"), [Model(name) for name in fallbacks], identity=identity, **options
    )


def down() -> str:
    raise ConnectionError("connection refused")


# -- keys and their rules ------------------------------------------------------------------


def test_keys_are_derived_from_the_models_or_given() -> None:
    assert (guard().key, guard().fallback_keys, guard().fallback_key) == ("acme::m1", (), None)
    two = guard("m2", "m3")
    assert two.fallback_keys == ("acme::m2", "acme::m3")
    assert two.fallback_names == ("m2", "m3")
    assert two.fallback_key == "acme::m2"
    given = guard("m1", key="other::big", fallback_key="acme::m1-eu")
    assert (given.key, given.provider, given.model) == ("other::big", "other", "big")
    assert given.fallback_keys == ("acme::m1-eu",)


def test_a_fallback_sharing_the_inner_models_key_is_refused() -> None:
    with pytest.raises(ValueError, match="fallback: its circuit key 'acme::m1' is the inner"):
        guard("m1")
    with pytest.raises(ValueError, match="pass fallback_key="):
        guard("m2", fallback_key="acme::m1")
    with pytest.raises(ValueError, match=r"fallback\[1\]: its circuit key 'acme::m1'"):
        guard("m2", "m1")
    with pytest.raises(ValueError, match=r"fallback\[2\]: its circuit key 'acme::m2'"):
        guard("m2", "m3", "m2")


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"key": ""}, TypeError, "key: expected a non-empty string"),
        ({"key": 3}, TypeError, "key: expected a non-empty string"),
        ({"fallback_key": "a::b"}, ValueError, "fallback_key: given without a fallback"),
        ({"budget": "cheap"}, TypeError, "budget: expected a callpolicy.Budget"),
        ({"cache": {}}, TypeError, "cache: expected a callpolicy.ResponseCache"),
        ({"policy": "shared"}, TypeError, "policy: expected a CallPolicy"),
    ],
)
def test_bad_arguments_fail_naming_the_argument(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        guard(**arguments)


def test_a_model_cannot_back_itself_up_and_fallback_key_names_one_fallback() -> None:
    inner = object()
    with pytest.raises(ValueError, match="fallback: is the inner model itself"):
        ModelGuard(inner, [inner], identity=identity)
    with pytest.raises(TypeError, match="fallback_key: names one fallback's circuit"):
        guard("m2", "m3", fallback_key="acme::x")


def test_a_cost_budget_needs_a_price_for_every_model_named_in_a_note() -> None:
    budget = Budget(
        max_cost_usd=1.0, prices={"acme::m1": Price(input_per_million=1.0, output_per_million=1.0)}
    )
    with pytest.raises(MissingPriceError) as caught:
        guard("m2", budget=budget, owner="Wrapper")
    assert "budget: the fallback model of Wrapper has no price" in caught.value.__notes__
    assert guard(budget=budget).budget is budget


def test_the_policy_is_given_or_built_from_the_options() -> None:
    shared = CallPolicy()
    assert guard(policy=shared).policy is shared
    assert guard(options={"failure_threshold": 2}).policy.breaker.failure_threshold == 2
    with pytest.raises(TypeError, match=r"Wrapper: pass either policy= .*failure_threshold"):
        guard(policy=shared, options={"failure_threshold": 2}, owner="Wrapper")


# -- routing per call -----------------------------------------------------------------------


def test_a_per_call_model_override_has_its_own_circuit_and_skips_the_fallbacks() -> None:
    g = guard("m2")
    assert g.key_of({}) == g.key_of({"temperature": 0}) == "acme::m1"
    assert g.key_of({"model": "m9"}) == g.for_model("m9") == "acme::m9"
    assert g.for_model(None) == "acme::m1"
    kwargs = {"model": "m9", "temperature": 0}
    assert ModelGuard.fallback_kwargs(kwargs) == {"temperature": 0}
    plain = {"temperature": 0}
    assert ModelGuard.fallback_kwargs(plain) is plain


def test_the_plan_is_one_callable_or_a_list_of_the_chosen_fallbacks() -> None:
    one, key = guard("m2").fallback_plan(lambda index: index)
    assert key == "acme::m2"
    assert callable(one)
    assert not isinstance(one, Fallbacks)
    assert one() == 0
    listed, key = guard("m2", "m3", "m4").fallback_plan(lambda index: index, indices=[0, 2])
    assert key is None
    assert isinstance(listed, Fallbacks)
    assert guard("m2").fallback_plan(lambda index: index, indices=[]) == (None, None)


# -- calls ------------------------------------------------------------------------------------


def test_execute_serves_from_each_fallback_in_turn() -> None:
    g = guard("m2", "m3")
    served: list[int] = []

    def fallback(index: int) -> str:
        served.append(index)
        if index == 0:
            raise ConnectionError("down too")
        return f"fallback {index}"

    assert g.execute(g.key, down, fallback) == "fallback 1"
    assert served == [0, 1]
    with pytest.raises(AllModelsFailedError):
        g.execute(g.key, down, lambda index: down())


def test_aexecute_drives_the_same_plan() -> None:
    g = guard("m2", options={"failure_threshold": 1})

    async def fail() -> str:
        raise ConnectionError("connection refused")

    async def backup(index: int) -> str:
        return f"backup {index}"

    async def main() -> tuple[str, str]:
        first = await g.aexecute(g.key, fail, backup)
        second = await g.aexecute(g.key, fail, backup)  # refused: the circuit is open
        return first, second

    assert asyncio.run(main()) == ("backup 0", "backup 0")
    with pytest.raises(CircuitOpenError):
        asyncio.run(g.aexecute(g.key, fail))  # type: ignore[arg-type]


def test_a_request_brings_in_the_cache() -> None:
    g = guard(cache=ResponseCache())
    assert g.described
    calls: list[int] = []

    def call() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    def request() -> CallRequest[dict[str, int]]:
        return CallRequest(describe=lambda: {"q": "same"}, encode=dict, decode=dict)

    assert g.execute(g.key, call, request=request()) == {"n": 1}
    assert g.execute(g.key, call, request=request()) == {"n": 1}
    assert calls == [1]


def test_a_guarded_stream_picks_the_markers_of_the_chosen_fallbacks() -> None:
    g = guard("m2", "m3")

    def start() -> Iterator[str]:
        raise ConnectionError("no stream")
        yield "never"

    def fallback(index: int) -> Iterator[str]:
        return iter([f"chunk of {index}", "end"])

    chunks = g.stream(
        g.key,
        start,
        fallback,
        fallback_finished=[None, lambda chunk: chunk == "end"],
        indices=[1],
    )
    assert list(chunks) == ["chunk of 1", "end"]
    cut = g.stream(g.key, start, fallback, fallback_finished=lambda chunk: chunk == "done")
    with pytest.raises(IncompleteStreamError):
        list(cut)
    assert list(g.stream(g.key, lambda: iter([1, 2]))) == [1, 2]


def test_an_async_guarded_stream() -> None:
    g = guard("m2")

    async def chunks(*items: str) -> Any:
        for item in items:
            yield item

    def start() -> Any:
        raise ConnectionError("no stream")

    async def main() -> list[str]:
        return [c async for c in g.astream(g.key, start, lambda index: chunks("a", "b"))]

    assert asyncio.run(main()) == ["a", "b"]


# -- the engine options, declared once -------------------------------------------------------


def test_the_options_are_the_mixins_fields() -> None:
    assert set(ENGINE_OPTIONS) == set(EngineOptions.model_fields)
    assert "cooldown" in ENGINE_OPTIONS
    assert "store" in ENGINE_OPTIONS
    options = EngineOptions(failure_threshold=3)
    assert policy_from_options(None, options, owner="X").breaker.failure_threshold == 3
    with pytest.raises(TypeError, match="X: unexpected keyword argument 'treshold'"):
        policy_from_options(None, {"treshold": 3}, owner="X")


def test_a_plain_class_shows_the_options_in_its_signature() -> None:
    class Plain:
        @takes_engine_options
        def __init__(self, *, inner: str, **options: Any) -> None:
            self.policy = policy_from_options(None, options, owner="Plain")

    parameters = inspect.signature(Plain).parameters
    assert list(parameters) == ["inner", *ENGINE_OPTIONS]
    assert parameters["cooldown"].default is None
    assert Plain(inner="x", cooldown=5).policy.breaker.cooldown == 5


# -- describing a request ----------------------------------------------------------------------


def test_arguments_are_described_one_way() -> None:
    described = describe_arguments(
        {
            "temperature": 0.2,
            "tools": [{"name": "f", "parameters": {"password": {"type": "string"}}}],
            "tool_choice": None,
            "base_url": "https://user:secret@api.acme.test:8443/v1?key=abc",
        }
    )
    assert described["temperature"] == 0.2
    assert "password" in described["tools"]  # a schema is kept whole, as text
    assert described["tool_choice"] is None
    assert described["base_url"] == "https://api.acme.test:8443/v1"


def test_an_argument_with_no_json_form_is_named() -> None:
    with pytest.raises(UncacheableRequestError) as caught:
        describe_arguments({"client": object()}, where="settings")
    assert caught.value.where == "request['settings']['client']"
