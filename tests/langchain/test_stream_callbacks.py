"""The invoke path with streaming callbacks (LangGraph's ``stream_mode="messages"``,
``astream_events``): a model that streams internally shows each attempt's tokens as they
come, so when an attempt fails midway and another one answers, the UI must be told which
tokens to drop. The failed attempt's run ends (with its error) before the next attempt's
starts, and the ``callpolicy_retry``/``callpolicy_fallback`` custom event names the failed
run (``failed_run_id``)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_openai import ChatOpenAI

from callpolicy import CallPolicy, RetryPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.support.clock import FakeClock
from tests.support.openai_server import OpenAICompatServer, Reply, StreamDies

PRIMARY, BACKUP = "gpt-4o-mini", "backup-model"


def chat(server: OpenAICompatServer, model: str = PRIMARY) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=2.0
    )


class Timeline(BaseCallbackHandler):
    """Every chat-model run's start, token, end and error, and every custom event, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, Any]] = []

    def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: UUID, **kwargs: Any
    ) -> None:
        self.seen.append(("start", run_id, (kwargs.get("metadata") or {}).get("callpolicy_role")))

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        self.seen.append(("token", run_id, token))

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.seen.append(("end", run_id, None))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.seen.append(("error", run_id, type(error).__name__))

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.seen.append(("custom", name, data))

    def runs(self) -> list[UUID]:
        return [run for kind, run, _ in self.seen if kind == "start"]


def in_a_chain(model: CircuitBreakerChatModel) -> RunnableLambda[Any, Any]:
    """The model called from inside a parent run (a graph node, a chain step): custom
    events need one."""

    def node(question: str, config: RunnableConfig) -> Any:
        return model.invoke([HumanMessage(question)], config)

    async def anode(question: str, config: RunnableConfig) -> Any:
        return await model.ainvoke([HumanMessage(question)], config)

    return RunnableLambda(node, afunc=anode)


async def run(chain: Any, mode: str, timeline: Timeline) -> Any:
    config: RunnableConfig = {"callbacks": [timeline]}
    if mode == "sync":
        return chain.invoke("hi", config)
    return await chain.ainvoke("hi", config)


async def test_a_failed_attempt_ends_before_the_fallback_starts_and_the_event_names_it(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    model = CircuitBreakerChatModel(
        inner=ChatOpenAI(
            model=PRIMARY,
            base_url=openai_server.base_url,
            api_key="sk-test",
            max_retries=0,
            streaming=True,
        ),
        fallback=chat(openai_server, BACKUP),
        policy=CallPolicy(clock=clock, failure_threshold=5),
    )
    openai_server.push(StreamDies(after_chunks=3, content="one two three"), Reply("from backup"))
    timeline = Timeline()
    result = await run(in_a_chain(model), mode, timeline)
    assert result.content == "from backup"
    failed, answered = timeline.runs()
    kinds = [(kind, run) for kind, run, _ in timeline.seen if kind != "custom"]
    # The failed run streamed tokens, then ended with its error, before the fallback began.
    assert kinds.index(("error", failed)) < kinds.index(("start", answered))
    assert ("token", failed) in kinds
    fallback_events = [data for kind, name, data in timeline.seen if name == "callpolicy_fallback"]
    assert len(fallback_events) == 1
    assert fallback_events[0]["failed_run_id"] == str(failed)
    # ...and the event comes after the failed run's end, before the fallback's start.
    order = [(kind, run) for kind, run, _ in timeline.seen]
    assert order.index(("error", failed)) < order.index(("custom", "callpolicy_fallback"))
    assert order.index(("custom", "callpolicy_fallback")) < order.index(("start", answered))


async def test_each_retry_event_names_the_run_it_retries(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    model = CircuitBreakerChatModel(
        inner=ChatOpenAI(
            model=PRIMARY,
            base_url=openai_server.base_url,
            api_key="sk-test",
            max_retries=0,
            streaming=True,
        ),
        policy=CallPolicy(
            clock=clock,
            retry=RetryPolicy(max_attempts=3, base_delay=0.1, jitter=0.0),
            sleep=waits.append,
            async_sleep=asleep,
        ),
    )
    openai_server.push(
        StreamDies(after_chunks=2, content="one two"),
        StreamDies(after_chunks=3, content="one two three"),
        Reply("third time"),
    )
    timeline = Timeline()
    result = await run(in_a_chain(model), mode, timeline)
    assert result.content == "third time"
    runs = timeline.runs()
    assert len(runs) == 3
    retries = [data for kind, name, data in timeline.seen if name == "callpolicy_retry"]
    assert [event["failed_run_id"] for event in retries] == [str(runs[0]), str(runs[1])]


async def test_a_caller_run_id_still_names_the_first_attempt(
    openai_server: OpenAICompatServer, clock: FakeClock
) -> None:
    model = CircuitBreakerChatModel(
        inner=chat(openai_server), fallback=chat(openai_server, BACKUP), policy=CallPolicy()
    )
    timeline = Timeline()
    mine = UUID(int=42)
    await model.ainvoke("hi", {"callbacks": [timeline], "run_id": mine})
    assert timeline.runs() == [mine]


async def test_the_recipe_a_langgraph_ui_shows_only_the_answering_runs_tokens(
    openai_server: OpenAICompatServer, clock: FakeClock
) -> None:
    # docs/recipes.md, recipe 5: the failed attempt's tokens are dropped on its event.
    from langchain.agents import create_agent

    model = CircuitBreakerChatModel(
        inner=ChatOpenAI(
            model=PRIMARY,
            base_url=openai_server.base_url,
            api_key="sk-test",
            max_retries=0,
            streaming=True,
        ),
        fallback=chat(openai_server, BACKUP),
        policy=CallPolicy(clock=clock),
    )
    agent = create_agent(model=model, tools=[])
    openai_server.push(
        StreamDies(after_chunks=4, content="half an answer that dies"), Reply("the whole answer")
    )
    shown: dict[str, list[str]] = {}
    dropped = []
    async for event in agent.astream_events({"messages": [("user", "hi")]}, version="v2"):
        if event["event"] == "on_chat_model_stream":
            shown.setdefault(event["run_id"], []).append(str(event["data"]["chunk"].content))
        elif event["event"] == "on_custom_event" and event["name"] in (
            "callpolicy_retry",
            "callpolicy_fallback",
        ):
            failed = event["data"].get("failed_run_id")
            if failed:
                dropped.append("".join(shown.pop(failed, [])))
    assert dropped == ["half an answer"]
    assert ["".join(tokens) for tokens in shown.values()] == ["the whole answer"]
