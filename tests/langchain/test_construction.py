"""Construction, validation, keys, identity and serialization of the LangChain wrapper."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel, FakeListChatModel
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.load import dumpd, dumps
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI
from pydantic import ValidationError

from callpolicy import CallPolicy, CircuitState, EventKind, MemoryStore, RetryPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.fakes import Events, ScriptedChatModel, ServerError


def openai(model: str = "gpt-4o-mini", **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, api_key="sk-test", base_url="http://127.0.0.1:9/v1", max_retries=0, **kwargs
    )


# -- the models ---------------------------------------------------------------------------


def test_the_wrapper_is_a_chat_model_with_pydantic_fields() -> None:
    inner, backup = openai(), ScriptedChatModel(provider="other")
    model = CircuitBreakerChatModel(inner=inner, fallback=backup)
    assert isinstance(model, BaseChatModel)
    assert model.inner is inner
    assert model.fallback is backup
    assert {"inner", "fallback", "policy", "failure_threshold", "cooldown", "retry"} <= set(
        CircuitBreakerChatModel.model_fields
    )


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("inner", "gpt-4o-mini", "got str"),
        ("inner", FakeListLLM(responses=["x"]), "not a chat model"),
        ("inner", RunnableLambda(lambda x: x), "not a chat model"),
        ("inner", FakeListChatModel(responses=["x"]).bind(stop=["."]), "call bind_tools()"),
        ("fallback", 42, "got int"),
    ],
)
def test_a_wrong_model_fails_at_construction_naming_the_argument(
    field: str, value: Any, hint: str
) -> None:
    arguments: dict[str, Any] = {"inner": ScriptedChatModel(), field: value}
    with pytest.raises(TypeError, match=rf"^{field}: expected a LangChain chat model") as caught:
        CircuitBreakerChatModel(**arguments)
    assert hint in str(caught.value)


def test_the_fallback_cannot_be_the_inner_model() -> None:
    inner = ScriptedChatModel()
    with pytest.raises(ValidationError, match="fallback: is the inner model itself"):
        CircuitBreakerChatModel(inner=inner, fallback=inner)


def test_models_sharing_a_key_need_an_explicit_fallback_key() -> None:
    with pytest.raises(ValidationError, match="fallback: its circuit key 'acme::m1'"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), fallback=ScriptedChatModel())
    model = CircuitBreakerChatModel(
        inner=ScriptedChatModel(), fallback=ScriptedChatModel(), fallback_key="acme::m1-eu"
    )
    assert (model.key, model.fallback_key) == ("acme::m1", "acme::m1-eu")


def test_a_fallback_key_without_a_fallback_is_an_error() -> None:
    with pytest.raises(ValidationError, match="fallback_key: given without a fallback"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), fallback_key="x::y")


# -- engine options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", 0),
        ("cooldown", 0),
        ("cooldown", -1.5),
        ("half_open_max_calls", 0),
        ("success_threshold", 0),
        ("failure_rate_threshold", 1.5),
        ("window_size", 0),
        ("cooldown_multiplier", 0.5),
        ("counted_errors", ["no-such-class"]),
    ],
)
def test_a_bad_engine_option_is_a_validation_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), **{field: value})


def test_bad_fallback_on_and_retry_values_name_their_fields() -> None:
    with pytest.raises(ValueError, match="fallback_on"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), fallback_on="never")
    with pytest.raises(ValidationError, match="retry"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), retry="twice")


def test_a_bool_is_not_a_number_of_seconds() -> None:
    with pytest.raises(ValidationError, match="cooldown"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), cooldown=True)


def test_the_options_reach_the_engine() -> None:
    retry = RetryPolicy(max_attempts=2)
    model = CircuitBreakerChatModel(
        inner=ScriptedChatModel(),
        failure_threshold=3,
        cooldown=timedelta(minutes=2),
        half_open_max_calls=2,
        success_threshold=2,
        cooldown_multiplier=2.0,
        max_cooldown=600,
        retry=retry,
        fallback_on="open",
    )
    policy = model.policy
    assert isinstance(policy, CallPolicy)
    breaker = policy.breaker
    assert (breaker.failure_threshold, breaker.cooldown, breaker.half_open_max_calls) == (3, 120, 2)
    assert (breaker.success_threshold, breaker.cooldown_multiplier, breaker.max_cooldown) == (
        2,
        2.0,
        600,
    )
    assert policy.retry is retry
    assert policy.fallback_on == "open"


def test_defaults_are_the_engines() -> None:
    policy = CircuitBreakerChatModel(inner=ScriptedChatModel()).policy
    assert policy is not None
    assert (policy.breaker.failure_threshold, policy.breaker.cooldown) == (5, 30.0)
    assert policy.breaker.half_open_max_calls == 1
    assert policy.retry is None


def test_a_policy_and_engine_options_cannot_be_combined() -> None:
    with pytest.raises(TypeError, match=r"policy= or engine options \(cooldown\)"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), policy=CallPolicy(), cooldown=5)


def test_a_policy_that_is_not_a_policy_is_named() -> None:
    with pytest.raises(TypeError, match="policy: expected a CallPolicy"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), policy="shared")


def test_listeners_and_store_reach_the_engine(events: Events) -> None:
    store = MemoryStore()
    inner = ScriptedChatModel(script=[ServerError("500")])
    model = CircuitBreakerChatModel(
        inner=inner, failure_threshold=1, listeners=[events], store=store
    )
    with pytest.raises(ServerError):
        model.invoke("hi")
    assert [e.kind for e in events.events] == [EventKind.STATE_CHANGE]
    assert [c.key for c in store.circuits()] == ["acme::m1"]


# -- keys ---------------------------------------------------------------------------------


def test_the_key_comes_from_the_models_ls_params() -> None:
    model = CircuitBreakerChatModel(inner=openai(), fallback=openai("gpt-4o"))
    assert model.key == "openai::gpt-4o-mini"
    assert model.fallback_key == "openai::gpt-4o"
    assert model.key_for("gpt-4.1") == "openai::gpt-4.1"
    assert model.state_for("gpt-4.1") is CircuitState.CLOSED


def test_the_key_falls_back_to_model_attributes_then_the_class_name() -> None:
    class NoModelName(ScriptedChatModel):
        def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
            return {"ls_provider": "acme", "ls_model_type": "chat"}

    assert CircuitBreakerChatModel(inner=NoModelName(model_name="big")).key == "acme::big"
    fake = FakeListChatModel(responses=["x"])
    assert CircuitBreakerChatModel(inner=fake).key == "fakelistchatmodel::FakeListChatModel"


def test_an_explicit_key_names_the_circuit() -> None:
    model = CircuitBreakerChatModel(inner=openai(), key="azure-eu::gpt-4o-mini")
    assert model.key == "azure-eu::gpt-4o-mini"
    assert model.key_for("gpt-4o") == "azure-eu::gpt-4o"
    with pytest.raises(TypeError, match="key: expected a non-empty string"):
        CircuitBreakerChatModel(inner=openai(), key="")


# -- identity -----------------------------------------------------------------------------


def test_ls_params_are_the_inner_models_so_traces_name_the_real_model() -> None:
    model = CircuitBreakerChatModel(inner=openai(temperature=0.2), fallback=ScriptedChatModel())
    params = model._get_ls_params(stop=["END"])
    assert params["ls_provider"] == "openai"
    assert params["ls_model_name"] == "gpt-4o-mini"
    assert params["ls_temperature"] == 0.2
    assert params["ls_stop"] == ["END"]
    assert model._get_ls_params(model="gpt-4o")["ls_model_name"] == "gpt-4o"
    assert model.model_name == "gpt-4o-mini"


def test_llm_type_and_identifying_params_describe_both_models_and_the_policy() -> None:
    model = CircuitBreakerChatModel(
        inner=openai(), fallback=ScriptedChatModel(provider="other"), failure_threshold=3
    )
    assert model._llm_type == "circuit_breaker"
    params = model._identifying_params
    assert params["inner"]["_type"] == "openai-chat"
    assert params["inner"]["model_name"] == "gpt-4o-mini"
    assert params["fallback"] == {"_type": "other-chat", "model_name": "m1"}
    assert (params["key"], params["fallback_key"]) == ("openai::gpt-4o-mini", "other::m1")
    assert params["breaker"]["failure_threshold"] == 3
    assert params["retry"] is None
    assert model.asdict()["_type"] == "circuit_breaker"


def test_the_profile_is_the_inner_models() -> None:
    inner = ScriptedChatModel(profile={"tool_calling": True, "max_input_tokens": 1000})
    assert CircuitBreakerChatModel(inner=inner).profile == inner.profile


def test_lc_versions_include_callpolicy() -> None:
    model = CircuitBreakerChatModel(inner=ScriptedChatModel())
    assert model.metadata is not None
    assert "callpolicy" in model.metadata["lc_versions"]


# -- serialization ------------------------------------------------------------------------


def test_the_wrapper_is_not_lc_serializable_and_leaks_no_secret() -> None:
    # It holds live circuit state, and langchain-core's load() admits only the classes on
    # its own allowlist: dumpd() gives LangChain's "not implemented" form.
    model = CircuitBreakerChatModel(inner=openai(), fallback=openai("gpt-4o"))
    assert not CircuitBreakerChatModel.is_lc_serializable()
    serialized = dumpd(model)
    assert serialized["type"] == "not_implemented"
    assert serialized["id"][-1] == "CircuitBreakerChatModel"
    assert "sk-test" not in dumps(model)


# -- after construction -------------------------------------------------------------------


@pytest.mark.parametrize("field", ["inner", "fallback", "policy", "key", "cooldown", "retry"])
def test_the_fields_the_circuits_are_built_from_cannot_be_reassigned(field: str) -> None:
    model = CircuitBreakerChatModel(inner=ScriptedChatModel())
    with pytest.raises(AttributeError, match=f"^{field}: fixed at construction"):
        setattr(model, field, None)


def test_reassigned_tags_and_metadata_reach_the_next_runs() -> None:
    from tests.langchain.fakes import RunRecorder

    recorder = RunRecorder()
    model = CircuitBreakerChatModel(inner=ScriptedChatModel())
    model.tags = ["late"]
    model.metadata = {"added": "later"}
    model.callbacks = [recorder]
    model.invoke("hi")
    (start,) = recorder.starts
    assert "late" in start["tags"]
    assert start["metadata"]["added"] == "later"


def test_token_counting_is_the_inner_models() -> None:
    class Counting(ScriptedChatModel):
        def get_token_ids(self, text: str) -> list[int]:
            return [1] * len(text)

        def get_num_tokens_from_messages(self, messages: Any, tools: Any = None) -> int:
            return 42

    model = CircuitBreakerChatModel(inner=Counting())
    assert model.get_token_ids("abc") == [1, 1, 1]
    assert model.get_num_tokens("abcd") == 4
    assert model.get_num_tokens_from_messages([]) == 42


def test_a_misspelt_option_is_an_error_not_ignored() -> None:
    with pytest.raises(ValidationError, match="failure_treshold"):
        CircuitBreakerChatModel(inner=ScriptedChatModel(), failure_treshold=3)
