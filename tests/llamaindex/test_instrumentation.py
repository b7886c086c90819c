"""LlamaIndex instrumentation: one set of events and spans per call, from the model that
answered; the wrapper adds none of its own."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
    LLMPredictStartEvent,
)
from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler
from llama_index.core.llms import MockLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool

from callpolicy import CallPolicy
from llamaindex_breaker import CallPolicyEvent, CircuitBreakerLLM

from .fakes import EventRecorder, Raise, ScriptedLLM, Text, ToolCall, server_error


def span_names(handler: SimpleSpanHandler) -> list[str]:
    """``Class.method`` of every span, completed or dropped, in the order they closed."""
    spans = [*handler.completed_spans, *handler.dropped_spans]
    return [span.id_.rsplit("-", 5)[0] for span in spans]


async def chat(llm: Any, mode: str) -> Any:
    messages = [ChatMessage(role="user", content="hi")]
    return llm.chat(messages) if mode == "sync" else await llm.achat(messages)


async def test_one_set_of_chat_events_naming_the_inner_model(
    inner: ScriptedLLM,
    backup: ScriptedLLM,
    policy: CallPolicy,
    events: EventRecorder,
    spans: SimpleSpanHandler,
    mode: str,
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    await chat(llm, mode)
    starts = events.of(LLMChatStartEvent)
    assert len(starts) == 1
    assert len(events.of(LLMChatEndEvent)) == 1
    assert starts[0].model_dict["model_name"] == "fake-primary"  # type: ignore[attr-defined]
    method = "chat" if mode == "sync" else "achat"
    assert span_names(spans) == [f"ScriptedLLM.{method}"]


async def test_the_fallback_names_itself_when_it_answers_an_open_circuit(
    inner: ScriptedLLM,
    backup: ScriptedLLM,
    policy: CallPolicy,
    events: EventRecorder,
    spans: SimpleSpanHandler,
    mode: str,
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    policy.force_open(llm.key or "")
    response = await chat(llm, mode)
    starts, ends = events.of(LLMChatStartEvent), events.of(LLMChatEndEvent)
    assert [s.model_dict["model_name"] for s in starts] == ["fake-fallback"]  # type: ignore[attr-defined]
    assert len(ends) == 1
    assert ends[0].response.message.content == response.message.content  # type: ignore[attr-defined]
    assert ends[0].span_id == starts[0].span_id
    method = "chat" if mode == "sync" else "achat"
    assert span_names(spans) == [f"ScriptedLLM.{method}"]
    assert spans.completed_spans[0].id_ == ends[0].span_id


async def test_a_failed_attempt_shows_as_its_own_dropped_span(
    inner: ScriptedLLM,
    backup: ScriptedLLM,
    policy: CallPolicy,
    events: EventRecorder,
    spans: SimpleSpanHandler,
    mode: str,
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    inner.push(Raise(server_error()))
    await chat(llm, mode)
    # Two models were called: each fired its own start; only the answer ends.
    starts = events.of(LLMChatStartEvent)
    assert [s.model_dict["model_name"] for s in starts] == ["fake-primary", "fake-fallback"]  # type: ignore[attr-defined]
    ends = events.of(LLMChatEndEvent)
    assert [e.span_id for e in ends] == [starts[1].span_id]
    assert [s.id_ for s in spans.dropped_spans] == [starts[0].span_id]
    assert [s.id_ for s in spans.completed_spans] == [starts[1].span_id]


async def test_the_wrapper_fires_exactly_what_the_bare_model_fires(
    events: EventRecorder, spans: SimpleSpanHandler, mode: str
) -> None:
    bare = MockLLM()
    await chat(bare, mode)
    bare_events = [type(e).__name__ for e in events.events]
    bare_spans = span_names(spans)
    events.clear()
    spans.completed_spans.clear()

    await chat(CircuitBreakerLLM(inner=MockLLM()), mode)
    assert [type(e).__name__ for e in events.events] == bare_events
    assert span_names(spans) == bare_spans
    assert "LLMChatStartEvent" in bare_events
    assert not any(name.startswith("CircuitBreakerLLM") for name in span_names(spans))


async def test_completion_events_once(
    inner: ScriptedLLM, policy: CallPolicy, events: EventRecorder, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    if mode == "sync":
        llm.complete("hi")
    else:
        await llm.acomplete("hi")
    assert len(events.of(LLMCompletionStartEvent)) == 1
    assert len(events.of(LLMCompletionEndEvent)) == 1
    assert events.of(LLMChatStartEvent) == []


async def test_predict_keeps_llamaindex_own_span_around_the_models(
    inner: ScriptedLLM, policy: CallPolicy, events: EventRecorder, spans: SimpleSpanHandler
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    inner.push(Text("predicted"))
    assert llm.predict(PromptTemplate("Say {x}"), x="hi") == "predicted"
    assert len(events.of(LLMPredictStartEvent)) == 1
    assert len(events.of(LLMChatStartEvent)) == 1
    assert span_names(spans) == ["ScriptedLLM.chat", "CircuitBreakerLLM.predict"]
    chat_span, predict_span = spans.completed_spans
    assert chat_span.parent_id == predict_span.id_


async def test_tool_calls_fire_one_set_of_events(
    inner: ScriptedLLM, policy: CallPolicy, events: EventRecorder, spans: SimpleSpanHandler
) -> None:
    def noop() -> str:
        """Nothing."""
        return ""

    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    inner.push(ToolCall("noop"))
    await llm.achat_with_tools([FunctionTool.from_defaults(fn=noop)], user_msg="go")
    assert len(events.of(LLMChatStartEvent)) == 1
    assert len(events.of(LLMChatEndEvent)) == 1
    # The inner model's own spans (LlamaIndex wraps its _prepare_chat_with_tools too);
    # none of the wrapper's.
    assert span_names(spans) == ["ScriptedLLM._prepare_chat_with_tools", "ScriptedLLM.achat"]


async def test_engine_events_go_through_the_dispatcher_inside_the_calls_span(
    inner: ScriptedLLM,
    backup: ScriptedLLM,
    policy: CallPolicy,
    events: EventRecorder,
    mode: str,
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    policy.force_open(llm.key or "")
    events.clear()
    await chat(llm, mode)
    engine = events.of(CallPolicyEvent)
    assert [e.kind for e in engine] == ["refused", "fallback"]  # type: ignore[attr-defined]
    assert {e.key for e in engine} == {llm.key}  # type: ignore[attr-defined]
    assert engine[0].state == "open"  # type: ignore[attr-defined]


async def test_a_trip_is_a_state_change_event(
    inner: ScriptedLLM, policy: CallPolicy, events: EventRecorder, mode: str
) -> None:
    inner.push(*(Raise(server_error()) for _ in range(5)))
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    for _ in range(5):
        try:
            await chat(llm, mode)
        except Exception:
            continue
    changes = [e for e in events.of(CallPolicyEvent) if e.kind == "state_change"]  # type: ignore[attr-defined]
    assert [(e.old_state, e.state, e.reason) for e in changes] == [  # type: ignore[attr-defined]
        ("closed", "open", "threshold")
    ]
