"""The breaker's scenarios through the LangChain wrapper, sync (invoke) and async (ainvoke).

The reference crate's scenarios first, then fallback, retry, per-model circuits, batch and
shared state. Cooldowns pass by advancing a fake clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import AIMessage

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, ErrorClass, RetryPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.langchain.fakes import BadRequest, ScriptedChatModel, ServerError
from tests.support.clock import FakeClock

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


async def call(wrapper: Any, mode: str, input: Any = "hi", **kwargs: Any) -> AIMessage:
    if mode == "sync":
        result = wrapper.invoke(input, **kwargs)
    else:
        result = await wrapper.ainvoke(input, **kwargs)
    assert isinstance(result, AIMessage)
    return result


async def fail(model: Any, mode: str, times: int, error: type[Exception] = ServerError) -> None:
    for _ in range(times):
        with pytest.raises(error):
            await call(model, mode)


def guarded(
    clock: FakeClock,
    inner: ScriptedChatModel | None = None,
    fallback: ScriptedChatModel | None = None,
    **options: Any,
) -> CircuitBreakerChatModel:
    options.setdefault("failure_threshold", 5)
    options.setdefault("cooldown", 30)
    policy = CallPolicy(clock=clock, **options)
    return CircuitBreakerChatModel(
        inner=inner or ScriptedChatModel(), fallback=fallback, policy=policy
    )


# -- the reference crate's scenarios -------------------------------------------------------


def test_state_starts_closed(clock: FakeClock) -> None:
    model = guarded(clock)
    assert model.key == "acme::m1"
    assert model.state_for() is CLOSED


async def test_opens_after_threshold_then_fails_fast_without_calling_the_model(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 5)
    model = guarded(clock, inner)
    await fail(model, mode, 4)
    assert model.state_for() is CLOSED
    await fail(model, mode, 1)
    assert model.state_for() is OPEN
    assert inner.calls == 5
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            await call(model, mode)
    assert inner.calls == 5  # refused without a call


async def test_a_success_resets_the_consecutive_count(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 4 + ["fine"] + [ServerError("500")] * 4)
    model = guarded(clock, inner)
    await fail(model, mode, 4)
    assert (await call(model, mode)).content == "fine"
    await fail(model, mode, 4)
    assert model.state_for() is CLOSED


async def test_half_open_then_closes_on_a_successful_probe(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 5 + ["recovered"])
    model = guarded(clock, inner)
    await fail(model, mode, 5)
    clock.advance(30)
    assert (await call(model, mode)).content == "recovered"
    assert model.state_for() is CLOSED
    assert (await call(model, mode)).content == "ok"
    assert inner.calls == 7


async def test_half_open_reopens_at_once_on_failure_surfacing_the_providers_error(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 6)
    model = guarded(clock, inner)
    await fail(model, mode, 5)
    clock.advance(30)
    with pytest.raises(ServerError):  # the probe's own error, not CircuitOpenError
        await call(model, mode)
    assert model.state_for() is OPEN
    with pytest.raises(CircuitOpenError):
        await call(model, mode)
    assert inner.calls == 6


async def test_calls_are_refused_until_the_cooldown_has_fully_elapsed(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 5)
    model = guarded(clock, inner)
    await fail(model, mode, 5)
    clock.advance(29.999)
    with pytest.raises(CircuitOpenError):
        await call(model, mode)
    clock.advance(0.001)
    assert (await call(model, mode)).content == "ok"
    assert inner.calls == 6


async def test_circuit_open_error_names_provider_model_failures_and_retry_in(
    clock: FakeClock, mode: str
) -> None:
    model = guarded(clock, ScriptedChatModel(provider="openai", model_name="gpt-4o-mini"))
    model.inner.push(*[ServerError("500")] * 5)  # type: ignore[attr-defined]
    await fail(model, mode, 5)
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as caught:
        await call(model, mode)
    error = caught.value
    assert (error.provider, error.model, error.failures) == ("openai", "gpt-4o-mini", 5)
    assert error.retry_in == pytest.approx(20.0)


async def test_a_probe_failure_restarts_the_cooldown(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 6)
    model = guarded(clock, inner)
    await fail(model, mode, 5)
    clock.advance(30)
    await fail(model, mode, 1)
    clock.advance(29)
    with pytest.raises(CircuitOpenError):
        await call(model, mode)
    clock.advance(1)
    assert (await call(model, mode)).content == "ok"


async def test_uncounted_errors_neither_count_nor_reset(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 4 + [BadRequest("400")] * 6)
    model = guarded(clock, inner)
    await fail(model, mode, 4)
    await fail(model, mode, 6, BadRequest)
    assert model.state_for() is CLOSED
    assert model.policy is not None
    assert model.policy.circuit(model.key_for()).snapshot().failures == 4


async def test_half_open_admits_only_half_open_max_calls_probes_at_once(
    clock: FakeClock,
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 5)
    model = guarded(clock, inner)
    await fail(model, "async", 5)
    clock.advance(30)
    gate, entered = inner.hold()
    probe = asyncio.ensure_future(model.ainvoke("hi"))
    await entered.wait()  # the probe is in flight
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as caught:
            await model.ainvoke("hi")
        assert caught.value.retry_in == 0.0
    gate.set()
    assert (await probe).content == "ok"
    assert model.state_for() is CLOSED
    assert inner.calls == 6


# -- fallback ------------------------------------------------------------------------------


async def test_the_fallback_serves_an_open_circuit_without_calling_the_primary(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 5)
    backup = ScriptedChatModel(provider="other", model_name="b1", default="from backup")
    model = guarded(clock, inner, backup)
    for _ in range(5):  # each counted failure is answered by the fallback
        assert (await call(model, mode)).content == "from backup"
    assert model.state_for() is OPEN
    assert (await call(model, mode)).content == "from backup"
    assert (inner.calls, backup.calls) == (5, 6)
    clock.advance(30)  # the probe goes to the primary, which has recovered
    assert (await call(model, mode)).content == "ok"
    assert model.state_for() is CLOSED
    assert (inner.calls, backup.calls) == (6, 6)


async def test_fallback_on_open_lets_failures_through_until_the_circuit_opens(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 2)
    backup = ScriptedChatModel(provider="other", default="from backup")
    model = guarded(clock, inner, backup, failure_threshold=2, fallback_on="open")
    await fail(model, mode, 2)
    assert (await call(model, mode)).content == "from backup"
    assert backup.calls == 1


async def test_an_uncounted_error_falls_back_only_with_fallback_on_error(
    clock: FakeClock, mode: str
) -> None:
    backup = ScriptedChatModel(provider="other", default="from backup")
    model = guarded(clock, ScriptedChatModel(script=[BadRequest("400")]), backup)
    await fail(model, mode, 1, BadRequest)
    assert backup.calls == 0
    model = guarded(
        clock, ScriptedChatModel(script=[BadRequest("400")]), backup, fallback_on="error"
    )
    assert (await call(model, mode)).content == "from backup"


async def test_the_fallback_has_its_own_circuit(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(default="unused")
    backup = ScriptedChatModel(provider="other", model_name="b1", script=[ServerError("b")] * 2)
    model = guarded(clock, inner, backup, failure_threshold=2)
    assert model.policy is not None
    model.policy.force_open(model.key_for())
    await fail(model, mode, 2)  # the fallback's failures propagate...
    assert model.fallback_key == "other::b1"
    assert model.policy.state("other::b1") is OPEN  # ...and open its circuit
    with pytest.raises(CircuitOpenError) as caught:
        await call(model, mode)
    assert caught.value.provider == "other"
    assert inner.calls == 0


async def test_a_failing_fallback_raises_its_own_error_with_a_note(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("primary down")])
    backup = ScriptedChatModel(provider="other", script=[ServerError("backup down")])
    model = guarded(clock, inner, backup)
    with pytest.raises(ServerError, match="backup down") as caught:
        await call(model, mode)
    assert any("fallback failed" in note for note in getattr(caught.value, "__notes__", []))


# -- retry ---------------------------------------------------------------------------------


def retrying(clock: FakeClock, inner: ScriptedChatModel, **options: Any) -> CircuitBreakerChatModel:
    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        clock.advance(seconds)

    async def asleep(seconds: float) -> None:
        sleep(seconds)

    options.setdefault("failure_threshold", 5)
    policy = CallPolicy(
        clock=clock,
        sleep=sleep,
        async_sleep=asleep,
        retry=RetryPolicy(max_attempts=4, base_delay=0.5, jitter=0),
        **options,
    )
    model = CircuitBreakerChatModel(inner=inner, policy=policy)
    model.__dict__["_test_delays"] = delays
    return model


async def test_retry_is_off_by_default(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500"), "second"])
    await fail(guarded(clock, inner), mode, 1)
    assert inner.calls == 1


async def test_retries_pass_through_the_breaker_and_succeed(clock: FakeClock, mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 2 + ["third time"])
    model = retrying(clock, inner)
    assert (await call(model, mode)).content == "third time"
    assert inner.calls == 3
    assert model.__dict__["_test_delays"] == [0.5, 1.0]
    assert model.state_for() is CLOSED


async def test_a_retry_storm_opens_the_circuit_and_stops_retrying(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 10)
    model = retrying(clock, inner, failure_threshold=2)
    await fail(model, mode, 1)
    assert inner.calls == 2  # the second attempt opened the circuit: no third
    assert model.state_for() is OPEN


async def test_the_retry_option_reaches_the_engine(mode: str) -> None:
    inner = ScriptedChatModel(script=[ServerError("500"), "again"])
    model = CircuitBreakerChatModel(
        inner=inner, retry=RetryPolicy(max_attempts=2, base_delay=0, jitter=0)
    )
    assert (await call(model, mode)).content == "again"
    assert inner.calls == 2


# -- circuits per model --------------------------------------------------------------------


async def test_a_per_call_model_override_uses_that_models_circuit(
    clock: FakeClock, mode: str
) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 5)
    backup = ScriptedChatModel(provider="other", default="from backup")
    model = guarded(clock, inner, backup)
    for _ in range(5):
        assert (await call(model, mode, model="m2")).content == "from backup"
    assert model.state_for("m2") is OPEN
    assert model.state_for() is CLOSED
    assert model.key_for("m2") == "acme::m2"
    assert all(kw.get("model") == "m2" for kw in inner.call_kwargs)
    assert all("model" not in kw for kw in backup.call_kwargs)  # names the primary's model
    assert (await call(model, mode)).content == "ok"  # m1 is fine


# -- batch, sharing ----------------------------------------------------------------------


def test_batch_goes_through_the_engine(clock: FakeClock) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 7)
    model = guarded(clock, inner)
    results = model.batch(["a"] * 7, {"max_concurrency": 1}, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["ServerError"] * 5 + ["CircuitOpenError"] * 2
    assert inner.calls == 5


async def test_abatch_goes_through_the_engine_and_the_fallback(clock: FakeClock) -> None:
    inner = ScriptedChatModel(script=[ServerError("500")] * 7)
    backup = ScriptedChatModel(provider="other", default="from backup")
    model = guarded(clock, inner, backup)
    results = await model.abatch(["a"] * 7, {"max_concurrency": 1})
    assert [r.content for r in results] == ["from backup"] * 7
    assert (inner.calls, backup.calls) == (5, 7)
    assert model.state_for() is OPEN


async def test_wrappers_sharing_a_policy_share_circuit_state(clock: FakeClock, mode: str) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=2)
    first = CircuitBreakerChatModel(
        inner=ScriptedChatModel(script=[ServerError("500")] * 2), policy=policy
    )
    second_inner = ScriptedChatModel()
    second = CircuitBreakerChatModel(inner=second_inner, policy=policy)
    await fail(first, mode, 2)
    assert second.state_for() is OPEN
    with pytest.raises(CircuitOpenError):
        await call(second, mode)
    assert second_inner.calls == 0
    assert first.policy is second.policy is policy


async def test_a_custom_classifier_decides_what_counts(clock: FakeClock, mode: str) -> None:
    from callpolicy import Classification

    def everything_is_a_server_error(exc: BaseException) -> Classification:
        return Classification(ErrorClass.SERVER)

    inner = ScriptedChatModel(script=[BadRequest("400")] * 2)
    model = CircuitBreakerChatModel(
        inner=inner, failure_threshold=2, classifier=everything_is_a_server_error
    )
    await fail(model, mode, 2, BadRequest)
    assert model.state_for() is OPEN


async def test_the_failure_rate_mode_is_reachable_from_the_constructor(mode: str) -> None:
    script: list[Any] = ["ok", ServerError("500")] * 5
    inner = ScriptedChatModel(script=script)
    model = CircuitBreakerChatModel(
        inner=inner, failure_rate_threshold=0.5, window_size=10, minimum_calls=10
    )
    for entry in script:
        if isinstance(entry, Exception):
            await fail(model, mode, 1)
        else:
            await call(model, mode)
    assert model.state_for() is OPEN  # never two failures in a row, but half of them
