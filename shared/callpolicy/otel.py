"""OpenTelemetry metrics for a :class:`~callpolicy.CallPolicy` (needs ``callpolicy[otel]``).

>>> from callpolicy import CallPolicy
>>> from callpolicy.otel import instrument
>>> policy = CallPolicy()
>>> instrumentation = instrument(policy)        # the global MeterProvider, or meter_provider=

Nothing is counted twice: the instruments are *observable*, read from
:meth:`CallPolicy.metrics` (and :meth:`CallPolicy.snapshot` for the circuit state) each
time the SDK collects, so instrumenting costs the guarded call nothing.

Instruments, every one with the attributes ``provider`` and ``model``:

- counters: ``callpolicy.calls`` (attempts that reached the model and ended),
  ``callpolicy.successes``, ``callpolicy.failures`` and ``callpolicy.ignored_errors``
  (both also by ``error_class``), ``callpolicy.cancellations``, ``callpolicy.refusals``
  (calls refused by an open circuit), ``callpolicy.retries``, ``callpolicy.fallbacks``,
  ``callpolicy.cache.hits``, ``callpolicy.cache.misses``, ``callpolicy.budget.refusals``;
- gauges: ``callpolicy.circuit.state`` (0 closed, 1 half-open, 2 open — see
  :data:`STATE_VALUES`) and ``callpolicy.circuit.failures`` (consecutive counted failures).

With ``budgets={"name": budget, ...}``, also up-down counters of what each budget has used
(attributes ``budget`` — the name given — and ``key``, ``"*"`` for a shared budget):
``callpolicy.budget.calls``, ``callpolicy.budget.tokens`` (``token_type``: ``input`` or
``output``) and ``callpolicy.budget.cost`` (USD).

The counts are this process's (a Redis store shares circuit *state*, so the state gauge is
the cluster's; the counters are per worker, to be summed by the backend). Several policies
may be instrumented on one meter provider; give each distinguishing ``attributes`` (e.g.
``{"service": "chat"}``) unless their counts should add up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
except ImportError as missing:
    raise ModuleNotFoundError(
        'callpolicy.otel needs the OpenTelemetry API: pip install "callpolicy[otel]"'
        f" ({type(missing).__name__}: {missing})",
        name=missing.name,
    ) from missing

from . import __version__
from ._budget import Budget
from ._events import logger
from ._policy import CallPolicy
from ._types import CircuitState, KeyMetrics

__all__ = ["STATE_VALUES", "Instrumentation", "instrument"]

STATE_VALUES: Mapping[CircuitState, int] = {
    CircuitState.CLOSED: 0,
    CircuitState.HALF_OPEN: 1,
    CircuitState.OPEN: 2,
}
"""The value of ``callpolicy.circuit.state`` for each state (higher is worse)."""

AttributeValue = str | bool | int | float
Attributes = tuple[tuple[str, AttributeValue], ...]
Readings = dict[Attributes, float]


@dataclass(frozen=True)
class _Source:
    policy: CallPolicy
    budgets: Mapping[str, Budget]
    attributes: Mapping[str, AttributeValue]

    def base(self, provider: str, model: str) -> dict[str, AttributeValue]:
        return {**self.attributes, "provider": provider, "model": model}


def _frozen(attributes: Mapping[str, AttributeValue]) -> Attributes:
    return tuple(sorted(attributes.items()))


_Counter = Callable[[KeyMetrics], int]

_COUNTERS: tuple[tuple[str, str, str, _Counter], ...] = (
    ("callpolicy.calls", "{call}", "attempts that reached the model and ended", lambda m: m.calls),
    ("callpolicy.successes", "{call}", "attempts the model answered", lambda m: m.successes),
    (
        "callpolicy.cancellations",
        "{call}",
        "attempts ended by a cancellation",
        lambda m: m.cancelled,
    ),
    ("callpolicy.refusals", "{call}", "calls refused by an open circuit", lambda m: m.refusals),
    ("callpolicy.retries", "{retry}", "retries scheduled", lambda m: m.retries),
    ("callpolicy.fallbacks", "{call}", "calls handed to the fallback", lambda m: m.fallbacks),
    ("callpolicy.cache.hits", "{call}", "answers served from the cache", lambda m: m.cache_hits),
    (
        "callpolicy.cache.misses",
        "{call}",
        "cache lookups that ran the call",
        lambda m: m.cache_misses,
    ),
    (
        "callpolicy.budget.refusals",
        "{call}",
        "calls the budget refused",
        lambda m: m.budget_refusals,
    ),
)


class _Registry:
    """The instruments of one meter and the policies they report (instruments are
    created once per meter: the SDK ignores the callbacks of a duplicate)."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._sources: list[_Source] = []
        for name, unit, description, read in _COUNTERS:
            meter.create_observable_counter(
                name, callbacks=[self._counter(read)], unit=unit, description=description
            )
        for name, field, description in (
            ("callpolicy.failures", "failures", "counted failures, by error class"),
            ("callpolicy.ignored_errors", "ignored", "errors the breaker did not count"),
        ):
            meter.create_observable_counter(
                name, callbacks=[self._by_class(field)], unit="{call}", description=description
            )
        meter.create_observable_gauge(
            "callpolicy.circuit.state",
            callbacks=[self._circuits(lambda s: STATE_VALUES[s.state], worst=True)],
            unit="1",
            description="circuit state: 0 closed, 1 half-open, 2 open",
        )
        meter.create_observable_gauge(
            "callpolicy.circuit.failures",
            callbacks=[self._circuits(lambda s: s.failures, worst=True)],
            unit="{call}",
            description="consecutive counted failures",
        )
        meter.create_observable_up_down_counter(
            "callpolicy.budget.calls",
            callbacks=[self._budget(lambda u: [({}, u.calls)])],
            unit="{call}",
            description="calls a budget has counted",
        )
        meter.create_observable_up_down_counter(
            "callpolicy.budget.tokens",
            callbacks=[
                self._budget(
                    lambda u: [
                        ({"token_type": "input"}, u.input_tokens),
                        ({"token_type": "output"}, u.output_tokens),
                    ]
                )
            ],
            unit="{token}",
            description="tokens a budget has counted",
        )
        meter.create_observable_up_down_counter(
            "callpolicy.budget.cost",
            callbacks=[self._budget(lambda u: [({}, u.cost_usd)])],
            unit="USD",
            description="dollars a budget has counted",
        )

    def add(self, source: _Source) -> None:
        with self._lock:
            self._sources.append(source)

    def remove(self, source: _Source) -> None:
        with self._lock:
            self._sources = [s for s in self._sources if s is not source]

    def sources(self) -> list[_Source]:
        with self._lock:
            return list(self._sources)

    # -- callbacks: each reads every source, summing equal attribute sets ------------
    def _metrics(self) -> Iterator[tuple[_Source, KeyMetrics]]:
        for source in self.sources():
            for counts in source.policy.metrics().values():
                yield source, counts

    def _counter(self, read: _Counter) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            readings: Readings = {}
            for source, counts in self._metrics():
                attributes = _frozen(source.base(counts.provider, counts.model))
                readings[attributes] = readings.get(attributes, 0) + read(counts)
            return _observations(readings)

        return callback

    def _by_class(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            readings: Readings = {}
            for source, counts in self._metrics():
                by_class: Mapping[object, int] = getattr(counts, field)
                for error_class, count in by_class.items():
                    attributes = _frozen(
                        {
                            **source.base(counts.provider, counts.model),
                            "error_class": str(error_class),
                        }
                    )
                    readings[attributes] = readings.get(attributes, 0) + count
            return _observations(readings)

        return callback

    def _circuits(
        self, read: Callable[..., int], *, worst: bool
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            readings: Readings = {}
            for source in self.sources():
                try:
                    snapshots = source.policy.snapshot().values()
                except Exception:  # a store that cannot answer: no reading this time
                    logger.warning("callpolicy.otel: cannot read circuit state", exc_info=True)
                    continue
                for snapshot in snapshots:
                    attributes = _frozen(source.base(snapshot.provider, snapshot.model))
                    value = read(snapshot)
                    # One key seen through several policies: report the worst.
                    readings[attributes] = max(readings.get(attributes, value), value)
            return _observations(readings)

        return callback

    def _budget(
        self, read: Callable[..., list[tuple[dict[str, AttributeValue], float]]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            readings: Readings = {}
            for source in self.sources():
                for name, budget in source.budgets.items():
                    try:
                        usages = budget.usages()
                    except Exception:
                        logger.warning(
                            "callpolicy.otel: cannot read budget %r", name, exc_info=True
                        )
                        continue
                    for scope, usage in usages.items():
                        for extra, value in read(usage):
                            attributes = _frozen(
                                {**source.attributes, "budget": name, "key": scope, **extra}
                            )
                            readings[attributes] = readings.get(attributes, 0) + value
            return _observations(readings)

        return callback


def _observations(readings: Readings) -> list[Observation]:
    return [Observation(value, dict(attributes)) for attributes, value in readings.items()]


_REGISTRIES: dict[int, tuple[Meter, _Registry]] = {}
_REGISTRIES_LOCK = threading.Lock()


def _registry(meter: Meter) -> _Registry:
    with _REGISTRIES_LOCK:
        found = _REGISTRIES.get(id(meter))
        if found is None or found[0] is not meter:
            found = (meter, _Registry(meter))
            _REGISTRIES[id(meter)] = found
        return found[1]


class Instrumentation:
    """What :func:`instrument` returns: :meth:`close` stops reporting its policy."""

    def __init__(self, registry: _Registry, source: _Source) -> None:
        self._registry = registry
        self._source = source

    @property
    def policy(self) -> CallPolicy:
        return self._source.policy

    def close(self) -> None:
        """Stop reporting (the instruments stay; they report the other policies, if any)."""
        self._registry.remove(self._source)


def instrument(
    policy: CallPolicy,
    *,
    meter_provider: MeterProvider | None = None,
    budgets: Mapping[str, Budget] | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Instrumentation:
    """Report ``policy``'s counts and circuit states as OpenTelemetry metrics.

    Args:
        policy: the engine to report.
        meter_provider: where to report; the global one (``metrics.get_meter_provider()``)
            by default.
        budgets: budgets whose usage to report too, by a name of your choice.
        attributes: added to every observation (to tell policies apart).
    """
    if not isinstance(policy, CallPolicy):
        raise TypeError(f"policy: expected a CallPolicy, got {type(policy).__name__}")
    budgets = dict(budgets or {})
    for name, budget in budgets.items():
        if not isinstance(budget, Budget):
            raise TypeError(f"budgets[{name!r}]: expected a Budget, got {type(budget).__name__}")
    extra = dict(attributes or {})
    reserved = {"provider", "model", "error_class", "budget", "key", "token_type"} & set(extra)
    if reserved:
        raise ValueError(f"attributes: {', '.join(sorted(reserved))} are set by callpolicy")
    meter = metrics.get_meter("callpolicy", __version__, meter_provider=meter_provider)
    registry = _registry(meter)
    source = _Source(policy, budgets, extra)
    registry.add(source)
    return Instrumentation(registry, source)
