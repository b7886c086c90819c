"""The reference breaker scenarios, through ``CircuitBreakerLLM``, sync and async.

Each test runs twice (``mode``): through ``chat`` and through ``achat``. The inner model
is a scripted fake; time moves only when the fake clock is advanced.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, RetryPolicy
from llamaindex_breaker import CircuitBreakerLLM, served_by
from tests.support.clock import FakeClock, FakeSleeper

from .fakes import FakeAPIError, Raise, ScriptedLLM, Text, client_error, server_error


async def ask(llm: CircuitBreakerLLM, mode: str, text: str = "hi", **kwargs: Any) -> ChatResponse:
    messages = [ChatMessage(role="user", content=text)]
    if mode == "sync":
        return llm.chat(messages, **kwargs)
    return await llm.achat(messages, **kwargs)


async def complete(llm: CircuitBreakerLLM, mode: str, prompt: str = "hi") -> CompletionResponse:
    if mode == "sync":
        return llm.complete(prompt)
    return await llm.acomplete(prompt)


async def fail_times(llm: CircuitBreakerLLM, inner: ScriptedLLM, mode: str, times: int) -> None:
    for _ in range(times):
        error = server_error()
        inner.push(Raise(error))
        with pytest.raises(FakeAPIError) as raised:
            await ask(llm, mode)
        assert raised.value is error  # the provider's own exception, unchanged


async def test_healthy_calls_pass_through(
    inner: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    inner.push(Text("hello"))
    response = await ask(llm, mode, "question")
    assert response.message.content == "hello"
    assert served_by(response) == "primary"
    assert inner.calls[0].messages == ["question"]
    assert inner.calls[0].method == ("chat" if mode == "sync" else "achat")
    assert llm.state_for() is CircuitState.CLOSED


async def test_five_consecutive_failures_open_the_circuit(
    inner: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    await fail_times(llm, inner, mode, 4)
    assert llm.state_for() is CircuitState.CLOSED
    await fail_times(llm, inner, mode, 1)
    assert llm.state_for() is CircuitState.OPEN

    with pytest.raises(CircuitOpenError) as refused:
        await ask(llm, mode)
    assert len(inner.calls) == 5  # the refused call never reached the model
    assert (refused.value.provider, refused.value.model) == ("scriptedllm", "fake-primary")
    assert refused.value.failures == 5
    assert refused.value.retry_in == pytest.approx(30.0)


async def test_a_success_resets_the_count(
    inner: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    await fail_times(llm, inner, mode, 4)
    await ask(llm, mode)
    await fail_times(llm, inner, mode, 4)
    assert llm.state_for() is CircuitState.CLOSED
    await fail_times(llm, inner, mode, 1)
    assert llm.state_for() is CircuitState.OPEN


async def test_caller_errors_neither_count_nor_fall_back(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    for _ in range(8):
        inner.push(Raise(client_error()))
        with pytest.raises(FakeAPIError, match="400"):
            await ask(llm, mode)
    assert llm.state_for() is CircuitState.CLOSED
    assert backup.calls == []


async def test_cooldown_then_a_successful_probe_closes(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    await fail_times(llm, inner, mode, 5)
    clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        await ask(llm, mode)
    clock.advance(0.2)
    assert llm.state_for() is CircuitState.OPEN  # a probe is due, none admitted yet
    inner.push(Text("back"))
    assert (await ask(llm, mode)).message.content == "back"
    assert llm.state_for() is CircuitState.CLOSED
    assert len(inner.calls) == 6


async def test_a_failed_probe_reopens(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    await fail_times(llm, inner, mode, 5)
    clock.advance(30.0)
    await fail_times(llm, inner, mode, 1)  # the probe
    assert llm.state_for() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as refused:
        await ask(llm, mode)
    assert refused.value.retry_in == pytest.approx(30.0)
    assert len(inner.calls) == 6


async def test_half_open_admits_one_probe_at_a_time(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    await fail_times(llm, inner, mode, 5)
    clock.advance(30.0)
    if mode == "sync":
        refusals: list[BaseException] = []

        def probe_in_flight(messages: Any) -> Text:
            # While the probe runs, another caller comes: refused, not a second probe.
            try:
                llm.chat([ChatMessage(role="user", content="second")])
            except CircuitOpenError as refused:
                refusals.append(refused)
            return Text("probe answered")

        inner.push(probe_in_flight)
        assert (await ask(llm, mode)).message.content == "probe answered"
        assert len(refusals) == 1
    else:
        entered = inner.hold()
        inner.push(Text("probe answered"))
        probe = asyncio.create_task(ask(llm, mode, "probe"))
        await entered.wait()  # the probe is inside the model
        with pytest.raises(CircuitOpenError) as refused:
            await ask(llm, mode, "second")
        assert refused.value.retry_in == 0.0  # half-open, its one probe slot taken
        inner.release()
        assert (await probe).message.content == "probe answered"
    assert llm.state_for() is CircuitState.CLOSED
    assert [c.messages for c in inner.calls[5:]] == [["hi"] if mode == "sync" else ["probe"]]


async def test_fallback_answers_failures_then_the_open_circuit(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    for _ in range(5):
        inner.push(Raise(server_error()))
        response = await ask(llm, mode)
        assert response.message.content == "from the fallback"
        assert served_by(response) == "fallback"
        assert response.additional_kwargs["callpolicy"] == {
            "served_by": "fallback",
            "key": "scriptedllm::fake-fallback",
            "model": "fake-fallback",
        }
    assert llm.state_for() is CircuitState.OPEN
    response = await ask(llm, mode, "while open")
    assert served_by(response) == "fallback"
    assert len(inner.calls) == 5  # refused without calling the model
    assert backup.calls[-1].messages == ["while open"]
    assert llm.state_for("fake-fallback") is CircuitState.CLOSED


async def test_fallback_on_open_only(
    inner: ScriptedLLM, backup: ScriptedLLM, clock: FakeClock, mode: str
) -> None:
    llm = CircuitBreakerLLM(
        inner=inner, fallback=backup, fallback_on="open", policy=None, failure_threshold=2
    )
    await fail_times(llm, inner, mode, 2)
    assert backup.calls == []
    assert served_by(await ask(llm, mode)) == "fallback"


async def test_a_failing_fallback_raises_its_own_error_with_a_note(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    inner.push(Raise(server_error()))
    backup.push(Raise(ConnectionError("connection refused")))
    with pytest.raises(ConnectionError) as raised:
        await ask(llm, mode)
    notes = getattr(raised.value, "__notes__", [])
    assert any("fallback failed after scriptedllm/fake-primary" in note for note in notes)


async def test_the_fallback_has_its_own_circuit(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    policy.force_open(llm.key or "")
    for _ in range(5):
        backup.push(Raise(server_error()))
        with pytest.raises(FakeAPIError):
            await ask(llm, mode)
    assert llm.state_for("fake-fallback") is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as refused:
        await ask(llm, mode)
    assert refused.value.model == "fake-fallback"
    assert inner.calls == []
    assert len(backup.calls) == 5


async def test_retry_then_success(
    inner: ScriptedLLM, clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = CallPolicy(
        retry=RetryPolicy(max_attempts=3, base_delay=0.5, jitter=0),
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
    )
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    inner.push(Raise(server_error()), Text("second time lucky"))
    assert (await ask(llm, mode)).message.content == "second time lucky"
    assert sleeper.delays == [0.5]
    assert len(inner.calls) == 2


async def test_retries_count_toward_the_breaker(
    inner: ScriptedLLM, backup: ScriptedLLM, clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    llm = CircuitBreakerLLM(
        inner=inner,
        fallback=backup,
        policy=CallPolicy(
            retry=RetryPolicy(max_attempts=10, base_delay=0.1, jitter=0, deadline=None),
            clock=clock,
            sleep=sleeper,
            async_sleep=sleeper.asleep,
        ),
    )
    inner.default = Raise(server_error())
    response = await ask(llm, mode)
    assert served_by(response) == "fallback"
    assert len(inner.calls) == 5  # the fifth failure opened the circuit: no sixth attempt
    assert len(sleeper.delays) == 4
    assert llm.state_for() is CircuitState.OPEN


async def test_complete_goes_through_the_engine(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    inner.push(Text("done"))
    response = await complete(llm, mode, "prompt")
    assert (response.text, served_by(response)) == ("done", "primary")
    for _ in range(5):
        inner.push(Raise(server_error()))
        response = await complete(llm, mode)
        assert (response.text, served_by(response)) == ("from the fallback", "fallback")
    assert llm.state_for() is CircuitState.OPEN
    assert [c.method for c in backup.calls] == ["complete" if mode == "sync" else "acomplete"] * 5


async def test_a_per_call_model_has_its_own_circuit(
    inner: ScriptedLLM, backup: ScriptedLLM, policy: CallPolicy, mode: str
) -> None:
    llm = CircuitBreakerLLM(inner=inner, fallback=backup, policy=policy)
    for _ in range(5):
        inner.push(Raise(server_error()))
        assert served_by(await ask(llm, mode, model="fake-big")) == "fallback"
    assert llm.state_for("fake-big") is CircuitState.OPEN
    assert llm.state_for() is CircuitState.CLOSED
    assert all(call.kwargs.get("model") == "fake-big" for call in inner.calls)
    assert all("model" not in call.kwargs for call in backup.calls)  # names a primary model


async def test_a_cancelled_probe_frees_its_slot(
    inner: ScriptedLLM, policy: CallPolicy, clock: FakeClock
) -> None:
    llm = CircuitBreakerLLM(inner=inner, policy=policy)
    await fail_times(llm, inner, "async", 5)
    clock.advance(30.0)
    entered = inner.hold()
    probe = asyncio.create_task(ask(llm, "async", "probe"))
    await entered.wait()
    with pytest.raises(CircuitOpenError):
        await ask(llm, "async", "refused")
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    inner.release()
    inner.push(Text("admitted"))
    assert (await ask(llm, "async", "next")).message.content == "admitted"
    assert llm.state_for() is CircuitState.CLOSED
