"""``callpolicy.otel.instrument``: the counters and circuit states as OpenTelemetry metrics,
read back through the SDK's in-memory reader."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from callpolicy import Budget, CallPolicy, CallRequest, CircuitState, ResponseCache, RetryPolicy
from callpolicy.otel import STATE_VALUES, instrument
from tests.observability.support import KEY, BadRequest, Model, ServerError
from tests.support.clock import FakeClock, FakeSleeper

Points = dict[frozenset[tuple[str, Any]], float]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> MeterProvider:
    return MeterProvider(metric_readers=[reader])


def _collect(reader: InMemoryMetricReader) -> dict[str, Points]:
    found: dict[str, Points] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "callpolicy"
            for metric in scope.metrics:
                points = found.setdefault(metric.name, {})
                for point in metric.data.data_points:
                    points[frozenset((point.attributes or {}).items())] = point.value  # type: ignore[union-attr]
    return found


def _at(**attributes: Any) -> frozenset[tuple[str, Any]]:
    return frozenset(attributes.items())


ACME = _at(provider="acme", model="m1")


def _request(text: str = "hello") -> CallRequest[str]:
    return CallRequest(
        describe=lambda: {"messages": [text]},
        input_text=lambda: text,
        encode=lambda result: {"text": result},
        decode=lambda payload: str(payload["text"]),
        usage=lambda result: {"input_tokens": 7, "output_tokens": 3},
    )


def test_every_counter_and_the_state_gauge_are_exported(
    clock: FakeClock, sleeper: FakeSleeper, reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    policy = CallPolicy(
        clock=clock,
        sleep=sleeper,
        failure_threshold=3,
        retry=RetryPolicy(max_attempts=2, jitter=0.0),
    )
    budget, cache = Budget(max_calls=3), ResponseCache()
    instrument(policy, meter_provider=provider, budgets={"main": budget})

    policy.execute(KEY, Model(), budget=budget, cache=cache, request=_request())  # miss
    policy.execute(KEY, Model(), budget=budget, cache=cache, request=_request())  # hit
    with pytest.raises(BadRequest):  # uncounted
        policy.execute(KEY, Model(errors=[BadRequest("400")]))
    failing = Model()
    failing.always = ServerError
    backup = Model("backup")
    assert policy.execute(KEY, failing, fallback=backup) == "backup"  # 2 failures, 1 retry
    assert policy.execute(KEY, failing, fallback=backup) == "backup"  # 3rd failure: open
    assert policy.execute(KEY, failing, fallback=backup) == "backup"  # refused
    metrics = _collect(reader)
    assert metrics["callpolicy.calls"] == {ACME: 5}
    assert metrics["callpolicy.successes"] == {ACME: 1}
    assert metrics["callpolicy.failures"] == {
        _at(provider="acme", model="m1", error_class="server"): 3
    }
    assert metrics["callpolicy.ignored_errors"] == {
        _at(provider="acme", model="m1", error_class="client"): 1
    }
    assert metrics["callpolicy.retries"] == {ACME: 1}
    assert metrics["callpolicy.fallbacks"] == {ACME: 3}
    assert metrics["callpolicy.cache.hits"] == {ACME: 1}
    assert metrics["callpolicy.cache.misses"] == {ACME: 1}
    assert metrics["callpolicy.circuit.state"] == {ACME: STATE_VALUES[CircuitState.OPEN]}
    assert metrics["callpolicy.circuit.failures"] == {ACME: 3}
    assert metrics["callpolicy.refusals"] == {ACME: 1}
    assert metrics["callpolicy.budget.refusals"] == {ACME: 0}
    assert metrics["callpolicy.cancellations"] == {ACME: 0}
    # The cache miss was the budget's one call; the hit cost nothing.
    assert metrics["callpolicy.budget.calls"] == {_at(budget="main", key="*"): 1}
    assert metrics["callpolicy.budget.tokens"] == {
        _at(budget="main", key="*", token_type="input"): 7,
        _at(budget="main", key="*", token_type="output"): 3,
    }
    assert metrics["callpolicy.budget.cost"] == {_at(budget="main", key="*"): 0.0}


def test_refusals_and_budget_refusals_are_exported(
    clock: FakeClock, reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=1)
    budget = Budget(max_calls=1)
    instrument(policy, meter_provider=provider, budgets={"main": budget})
    policy.execute(KEY, Model(), budget=budget, request=_request())
    for _ in range(2):
        with pytest.raises(Exception, match="budget exceeded"):
            policy.execute(KEY, Model(), budget=budget, request=_request())
    policy.trip(KEY)
    for _ in range(3):
        assert policy.execute(KEY, Model(), fallback=Model("backup")) == "backup"

    metrics = _collect(reader)
    assert metrics["callpolicy.refusals"] == {ACME: 3}
    assert metrics["callpolicy.budget.refusals"] == {ACME: 2}
    assert metrics["callpolicy.budget.calls"] == {_at(budget="main", key="*"): 1}
    assert metrics["callpolicy.budget.tokens"] == {
        _at(budget="main", key="*", token_type="input"): 7,
        _at(budget="main", key="*", token_type="output"): 3,
    }


def test_the_state_gauge_follows_the_circuit(
    clock: FakeClock, reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    policy = CallPolicy(clock=clock, cooldown=30)
    instrument(policy, meter_provider=provider)
    policy.execute(KEY, Model())
    assert _collect(reader)["callpolicy.circuit.state"] == {ACME: 0}
    policy.trip(KEY)
    assert _collect(reader)["callpolicy.circuit.state"] == {ACME: 2}
    clock.advance(30)
    policy.circuit(KEY).admit()  # the probe's admission: half-open, probe in flight
    assert _collect(reader)["callpolicy.circuit.state"] == {ACME: 1}
    policy.reset(KEY)
    assert _collect(reader)["callpolicy.circuit.state"] == {ACME: 0}


def test_counters_are_cumulative_across_collections(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    policy = CallPolicy()
    instrument(policy, meter_provider=provider)
    policy.execute(KEY, Model())
    assert _collect(reader)["callpolicy.calls"] == {ACME: 1}
    policy.execute(KEY, Model())
    policy.execute(KEY, Model())
    assert _collect(reader)["callpolicy.calls"] == {ACME: 3}


def test_several_policies_on_one_meter_provider_are_all_reported(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    chat, batch = CallPolicy(), CallPolicy()
    instrument(chat, meter_provider=provider, attributes={"service": "chat"})
    instrument(batch, meter_provider=provider, attributes={"service": "batch"})
    chat.execute(KEY, Model())
    for _ in range(2):
        batch.execute(KEY, Model())
    assert _collect(reader)["callpolicy.calls"] == {
        _at(provider="acme", model="m1", service="chat"): 1,
        _at(provider="acme", model="m1", service="batch"): 2,
    }


def test_policies_without_distinguishing_attributes_add_up(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    first, second = CallPolicy(), CallPolicy()
    instrument(first, meter_provider=provider)
    instrument(second, meter_provider=provider)
    first.execute(KEY, Model())
    second.execute(KEY, Model())
    second.trip(KEY)
    metrics = _collect(reader)
    assert metrics["callpolicy.calls"] == {ACME: 2}
    assert metrics["callpolicy.circuit.state"] == {ACME: 2}, "the worst state of the key"


def test_close_stops_reporting_the_policy(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    kept, dropped = CallPolicy(), CallPolicy()
    instrument(kept, meter_provider=provider, attributes={"p": "kept"})
    handle = instrument(dropped, meter_provider=provider, attributes={"p": "dropped"})
    assert handle.policy is dropped
    kept.execute(KEY, Model())
    dropped.execute(KEY, Model())
    handle.close()
    assert _collect(reader)["callpolicy.calls"] == {_at(provider="acme", model="m1", p="kept"): 1}


def test_a_store_that_cannot_answer_costs_one_reading_not_the_collection(
    reader: InMemoryMetricReader, provider: MeterProvider, caplog: pytest.LogCaptureFixture
) -> None:
    policy = CallPolicy()
    instrument(policy, meter_provider=provider)
    policy.execute(KEY, Model())

    def broken() -> dict[str, Any]:
        raise ConnectionError("store down")

    policy.snapshot = broken  # type: ignore[method-assign]
    metrics = _collect(reader)
    assert metrics["callpolicy.calls"] == {ACME: 1}
    assert "callpolicy.circuit.state" not in metrics
    assert "cannot read circuit state" in caplog.text


def test_bad_arguments_are_refused(provider: MeterProvider) -> None:
    with pytest.raises(TypeError, match="policy"):
        instrument("policy", meter_provider=provider)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="budgets"):
        instrument(CallPolicy(), meter_provider=provider, budgets={"b": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="provider"):
        instrument(CallPolicy(), meter_provider=provider, attributes={"provider": "x"})


def test_the_engine_imports_neither_opentelemetry_nor_matplotlib() -> None:
    code = (
        "import sys, callpolicy\n"
        "callpolicy.CallPolicy().execute('a::b', lambda: 1)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('opentelemetry', 'matplotlib'))\n"
        "print(heavy)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "[]"
