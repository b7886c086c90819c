"""The breaker strategy: innermost, next to the model, so it counts exactly the
provider's answers.

The circuit itself (its state and rules) lives behind the ``CircuitStore`` seam
(``_store``); this module is what the pipeline does around it: judge an attempt's error
(counted or not, per ``counted_errors``), count it, tell listeners of a refusal, warn
once per key about credentials the provider refused, and guard one call once (a
fallback under its own key, a step of a list of fallbacks). The healthy attempt itself
(admit, call, record, count) is written inline in ``CallPolicy.execute``/``aexecute``:
it is the hot path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ._classify import Classification
from ._drive import Body, Held, Op, admit_op, record_op, release_op
from ._errors import CircuitOpenError
from ._events import Announcer, Event, EventKind, logger
from ._store import Circuit, Permit
from ._tally import Tallies, _Tally
from ._types import CircuitState, ErrorClass, Outcome

__all__ = ["Breaker", "Verdict", "refused_state"]

_FAILURE = Outcome.FAILURE
_IGNORED = Outcome.IGNORED
_AUTH = ErrorClass.AUTH


class Verdict:
    """How the primary's attempts ended, when none answered: what the fallback strategy
    decides on (``refused``: the circuit opened before a retry could be admitted)."""

    __slots__ = ("classification", "error", "outcome", "refused", "state")

    def __init__(
        self,
        error: Exception,
        classification: Classification,
        outcome: Outcome,
        state: CircuitState,
        refused: bool = False,
    ) -> None:
        self.error = error
        self.classification = classification
        self.outcome = outcome
        self.state = state
        self.refused = refused


class Breaker:
    """Judges and counts each attempt's end for the circuits of one policy."""

    __slots__ = ("announcer", "classify", "counted", "tallies")

    def __init__(
        self,
        *,
        counted: frozenset[ErrorClass],
        classify: Callable[[BaseException], Classification],
        tallies: Tallies,
        announcer: Announcer,
    ) -> None:
        self.counted = counted
        self.classify = classify
        self.tallies = tallies
        self.announcer = announcer

    def judge(self, exc: BaseException) -> tuple[Classification, Outcome]:
        """The error's class, and whether the circuit counts it (per ``counted_errors``)."""
        classification = self.classify(exc)
        counted = classification.error_class in self.counted
        return classification, (_FAILURE if counted else _IGNORED)

    def failed(self, tally: _Tally, exc: BaseException) -> tuple[Classification, Outcome]:
        """Judge and count an attempt's error; the outcome to record."""
        classification, outcome = self.judge(exc)
        error_class = classification.error_class
        seen = self.tallies.count_error(tally, error_class, outcome is _FAILURE)
        if error_class is _AUTH and seen == 1:
            _warn_auth(tally.circuit, classification)
        return classification, outcome

    def cancelled(self, tally: _Tally) -> None:
        self.tallies.add(tally, "cancelled")

    def refused(self, tally: _Tally, refusal: CircuitOpenError) -> None:
        """Count a refusal; an event only when someone would hear it (an open circuit
        refuses every call of an outage, so this stays lean)."""
        (tally.more or self.tallies.more(tally)).refusals += 1
        if not self.announcer.heard(logging.DEBUG):
            return
        circuit = tally.circuit
        self.announcer.emit(
            Event(
                EventKind.REFUSED,
                circuit.key,
                circuit.provider,
                circuit.model,
                state=refused_state(refusal),
                failures=refusal.failures,
                delay=refusal.retry_in,
            )
        )

    def settle(
        self, tally: _Tally, permit: Permit, error: Exception, attempt: Op, started: float
    ) -> Body[Verdict]:
        """The first attempt failed and nothing retries: record it; the verdict."""
        classification, outcome = self.failed(tally, error)
        state = yield record_op(tally.circuit, permit, outcome)
        return Verdict(error, classification, outcome, state)

    def abandon(self, tally: _Tally, permit: Permit) -> Body[None]:
        """An attempt ended by a cancellation, an interrupt or another BaseException:
        neither success nor failure; its slot is freed."""
        self.tallies.add(tally, "cancelled")
        yield release_op(tally.circuit, permit)

    def guarded(self, tally: _Tally, attempt: Op, hold: bool = False) -> Body[Any]:
        """``attempt`` once under ``tally``'s circuit (refused with CircuitOpenError when
        open): its result, recorded and counted; or, with ``hold``, :class:`Held` with
        the permit still to record (a stream's first chunk). Its error is raised after
        it is recorded."""
        circuit = tally.circuit
        try:
            permit = yield admit_op(circuit)
        except CircuitOpenError as refusal:
            self.refused(tally, refusal)
            raise
        try:
            result = yield attempt
        except Exception as exc:
            yield record_op(circuit, permit, self.failed(tally, exc)[1])
            raise
        except BaseException:
            yield from self.abandon(tally, permit)
            raise
        if hold:
            return Held(permit, result)
        yield record_op(circuit, permit, Outcome.SUCCESS)
        tally.successes += 1
        return result


def refused_state(refusal: CircuitOpenError) -> CircuitState:
    """The state a refusal comes from: half-open with its probe slots taken (no wait),
    or open (cooling down, or held)."""
    return CircuitState.HALF_OPEN if refusal.retry_in == 0.0 else CircuitState.OPEN


def _warn_auth(circuit: Circuit, classification: Classification) -> None:
    """A provider refused our credentials: said once per key, at WARNING, since behind a
    fallback a revoked key is otherwise silent. Names no secret (nor the provider's
    message, which can quote part of the key)."""
    status = "" if classification.status is None else f"HTTP {classification.status}, "
    logger.warning(
        "callpolicy: the provider of %r refused the credentials (%sauth): check its API "
        "key and permissions; every call to it fails (and goes to the fallback, if any) "
        "until they are fixed",
        circuit.key,
        status,
        extra={
            "callpolicy_event": "auth_failed",
            "callpolicy_key": circuit.key,
            "callpolicy_provider": circuit.provider,
            "callpolicy_model": circuit.model,
            "callpolicy_error_class": str(classification.error_class),
        },
    )
