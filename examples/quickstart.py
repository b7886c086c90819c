"""The main demo: an outage, seen through a LangChain chat model guarded by callpolicy.

Runs on fake models (no API key, no network) and a simulated clock that the demo moves by
hand, so the 30-second cooldown passes without waiting. What it shows:

1. the primary answers while healthy;
2. the primary goes down: each failure is answered by the fallback, and after
   ``failure_threshold`` failures the circuit opens;
3. while open, calls go straight to the fallback: the primary is not called at all;
4. after the cooldown, one probe reaches the primary; it succeeds and the circuit closes.

    python examples/quickstart.py
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from callpolicy import CallPolicy, CircuitState, Event, EventKind
from langchain_breaker import CircuitBreakerChatModel


class FlakyChatModel(BaseChatModel):
    """A stand-in for a hosted model that can be switched off (it then raises a 503)."""

    model_name: str = "gpt-4o-mini"
    down: bool = False
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "flaky-demo"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls += 1
        if self.down:
            raise ServiceUnavailable("503 Service Unavailable")
        text = f"(primary) you said: {messages[-1].content}"
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


class ServiceUnavailable(Exception):
    status_code = 503  # classified structurally, as an SDK's error would be


class Clock:
    """Monotonic seconds that only move when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def show_event(event: Event) -> None:
    if event.kind is EventKind.STATE_CHANGE:
        change = f"{event.old_state} -> {event.state}"
        print(f"   [event] circuit {event.key}: {change} ({event.reason})")


def main() -> None:
    clock = Clock()
    primary = FlakyChatModel()
    fallback = FakeListChatModel(responses=["(fallback) I am the backup model."])
    policy = CallPolicy(failure_threshold=3, cooldown=30.0, clock=clock, listeners=[show_event])
    model = CircuitBreakerChatModel(inner=primary, fallback=fallback, policy=policy)

    def ask(question: str) -> None:
        answer = model.invoke(question)
        print(f"   {question!r} -> {answer.content!r}   [circuit: {model.state_for().value}]")

    print("An outage on fake models, timed by a simulated clock: no API key, no network,")
    print("and the 30-second cooldown passes without waiting.\n")
    print(f"1. Healthy. Circuit key: {model.key_for()}")
    ask("hello")

    print("2. The primary goes down (503s). The fallback answers each failed call:")
    primary.down = True
    for number in range(3):
        ask(f"question {number + 1}")
    assert model.state_for() is CircuitState.OPEN

    print("3. Circuit open: calls go to the fallback without touching the primary.")
    calls_before = primary.calls
    for number in range(3):
        ask(f"question {number + 4}")
    print(f"   primary calls while open: {primary.calls - calls_before}")
    assert primary.calls == calls_before

    primary.down = False
    clock.now += 30.0
    print("4. 30 s later on the simulated clock (no waiting), the primary is back;")
    print("   the cooldown has passed, so one probe reaches it and closes the circuit.")
    ask("are you back?")
    assert model.state_for() is CircuitState.CLOSED

    print("\nThe policy, as repr(policy) shows it (a notebook shows it as an HTML table):")
    print(policy)


if __name__ == "__main__":
    main()
