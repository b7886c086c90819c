"""Model-based test: a CallPolicy against a plain, obviously-correct model of the rules.

Hypothesis drives both with random sequences of calls (succeeding, failing with a
counted or an uncounted error), clock advances, manual trips and resets, and calls
left in flight (started, then finished or cancelled later, so probes overlap and
outcomes arrive after the circuit has moved on). After every step the engine's
snapshot must equal the model's.

Calls in flight are ``aexecute`` coroutines stepped by hand: the model call awaits a
:class:`Gate` that suspends once, so no event loop and no thread is needed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from callpolicy import CallPolicy, CircuitOpenError, CircuitState
from callpolicy._numbers import MAX_SECONDS
from tests.support.clock import FakeClock

KEY = "acme::m1"
CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class Counted(Exception):
    status_code = 503


class Uncounted(Exception):
    status_code = 400


# -- the model -------------------------------------------------------------------------------


@dataclass
class Ticket:
    """What the model remembers of an admitted call: the period it was admitted in."""

    period: int
    probe: bool


class Refused(Exception):
    def __init__(self, failures: int, retry_in: float | None) -> None:
        self.failures = failures
        self.retry_in = retry_in


class BreakerModel:
    """The breaker rules, written out as plainly as possible.

    A "period" is the time between two state changes; an outcome is only recorded if
    its call was admitted in the current period.
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        cooldown: float,
        half_open_max_calls: int,
        success_threshold: int,
        cooldown_multiplier: float,
        max_cooldown: float | None,
        failure_rate_threshold: float | None,
        window_size: int,
        minimum_calls: int,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_cooldown = cooldown
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = success_threshold
        self.cooldown_multiplier = cooldown_multiplier
        self.max_cooldown = max_cooldown
        self.failure_rate_threshold = failure_rate_threshold
        self.window: deque[bool] = deque(maxlen=window_size)
        self.minimum_calls = minimum_calls

        self.state = CLOSED
        self.period = 0
        self.failures = 0
        self.trips = 0
        self.opens_in_a_row = 0
        self.open_until = 0.0
        self.probes = 0
        self.probe_successes = 0

    def _change(self, state: CircuitState) -> None:
        self.state = state
        self.period += 1

    def _open(self, now: float) -> None:
        self.opens_in_a_row += 1
        self.trips += 1
        cooldown = self.base_cooldown * self.cooldown_multiplier ** (self.opens_in_a_row - 1)
        # Without max_cooldown, a growing cooldown stops at the longest duration (ten years).
        cooldown = min(cooldown, MAX_SECONDS if self.max_cooldown is None else self.max_cooldown)
        self.open_until = now + cooldown
        self.probes = 0
        self.window.clear()
        self._change(OPEN)

    def _close(self) -> None:
        self.failures = 0
        self.opens_in_a_row = 0
        self.probes = 0
        self.window.clear()
        self._change(CLOSED)

    def admit(self, now: float) -> Ticket:
        if self.state is CLOSED:
            return Ticket(self.period, probe=False)
        if self.state is OPEN:
            if now < self.open_until:
                raise Refused(self.failures, self.open_until - now)
            self._change(HALF_OPEN)
            self.probes = 0
            self.probe_successes = 0
        if self.probes == self.half_open_max_calls:
            raise Refused(self.failures, 0.0)
        self.probes += 1
        return Ticket(self.period, probe=True)

    def finish(self, ticket: Ticket, outcome: str, now: float) -> None:
        """``outcome``: "success", "counted", or "neutral" (uncounted error, cancellation)."""
        if ticket.period != self.period:
            return  # stale: admitted before the last state change
        if ticket.probe:
            self.probes -= 1
            if outcome == "success":
                self.probe_successes += 1
                if self.probe_successes == self.success_threshold:
                    self._close()
            elif outcome == "counted":
                self.failures += 1
                self._open(now)
            return
        if outcome == "success":
            self.failures = 0
            self.window.append(False)
        elif outcome == "counted":
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._open(now)
                return
            self.window.append(True)
            rate = self.failure_rate_threshold
            if (
                rate is not None
                and len(self.window) >= self.minimum_calls
                and sum(self.window) / len(self.window) >= rate
            ):
                self._open(now)

    def trip(self, now: float) -> None:
        self._open(now)

    def reset(self) -> None:
        self._close()

    def retry_in(self, now: float) -> float | None:
        if self.state is OPEN:
            return max(self.open_until - now, 0.0)
        return 0.0 if self.state is HALF_OPEN else None


# -- calls in flight -----------------------------------------------------------------------


class Gate:
    """An awaitable that suspends once; on resumption it returns or raises ``result``."""

    def __init__(self) -> None:
        self.result: object = "ok"

    def __await__(self) -> Generator[None, None, object]:
        yield
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@dataclass
class InFlight:
    coroutine: Coroutine[Any, Any, object]
    gate: Gate
    ticket: Ticket


# -- the machine -------------------------------------------------------------------------------

OUTCOMES = st.sampled_from(["success", "counted", "uncounted"])


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.in_flight: list[InFlight] = []
        self.engine_refusals = 0
        self.model_refusals = 0
        self.engine_calls = 0
        self.model_calls = 0

    @initialize(
        failure_threshold=st.integers(1, 4),
        cooldown=st.sampled_from([1.0, 5.0, 10.0]),
        half_open_max_calls=st.integers(1, 3),
        success_threshold=st.integers(1, 3),
        cooldown_multiplier=st.sampled_from([1.0, 2.0]),
        max_cooldown_factor=st.sampled_from([None, 1.0, 3.0]),
        # Exact binary fractions, so "failures >= rate * calls" has no rounding to argue over.
        failure_rate_threshold=st.sampled_from([None, 0.25, 0.5, 0.75, 1.0]),
        window=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    )
    def configure(
        self,
        failure_threshold: int,
        cooldown: float,
        half_open_max_calls: int,
        success_threshold: int,
        cooldown_multiplier: float,
        max_cooldown_factor: float | None,
        failure_rate_threshold: float | None,
        window: tuple[int, int],
    ) -> None:
        window_size, minimum_calls = max(window), min(window)
        options: dict[str, Any] = {
            "failure_threshold": failure_threshold,
            "cooldown": cooldown,
            "half_open_max_calls": half_open_max_calls,
            "success_threshold": success_threshold,
            "cooldown_multiplier": cooldown_multiplier,
            "max_cooldown": None if max_cooldown_factor is None else cooldown * max_cooldown_factor,
            "failure_rate_threshold": failure_rate_threshold,
            "window_size": window_size,
            "minimum_calls": minimum_calls,
        }
        self.policy = CallPolicy(clock=self.clock, **options)
        self.model = BreakerModel(**options)

    # -- rules -------------------------------------------------------------------------
    def _model_admit(self) -> Ticket | None:
        try:
            ticket = self.model.admit(self.clock.now)
        except Refused as refused:
            self.model_refusals += 1
            self.model_refusal = refused
            return None
        self.model_calls += 1
        return ticket

    def _check_refusal(self, error: CircuitOpenError) -> None:
        self.engine_refusals += 1
        assert error.failures == self.model_refusal.failures
        assert error.retry_in == pytest.approx(self.model_refusal.retry_in)

    @rule(outcome=OUTCOMES)
    def call(self, outcome: str) -> None:
        """A call that starts and finishes before anything else happens."""

        def model_call() -> str:
            self.engine_calls += 1
            if outcome == "counted":
                raise Counted("503 service unavailable")
            if outcome == "uncounted":
                raise Uncounted("400 bad request")
            return "ok"

        ticket = self._model_admit()
        try:
            result = self.policy.execute(KEY, model_call)
        except CircuitOpenError as error:
            self._check_refusal(error)
            assert ticket is None, "the engine refused a call the model admits"
            return
        except (Counted, Uncounted):
            assert outcome != "success"
        else:
            assert (result, outcome) == ("ok", "success")
        assert ticket is not None, "the engine admitted a call the model refuses"
        self.model.finish(ticket, "neutral" if outcome == "uncounted" else outcome, self.clock.now)

    @rule()
    def start_call(self) -> None:
        """A call that stays in flight (a slow answer, or a probe) until finished later."""
        gate = Gate()

        async def model_call() -> object:
            self.engine_calls += 1
            return await gate

        ticket = self._model_admit()
        coroutine = self.policy.aexecute(KEY, model_call)
        try:
            coroutine.send(None)
        except CircuitOpenError as error:
            self._check_refusal(error)
            assert ticket is None, "the engine refused a call the model admits"
            return
        assert ticket is not None, "the engine admitted a call the model refuses"
        self.in_flight.append(InFlight(coroutine, gate, ticket))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "counted", "uncounted", "cancel"]))
    def finish_call(self, data: st.DataObject, outcome: str) -> None:
        index = data.draw(st.integers(0, len(self.in_flight) - 1), label="which call")
        call = self.in_flight.pop(index)
        expected: type[BaseException] | None = None
        if outcome == "counted":
            expected = Counted
            call.gate.result = Counted("503 service unavailable")
        elif outcome == "uncounted":
            expected = Uncounted
            call.gate.result = Uncounted("400 bad request")
        elif outcome == "cancel":
            expected = asyncio.CancelledError
        returned: object = None
        raised: BaseException | None = None
        try:
            if outcome == "cancel":
                call.coroutine.throw(asyncio.CancelledError())
            else:
                call.coroutine.send(None)
        except StopIteration as done:
            returned = done.value
        except BaseException as error:
            raised = error
        else:
            raise AssertionError("the call did not finish")
        if expected is None:
            assert (returned, raised) == ("ok", None)
        else:
            assert isinstance(raised, expected)
        neutral = outcome in ("uncounted", "cancel")
        self.model.finish(call.ticket, "neutral" if neutral else outcome, self.clock.now)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 5.0, 10.0, 30.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def wait_out_the_cooldown(self) -> None:
        """Jump to the moment the open circuit admits a probe (makes half-open common)."""
        if self.model.state is OPEN:
            self.clock.now = max(self.clock.now, self.model.open_until)

    @rule()
    def trip(self) -> None:
        self.policy.trip(KEY)
        self.model.trip(self.clock.now)

    @rule()
    def reset(self) -> None:
        self.policy.reset(KEY)
        self.model.reset()

    # -- the comparison ------------------------------------------------------------------
    @invariant()
    def engine_matches_model(self) -> None:
        if not hasattr(self, "policy"):
            return
        snapshot = self.policy.snapshot().get(KEY)
        if snapshot is None:  # never called yet
            assert self.model.state is CLOSED
            return
        model = self.model
        assert snapshot.state is model.state
        assert snapshot.failures == model.failures
        assert snapshot.trips == model.trips
        assert snapshot.probes_in_flight == model.probes
        assert snapshot.retry_in == pytest.approx(model.retry_in(self.clock.now))
        if model.failure_rate_threshold is not None:
            assert snapshot.calls_in_window == len(model.window)
            assert snapshot.failures_in_window == sum(model.window)
        assert self.engine_refusals == self.model_refusals
        assert self.engine_calls == self.model_calls

    def teardown(self) -> None:
        for call in self.in_flight:
            call.coroutine.close()


BreakerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBreakerAgainstModel = BreakerMachine.TestCase
