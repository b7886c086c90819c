"""The retry strategy: between the fallback and the breaker.

Outside the breaker so that *every attempt* passes through it: a storm of retries counts
as the failures it is and trips the circuit, and a retry never goes to an open circuit
(it is refused, and the call goes on to the fallback). Inside the fallback so that the
fallback sees the final verdict, after the last attempt.

Built only when the policy has a ``RetryPolicy``: without one, the pipeline settles the
first failure at once (``Breaker.settle``) and nothing here runs.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

from ._breaking import Breaker, Verdict
from ._classify import Classification
from ._config import RetryPolicy
from ._drive import Body, Held, Op, admit_op, record_op
from ._errors import CircuitOpenError, add_note
from ._events import Event, EventKind
from ._store import Circuit, Permit
from ._tally import _Tally
from ._types import CircuitState

__all__ = ["Retrying", "note_gave_up"]

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN


class Retrying:
    """Decides whether and when another attempt is made, and makes it."""

    __slots__ = ("async_sleep", "breaker", "clock", "policy", "rng", "sleep")

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        breaker: Breaker,
        clock: Callable[[], float],
        sleep: Callable[[float], object],
        async_sleep: Callable[[float], Awaitable[object]],
        rng: random.Random,
    ) -> None:
        self.policy = policy
        self.breaker = breaker
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep
        self.rng = rng

    def delay(
        self,
        circuit: Circuit,
        exc: Exception,
        classification: Classification,
        state: CircuitState,
        attempt: int,
        started: float,
    ) -> float | None:
        """Seconds to wait before another attempt, or None to give up (noting why on the
        error). Counts the retry and announces it."""
        retry = self.policy
        clock = self.clock
        if classification.error_class not in retry.retry_on:
            if attempt > 1:
                note_gave_up(exc, circuit, attempt, clock() - started, "not retryable")
            return None
        if state is not _CLOSED:
            why = "the circuit opened" if state is _OPEN else f"the circuit is {state}"
            note_gave_up(exc, circuit, attempt, clock() - started, why)
            return None
        if attempt >= retry.max_attempts:
            note_gave_up(exc, circuit, attempt, clock() - started, "attempts exhausted")
            return None
        delay = retry.delay(attempt, classification.retry_after, self.rng)
        if retry.deadline is not None and clock() - started + delay > retry.deadline:
            note_gave_up(exc, circuit, attempt, clock() - started, "deadline reached")
            return None
        breaker = self.breaker
        breaker.tallies.add(breaker.tallies.get(circuit.key), "retries")
        breaker.announcer.emit(
            Event(
                EventKind.RETRY,
                circuit.key,
                circuit.provider,
                circuit.model,
                error_class=classification.error_class,
                error_type=type(exc).__name__,
                attempt=attempt,
                delay=delay,
            )
        )
        return delay

    def readmitted(
        self,
        tally: _Tally,
        refusal: CircuitOpenError,
        last_error: Exception,
        attempts: int,
        started: float,
    ) -> None:
        """The circuit refused a retry: count the refusal, note on the error why we stopped."""
        self.breaker.refused(tally, refusal)
        note_gave_up(
            last_error, tally.circuit, attempts, self.clock() - started, "the circuit opened"
        )

    def attempts(
        self, tally: _Tally, permit: Permit, error: Exception, attempt: Op, started: float
    ) -> Body[Verdict | Held]:
        """The first ``attempt`` failed with ``error``: record it, and make the attempt
        again while the policy says so. :class:`Held` (its permit still to record) for an
        attempt that succeeded, else the :class:`Verdict`."""
        breaker = self.breaker
        circuit = tally.circuit
        count = 1
        while True:
            classification, outcome = breaker.failed(tally, error)
            state = yield record_op(circuit, permit, outcome)
            delay = self.delay(circuit, error, classification, state, count, started)
            if delay is None:
                return Verdict(error, classification, outcome, state)
            yield Op(self.sleep, self.async_sleep, delay)
            count += 1
            try:
                permit = yield admit_op(circuit)
            except CircuitOpenError as refusal:
                self.readmitted(tally, refusal, error, count - 1, started)
                # Refused mid-retry: the circuit is open, so every mode falls back.
                return Verdict(error, classification, outcome, _OPEN, refused=True)
            try:
                result = yield attempt
            except Exception as exc:
                error = exc
            except BaseException:
                yield from breaker.abandon(tally, permit)
                raise
            else:
                return Held(permit, result)


def note_gave_up(
    exc: BaseException, circuit: Circuit, attempts: int, elapsed: float, why: str
) -> None:
    add_note(
        exc,
        f"callpolicy: gave up on {circuit.provider}/{circuit.model} after {attempts} "
        f"attempt{'s' if attempts != 1 else ''} over {elapsed:.2f}s ({why})",
    )
