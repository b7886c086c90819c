"""Per-key counters: ``policy.metrics()`` and ``CircuitSnapshot.metrics``, exact when
single-threaded, sync and async alike."""

from __future__ import annotations

import asyncio

import pytest

from callpolicy import (
    Budget,
    BudgetExceededError,
    CallPolicy,
    CallRequest,
    CircuitOpenError,
    CircuitSnapshot,
    ErrorClass,
    KeyMetrics,
    MemoryStore,
    ResponseCache,
    RetryPolicy,
)
from tests.observability.support import (
    FALLBACK_KEY,
    KEY,
    BadRequest,
    Model,
    ServerError,
    invoke,
)
from tests.support.clock import FakeClock, FakeSleeper


def _request(text: str = "hello") -> CallRequest[str]:
    return CallRequest(
        describe=lambda: {"messages": [text]},
        input_text=lambda: text,
        encode=lambda result: {"text": result},
        decode=lambda payload: str(payload["text"]),
    )


def _empty(key: str = KEY) -> KeyMetrics:
    provider, _, model = key.partition("::")
    return KeyMetrics(key=key, provider=provider, model=model)


def test_a_new_policy_has_no_metrics() -> None:
    assert CallPolicy().metrics() == {}


async def test_successes_are_counted_as_calls(mode: str) -> None:
    policy = CallPolicy()
    for _ in range(3):
        assert await invoke(policy, KEY, Model(), mode) == "primary"
    assert policy.metrics() == {
        KEY: KeyMetrics(key=KEY, provider="acme", model="m1", calls=3, successes=3)
    }


async def test_failures_are_counted_by_class_and_uncounted_errors_apart(
    clock: FakeClock, mode: str
) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=10)
    errors = [ServerError("503"), TimeoutError("t"), ServerError("503"), BadRequest("400")]
    for error in errors:
        with pytest.raises(type(error)):
            await invoke(policy, KEY, Model(errors=[error]), mode)
    (metrics,) = policy.metrics().values()
    assert metrics.failures == {ErrorClass.SERVER: 2, ErrorClass.TIMEOUT: 1}
    assert metrics.ignored == {ErrorClass.CLIENT: 1}
    assert (metrics.calls, metrics.successes, metrics.failure_count) == (4, 0, 3)


async def test_refusals_retries_and_fallbacks(
    clock: FakeClock, sleeper: FakeSleeper, mode: str
) -> None:
    policy = CallPolicy(
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        failure_threshold=3,
        retry=RetryPolicy(max_attempts=2, jitter=0.0),
    )
    primary, backup = Model(), Model("backup")
    primary.always = ServerError
    # 1st call: attempt, retry, attempt -> fallback. 2nd: attempt (the 3rd failure opens
    # the circuit: no retry) -> fallback. 3rd: refused -> fallback. 4th: refused, raised.
    for _ in range(3):
        assert await invoke(policy, KEY, primary, mode, fallback=backup) == "backup"
    with pytest.raises(CircuitOpenError):
        await invoke(policy, KEY, primary, mode)
    assert primary.calls == 3
    assert policy.metrics()[KEY] == KeyMetrics(
        key=KEY,
        provider="acme",
        model="m1",
        calls=3,
        failures={ErrorClass.SERVER: 3},
        refusals=2,
        retries=1,
        fallbacks=3,
    )
    assert policy.fallback_served() == {KEY: 3}


async def test_a_guarded_fallback_counts_under_its_own_key(clock: FakeClock, mode: str) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=1)
    failing_backup = Model("backup", errors=[ServerError("503")])
    with pytest.raises(ServerError):
        await invoke(
            policy,
            KEY,
            Model(errors=[TimeoutError("t")]),
            mode,
            fallback=failing_backup,
            fallback_key=FALLBACK_KEY,
        )
    # The primary's circuit is open now; the fallback's too (threshold 1).
    with pytest.raises(CircuitOpenError):
        await invoke(
            policy, KEY, Model(), mode, fallback=Model("backup"), fallback_key=FALLBACK_KEY
        )
    metrics = policy.metrics()
    assert metrics[KEY] == KeyMetrics(
        key=KEY,
        provider="acme",
        model="m1",
        calls=1,
        failures={ErrorClass.TIMEOUT: 1},
        refusals=1,
        fallbacks=2,
    )
    assert metrics[FALLBACK_KEY] == KeyMetrics(
        key=FALLBACK_KEY,
        provider="backup",
        model="m2",
        calls=1,
        failures={ErrorClass.SERVER: 1},
        refusals=1,
    )


async def test_cache_hits_and_misses(mode: str) -> None:
    policy, cache, model = CallPolicy(), ResponseCache(), Model()
    for text in ("a", "a", "b", "a"):
        await invoke(policy, KEY, model, mode, cache=cache, request=_request(text))
    assert model.calls == 2
    metrics = policy.metrics()[KEY]
    assert (metrics.cache_hits, metrics.cache_misses) == (2, 2)
    assert (metrics.calls, metrics.successes) == (2, 2)
    assert cache.stats().hits == 2


async def test_a_failed_miss_is_still_a_miss(mode: str) -> None:
    policy, cache = CallPolicy(), ResponseCache()
    with pytest.raises(ServerError):
        await invoke(
            policy, KEY, Model(errors=[ServerError("503")]), mode, cache=cache, request=_request()
        )
    metrics = policy.metrics()[KEY]
    assert (metrics.cache_hits, metrics.cache_misses, metrics.failure_count) == (0, 1, 1)


async def test_budget_refusals(mode: str) -> None:
    policy, budget, model = CallPolicy(), Budget(max_calls=2), Model()
    for _ in range(2):
        await invoke(policy, KEY, model, mode, budget=budget, request=_request())
    for _ in range(3):
        with pytest.raises(BudgetExceededError):
            await invoke(policy, KEY, model, mode, budget=budget, request=_request())
    metrics = policy.metrics()[KEY]
    assert (metrics.calls, metrics.budget_refusals) == (2, 3)
    assert budget.usage().calls == 2, "what the budget used is the budget's to report"


async def test_a_cancelled_call_is_counted_as_cancelled() -> None:
    policy = CallPolicy()
    started = asyncio.Event()

    async def hangs() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.create_task(policy.aexecute(KEY, hangs))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    metrics = policy.metrics()[KEY]
    assert (metrics.calls, metrics.cancelled, metrics.successes) == (1, 1, 0)


def test_an_interrupted_sync_call_is_counted_as_cancelled() -> None:
    policy = CallPolicy()
    with pytest.raises(KeyboardInterrupt):
        policy.execute(KEY, Model(errors=[KeyboardInterrupt()]))
    assert policy.metrics()[KEY].cancelled == 1


def test_counts_survive_a_reset(clock: FakeClock) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=1)
    with pytest.raises(ServerError):
        policy.execute(KEY, Model(errors=[ServerError("503")]))
    policy.reset(KEY)
    policy.execute(KEY, Model())
    metrics = policy.metrics()[KEY]
    assert (metrics.calls, metrics.successes, metrics.failure_count) == (2, 1, 1)


def test_the_snapshot_carries_the_metrics_of_each_key(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    policy = CallPolicy(clock=clock, store=store, failure_threshold=1)
    policy.execute(KEY, Model())
    # A circuit another policy created in the shared store: no counts of this policy's.
    CallPolicy(clock=clock, store=store).execute("other::m", Model())

    snapshot = policy.snapshot()
    assert list(snapshot) == [KEY, "other::m"]
    assert snapshot[KEY].metrics == policy.metrics()[KEY]
    assert snapshot["other::m"].metrics == _empty("other::m")
    # Equality of snapshots is about the circuit, not the counts.
    assert snapshot[KEY] == CircuitSnapshot(
        key=KEY,
        provider="acme",
        model="m1",
        state=snapshot[KEY].state,
        failures=0,
        retry_in=None,
        trips=0,
        probes_in_flight=0,
    )


def test_metrics_serialise_to_plain_json() -> None:
    policy = CallPolicy(failure_threshold=10)
    with pytest.raises(TimeoutError):
        policy.execute(KEY, Model(errors=[TimeoutError("t")]))
    assert policy.metrics()[KEY].to_dict() == {
        "key": KEY,
        "provider": "acme",
        "model": "m1",
        "calls": 1,
        "successes": 0,
        "failures": {"timeout": 1},
        "ignored": {},
        "cancelled": 0,
        "refusals": 0,
        "retries": 0,
        "fallbacks": 0,
        "cache_hits": 0,
        "cache_misses": 0,
        "budget_refusals": 0,
    }


def test_a_copy_of_the_metrics_does_not_move_with_the_policy() -> None:
    policy = CallPolicy(failure_threshold=10)
    with pytest.raises(TimeoutError):
        policy.execute(KEY, Model(errors=[TimeoutError("t")]))
    before = policy.metrics()[KEY]
    with pytest.raises(TimeoutError):
        policy.execute(KEY, Model(errors=[TimeoutError("t")]))
    assert before.failures == {ErrorClass.TIMEOUT: 1}
    assert policy.metrics()[KEY].failures == {ErrorClass.TIMEOUT: 2}
