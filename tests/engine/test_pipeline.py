"""The pipeline's pieces: one body of steps run by the sync and the async driver, the
shape composed at construction, and the per-key counts made only when needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from callpolicy import CallPolicy, CircuitOpenError, RetryPolicy
from callpolicy._drive import Body, Op, arun, call_op, run, within
from tests.support.clock import FakeClock, FakeSleeper

pytestmark = pytest.mark.parametrize("mode", ["sync", "async"])


def _drive(mode: str, body: Body[Any]) -> Any:
    return run(body) if mode == "sync" else asyncio.run(arun(body))


def _twice(mode: str, calls: list[str]) -> Callable[[], Any]:
    if mode == "sync":

        def sync() -> str:
            calls.append("called")
            return "answer"

        return sync

    async def asynchronous() -> str:
        calls.append("called")
        return "answer"

    return asynchronous


def _body(first: Callable[[], Any], failing: Callable[[], Any], log: list[object]) -> Body[Any]:
    """Calls ``first``, then ``failing``, catching its error; returns both results."""
    answer = yield call_op(first)
    try:
        yield call_op(failing)
    except ValueError as exc:
        log.append(exc)
    return answer, len(log)


def test_one_body_runs_the_same_under_both_drivers(mode: str) -> None:
    calls: list[str] = []
    log: list[object] = []

    if mode == "sync":

        def failing() -> None:
            raise ValueError("no")
    else:

        async def failing() -> None:
            raise ValueError("no")

    assert _drive(mode, _body(_twice(mode, calls), failing, log)) == ("answer", 1)
    assert calls == ["called"]
    assert isinstance(log[0], ValueError), "the op's error was thrown in at its yield"


def test_an_error_the_body_does_not_catch_reaches_the_caller_unchanged(mode: str) -> None:
    error = KeyError("mine")

    def body() -> Body[None]:
        yield Op(_raise, _araise, error)

    with pytest.raises(KeyError) as caught:
        _drive(mode, body())
    assert caught.value is error


def test_an_op_run_within_a_cause_chains_its_error_to_it(mode: str) -> None:
    cause = ConnectionError("the primary's")
    error = ValueError("the fallback's")

    def body() -> Body[None]:
        yield within(Op(_raise, _araise, error), cause)

    with pytest.raises(ValueError, match="the fallback's"):
        _drive(mode, body())
    assert error.__context__ is cause


def test_without_a_retry_policy_a_failure_is_settled_at_once(mode: str) -> None:
    plain = CallPolicy()
    assert plain._core.retrying is None
    assert plain._core.attempts == plain._core.breaker.settle
    retrying = CallPolicy(retry=RetryPolicy(jitter=0), sleep=FakeSleeper(FakeClock()))
    assert retrying._core.retrying is not None
    assert retrying._core.attempts == retrying._core.retrying.attempts


def test_a_key_only_ever_answered_keeps_no_other_counts(mode: str) -> None:
    policy = CallPolicy()
    if mode == "sync":
        policy.execute("acme::m1", lambda: "ok")
    else:

        async def ok() -> str:
            return "ok"

        asyncio.run(policy.aexecute("acme::m1", ok))
    tally = policy._tallies["acme::m1"]
    assert tally.more is None
    assert policy.metrics()["acme::m1"].successes == 1
    policy.force_open("acme::m1")
    with pytest.raises(CircuitOpenError):
        policy.execute("acme::m1", lambda: "ok")
    assert tally.more is not None
    assert policy.metrics()["acme::m1"].refusals == 1


def _raise(error: BaseException) -> None:
    raise error


async def _araise(error: BaseException) -> None:
    raise error
