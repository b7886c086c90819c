"""A call with no config and no kwargs takes a shorter way through the wrapper (the
common call of a script or a thread pool). It must be indistinguishable from the general
way: the same runs, with the same labels and metadata, the same circuit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.context import collect_runs

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, RetryPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.fakes import ScriptedChatModel, ServerError
from tests.support.clock import FakeClock


def traced(model: CircuitBreakerChatModel, config: Any, mode: str) -> list[dict[str, Any]]:
    """The metadata and tags of every chat-model run of one call."""
    with collect_runs() as runs:
        if mode == "sync":
            model.invoke("hi", config)
        else:
            asyncio.run(model.ainvoke("hi", config))
    found = []
    for run in runs.traced_runs:
        assert run.run_type == "llm"
        meta = dict((run.extra or {}).get("metadata", {}))
        found.append({"name": run.name, "tags": sorted(run.tags or []), "metadata": meta})
    return found


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("wrapper_metadata", [None, {"team": "search"}])
def test_a_bare_call_is_traced_as_a_call_with_an_empty_config(
    clock: FakeClock, mode: str, wrapper_metadata: dict[str, str] | None
) -> None:
    model = CircuitBreakerChatModel(
        inner=ScriptedChatModel(), policy=CallPolicy(clock=clock), metadata=wrapper_metadata
    )
    assert model._fast_route().bare()  # the short way is the one under test
    bare = traced(model, None, mode)
    general = traced(model, {}, mode)
    assert bare == general
    assert len(bare) == 1
    assert bare[0]["metadata"]["callpolicy_role"] == "primary"
    assert bare[0]["metadata"]["callpolicy_attempt"] == 1
    assert bare[0]["metadata"]["callpolicy_key"] == model.key_for()
    if wrapper_metadata:
        assert bare[0]["metadata"]["team"] == "search"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_bare_call_counts_on_the_circuit(clock: FakeClock, mode: str) -> None:
    failures = [ServerError("500")] * 5
    model = CircuitBreakerChatModel(
        inner=ScriptedChatModel(script=failures), policy=CallPolicy(clock=clock)
    )
    for _ in range(5):
        with pytest.raises(ServerError):
            traced(model, None, mode)
    assert model.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        traced(model, None, mode)


@pytest.mark.parametrize(
    "options",
    [
        {"tags": ["guarded"]},
        {"callbacks": []},
        {"fallback": ScriptedChatModel(provider="other")},
        {"policy": CallPolicy(retry=RetryPolicy())},
    ],
    ids=["tags", "callbacks", "fallback", "retry"],
)
def test_anything_to_add_or_route_takes_the_general_way(options: dict[str, Any]) -> None:
    model = CircuitBreakerChatModel(inner=ScriptedChatModel(), **options)
    assert not model._fast_route().bare()


def test_inside_a_parent_run_the_general_way_keeps_the_run_a_child() -> None:
    model = CircuitBreakerChatModel(inner=ScriptedChatModel())
    seen: list[bool] = []

    def inside(text: str) -> str:
        seen.append(model._fast_route().bare())
        return str(model.invoke(text).content)

    with collect_runs() as runs:
        RunnableLambda(inside).invoke("hi")
    assert seen == [False]
    (parent,) = runs.traced_runs
    assert [child.run_type for child in parent.child_runs] == ["llm"]
