"""The engine's events reach LangChain callbacks as custom events (``astream_events``,
LangSmith), on the caller's run, each before the model run it explains."""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableConfig, RunnableLambda

from callpolicy import CallPolicy
from langchain_breaker import EVENT_PREFIX, CircuitBreakerChatModel
from tests.langchain.fakes import ScriptedChatModel, ServerError
from tests.support.clock import FakeClock


def _model(clock: FakeClock) -> tuple[CircuitBreakerChatModel, ScriptedChatModel]:
    primary = ScriptedChatModel(provider="acme", model_name="m1")
    backup = ScriptedChatModel(provider="backup", model_name="m2", default="from backup")
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=clock)
    return CircuitBreakerChatModel(inner=primary, fallback=backup, policy=policy), primary


async def test_astream_events_show_the_fallback_and_the_trip_before_the_fallback_run() -> None:
    model, primary = _model(FakeClock())
    primary.push(ServerError("500 internal server error"))

    async def ask(question: str, config: RunnableConfig) -> Any:
        return await model.ainvoke(question, config)

    seen = [
        (event["event"], event.get("name"), event.get("data"))
        async for event in RunnableLambda(ask).astream_events("hi", version="v2")
    ]
    kinds = [(kind, name) for kind, name, _ in seen]
    custom = [name for kind, name in kinds if kind == "on_custom_event"]
    assert custom == [f"{EVENT_PREFIX}state_change", f"{EVENT_PREFIX}fallback"]
    # Both come before the fallback's own model run starts.
    fallback_start = max(i for i, (kind, _) in enumerate(kinds) if kind == "on_chat_model_start")
    assert kinds.index(("on_custom_event", f"{EVENT_PREFIX}fallback")) < fallback_start
    trip = next(data for kind, name, data in seen if name == f"{EVENT_PREFIX}state_change")
    assert trip["state"] == "open"
    assert trip["key"] == "acme::m1"


def test_sync_invoke_in_a_chain_dispatches_refusals_to_handlers() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Recorder(BaseCallbackHandler):
        def __init__(self) -> None:
            self.names: list[str] = []

        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            self.names.append(name)

    model, _ = _model(FakeClock())
    model.policy.force_open(model.key_for())  # type: ignore[union-attr]
    recorder = Recorder()
    chain = RunnableLambda(model.invoke)
    answer = chain.invoke("hi", {"callbacks": [recorder]})
    assert answer.content == "from backup"
    assert recorder.names == [f"{EVENT_PREFIX}refused", f"{EVENT_PREFIX}fallback"]


def test_a_bare_invoke_with_handlers_but_no_parent_run_still_answers() -> None:
    model, primary = _model(FakeClock())
    primary.push(ServerError("500"))
    answer = model.invoke("hi", {"callbacks": []})
    assert answer.content == "from backup"
