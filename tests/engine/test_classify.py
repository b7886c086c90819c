"""Error classification: real SDK errors first, then shapes of other SDKs, then plain text.

The exceptions are built the way the SDKs build them (``openai`` errors around a real
``httpx.Response``), so a change in what the engine reads off them shows up here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate

import httpx
import openai
import pytest
from langchain_core.exceptions import (
    ContextOverflowError,
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelInvalidRequestError,
    ModelRateLimitError,
    ModelTimeoutError,
    OutputParserException,
)

from callpolicy import (
    CallPolicy,
    CircuitState,
    Classification,
    ErrorClass,
    classify_error,
    retry_after_from_headers,
)

RATE_LIMITED = ErrorClass.RATE_LIMITED
TIMEOUT = ErrorClass.TIMEOUT
NETWORK = ErrorClass.NETWORK
SERVER = ErrorClass.SERVER
CLIENT = ErrorClass.CLIENT
AUTH = ErrorClass.AUTH
CONTEXT_OVERFLOW = ErrorClass.CONTEXT_OVERFLOW
UNKNOWN = ErrorClass.UNKNOWN
CALLER = ErrorClass.CALLER

REQUEST = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")


def response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, headers={k.replace("_", "-"): v for k, v in headers.items()}, request=REQUEST
    )


def openai_error(cls: type[openai.APIStatusError], status: int, message: str = "", **headers: str):
    return cls(f"Error code: {status} - {message}", response=response(status, **headers), body=None)


def raised_from(cause: BaseException, outer: BaseException) -> BaseException:
    """``outer`` as if raised ``from cause`` (with the traceback machinery's links)."""
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


def raised_during(context: BaseException, outer: BaseException) -> BaseException:
    """``outer`` as if raised while handling ``context`` (implicit chaining)."""
    try:
        try:
            raise context
        except BaseException:
            raise outer  # noqa: B904 - the implicit __context__ is the point
    except BaseException as exc:
        return exc


# -- shapes of other SDKs, defined here ---------------------------------------------------


class OverloadedError(Exception):
    """Anthropic's 529."""

    def __init__(self, message: str = "Overloaded", status_code: int | None = 529) -> None:
        super().__init__(message)
        self.status_code = status_code


class GoogleAPICallError(Exception):
    """google.api_core's base error: the HTTP status is in ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


GoogleAPICallError.__module__ = "google.api_core.exceptions"


class AppError(Exception):
    """Not Google's: its ``code`` is an application code, not an HTTP status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class StripeLikeError(Exception):
    http_status = 503


class RequestsLikeError(Exception):
    """``requests.HTTPError`` keeps the response, whose ``status_code`` says it all."""

    def __init__(self, status: int) -> None:
        super().__init__("HTTP error")
        self.response = type("Response", (), {"status_code": status, "headers": {}})()


class StatusIsABool(Exception):
    status_code = True


# -- the table --------------------------------------------------------------------------------

CASES = [
    # openai, status from the real response
    pytest.param(
        openai_error(openai.RateLimitError, 429, "slow down"), RATE_LIMITED, id="openai-429"
    ),
    pytest.param(openai_error(openai.InternalServerError, 500), SERVER, id="openai-500"),
    pytest.param(openai_error(openai.InternalServerError, 503), SERVER, id="openai-503"),
    pytest.param(
        openai_error(openai.AuthenticationError, 401, "Incorrect API key req_429"),
        AUTH,
        id="openai-401-status-beats-text",
    ),
    pytest.param(openai_error(openai.PermissionDeniedError, 403), AUTH, id="openai-403"),
    pytest.param(
        openai_error(openai.BadRequestError, 400, "bad tool schema"), CLIENT, id="openai-400"
    ),
    pytest.param(
        openai_error(
            openai.BadRequestError,
            400,
            "This model's maximum context length is 8192 tokens. (context_length_exceeded)",
        ),
        CONTEXT_OVERFLOW,
        id="openai-400-context-length",
    ),
    pytest.param(openai_error(openai.NotFoundError, 404), CLIENT, id="openai-404"),
    pytest.param(openai_error(openai.UnprocessableEntityError, 422), CLIENT, id="openai-422"),
    pytest.param(openai_error(openai.APIStatusError, 408), TIMEOUT, id="openai-408"),
    pytest.param(openai_error(openai.APIStatusError, 413), CONTEXT_OVERFLOW, id="openai-413"),
    pytest.param(openai.APITimeoutError(request=REQUEST), TIMEOUT, id="openai-timeout"),
    pytest.param(
        openai.APIConnectionError(message="upstream said 429", request=REQUEST),
        NETWORK,
        id="openai-connection-type-beats-text",
    ),
    # httpx
    pytest.param(
        httpx.HTTPStatusError("oops", request=REQUEST, response=response(502)),
        SERVER,
        id="httpx-status-502",
    ),
    pytest.param(
        httpx.HTTPStatusError("oops", request=REQUEST, response=response(429)),
        RATE_LIMITED,
        id="httpx-status-429",
    ),
    pytest.param(
        httpx.ConnectError("[Errno 111] 500", request=REQUEST), NETWORK, id="httpx-connect"
    ),
    pytest.param(httpx.ReadTimeout("read", request=REQUEST), TIMEOUT, id="httpx-read-timeout"),
    pytest.param(httpx.RemoteProtocolError("peer closed"), NETWORK, id="httpx-protocol"),
    # other SDKs' shapes
    pytest.param(OverloadedError(), SERVER, id="anthropic-overloaded-529"),
    pytest.param(OverloadedError(status_code=None), SERVER, id="anthropic-overloaded-by-name"),
    pytest.param(GoogleAPICallError("quota", code=429), RATE_LIMITED, id="google-code-429"),
    pytest.param(GoogleAPICallError("backend", code=503), SERVER, id="google-code-503"),
    pytest.param(AppError("app failure", code=429), UNKNOWN, id="non-google-code-is-no-status"),
    pytest.param(StripeLikeError("card api down"), SERVER, id="http_status-attribute"),
    pytest.param(RequestsLikeError(401), AUTH, id="response-status_code"),
    pytest.param(StatusIsABool("flag"), UNKNOWN, id="bool-status-ignored"),
    # langchain-core's provider-neutral family
    pytest.param(ModelRateLimitError("limited"), RATE_LIMITED, id="lc-rate-limit"),
    pytest.param(ModelTimeoutError("slow"), TIMEOUT, id="lc-timeout"),
    pytest.param(ModelConnectionError("gone"), NETWORK, id="lc-connection"),
    pytest.param(ModelAPIError("oops"), SERVER, id="lc-api"),
    pytest.param(ContextOverflowError("too long"), CONTEXT_OVERFLOW, id="lc-context-overflow"),
    pytest.param(ModelAuthenticationError("nope 429"), AUTH, id="lc-auth-beats-text"),
    pytest.param(ModelInvalidRequestError("bad"), CLIENT, id="lc-invalid-request"),
    pytest.param(OutputParserException("could not parse"), CLIENT, id="lc-output-parser"),
    # builtins
    pytest.param(TimeoutError(), TIMEOUT, id="TimeoutError"),
    pytest.param(asyncio.TimeoutError(), TIMEOUT, id="asyncio.TimeoutError"),
    pytest.param(ConnectionResetError(104, "reset"), NETWORK, id="ConnectionResetError"),
    pytest.param(ConnectionRefusedError(), NETWORK, id="ConnectionRefusedError"),
    pytest.param(RuntimeError("something else"), UNKNOWN, id="RuntimeError-unknown"),
    pytest.param(ValueError("something else"), CALLER, id="ValueError-caller"),
    # chains: the cause decides when the outer error says nothing structural
    pytest.param(
        raised_from(openai_error(openai.RateLimitError, 429), RuntimeError("agent step failed")),
        RATE_LIMITED,
        id="chained-from-openai-429",
    ),
    pytest.param(
        raised_during(TimeoutError(), RuntimeError("tool call failed")),
        TIMEOUT,
        id="implicit-context-timeout",
    ),
    pytest.param(
        raised_from(ConnectionResetError(), ValueError("wrapper says bad request")),
        NETWORK,
        id="chained-structure-beats-outer-text",
    ),
]


@pytest.mark.parametrize(("error", "expected"), CASES)
def test_classifies_structured_errors(error: BaseException, expected: ErrorClass) -> None:
    assert classify_error(error).error_class is expected


def test_the_http_status_is_reported() -> None:
    assert classify_error(openai_error(openai.InternalServerError, 503)).status == 503
    assert classify_error(OverloadedError()).status == 529
    assert classify_error(TimeoutError()).status is None


def test_langchain_provider_errors_that_also_inherit_the_sdk_error_are_read_as_langchain() -> None:
    langchain_openai = pytest.importorskip("langchain_openai.chat_models.base")
    overflow = langchain_openai.OpenAIContextOverflowError(
        "Error code: 400 - input rejected", response=response(400), body=None
    )
    assert classify_error(overflow).error_class is CONTEXT_OVERFLOW
    limited = langchain_openai.OpenAIRateLimitError(
        "Error code: 429", response=response(429, retry_after="4"), body=None
    )
    assert classify_error(limited) == Classification(RATE_LIMITED, 4.0, 429)


def test_a_model_error_with_a_more_precise_http_status_uses_the_status() -> None:
    class ProviderInvalidRequest(openai.BadRequestError, ModelInvalidRequestError):
        pass

    error = ProviderInvalidRequest("Error code: 413", response=response(413), body=None)
    assert classify_error(error).error_class is CONTEXT_OVERFLOW


# -- text only ----------------------------------------------------------------------------------

TEXT_CASES = [
    # the reference's phrases, class by class
    ("HTTP 429", RATE_LIMITED),
    ("rate limit exceeded", RATE_LIMITED),
    ("Rate_limit reached for requests", RATE_LIMITED),
    ("Too Many Requests", RATE_LIMITED),
    ("quota exceeded for this project", RATE_LIMITED),
    ("status 401", AUTH),
    ("Unauthorized", AUTH),
    ("invalid api key", AUTH),
    ("status 500", SERVER),
    ("upstream 502", SERVER),
    ("error 503 from backend", SERVER),
    ("got 504", SERVER),
    ("Internal Server Error", SERVER),
    ("Bad Gateway", SERVER),
    ("Service Unavailable", SERVER),
    ("Gateway Timeout", SERVER),
    ("model is overloaded", SERVER),
    ("connection reset by peer", NETWORK),
    ("Connection refused", NETWORK),
    ("connection closed before message completed", NETWORK),
    ("broken pipe", NETWORK),
    ("dns lookup failed", NETWORK),
    ("tls handshake failed", NETWORK),
    ("io error: unexpected eof", NETWORK),
    # the reference calls these Network; a timeout is its own class here
    ("operation timed out", TIMEOUT),
    ("request timeout", TIMEOUT),
    ("deadline exceeded", TIMEOUT),
    ("status 400", CLIENT),
    ("status 404", CLIENT),
    ("bad request", CLIENT),
    ("model not found", CLIENT),
    # the reference calls these Client4xx; permission problems are AUTH here
    ("status 403", AUTH),
    ("Forbidden", AUTH),
    ("prompt is too long: 210000 tokens > 200000 maximum", CONTEXT_OVERFLOW),
    ("something odd happened", UNKNOWN),
]


@pytest.mark.parametrize(("message", "expected"), TEXT_CASES)
def test_classifies_plain_text_by_the_references_phrases(
    message: str, expected: ErrorClass
) -> None:
    assert classify_error(RuntimeError(message)).error_class is expected


@pytest.mark.parametrize(
    "message",
    [
        "request req_4291 failed",
        "processed 5003 tokens",
        "trace id abc401def",
        "took 5000ms",
        "error 4013",
        "order #14290",
    ],
)
def test_status_numbers_in_text_must_be_whole_words(message: str) -> None:
    assert classify_error(RuntimeError(message)).error_class is UNKNOWN


def test_text_is_read_along_the_whole_chain() -> None:
    error = raised_from(RuntimeError("HTTP 503"), RuntimeError("agent failed"))
    assert classify_error(error).error_class is SERVER


def test_a_cyclic_chain_terminates() -> None:
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__context__, second.__context__ = second, first
    assert classify_error(first).error_class is UNKNOWN


def test_an_exception_whose_str_raises_is_still_classified() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    assert classify_error(Unprintable()).error_class is UNKNOWN


# -- retry-after --------------------------------------------------------------------------------


def test_retry_after_ms_header() -> None:
    error = openai_error(openai.RateLimitError, 429, retry_after_ms="1500", retry_after="9")
    assert classify_error(error).retry_after == 1.5


@pytest.mark.parametrize(("value", "seconds"), [("7", 7.0), ("2.5", 2.5), ("0", 0.0)])
def test_retry_after_seconds_header(value: str, seconds: float) -> None:
    error = openai_error(openai.RateLimitError, 429, retry_after=value)
    assert classify_error(error).retry_after == seconds


def test_retry_after_http_date_header_is_relative_to_now() -> None:
    in_two_minutes = formatdate(time.time() + 120, usegmt=True)
    error = openai_error(openai.RateLimitError, 429, retry_after=in_two_minutes)
    found = classify_error(error).retry_after
    assert found is not None
    assert found == pytest.approx(120, abs=5)  # whole seconds in the header; a value check


def test_retry_after_http_date_with_an_injected_now() -> None:
    headers = {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}
    at = 1445412480.0  # that date as a timestamp
    assert retry_after_from_headers(headers, now=lambda: at - 30) == 30.0
    assert retry_after_from_headers(headers, now=lambda: at + 30) == 0.0, "past dates: no wait"


@pytest.fixture
def local_time_is_not_utc(monkeypatch: pytest.MonkeyPatch):
    """Run with the process's local time zone five hours behind UTC (POSIX TZ, no tzdata)."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is POSIX-only")
    monkeypatch.setenv("TZ", "EST+05EDT,M3.2.0,M11.1.0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    "date",
    [
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015 07:28:00 -0000",  # a zone that email.utils leaves naive
        "Wed Oct 21 07:28:00 2015",  # asctime, one of HTTP's obsolete formats: no zone
        "Wednesday, 21-Oct-15 07:28:00 GMT",  # RFC 850, the other one
    ],
)
def test_http_dates_are_utc_whatever_the_local_time_zone(local_time_is_not_utc, date) -> None:
    at = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert retry_after_from_headers({"retry-after": date}, now=lambda: at - 30) == 30.0


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "soon"},
        {"retry-after": "-5"},
        {"retry-after": "nan"},
        {"retry-after": "inf"},
        {"retry-after-ms": "x"},
        {"retry-after-ms": "-1"},
        {},
    ],
)
def test_unusable_retry_after_headers_give_none(headers: dict[str, str]) -> None:
    assert retry_after_from_headers(headers) is None


def test_a_bad_retry_after_ms_falls_back_to_retry_after() -> None:
    assert retry_after_from_headers({"retry-after-ms": "x", "retry-after": "3"}) == 3.0


def test_retry_after_header_names_are_case_insensitive() -> None:
    assert retry_after_from_headers({"Retry-After": "4"}) == 4.0
    assert retry_after_from_headers(httpx.Headers({"RETRY-AFTER": "4"})) == 4.0


def test_a_garbage_header_gives_no_retry_after_on_the_error() -> None:
    error = openai_error(openai.RateLimitError, 429, "slow down", retry_after="whenever")
    assert classify_error(error) == Classification(RATE_LIMITED, None, 429)


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("HTTP 429: slow down, retry after 7s", 7.0),
        ("Rate limit reached. Please try again in 250ms.", 0.25),
        ("Rate limit reached. Please try again in 1.5 seconds.", 1.5),
        ("429 Too Many Requests; Retry-After: 12", 12.0),
        ("rate limited (retry_after=3)", 3.0),
    ],
)
def test_retry_after_from_text(message: str, seconds: float) -> None:
    assert classify_error(RuntimeError(message)).retry_after == seconds


def test_a_header_beats_the_text() -> None:
    error = openai_error(openai.RateLimitError, 429, "try again in 20s", retry_after="2")
    assert classify_error(error).retry_after == 2.0


def test_retry_after_is_found_on_a_chained_cause() -> None:
    cause = openai_error(openai.RateLimitError, 429, retry_after="6")
    assert classify_error(raised_from(cause, RuntimeError("wrapped"))).retry_after == 6.0


def test_retry_after_on_the_exceptions_own_headers() -> None:
    class WithHeaders(Exception):
        status_code = 429
        headers = {"retry-after": "5"}  # noqa: RUF012 - a plain shape, never mutated

    assert classify_error(WithHeaders()).retry_after == 5.0


# -- classifiers on the policy ------------------------------------------------------------------


def test_a_user_classifier_overrides_the_built_in_one() -> None:
    def everything_is_a_rate_limit(exc: BaseException) -> Classification:
        return Classification(RATE_LIMITED, retry_after=1.0)

    policy = CallPolicy(classifier=everything_is_a_rate_limit)
    assert policy.classify(ValueError("x")) == Classification(RATE_LIMITED, 1.0)


def test_a_user_classifier_decides_what_counts(clock) -> None:
    policy = CallPolicy(
        failure_threshold=1,
        clock=clock,
        classifier=lambda exc: Classification(CLIENT),
    )
    with pytest.raises(TimeoutError):
        policy.execute("a::m", _raise(TimeoutError()))
    assert policy.state("a::m") is CircuitState.CLOSED, "the user classifier said CLIENT"


def test_a_raising_classifier_falls_back_to_the_built_in_one_and_logs(clock, caplog) -> None:
    def broken(exc: BaseException) -> Classification:
        raise KeyError("classifier bug")

    policy = CallPolicy(failure_threshold=1, clock=clock, classifier=broken)
    assert policy.classify(TimeoutError()).error_class is TIMEOUT

    with pytest.raises(TimeoutError):  # the provider's error, not the classifier's
        policy.execute("a::m", _raise(TimeoutError()))
    assert policy.state("a::m") is CircuitState.OPEN
    logged = [r for r in caplog.records if r.name == "callpolicy" and r.levelno == logging.ERROR]
    assert logged
    assert "classifier" in logged[0].getMessage()
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[0] is KeyError


def test_a_classifier_returning_something_else_falls_back_and_logs(caplog) -> None:
    policy = CallPolicy(classifier=lambda exc: "rate_limited")  # type: ignore[arg-type,return-value]
    assert policy.classify(TimeoutError()).error_class is TIMEOUT
    assert any("not a Classification" in r.getMessage() for r in caplog.records)


def test_counted_errors_can_include_context_overflow(clock) -> None:
    from callpolicy import DEFAULT_COUNTED_ERRORS

    policy = CallPolicy(
        failure_threshold=1,
        counted_errors=DEFAULT_COUNTED_ERRORS | {CONTEXT_OVERFLOW},
        clock=clock,
    )
    with pytest.raises(ContextOverflowError):
        policy.execute("a::m", _raise(ContextOverflowError("too long")))
    assert policy.state("a::m") is CircuitState.OPEN


def test_default_counted_errors_leave_out_the_callers_faults() -> None:
    from callpolicy import DEFAULT_COUNTED_ERRORS

    assert frozenset(ErrorClass) - {CLIENT, CONTEXT_OVERFLOW, CALLER} == DEFAULT_COUNTED_ERRORS


def _raise(error: BaseException):
    def call() -> str:
        raise error

    return call
