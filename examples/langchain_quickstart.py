"""LangChain quickstart: a guarded chat model in an LCEL chain, with tools and streaming.

Runs offline: no API key, no network. The two "providers" are small fake chat models
(``ToyChatModel``) and the clock is driven by hand, so the cooldown passes instantly.
With real providers the wrapper is built the same way::

    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    model = CircuitBreakerChatModel(
        inner=ChatOpenAI(model="gpt-4o-mini", max_retries=0),
        fallback=ChatAnthropic(model="claude-3-5-haiku-latest"),
        failure_threshold=5,
        cooldown=30.0,
    )

What it shows: the chain answering from the primary; the primary failing and the
fallback answering (each run labelled in the trace with ``callpolicy_role``); the circuit
opening, after which the primary is not called; a tool call served by the fallback in
its own tool format; and, after the cooldown, a probe closing the circuit. Streams are
the primary's own (the breaker does not guard them).

    python examples/langchain_quickstart.py
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

from callpolicy import CallPolicy, CircuitState, Event, EventKind
from langchain_breaker import CircuitBreakerChatModel


class ServiceUnavailable(Exception):
    """What an SDK raises on a 503 (classified by its status code)."""

    status_code = 503


class ToyChatModel(BaseChatModel):
    """A stand-in for a hosted chat model: answers, calls tools, streams; can be down."""

    provider: str
    model_name: str
    tool_format: str = "openai"
    down: bool = False
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return f"{self.provider}-toy"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(
            ls_provider=self.provider, ls_model_name=self.model_name, ls_model_type="chat"
        )

    def _answer(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        self.calls += 1
        if self.down:
            raise ServiceUnavailable("503 Service Unavailable")
        tools = kwargs.get("tools")
        if tools:
            name = (
                tools[0]["name"]
                if self.tool_format == "anthropic"
                else tools[0]["function"]["name"]
            )
            return AIMessage(
                content="", tool_calls=[{"name": name, "args": {"city": "Oslo"}, "id": "call_1"}]
            )
        return AIMessage(content=f"{self.provider} says: {messages[-1].content}")

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._answer(messages, kwargs))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for word in str(self._answer(messages, kwargs).content).split(" "):
            yield ChatGenerationChunk(message=AIMessageChunk(content=word + " "))

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        specs = [convert_to_openai_tool(t) for t in tools]
        if self.tool_format == "anthropic":  # each provider has its own tool format
            specs = [
                {"name": s["function"]["name"], "input_schema": s["function"]["parameters"]}
                for s in specs
            ]
        return self.bind(tools=specs, **kwargs)


class Clock:
    """Monotonic seconds that only move when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ShowRuns(BaseCallbackHandler):
    """Prints each chat model run as a tracer would record it."""

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        meta = kwargs.get("metadata") or {}
        print(
            f"     run: {meta.get('ls_provider')}/{meta.get('ls_model_name')} "
            f"role={meta.get('callpolicy_role')} attempt={meta.get('callpolicy_attempt')}"
        )

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        print(f"     ... failed: {type(error).__name__}: {error}")


def show_event(event: Event) -> None:
    if event.kind is EventKind.STATE_CHANGE:
        print(f"   [circuit {event.key}: {event.old_state} -> {event.state} ({event.reason})]")


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def main() -> None:
    clock = Clock()
    primary = ToyChatModel(provider="openai", model_name="gpt-4o-mini")
    backup = ToyChatModel(provider="anthropic", model_name="claude-haiku", tool_format="anthropic")
    model = CircuitBreakerChatModel(
        inner=primary,
        fallback=backup,
        policy=CallPolicy(failure_threshold=2, cooldown=30.0, clock=clock, listeners=[show_event]),
    )
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model | StrOutputParser()
    config = {"callbacks": [ShowRuns()]}

    def ask(question: str) -> None:
        answer = chain.invoke({"question": question}, config)
        print(f"   {question!r} -> {answer!r}   [circuit: {model.state_for().value}]")

    print(f"1. Healthy. The chain's model guards circuit {model.key_for()!r}.")
    ask("hello")

    print("2. The primary goes down: the fallback answers each failed call.")
    primary.down = True
    ask("question 1")
    ask("question 2")
    assert model.state_for() is CircuitState.OPEN

    print("3. Open: the primary is not called at all.")
    calls = primary.calls
    ask("question 3")
    assert primary.calls == calls

    print("4. A tool call, bound on both models, each in its own format:")
    message = model.bind_tools([get_weather]).invoke("Weather in Oslo?", config)
    print(f"   tool call {message.tool_calls[0]['name']}({message.tool_calls[0]['args']})")
    print(f"   -> {get_weather.invoke(message.tool_calls[0]['args'])!r}")

    print("5. 30 s later the primary is back: one probe closes the circuit.")
    primary.down = False
    clock.now += 30.0
    ask("are you back?")
    assert model.state_for() is CircuitState.CLOSED

    print("6. Streams are the primary's own chunks (the breaker does not guard streams):")
    print("   " + "|".join(str(chunk.content) for chunk in model.stream("stream this")))


if __name__ == "__main__":
    main()
