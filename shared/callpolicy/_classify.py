"""Error classification: structure first (exception types, HTTP status, headers), text last.

The reference crate matched substrings of the message only, so "429" anywhere (a
request id, a token count) meant "rate limited". Here the exception's type and its
HTTP status decide; the message is read only when neither says anything, and status
numbers in it must stand as whole words.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

from ._types import ErrorClass

_logger = logging.getLogger("callpolicy")

__all__ = [
    "Classification",
    "Classifier",
    "classify_error",
    "classify_with",
    "retry_after_from_headers",
]


@dataclass(frozen=True, slots=True)
class Classification:
    """What :func:`classify_error` makes of an exception."""

    error_class: ErrorClass
    retry_after: float | None = None
    """Seconds the provider asked us to wait, if it said (uncapped; the retry policy caps)."""
    status: int | None = None
    """The HTTP status, when the exception carried one."""


Classifier = Callable[[BaseException], Classification]
"""A function from an exception to its :class:`Classification`; replaces the built-in one."""

# langchain-core's provider-neutral exceptions (>= 1.7), recognised by name so the
# engine never imports LangChain. Most specific first: the MRO is walked in order.
_LANGCHAIN_CLASSES: dict[str, ErrorClass] = {
    "ContextOverflowError": ErrorClass.CONTEXT_OVERFLOW,
    "ModelRateLimitError": ErrorClass.RATE_LIMITED,
    "ModelTimeoutError": ErrorClass.TIMEOUT,
    "ModelConnectionError": ErrorClass.NETWORK,
    "ModelAPIError": ErrorClass.SERVER,
    "ModelAuthenticationError": ErrorClass.AUTH,
    "ModelPermissionDeniedError": ErrorClass.AUTH,
    "ModelInvalidRequestError": ErrorClass.CLIENT,
    "ModelNotFoundError": ErrorClass.CLIENT,
    "ModelRefusalError": ErrorClass.CLIENT,
    "OutputParserException": ErrorClass.CLIENT,
}

# SDK exception names (openai, anthropic, httpx, httpcore, requests, aiohttp, google,
# mistral, groq, ... share these). Checked after the HTTP status, for errors without one.
_SDK_CLASSES: dict[str, ErrorClass] = {
    "APITimeoutError": ErrorClass.TIMEOUT,
    "TimeoutException": ErrorClass.TIMEOUT,
    "ConnectTimeout": ErrorClass.TIMEOUT,
    "ReadTimeout": ErrorClass.TIMEOUT,
    "WriteTimeout": ErrorClass.TIMEOUT,
    "PoolTimeout": ErrorClass.TIMEOUT,
    "ServerTimeoutError": ErrorClass.TIMEOUT,
    "DeadlineExceeded": ErrorClass.TIMEOUT,
    "APIConnectionError": ErrorClass.NETWORK,
    "ConnectError": ErrorClass.NETWORK,
    "RemoteProtocolError": ErrorClass.NETWORK,
    "ReadError": ErrorClass.NETWORK,
    "WriteError": ErrorClass.NETWORK,
    "NetworkError": ErrorClass.NETWORK,
    "TransportError": ErrorClass.NETWORK,
    "ProtocolError": ErrorClass.NETWORK,
    "ClientConnectionError": ErrorClass.NETWORK,
    "ServerDisconnectedError": ErrorClass.NETWORK,
    "ServiceUnavailable": ErrorClass.SERVER,
    "RateLimitError": ErrorClass.RATE_LIMITED,
    "ResourceExhausted": ErrorClass.RATE_LIMITED,
    "TooManyRequests": ErrorClass.RATE_LIMITED,
    "AuthenticationError": ErrorClass.AUTH,
    "PermissionDeniedError": ErrorClass.AUTH,
    "Unauthenticated": ErrorClass.AUTH,
    "PermissionDenied": ErrorClass.AUTH,
    "InternalServerError": ErrorClass.SERVER,
    "OverloadedError": ErrorClass.SERVER,
    "ServiceUnavailableError": ErrorClass.SERVER,
    "BadRequestError": ErrorClass.CLIENT,
    "NotFoundError": ErrorClass.CLIENT,
    "UnprocessableEntityError": ErrorClass.CLIENT,
    "InvalidArgument": ErrorClass.CLIENT,
    # callpolicy's own: a stream that ended without its end marker (a dropped connection
    # that a proxy closed cleanly, most often).
    "IncompleteStreamError": ErrorClass.NETWORK,
}

# The built-in errors of a caller's mistake: invalid input (None for a prompt, a value
# JSON cannot encode, a NaN in a tool schema) or a bug in the calling code. pydantic's
# ValidationError is a ValueError.
_CALLER_TYPES: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    NameError,
    NotImplementedError,
)
# The HTTP layer's own errors (connections, sockets, TLS, timeouts are OSErrors), and the
# ValueErrors of a response that did not parse: the provider's side, never the caller's.
_PROVIDER_SIDE: tuple[type[BaseException], ...] = (
    OSError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)
# Packages whose exceptions belong to the HTTP layer (clients, transports, provider SDKs),
# whatever their base class (requests' InvalidURL is a ValueError, for one).
_TRANSPORT_PACKAGES = frozenset(
    {
        "aiohttp",
        "anthropic",
        "botocore",
        "google",
        "grpc",
        "h11",
        "h2",
        "httpcore",
        "httpx",
        "openai",
        "requests",
        "urllib3",
        "websockets",
    }
)

_CONTEXT_PHRASES = re.compile(
    r"context[ _]length|context[ _]window|maximum context|context_length_exceeded"
    r"|prompt is too long|too many tokens|input is too long|reduce the length",
    re.IGNORECASE,
)


def _status_class(status: int, message: str) -> ErrorClass:
    if status == 429:
        return ErrorClass.RATE_LIMITED
    if status in (401, 403):
        return ErrorClass.AUTH
    if status == 408:
        return ErrorClass.TIMEOUT
    if status == 413 or (400 <= status < 500 and _CONTEXT_PHRASES.search(message)):
        return ErrorClass.CONTEXT_OVERFLOW
    if 400 <= status < 500:
        return ErrorClass.CLIENT
    if status >= 500:  # 529 is Anthropic's "overloaded"
        return ErrorClass.SERVER
    return ErrorClass.UNKNOWN


# The reference crate's phrases, in its order (first match wins), with its bare status
# numbers turned into whole-word matches: "429" inside "req_4291" is not a rate limit.
_TEXT_RULES: tuple[tuple[re.Pattern[str], ErrorClass], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), cls)
    for pattern, cls in (
        (r"\b429\b|rate[ _-]?limit|too many requests|quota exceeded", ErrorClass.RATE_LIMITED),
        (
            r"\b40[13]\b|unauthori[sz]ed|invalid api key|incorrect api key|forbidden",
            ErrorClass.AUTH,
        ),
        (_CONTEXT_PHRASES.pattern, ErrorClass.CONTEXT_OVERFLOW),
        (
            r"\b50[0-4]\b|\b529\b|internal server error|bad gateway|service unavailable"
            r"|gateway timeout|overloaded",
            ErrorClass.SERVER,
        ),
        (r"timed out|\btimeout\b|deadline exceeded", ErrorClass.TIMEOUT),
        (
            r"connection (reset|refused|closed|aborted|error)|broken pipe|\bdns\b|\btls\b"
            r"|io error|server disconnected|network is unreachable",
            ErrorClass.NETWORK,
        ),
        (r"\b4(0[0-9]|1[0-9]|2[0-8])\b|bad request|not found|invalid request", ErrorClass.CLIENT),
    )
)

_TEXT_RETRY_AFTER = re.compile(
    r"retry[- _]after[\"':=\s]*(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|seconds?)?"
    r"|try again in\s*(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|seconds?)?",
    re.IGNORECASE,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts, each once (cycles are possible)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> int | None:
    for candidate in (
        getattr(exc, "status_code", None),
        getattr(getattr(exc, "response", None), "status_code", None),
        getattr(exc, "http_status", None),
        getattr(exc, "status", None),
    ):
        if (
            isinstance(candidate, int)
            and not isinstance(candidate, bool)
            and (100 <= candidate <= 599)
        ):
            return candidate
    # google.api_core errors carry the HTTP status in ``code``; elsewhere ``code`` is
    # too often an errno or a provider's string to trust.
    code = getattr(exc, "code", None)
    if type(exc).__module__.startswith("google.") and isinstance(code, int) and 100 <= code <= 599:
        return code
    return None


def _headers(exc: BaseException) -> Mapping[str, Any] | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        headers = getattr(exc, "headers", None)
    return headers if isinstance(headers, Mapping) or hasattr(headers, "get") else None


def _header(headers: Any, name: str) -> str | None:
    try:
        value = headers.get(name)
        if value is None:  # plain dicts are case-sensitive
            value = headers.get(name.title())
    except Exception:  # a foreign headers object; classification must not fail
        return None
    return None if value is None else str(value)


def retry_after_from_headers(headers: Any, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date).

    >>> retry_after_from_headers({"retry-after": "1.5"})
    1.5
    >>> retry_after_from_headers({"retry-after-ms": "250"})
    0.25
    """
    if headers is None:
        return None
    millis = _header(headers, "retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" or no zone (asctime): HTTP dates are always UTC
            when = when.replace(tzinfo=timezone.utc)
        return max(when.timestamp() - now(), 0.0)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _retry_after_from_text(message: str) -> float | None:
    match = _TEXT_RETRY_AFTER.search(message)
    if match is None:
        return None
    number = match.group(1) or match.group(3)
    unit = (match.group(2) or match.group(4) or "s").lower()
    value = float(number)
    return value / 1000.0 if unit.startswith("m") else value


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not break classification
        return type(exc).__name__


def classify_error(exc: BaseException) -> Classification:
    """Classify a provider's exception, structure first, then its message.

    Order: langchain-core's ``ModelError`` family (by class name; LangChain is never
    imported), an HTTP status (``status_code``, ``response.status_code``,
    ``http_status``), SDK exception names and builtin ``TimeoutError`` /
    ``ConnectionError`` — along the whole ``__cause__``/``__context__`` chain — then
    the caller's own mistakes (:data:`ErrorClass.CALLER`: a built-in ``TypeError``,
    ``ValueError``, ``KeyError``, ``AttributeError``, ... with nothing from the HTTP
    layer along its chain), and only then the text of the messages. Retry-After comes
    from the response headers (``retry-after-ms``, ``retry-after`` as seconds or an HTTP
    date), else the text.

    >>> classify_error(TimeoutError()).error_class
    <ErrorClass.TIMEOUT: 'timeout'>
    >>> classify_error(RuntimeError("request req_4291 failed")).error_class
    <ErrorClass.UNKNOWN: 'unknown'>
    >>> classify_error(RuntimeError("HTTP 429: slow down, retry after 7s")).retry_after
    7.0
    """
    chain = list(_chain(exc))
    retry_after: float | None = None
    for link in chain:
        retry_after = retry_after_from_headers(_headers(link))
        if retry_after is not None:
            break
    text = " | ".join(_message(link) for link in chain)
    if retry_after is None:
        retry_after = _retry_after_from_text(text)

    for link in chain:
        found = _structural_class(link, text)
        if found is not None:
            error_class, status = found
            return Classification(error_class, retry_after, status)
    if _is_callers(chain):
        # Before the text: a caller's message can say anything ("timeout must be > 0",
        # or a prompt quoted back that mentions a 500), and must never trip a circuit.
        return Classification(ErrorClass.CALLER)
    for pattern, error_class in _TEXT_RULES:
        if pattern.search(text):
            return Classification(error_class, retry_after)
    return Classification(ErrorClass.UNKNOWN, retry_after)


def _is_callers(chain: list[BaseException]) -> bool:
    """The caller's own mistake: a built-in caller error (``TypeError``, ``ValueError``,
    pydantic's ``ValidationError``, ``KeyError``, ``AttributeError``, ...), and nothing
    along its cause/context chain from the HTTP layer: no ``OSError`` (connections,
    sockets, TLS, timeouts), no exception of an HTTP client or provider SDK, and no
    response that failed to parse (``JSONDecodeError``, ``UnicodeDecodeError``)."""
    if not isinstance(chain[0], _CALLER_TYPES):
        return False
    for link in chain:
        if isinstance(link, _PROVIDER_SIDE):
            return False
        if type(link).__module__.partition(".")[0] in _TRANSPORT_PACKAGES:
            return False
    return True


def _structural_class(exc: BaseException, text: str) -> tuple[ErrorClass, int | None] | None:
    names = [cls.__name__ for cls in type(exc).__mro__]
    for name in names:
        if name in _LANGCHAIN_CLASSES:
            found = _LANGCHAIN_CLASSES[name]
            if found is not ErrorClass.CONTEXT_OVERFLOW:
                # A ModelError subclass may still carry a more precise HTTP status.
                status = _http_status(exc)
                if status is not None:
                    return _status_class(status, text), status
            return found, _http_status(exc)
    status = _http_status(exc)
    if status is not None:
        return _status_class(status, text), status
    for name in names:
        if name in _SDK_CLASSES:
            return _SDK_CLASSES[name], None
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ErrorClass.TIMEOUT, None
    if isinstance(exc, ConnectionError):
        return ErrorClass.NETWORK, None
    return None


def classify_with(classifier: Classifier, exc: BaseException) -> Classification:
    """``classifier(exc)``, or the built-in classification when a user's classifier fails
    or returns something else (logged: a broken classifier must not break the call)."""
    try:
        found = classifier(exc)
    except Exception:
        _logger.exception("callpolicy classifier failed; using the built-in one")
        return classify_error(exc)
    if not isinstance(found, Classification):
        _logger.error("callpolicy classifier returned %r, not a Classification", found)
        return classify_error(exc)
    return found
