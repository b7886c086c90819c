"""The cache strategy, per call: outermost, so a hit costs nothing (no budget, no
breaker slot, no model call).

A cache is handed to each call (``execute(..., cache=)``), so this layer is composed per
call around the rest of the pipeline. Identical calls in the air share one model call
(single flight, in ``_cache``); an answer the fallback gave is shared with them but not
stored, unless the cache says ``cache_fallback_answers``: it must not outlive the outage.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ._breaking import Breaker
from ._cache import ResponseCache
from ._drive import Body, Op, arun, run
from ._events import Event, EventKind
from ._fallback import Fallbacks
from ._request import CallRequest
from ._types import split_key

__all__ = ["Caching"]

Fallback = Callable[[], Any] | Fallbacks[Any] | None
Inner = Callable[[Fallback], Body[Any]]
"""The rest of the pipeline (budget, then the policy's call), given its fallback."""


class Caching:
    """Looks the call up, runs the rest of the pipeline on a miss, counts both."""

    __slots__ = ("breaker",)

    def __init__(self, *, breaker: Breaker) -> None:
        self.breaker = breaker

    def body(
        self,
        cache: ResponseCache,
        request: CallRequest[Any],
        key: str,
        fallback: Fallback,
        inner: Inner,
    ) -> Body[Any]:
        keep = None
        if fallback is not None and not cache.cache_fallback_answers:
            fell_back = [False]
            fallback = _noting(fallback, fell_back)

            def keep(_answer: object) -> bool:
                return not fell_back[0]

        encode, decode = request.encode, request.decode
        if encode is None or decode is None:
            raise TypeError("request: encode and decode are needed when a cache is given")
        cache_key = cache.request_key(key, request.describe)
        if cache_key is None:  # no canonical form: uncached, never another request's answer
            return (yield from inner(fallback))
        tallies = self.breaker.tallies

        def computed() -> Body[Any]:
            tallies.add(tallies.get(key), "cache_misses")
            return (yield from inner(fallback))

        value, status = yield Op(
            _get_or_compute, _aget_or_compute, cache, cache_key, computed, encode, decode, keep
        )
        if status == "miss":
            return value
        tallies.add(tallies.get(key), "cache_hits")
        announcer = self.breaker.announcer
        if announcer.heard(logging.DEBUG):
            provider, model = split_key(key)
            announcer.emit(Event(EventKind.CACHE_HIT, key, provider, model, reason=status))
        return request.mark(value, status) if request.mark is not None else value


def _get_or_compute(
    cache: ResponseCache, key: str, computed: Callable[[], Body[Any]], *codec: Any
) -> tuple[Any, str]:
    encode, decode, keep = codec
    return cache.get_or_compute(
        key, lambda: run(computed()), encode=encode, decode=decode, keep=keep
    )


async def _aget_or_compute(
    cache: ResponseCache, key: str, computed: Callable[[], Body[Any]], *codec: Any
) -> tuple[Any, str]:
    encode, decode, keep = codec
    compute: Callable[[], Awaitable[Any]] = lambda: arun(computed())  # noqa: E731
    return await cache.aget_or_compute(key, compute, encode=encode, decode=decode, keep=keep)


def _noting(fallback: Callable[[], Any] | Fallbacks[Any], noted: list[bool]) -> Fallback:
    """``fallback`` (each step of a list), noting in ``noted[0]`` that it ran. What it
    returns is handed on as it is (an awaitable, for an async call)."""
    if isinstance(fallback, Fallbacks):
        return fallback.map(lambda _key, call: _noted(call, noted))
    return _noted(fallback, noted)


def _noted(fallback: Callable[[], Any], noted: list[bool]) -> Callable[[], Any]:
    def noting() -> Any:
        noted[0] = True
        return fallback()

    return noting
