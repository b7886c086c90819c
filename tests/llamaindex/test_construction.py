"""Building the wrapper: argument checks, keys, the policy, metadata and inherited settings."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms import LLM, ChatMessage, MockLLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.rate_limiter import BaseRateLimiter
from pydantic import ValidationError

from callpolicy import CallPolicy, CircuitState, RetryPolicy
from llamaindex_breaker import CircuitBreakerLLM
from tests.support.clock import FakeClock

from .fakes import Raise, ScriptedLLM, Text, primary, secondary, server_error


@pytest.mark.parametrize("bad", [None, "gpt-4o-mini", {"model": "gpt-4o"}, 3, object()])
def test_a_bad_inner_fails_naming_the_argument(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"^inner: expected a LlamaIndex LLM"):
        CircuitBreakerLLM(inner=bad)


@pytest.mark.parametrize("bad", ["claude", {"model": "x"}, MockLLM])
def test_a_bad_fallback_fails_naming_the_argument(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"^fallback: expected a LlamaIndex LLM"):
        CircuitBreakerLLM(inner=primary(), fallback=bad)


def test_a_langchain_model_gets_a_hint() -> None:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    with pytest.raises(TypeError, match="langchain_breaker"):
        CircuitBreakerLLM(inner=FakeListChatModel(responses=["x"]))


def test_a_model_cannot_be_its_own_fallback() -> None:
    model = primary()
    with pytest.raises(ValidationError, match="fallback: is the inner model itself"):
        CircuitBreakerLLM(inner=model, fallback=model)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"cooldown": -1}, "cooldown"),
        ({"cooldown": True}, "cooldown"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"window_size": 5, "minimum_calls": 10}, "minimum_calls"),
    ],
)
def test_bad_engine_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        CircuitBreakerLLM(inner=primary(), **options)


def test_bad_engine_option_types_name_the_field() -> None:
    with pytest.raises(TypeError, match=r"^retry:"):
        CircuitBreakerLLM(inner=primary(), retry={"max_attempts": 3})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="fallback_on"):
        CircuitBreakerLLM(inner=primary(), fallback_on="sometimes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^policy: expected a CallPolicy"):
        CircuitBreakerLLM(inner=primary(), policy="shared")  # type: ignore[arg-type]


def test_policy_and_engine_options_do_not_mix() -> None:
    with pytest.raises(TypeError, match=r"either policy= or engine options \(failure_threshold\)"):
        CircuitBreakerLLM(inner=primary(), policy=CallPolicy(), failure_threshold=3)


def test_engine_options_build_the_policy() -> None:
    retry = RetryPolicy(max_attempts=2)
    llm = CircuitBreakerLLM(
        inner=primary(),
        failure_threshold=3,
        cooldown=timedelta(seconds=12),
        half_open_max_calls=2,
        success_threshold=2,
        retry=retry,
        fallback_on="open",
    )
    assert isinstance(llm.policy, CallPolicy)
    breaker = llm.policy.breaker
    assert (breaker.failure_threshold, breaker.cooldown) == (3, 12.0)
    assert (breaker.half_open_max_calls, breaker.success_threshold) == (2, 2)
    assert llm.policy.retry is retry
    assert llm.policy.fallback_on == "open"


def test_defaults_are_the_reference_breaker() -> None:
    llm = CircuitBreakerLLM(inner=primary())
    assert llm.policy is not None
    breaker = llm.policy.breaker
    assert (breaker.failure_threshold, breaker.cooldown, breaker.half_open_max_calls) == (5, 30, 1)
    assert llm.policy.retry is None


def test_a_given_policy_is_used_as_is() -> None:
    policy = CallPolicy(failure_threshold=2)
    assert CircuitBreakerLLM(inner=primary(), policy=policy).policy is policy


def test_keys_are_the_lowercased_class_and_model_name() -> None:
    llm = CircuitBreakerLLM(inner=primary(), fallback=secondary())
    assert llm.key == "scriptedllm::fake-primary"
    assert llm.fallback_key == "scriptedllm::fake-fallback"
    assert CircuitBreakerLLM(inner=MockLLM()).key == "mockllm::unknown"


def test_keys_can_be_given() -> None:
    policy = CallPolicy(failure_threshold=1)
    llm = CircuitBreakerLLM(
        inner=primary(), fallback=secondary(), policy=policy, key="acme::big", fallback_key="b::s"
    )
    llm.inner.push(Text("x"))  # type: ignore[attr-defined]
    policy.trip("acme::big")
    assert llm.state_for() is CircuitState.OPEN
    assert llm.chat([ChatMessage(role="user", content="hi")]).message.content == (
        "from the fallback"
    )
    assert set(policy.snapshot()) == {"acme::big", "b::s"}


def test_a_fallback_with_the_inner_key_is_refused_naming_the_fix() -> None:
    # One circuit for both would refuse the fallback exactly when the primary is refused:
    # the rule of the engine's ModelGuard, as in the LangChain wrapper.
    with pytest.raises(ValidationError, match=r"inner model's too.*pass fallback_key="):
        CircuitBreakerLLM(inner=MockLLM(), fallback=MockLLM())
    with pytest.raises(ValidationError, match=r"fallback\[1\]: its circuit key 'mockllm::unknown'"):
        CircuitBreakerLLM(inner=MockLLM(), fallback=[secondary(), MockLLM()])
    # Told apart by a key, the same model at another endpoint is a fallback again.
    policy = CallPolicy(failure_threshold=1)
    llm = CircuitBreakerLLM(
        inner=MockLLM(), fallback=MockLLM(), fallback_key="mockllm::eu", policy=policy
    )
    policy.trip(llm.key or "")
    assert llm.complete("still served").text == "still served"
    assert set(policy.snapshot()) == {"mockllm::unknown", "mockllm::eu"}


def test_an_explicit_fallback_key_must_differ() -> None:
    with pytest.raises(ValidationError, match="fallback_key"):
        CircuitBreakerLLM(inner=primary(), fallback=secondary(), key="a::b", fallback_key="a::b")
    with pytest.raises(ValidationError, match="fallback_key: given without a fallback"):
        CircuitBreakerLLM(inner=primary(), fallback_key="a::b")
    with pytest.raises(TypeError, match=r"^key: expected a non-empty string"):
        CircuitBreakerLLM(inner=primary(), key="")


def test_state_for_names_either_model(clock: FakeClock) -> None:
    policy = CallPolicy(clock=clock)
    llm = CircuitBreakerLLM(inner=primary(), fallback=secondary(), policy=policy)
    policy.trip("scriptedllm::fake-fallback")
    assert llm.state_for() is CircuitState.CLOSED
    assert llm.state_for("fake-primary") is CircuitState.CLOSED
    assert llm.state_for("fake-fallback") is CircuitState.OPEN
    policy.trip("scriptedllm::fake-other")
    assert llm.state_for("fake-other") is CircuitState.OPEN  # a per-call model= override


def test_metadata_is_the_inner_models() -> None:
    inner = ScriptedLLM(model_name="m-1", function_calling=False)
    llm = CircuitBreakerLLM(inner=inner, fallback=secondary())
    assert llm.metadata == inner.metadata
    assert llm.metadata.model_name == "m-1"
    assert llm.metadata.is_function_calling_model is False
    assert (llm.metadata.context_window, llm.metadata.num_output) == (4096, 256)
    assert isinstance(llm, FunctionCallingLLM)
    assert isinstance(llm, LLM)


def test_prompt_settings_come_from_the_inner_model() -> None:
    inner = MockLLM(system_prompt="You are terse.")
    llm = CircuitBreakerLLM(inner=inner)
    assert llm.system_prompt == "You are terse."
    assert llm.messages_to_prompt is inner.messages_to_prompt
    assert llm.callback_manager is inner.callback_manager
    # predict() formats with them: the MockLLM echoes its prompt.
    assert llm.predict(PromptTemplate("Say {x}"), x="hi") == inner.predict(
        PromptTemplate("Say {x}"), x="hi"
    )
    assert llm.predict(PromptTemplate("Say {x}"), x="hi").startswith("You are terse.")
    own = CircuitBreakerLLM(inner=inner, system_prompt="Be kind.")
    assert own.system_prompt == "Be kind."


def test_an_assigned_callback_manager_reaches_both_models() -> None:
    inner, backup = primary(), secondary()
    llm = CircuitBreakerLLM(inner=inner, fallback=backup)
    manager = CallbackManager([])
    llm.callback_manager = manager
    assert inner.callback_manager is manager
    assert backup.callback_manager is manager


def test_a_given_callback_manager_reaches_both_models() -> None:
    inner, backup = primary(), secondary()
    manager = CallbackManager([])
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, callback_manager=manager)
    assert llm.callback_manager is manager
    assert inner.callback_manager is manager
    assert backup.callback_manager is manager


def test_the_guarded_fields_are_frozen() -> None:
    llm = CircuitBreakerLLM(inner=primary())
    for name, value in [("inner", primary()), ("fallback", secondary()), ("policy", None)]:
        with pytest.raises(ValidationError, match="frozen"):
            setattr(llm, name, value)


def test_the_wrapper_serialises_without_its_engine() -> None:
    llm = CircuitBreakerLLM(inner=MockLLM(), failure_threshold=3)
    data = llm.to_dict()
    assert data["class_name"] == "CircuitBreakerLLM"
    assert data["inner"]["class_name"] == "MockLLM"
    assert data["failure_threshold"] == 3
    assert "policy" not in data


class CountingLimiter(BaseRateLimiter):
    def __init__(self) -> None:
        self.acquired = 0

    def acquire(self, num_tokens: int = 0) -> None:
        self.acquired += 1

    async def async_acquire(self, num_tokens: int = 0) -> None:
        self.acquired += 1


async def test_the_wrappers_rate_limiter_is_acquired_once_per_call() -> None:
    inner, backup = primary(), secondary()
    limiter = CountingLimiter()
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, rate_limiter=limiter)
    inner.push(Raise(server_error()))
    llm.chat([ChatMessage(role="user", content="hi")])  # two models called: one acquire
    await llm.achat([ChatMessage(role="user", content="hi")])
    list(llm.stream_chat([ChatMessage(role="user", content="hi")]))
    await llm.acomplete("hi")
    assert limiter.acquired == 4
    assert inner.rate_limiter is None  # not passed on: the inner model keeps its own


def test_key_for_names_the_circuits() -> None:
    llm = CircuitBreakerLLM(inner=primary(), fallback=secondary())
    assert llm.key_for() == "scriptedllm::fake-primary"
    assert llm.key_for("fake-fallback") == "scriptedllm::fake-fallback"
    assert llm.key_for("fake-big") == "scriptedllm::fake-big"
