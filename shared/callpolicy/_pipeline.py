"""The pipeline: the strategies of one policy, composed once, in their order.

Outermost first (docs/how-it-works.md draws it and says why each stands where it does)::

    cache -> budget -> fallback -> retry -> breaker -> the model call

The last three are the policy's own and are composed here, once, at construction, from
what the policy was configured with: without a ``RetryPolicy`` there is no retry loop at
all (a failure is settled by the breaker at once). The cache and the budget are handed to
each call, so :meth:`Core.outer` wraps them around the policy's call, per call, and only
for a call that has one.

Each strategy is a module of its own, which owns its decisions, counts and events:
``_caching``, ``_budgeting``, ``_fallback``, ``_retrying``, ``_breaking``. Its steps are
written once and run by the sync or the async driver (``_drive``). A new strategy takes
its place in the order the same way: an attempt timeout and hedging wrap the model call
(between retry and breaker: every attempt is bounded, and each counts in the breaker);
a rate limit and a concurrency limit stand after the budget and before the fallback
(a call waits for capacity once, however many attempts it makes, and a refusal to wait
longer is an error the fallback may serve).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ._breaking import Breaker, Verdict, refused_state
from ._budget import Budget
from ._budgeting import Budgeting
from ._cache import ResponseCache
from ._caching import Caching, Fallback
from ._classify import Classification
from ._config import FallbackOn, RetryPolicy
from ._drive import Body, Held, Op, admit_op, record_op
from ._errors import CircuitOpenError
from ._events import Announcer
from ._fallback import FallingBack, Step
from ._request import CallRequest
from ._retrying import Retrying
from ._store import Permit
from ._tally import Tallies, _Tally
from ._types import ErrorClass, Outcome

__all__ = ["Core"]


class Guarded(Protocol):
    """The policy's own call, as the outer strategies (cache, budget) make it."""

    @property
    def execute(self) -> Callable[..., Any]: ...

    @property
    def aexecute(self) -> Callable[..., Awaitable[Any]]: ...


class Core:
    """What a :class:`~callpolicy.CallPolicy` is built of, behind its public face."""

    __slots__ = (
        "attempts",
        "breaker",
        "budgeting",
        "caching",
        "clock",
        "falling_back",
        "retrying",
        "tallies",
    )

    def __init__(
        self,
        *,
        tallies: Tallies,
        announcer: Announcer,
        counted: frozenset[ErrorClass],
        classify: Callable[[BaseException], Classification],
        retry: RetryPolicy | None,
        fallback_on: FallbackOn,
        clock: Callable[[], float],
        sleep: Callable[[float], object],
        async_sleep: Callable[[float], Awaitable[object]],
        rng: random.Random,
    ) -> None:
        self.tallies = tallies
        self.clock = clock
        breaker = Breaker(counted=counted, classify=classify, tallies=tallies, announcer=announcer)
        self.breaker = breaker
        self.retrying: Retrying | None = None
        if retry is not None:
            self.retrying = Retrying(
                retry, breaker=breaker, clock=clock, sleep=sleep, async_sleep=async_sleep, rng=rng
            )
        self.attempts = breaker.settle if self.retrying is None else self.retrying.attempts
        """After a first attempt failed: retry (if configured), then the verdict."""
        self.falling_back = FallingBack(fallback_on, breaker=breaker)
        self.budgeting = Budgeting(breaker=breaker)
        self.caching = Caching(breaker=breaker)

    def recover(
        self,
        tally: _Tally,
        permit: Permit,
        error: Exception,
        attempt: Op,
        fallback: Fallback,
        fallback_key: str | None,
        started: float,
        step: Step | None = None,
        hold: bool = False,
    ) -> Body[Any]:
        """The first ``attempt`` failed with ``error``: the rest of the policy's pipeline
        (retry, then the fallback, each of its calls made by ``step``), ending with an
        answer or the error to raise. With ``hold`` a retry that succeeds answers
        :class:`Held`, its permit still to record (a stream's)."""
        ended = yield from self.attempts(tally, permit, error, attempt, started)
        if type(ended) is Held:
            if hold:
                return ended
            yield record_op(tally.circuit, ended.permit, Outcome.SUCCESS)
            tally.successes += 1
            return ended.result
        assert isinstance(ended, Verdict)
        falling_back = self.falling_back
        if fallback is None or not (
            ended.refused or falling_back.wants(ended.classification, ended.outcome)
        ):
            raise ended.error
        cause, classification, state = ended.error, ended.classification, ended.state
        # A call's fallback answers in the primary's place, so its errors chain to the
        # primary's (the classifier reads that chain); a stream's fallback is opened
        # after the primary's attempts are over, as a call of its own.
        return (
            yield from falling_back.serve(
                tally, fallback, fallback_key, cause, classification, state, step, not hold
            )
        )

    def held(
        self,
        tally: _Tally,
        attempt: Op,
        fallback: Fallback,
        fallback_key: str | None,
        step: Step,
    ) -> Body[Any]:
        """The whole pipeline around one ``attempt`` that keeps its permit (a stream's
        opening): admission, retries, the fallback (by ``step``). :class:`Held` when the
        primary's attempt succeeded, else what ``step`` answered for the fallback."""
        started = self.clock() if self.retrying is not None else 0.0
        try:
            permit = yield admit_op(tally.circuit)
        except CircuitOpenError as refusal:
            self.breaker.refused(tally, refusal)
            if fallback is None:
                raise
            cause = refusal.with_traceback(None)  # kept in the fallback's context: no cycle
            serving = self.falling_back.serve(
                tally, fallback, fallback_key, cause, None, refused_state(cause), step
            )
        else:
            try:
                result = yield attempt
            except Exception as exc:
                serving = self.recover(
                    tally, permit, exc, attempt, fallback, fallback_key, started, step, True
                )
            except BaseException:
                yield from self.breaker.abandon(tally, permit)
                raise
            else:
                return Held(permit, result)
        return (yield from serving)

    def outer(
        self,
        policy: Guarded,
        key: str,
        call: Callable[[], Any],
        fallback: Fallback,
        fallback_key: str | None,
        budget: Budget | None,
        cache: ResponseCache | None,
        request: CallRequest[Any] | None,
    ) -> Body[Any]:
        """The cache, then the budget, around the policy's own call (``execute`` or
        ``aexecute``, whichever driver runs this), for a call that has either."""
        if request is None:
            raise TypeError("request: a CallRequest is needed when a budget or cache is given")

        def route(routed: Fallback) -> Op:
            return Op(
                policy.execute,
                policy.aexecute,
                key,
                call,
                fallback=routed,
                fallback_key=fallback_key,
            )

        def inner(routed: Fallback) -> Body[Any]:
            if budget is None:
                return (yield route(routed))
            return (
                yield from self.budgeting.body(budget, request, key, routed, fallback_key, route)
            )

        if cache is None:
            return (yield from inner(fallback))
        return (yield from self.caching.body(cache, request, key, fallback, inner))
