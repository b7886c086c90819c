"""LangChain's standard chat model unit tests, run against the wrapper.

The standard tests construct the model class from a provider's own keyword arguments
(``temperature``, ``max_tokens``, ``timeout``, ``stop``, ``max_retries``, ``api_key``,
``streaming``, ...). :class:`GuardedChatOpenAI` is the wrapper taking those: they build
its inner model, a real ``ChatOpenAI`` pointed at 127.0.0.1, and its fallback, a
``ChatOpenAI`` of another model. Everything else is ``CircuitBreakerChatModel``'s own.
No test here makes a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import model_validator

from langchain_breaker import CircuitBreakerChatModel

BASE_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing answers, nothing is asked


class GuardedChatOpenAI(CircuitBreakerChatModel):
    """``CircuitBreakerChatModel`` built from ``ChatOpenAI``'s own arguments."""

    @model_validator(mode="before")
    @classmethod
    def _from_provider_arguments(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "inner" in data:
            return data
        own = {k: v for k, v in data.items() if k in CircuitBreakerChatModel.model_fields}
        provider = {k: v for k, v in data.items() if k not in own}
        provider.setdefault("model", "gpt-4o-mini")
        return {
            **own,
            "inner": ChatOpenAI(**provider),
            "fallback": ChatOpenAI(**{**provider, "model": "gpt-4o"}),
        }


class TestCircuitBreakerChatModelStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[GuardedChatOpenAI]:
        return GuardedChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "gpt-4o-mini", "base_url": BASE_URL, "api_key": "sk-test"}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def init_from_env_params(
        self,
    ) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return (
            {"OPENAI_API_KEY": "sk-from-env"},
            {"model": "gpt-4o-mini", "base_url": BASE_URL},
            {"model_name": "gpt-4o-mini", "key": "openai::gpt-4o-mini"},
        )

    @pytest.fixture
    def benchmark(self) -> Callable[..., Any]:
        """pytest-benchmark is off in this suite (speed is measured in ``benchmarks/``):
        ``test_init_time`` runs its loop once, as a construction smoke test."""

        def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return run


def test_the_wrapper_under_test_is_the_real_one() -> None:
    model = GuardedChatOpenAI(model="gpt-4o-mini", base_url=BASE_URL, api_key="sk-test", stop=["x"])
    assert isinstance(model.inner, ChatOpenAI)
    assert isinstance(model.fallback, ChatOpenAI)
    assert model.inner.stop == ["x"]
    assert (model.key, model.fallback_key) == ("openai::gpt-4o-mini", "openai::gpt-4o")
    assert type(model).invoke is CircuitBreakerChatModel.invoke
    assert type(model).bind_tools is CircuitBreakerChatModel.bind_tools
    assert type(model).with_structured_output is CircuitBreakerChatModel.with_structured_output
