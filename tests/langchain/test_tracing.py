"""Traces: one chat-model run per attempt, of the model that answered, labelled; no run of
the wrapper's own; streaming callback handlers still get the tokens of an ``invoke``."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.context import collect_runs
from langchain_core.tracers.schemas import Run

from callpolicy import CallPolicy, RetryPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.fakes import RunRecorder, ScriptedChatModel, ServerError
from tests.support.clock import FakeClock


def model_with_backup(
    clock: FakeClock, inner: ScriptedChatModel, **options: Any
) -> tuple[CircuitBreakerChatModel, ScriptedChatModel]:
    backup = ScriptedChatModel(provider="other", model_name="b1", default="from backup")

    async def no_wait(seconds: float) -> None:
        return None

    policy = CallPolicy(clock=clock, sleep=lambda s: None, async_sleep=no_wait, **options)
    return CircuitBreakerChatModel(inner=inner, fallback=backup, policy=policy), backup


async def run(model: Any, mode: str, input: Any = "hi", **config: Any) -> Any:
    if mode == "sync":
        return model.invoke(input, config or None)
    return await model.ainvoke(input, config or None)


def llm_runs(runs: list[Run]) -> list[Run]:
    found: list[Run] = []
    for item in runs:
        if item.run_type == "llm":
            found.append(item)
        found.extend(llm_runs(item.child_runs))
    return sorted(found, key=lambda r: r.dotted_order or "")


def labels(item: Run) -> dict[str, Any]:
    meta = (item.extra or {}).get("metadata", {})
    return {
        "name": item.name,
        "provider": meta.get("ls_provider"),
        "model": meta.get("ls_model_name"),
        "role": meta.get("callpolicy_role"),
        "attempt": meta.get("callpolicy_attempt"),
        "key": meta.get("callpolicy_key"),
        "error": item.error is not None,
    }


async def test_one_run_per_attempt_naming_the_model_that_answered(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")])
    model, _ = model_with_backup(clock, inner)
    with collect_runs() as collector:
        assert (await run(model, mode)).content == "from backup"
    runs = llm_runs(collector.traced_runs)
    assert [labels(r) for r in runs] == [
        {
            "name": "ScriptedChatModel",
            "provider": "acme",
            "model": "m1",
            "role": "primary",
            "attempt": 1,
            "key": "acme::m1",
            "error": True,
        },
        {
            "name": "ScriptedChatModel",
            "provider": "other",
            "model": "b1",
            "role": "fallback",
            "attempt": 2,
            "key": "acme::m1",
            "error": False,
        },
    ]
    assert runs[1].extra is not None
    assert runs[1].extra["metadata"]["callpolicy_state"] == "closed"  # one failure of five
    assert all(r.parent_run_id is None for r in runs)  # no run of the wrapper around them


async def test_each_retry_is_a_run_of_its_own(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 3)
    model, _ = model_with_backup(clock, inner, retry=RetryPolicy(max_attempts=3, jitter=0))
    with collect_runs() as collector:
        await run(model, mode)
    runs = llm_runs(collector.traced_runs)
    assert [(r.name, labels(r)["role"], labels(r)["attempt"]) for r in runs] == [
        ("ScriptedChatModel", "primary", 1),
        ("ScriptedChatModel", "primary", 2),
        ("ScriptedChatModel", "primary", 3),
        ("ScriptedChatModel", "fallback", 4),
    ]
    assert len({r.id for r in runs}) == 4


async def test_an_open_circuit_traces_only_the_fallback(clock: FakeClock, mode: str) -> None:
    model, _ = model_with_backup(clock, ScriptedChatModel())
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    with collect_runs() as collector:
        await run(model, mode)
    runs = llm_runs(collector.traced_runs)
    assert [labels(r)["provider"] for r in runs] == ["other"]
    assert runs[0].extra is not None
    assert runs[0].extra["metadata"]["callpolicy_state"] == "open"


async def test_in_a_chain_the_models_run_is_the_chains_child(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")])
    model, _ = model_with_backup(clock, inner)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    with collect_runs() as collector:
        assert await run(chain, mode, {"q": "hi"}) == "from backup"
    (root,) = collector.traced_runs
    assert [child.name for child in root.child_runs] == [
        "ChatPromptTemplate",
        "ScriptedChatModel",
        "ScriptedChatModel",
        "StrOutputParser",
    ]
    assert [labels(c)["role"] for c in root.child_runs] == [None, "primary", "fallback", None]
    assert "CircuitBreakerChatModel" not in {r.name for r in root.child_runs}


async def test_the_wrappers_tags_metadata_and_callbacks_reach_every_run(
    clock: FakeClock, mode: str
) -> None:
    recorder = RunRecorder()
    inner = ScriptedChatModel(script=[ServerError("500")])
    backup = ScriptedChatModel(provider="other")
    model = CircuitBreakerChatModel(
        inner=inner,
        fallback=backup,
        policy=CallPolicy(clock=clock),
        tags=["guarded"],
        metadata={"team": "search"},
        callbacks=[recorder],
    )
    caller = RunRecorder()
    await run(model, mode, callbacks=[caller], tags=["call"], metadata={"request": 7})
    for seen in (recorder, caller):
        assert [s["metadata"]["callpolicy_role"] for s in seen.starts] == ["primary", "fallback"]
    for start in caller.starts:
        assert {"call", "guarded"} <= set(start["tags"])
        assert start["metadata"]["team"] == "search"
        assert start["metadata"]["request"] == 7


async def test_a_callers_run_id_names_the_first_attempts_run_only(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")])
    model, _ = model_with_backup(clock, inner)
    chosen = uuid.uuid4()
    recorder = RunRecorder()
    await run(model, mode, callbacks=[recorder], run_id=chosen)
    assert [s["run_id"] == chosen for s in recorder.starts] == [True, False]


# -- streaming callback handlers see an invoke's tokens ------------------------------------


def invoke_without_config(model: CircuitBreakerChatModel) -> Any:
    """A step calling ``model.invoke`` without passing the config on: the model finds
    the step's config (and so the event stream's handler) in LangChain's context."""

    def step(text: str) -> Any:
        return model.invoke(text)

    return step


async def test_astream_events_of_an_invoke_get_the_answering_models_tokens(
    clock: FakeClock,
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")])
    model, backup = model_with_backup(clock, inner)
    backup.default = "tokens from backup"
    invoking = RunnableLambda(invoke_without_config(model))
    events = [e async for e in invoking.astream_events("hi", version="v2")]
    streamed = [
        (e["metadata"].get("callpolicy_role"), e["data"]["chunk"].content)
        for e in events
        if e["event"] == "on_chat_model_stream"
    ]
    assert streamed[:3] == [
        ("fallback", "tokens "),
        ("fallback", "from "),
        ("fallback", "backup"),
    ]
    starts = [e for e in events if e["event"] == "on_chat_model_start"]
    assert [e["metadata"]["callpolicy_role"] for e in starts] == ["primary", "fallback"]
    assert (inner.calls, backup.calls) == (1, 1)  # invoke went through the engine


async def test_astream_events_of_an_invoke_on_an_open_circuit(clock: FakeClock) -> None:
    model, _ = model_with_backup(clock, ScriptedChatModel())
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    invoking = RunnableLambda(invoke_without_config(model))
    events = [e async for e in invoking.astream_events("hi", version="v2")]
    tokens = "".join(
        str(e["data"]["chunk"].content) for e in events if e["event"] == "on_chat_model_stream"
    )
    assert tokens == "from backup"
    assert model.inner.calls == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("graph_mode", ["sync", "async"])
async def test_langgraph_messages_mode_streams_the_fallbacks_tokens(
    clock: FakeClock, graph_mode: str
) -> None:
    from langgraph.graph import END, START, MessagesState, StateGraph

    inner = ScriptedChatModel(script=[ServerError("500")])
    model, backup = model_with_backup(clock, inner)
    backup.default = "graph says hi"

    def node(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    async def anode(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("chat", node if graph_mode == "sync" else anode)
    builder.add_edge(START, "chat")
    builder.add_edge("chat", END)
    graph = builder.compile()
    inputs = {"messages": [HumanMessage("hi")]}
    if graph_mode == "sync":
        items = list(graph.stream(inputs, stream_mode="messages"))
    else:
        items = [item async for item in graph.astream(inputs, stream_mode="messages")]
    chunks = [(msg, meta) for msg, meta in items if isinstance(msg, AIMessageChunk)]
    assert "".join(str(m.content) for m, _ in chunks) == "graph says hi"
    assert {meta["callpolicy_role"] for _, meta in chunks} == {"fallback"}
    assert {meta["langgraph_node"] for _, meta in chunks} == {"chat"}
    assert (inner.calls, backup.calls) == (1, 1)


# -- the legacy generate() path -----------------------------------------------------------


async def test_generate_is_one_run_of_the_wrapper_named_for_the_inner_model(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")])
    model, backup = model_with_backup(clock, inner)
    with collect_runs() as collector:
        if mode == "sync":
            result = model.generate([[HumanMessage("hi")]])
        else:
            result = await model.agenerate([[HumanMessage("hi")]])
    assert result.generations[0][0].text == "from backup"
    runs = llm_runs(collector.traced_runs)
    assert len(runs) == 1
    assert runs[0].extra is not None
    assert runs[0].extra["metadata"]["ls_provider"] == "acme"
    assert (inner.calls, backup.calls) == (1, 1)


async def test_the_fallbacks_state_label_costs_no_second_read_of_the_circuit(
    clock: FakeClock, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine hands the state over with the fallback (callpolicy.fallback_start()):
    # with a shared store, a read would be a round trip on every call of an outage.
    model, _ = model_with_backup(
        clock, ScriptedChatModel(script=[ServerError("500")] * 5), failure_threshold=5
    )
    assert model.policy is not None
    circuit_type = type(model.policy.circuit(model.key_for()))

    def unreachable(self: Any) -> Any:
        raise ConnectionError("store out of reach")

    monkeypatch.setattr(circuit_type, "snapshot", unreachable)
    recorder = RunRecorder()
    states = []
    for _ in range(6):  # four failures below the threshold, the fifth opens, then refused
        answer = await run(model, mode, callbacks=[recorder])
        assert answer.content == "from backup"
        states.append(recorder.starts[-1]["metadata"]["callpolicy_state"])
    assert states == ["closed"] * 4 + ["open", "open"]
