"""The budget strategy, per call: after the cache, before the fallback.

After the cache, so a hit costs no budget. Before the fallback, so a call the budget
refuses (:class:`BudgetExceededError`) reaches no model at all, and a call the fallback
serves is still a call: its usage is counted under the model that answered.

A budget is handed to each call (``execute(..., budget=)``), so this layer is composed
per call around the policy's own pipeline, and costs nothing to a call without one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ._breaking import Breaker
from ._budget import Budget, Usage
from ._budget_store import BudgetExceededError
from ._drive import Body, Op
from ._errors import CircuitOpenError
from ._events import Event, EventKind
from ._fallback import Fallbacks
from ._request import CallRequest
from ._types import ErrorClass, split_key

__all__ = ["Budgeting"]

T = TypeVar("T")

_CALLER = ErrorClass.CALLER

Route = Callable[[Callable[[], Any] | Fallbacks[Any] | None], Op]
"""The call to make under the budget, given the fallback to make it with."""


class Budgeting:
    """Reserves before the call, settles after it (commit, or release with a refund
    when no model was reached)."""

    __slots__ = ("breaker",)

    def __init__(self, *, breaker: Breaker) -> None:
        self.breaker = breaker

    def refused(self, key: str, refusal: BudgetExceededError) -> None:
        breaker = self.breaker
        breaker.tallies.add(breaker.tallies.get(key), "budget_refusals")
        if not breaker.announcer.heard(logging.WARNING):
            return
        provider, model = split_key(key)
        breaker.announcer.emit(
            Event(
                EventKind.BUDGET_REFUSED,
                key,
                provider,
                model,
                reason=f"{refusal.kind}: {refusal.consumed} of {refusal.limit}",
                error_type=type(refusal).__name__,
            )
        )

    def never_sent(self, exc: Exception, answered: str, key: str) -> bool:
        """A call that failed with the caller's own mistake, the fallback never started:
        it reached no model, so it costs no round."""
        return answered == key and self.breaker.classify(exc).error_class is _CALLER

    def body(
        self,
        budget: Budget,
        request: CallRequest[Any],
        key: str,
        fallback: Callable[[], Any] | Fallbacks[Any] | None,
        fallback_key: str | None,
        route: Route,
    ) -> Body[Any]:
        try:
            reservation = yield Op(
                budget.reserve, budget.areserve, key, budget.estimate(request.input_text())
            )
        except BudgetExceededError as refusal:
            self.refused(key, refusal)
            raise
        answered = [key]
        if isinstance(fallback, Fallbacks):
            fallback = fallback.map(functools.partial(_answering, answered))
        elif fallback is not None:
            fallback = _answering(answered, fallback_key or key, fallback)
        try:
            result = yield route(fallback)
        except CircuitOpenError:
            yield Op(budget.release, budget.arelease, reservation, refund_call=answered[0] == key)
            raise
        except Exception as exc:
            refund = self.never_sent(exc, answered[0], key)
            yield Op(budget.release, budget.arelease, reservation, refund_call=refund)
            raise
        except BaseException:
            yield Op(budget.release, budget.arelease, reservation)
            raise
        yield Op(
            budget.commit, budget.acommit, reservation, _usage(request, result), key=answered[0]
        )
        return result


def _answering(answered: list[str], key: str | None, call: Callable[[], T]) -> Callable[[], T]:
    """``call``, noting first that ``key`` (a fallback, or a step of a list) is answering:
    the budget counts the call's usage under the model that answered. What ``call``
    returns is handed on as it is (an awaitable, for an async call)."""

    def step() -> T:
        if key is not None:
            answered[0] = key
        return call()

    return step


def _usage(request: CallRequest[Any], result: object) -> Usage | None:
    if request.usage is None:
        return None
    return Usage.from_report(request.usage(result))
