"""The caller's own mistakes (``ErrorClass.CALLER``) are not the provider's failures.

A built-in ``TypeError``/``ValueError``/``KeyError``/``AttributeError`` (pydantic's
``ValidationError`` is a ``ValueError``) with nothing from the HTTP layer along its chain
is the caller's: never counted, never retried, never handed to the fallback (in every
``fallback_on`` mode), with or without a cache and a budget. A response that did not parse
stays the provider's failure.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pydantic
import pytest

from callpolicy import (
    DEFAULT_COUNTED_ERRORS,
    DEFAULT_RETRYABLE_ERRORS,
    Budget,
    CallPolicy,
    CallRequest,
    CircuitState,
    ErrorClass,
    ResponseCache,
    RetryPolicy,
    classify_error,
)
from tests.support.clock import FakeClock, FakeSleeper

CALLER = ErrorClass.CALLER
KEY, BACKUP = "acme::m1", "acme::backup"
REQUEST = httpx.Request("POST", "https://api.example.test/v1/chat/completions")


class Strict(pydantic.BaseModel):
    n: int


def validation_error() -> pydantic.ValidationError:
    try:
        Strict(n="not a number")  # type: ignore[arg-type]
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


def raised_during(context: BaseException, error: BaseException) -> BaseException:
    try:
        try:
            raise context
        except BaseException:
            raise error  # noqa: B904 (the implicit context is the point)
    except BaseException as caught:
        return caught


def raised_from(cause: BaseException, error: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def json_error() -> json.JSONDecodeError:
    try:
        json.loads("not json")
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


def unicode_error() -> UnicodeDecodeError:
    try:
        b"\xff\xfe".decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


def unserializable() -> TypeError:
    try:
        json.dumps({"x": object()})
    except TypeError as exc:
        return exc
    raise AssertionError("unreachable")


def nan_in_a_schema() -> ValueError:
    try:
        json.dumps({"maximum": float("nan")}, allow_nan=False)
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


class RequestsLikeInvalidURL(OSError, ValueError):
    """requests' InvalidURL: a RequestException (an OSError) and a ValueError."""


CALLERS = [
    pytest.param(ValueError("Invalid input type <class 'NoneType'>"), id="ValueError"),
    pytest.param(TypeError("'NoneType' object is not iterable"), id="TypeError"),
    pytest.param(KeyError("messages"), id="KeyError"),
    pytest.param(IndexError("list index out of range"), id="IndexError"),
    pytest.param(AttributeError("'NoneType' object has no attribute 'role'"), id="AttributeError"),
    pytest.param(NameError("undefined"), id="NameError"),
    pytest.param(NotImplementedError("bind_tools"), id="NotImplementedError"),
    pytest.param(validation_error(), id="pydantic-ValidationError"),
    pytest.param(unserializable(), id="unserializable-value"),
    pytest.param(nan_in_a_schema(), id="NaN-in-a-tool-schema"),
    # A caller's message can say anything: the text never makes it the provider's.
    pytest.param(ValueError("timeout must be > 0"), id="text-says-timeout"),
    pytest.param(ValueError("prompt: 'why do I get HTTP 500 and 429?'"), id="text-says-500"),
    pytest.param(
        raised_during(KeyError("k"), TypeError("while handling")), id="chain-of-callers-errors"
    ),
]

PROVIDERS = [
    pytest.param(json_error(), ErrorClass.UNKNOWN, id="JSONDecodeError-malformed-response"),
    pytest.param(unicode_error(), ErrorClass.UNKNOWN, id="UnicodeDecodeError-malformed-response"),
    pytest.param(
        raised_during(json_error(), StopIteration()), ErrorClass.UNKNOWN, id="json-in-the-chain"
    ),
    pytest.param(
        openai.APIResponseValidationError(
            response=httpx.Response(200, request=REQUEST), body=None, message="bad body"
        ),
        ErrorClass.UNKNOWN,
        id="openai-APIResponseValidationError",
    ),
    pytest.param(
        raised_from(ConnectionResetError(104, "reset"), ValueError("wrapper")),
        ErrorClass.NETWORK,
        id="ValueError-from-a-connection-error",
    ),
    pytest.param(
        raised_during(httpx.ReadError("boom", request=REQUEST), TypeError("while handling")),
        ErrorClass.NETWORK,
        id="TypeError-during-an-httpx-error",
    ),
    pytest.param(
        raised_from(OSError("ssl handshake"), KeyError("k")),
        ErrorClass.UNKNOWN,
        id="KeyError-from-an-OSError",
    ),
    pytest.param(RequestsLikeInvalidURL("no scheme"), ErrorClass.UNKNOWN, id="OSError-ValueError"),
    pytest.param(httpx.InvalidURL("bad"), ErrorClass.UNKNOWN, id="httpx-InvalidURL"),
    pytest.param(RuntimeError("x"), ErrorClass.UNKNOWN, id="RuntimeError"),
]


@pytest.mark.parametrize("error", CALLERS)
def test_a_callers_mistake_is_classed_caller(error: BaseException) -> None:
    assert classify_error(error).error_class is CALLER


@pytest.mark.parametrize(("error", "expected"), PROVIDERS)
def test_the_http_layer_and_malformed_responses_stay_the_providers(
    error: BaseException, expected: ErrorClass
) -> None:
    assert classify_error(error).error_class is expected


def test_caller_is_neither_counted_nor_retried_by_default() -> None:
    assert CALLER not in DEFAULT_COUNTED_ERRORS
    assert CALLER not in DEFAULT_RETRYABLE_ERRORS


# -- the engine -------------------------------------------------------------------------


class Calls:
    """A model that raises ``error`` (counting its calls) and a fallback that counts too."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.primary = 0
        self.fallback = 0

    def call(self) -> str:
        self.primary += 1
        raise self.error

    async def acall(self) -> str:
        return self.call()

    def backup(self) -> str:
        self.fallback += 1
        return "from backup"

    async def abackup(self) -> str:
        return self.backup()


def request() -> CallRequest[str]:
    return CallRequest(
        describe=lambda: {"messages": ["hi"]},
        input_text=lambda: "hi",
        encode=lambda text: {"text": text},
        decode=lambda data: str(data["text"]),
    )


async def run(
    policy: CallPolicy,
    mode: str,
    calls: Calls,
    *,
    fallback: bool = True,
    fallback_key: str | None = BACKUP,
    **outer: Any,
) -> str:
    if outer:
        outer["request"] = request()
    if mode == "sync":
        return policy.execute(
            KEY,
            calls.call,
            fallback=calls.backup if fallback else None,
            fallback_key=fallback_key,
            **outer,
        )
    return await policy.aexecute(
        KEY,
        calls.acall,
        fallback=calls.abackup if fallback else None,
        fallback_key=fallback_key,
        **outer,
    )


@pytest.mark.parametrize("fallback_on", ["failure", "open", "error"])
@pytest.mark.parametrize("outer", ["bare", "cache", "budget", "cache+budget"])
async def test_caller_errors_never_trip_never_retry_never_fall_back(
    mode: str, fallback_on: str, outer: str
) -> None:
    clock = FakeClock()
    sleeper = FakeSleeper(clock)
    policy = CallPolicy(
        failure_threshold=3,
        fallback_on=fallback_on,  # type: ignore[arg-type]
        retry=RetryPolicy(max_attempts=4, deadline=None),
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
    )
    options: dict[str, Any] = {}
    if "cache" in outer:
        options["cache"] = ResponseCache(clock=FakeClock.wall())
    budget = Budget(max_calls=2) if "budget" in outer else None
    if budget is not None:
        options["budget"] = budget
    calls = Calls(ValueError("Invalid input type <class 'NoneType'>"))
    for _ in range(5):
        with pytest.raises(ValueError, match="Invalid input type"):
            await run(policy, mode, calls, **options)
    assert calls.primary == 5  # one attempt each: never retried
    assert calls.fallback == 0  # never handed to the fallback, in any mode
    assert sleeper.delays == []
    assert policy.state(KEY) is CircuitState.CLOSED
    assert policy.state(BACKUP) is CircuitState.CLOSED
    counts = policy.metrics()[KEY]
    assert counts.failure_count == 0
    assert counts.ignored == {CALLER: 5}
    assert counts.fallbacks == 0
    assert counts.retries == 0
    if budget is not None:  # nothing left the process: no round of the budget used
        assert budget.usage().calls == 0
        assert budget.usage().in_flight == 0


async def test_a_healthy_call_goes_on_after_caller_errors(mode: str) -> None:
    policy = CallPolicy(failure_threshold=1, clock=FakeClock())
    calls = Calls(TypeError("Object of type Opaque is not JSON serializable"))
    for _ in range(3):
        with pytest.raises(TypeError):
            await run(policy, mode, calls)
    calls.error = None  # type: ignore[assignment]

    def healthy() -> str:
        return "fine"

    async def ahealthy() -> str:
        return "fine"

    if mode == "sync":
        assert policy.execute(KEY, healthy) == "fine"
    else:
        assert await policy.aexecute(KEY, ahealthy) == "fine"


async def test_the_fallbacks_own_caller_errors_do_not_count_against_its_circuit(
    mode: str,
) -> None:
    """The primary fails for real (its circuit is open); the fallback, handed a request
    it cannot serialize, raises the caller's error: the fallback's circuit stays closed."""
    policy = CallPolicy(failure_threshold=1, clock=FakeClock())
    policy.trip(KEY)

    def primary() -> str:
        raise AssertionError("an open circuit calls no model")

    def backup() -> str:
        raise TypeError("Object of type Opaque is not JSON serializable")

    async def aprimary() -> str:
        return primary()

    async def abackup() -> str:
        return backup()

    async def guarded() -> str:
        if mode == "sync":
            return policy.execute(KEY, primary, fallback=backup, fallback_key=BACKUP)
        return await policy.aexecute(KEY, aprimary, fallback=abackup, fallback_key=BACKUP)

    for _ in range(3):
        with pytest.raises(TypeError, match="not JSON serializable"):
            await guarded()
    assert policy.state(BACKUP) is CircuitState.CLOSED
    assert policy.metrics()[BACKUP].ignored == {CALLER: 3}


async def test_a_half_open_probe_ended_by_a_caller_error_frees_its_slot(mode: str) -> None:
    clock = FakeClock()
    policy = CallPolicy(failure_threshold=1, cooldown=10, clock=clock)
    policy.trip(KEY)
    clock.advance(10)
    calls = Calls(KeyError("messages"))
    with pytest.raises(KeyError):
        await run(policy, mode, calls, fallback=False)
    # Neutral: the probe slot is free again and the circuit did not re-open.
    snapshot = policy.snapshot()[KEY]
    assert snapshot.state is CircuitState.HALF_OPEN
    assert snapshot.probes_in_flight == 0


async def test_a_malformed_response_still_counts(mode: str) -> None:
    policy = CallPolicy(failure_threshold=3, clock=FakeClock())
    calls = Calls(json_error())
    for _ in range(3):
        assert await run(policy, mode, calls) == "from backup"
    assert policy.state(KEY) is CircuitState.OPEN


def test_callers_can_opt_in_to_counting_caller_errors_but_never_to_the_fallback() -> None:
    policy = CallPolicy(
        failure_threshold=2,
        counted_errors=DEFAULT_COUNTED_ERRORS | {CALLER},
        fallback_on="error",
        clock=FakeClock(),
    )
    calls = Calls(ValueError("bad input"))
    for _ in range(2):
        with pytest.raises(ValueError, match="bad input"):
            policy.execute(KEY, calls.call, fallback=calls.backup)
    assert policy.state(KEY) is CircuitState.OPEN
    assert calls.fallback == 0


async def test_many_concurrent_caller_errors_leave_the_circuit_closed() -> None:
    policy = CallPolicy(failure_threshold=1, half_open_max_calls=1, clock=FakeClock())

    async def bad() -> str:
        await asyncio.sleep(0)
        raise TypeError("bad input")

    results = await asyncio.gather(
        *(policy.aexecute(KEY, bad) for _ in range(200)), return_exceptions=True
    )
    assert all(isinstance(result, TypeError) for result in results)
    assert policy.state(KEY) is CircuitState.CLOSED
    assert policy.metrics()[KEY].ignored == {CALLER: 200}
