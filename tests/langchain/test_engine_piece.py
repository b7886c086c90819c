"""The LangChain wrappers on the engine's shared piece: the engine options declared once
(``callpolicy.EngineOptions``), the keys and checks of ``callpolicy.ModelGuard``."""

from __future__ import annotations

import inspect

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from pydantic import ValidationError

from callpolicy import ENGINE_OPTIONS, Budget, EngineOptions, MissingPriceError, Price
from langchain_breaker import CircuitBreakerChatModel, CircuitBreakerEmbeddings
from tests.langchain.fakes import ScriptedChatModel


def test_the_chat_model_inherits_the_engine_options() -> None:
    assert issubclass(CircuitBreakerChatModel, EngineOptions)
    fields = CircuitBreakerChatModel.model_fields
    assert set(ENGINE_OPTIONS) <= set(fields)
    assert all(fields[name].default is None for name in ENGINE_OPTIONS)
    model = CircuitBreakerChatModel(inner=ScriptedChatModel(), failure_threshold=2)
    assert model.policy is not None
    assert model.policy.breaker.failure_threshold == 2


def test_the_plain_wrappers_list_every_engine_option_in_their_signature() -> None:
    from langchain_breaker import CircuitBreakerMiddleware

    for wrapper in (CircuitBreakerEmbeddings, CircuitBreakerMiddleware):
        parameters = inspect.signature(wrapper).parameters
        assert set(ENGINE_OPTIONS) <= set(parameters), wrapper
        assert all(parameters[name].default is None for name in ENGINE_OPTIONS)


def test_an_unknown_option_of_a_plain_wrapper_is_named() -> None:
    with pytest.raises(TypeError, match="CircuitBreakerEmbeddings: unexpected keyword argument"):
        CircuitBreakerEmbeddings(inner=DeterministicFakeEmbedding(size=4), treshold=3)
    embeddings = CircuitBreakerEmbeddings(inner=DeterministicFakeEmbedding(size=4), cooldown=9)
    assert embeddings.policy.breaker.cooldown == 9


def test_a_fallback_sharing_the_inner_key_is_refused_naming_the_fix() -> None:
    with pytest.raises(ValidationError, match=r"pass fallback_key= \(or key=\)"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), fallback=ScriptedChatModel())
    with pytest.raises(ValidationError, match="is the inner model's too"):
        CircuitBreakerChatModel(
            inner=ScriptedChatModel(), fallback=ScriptedChatModel(), fallback_key="acme::m1"
        )


def test_a_missing_price_names_the_model_and_the_wrapper() -> None:
    price = Price(input_per_million=1.0, output_per_million=1.0)
    budget = Budget(max_cost_usd=1.0, prices={"acme::m1": price})
    backup = ScriptedChatModel(provider="other")
    with pytest.raises(MissingPriceError) as caught:
        CircuitBreakerChatModel(inner=ScriptedChatModel(), fallback=backup, budget=budget)
    notes = getattr(caught.value, "__notes__", [])
    assert "budget: the fallback model of CircuitBreakerChatModel has no price" in notes
