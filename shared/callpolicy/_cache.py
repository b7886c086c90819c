"""The response cache: a hit returns the full answer and costs nothing downstream.

:class:`ResponseCache` sits outermost (cache -> budget -> fallback -> retry -> breaker ->
model): a hit spends no budget, takes no breaker slot and makes no model call. It works on
JSON-able dicts: the adapters encode a framework answer (content, tool calls, usage,
response metadata) to a dict and decode it back, and the cache stores JSON text — never
pickle, so a cache file can never run code. What it adds to a plain key-value store:

- **freshness**: ``ttl`` per entry, checked by the cache (the stored envelope carries the
  creation and expiry times, wall clock, so they survive a restart);
- **single flight**: concurrent identical misses collapse into one model call
  (:meth:`ResponseCache.get_or_compute`); waiters get their own decoded copy of the
  leader's answer, or its exception; errors are never cached;
- **stale answers**, optional: with ``serve_stale_when_open=True`` an expired entry is kept
  ``stale_ttl`` longer and served — marked ``"stale"`` — when the call fails because the
  circuit is open and no fallback answered (:class:`~callpolicy.CircuitOpenError`);
- **robustness**: an entry that is not valid JSON, or that the adapter cannot decode, is a
  miss with a warning (and is deleted), never a crash; a backend failure is a miss too;
- **fallback answers** are not stored by default: an answer the fallback gave while the
  primary failed is returned (and shared with identical calls in the air) but not stored
  under the primary's request, so it is never served once the primary is back
  (``cache_fallback_answers=True`` stores it like any answer).

The key is :func:`~callpolicy.cache_key` of the request (see ``_cache_key``);
:meth:`ResponseCache.request_key` returns None for a request holding a value with no
canonical JSON form, and the engine then calls the model without the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ._cache_backend import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    CacheBackend,
    MemoryCacheBackend,
    backend_of,
)
from ._cache_entry import pack_entry, unpack_entry
from ._cache_key import UncacheableRequestError, cache_key
from ._errors import CircuitOpenError
from ._flight import Flight, SingleFlight
from ._numbers import Count, Seconds

__all__ = ["CacheStats", "CacheStatus", "ResponseCache"]

logger = logging.getLogger("callpolicy")

T = TypeVar("T")

CacheStatus = Literal["hit", "miss", "shared", "stale"]
"""Where an answer from :meth:`ResponseCache.get_or_compute` came from.

- ``"hit"``: a fresh cached entry;
- ``"miss"``: this caller's own model call (now cached);
- ``"shared"``: another caller's identical call, in the air when this one asked (single
  flight) — no model call of its own, like a hit;
- ``"stale"``: an expired entry, served because the circuit is open.
"""

_MISS: Any = object()

# The steps of a plan (see ResponseCache._plan) that its driver runs, and what it sends
# back: _READ (key) the stored text or None; _WAIT (flight) False if waiting would
# deadlock; _WRITE ((key, text)) None; _COMPUTE (None) the answer, or _Failed.
_READ, _WAIT, _WRITE, _COMPUTE = "read", "wait", "write", "compute"
_Step = tuple[str, Any]
_Steps = Generator[_Step, Any, tuple[Any, CacheStatus | None]]


@dataclass(frozen=True, slots=True)
class _Failed:
    """``compute()`` raised ``error`` (an ``Exception``; anything else ends the plan)."""

    error: Exception


class _Plan(Generic[T]):
    """One call of ``get_or_compute`` past its first lookup: its steps, run one by one by
    a driver. ``step`` is the one to run now (None: the plan is done)."""

    __slots__ = ("_result", "_steps", "step")

    def __init__(self, steps: _Steps) -> None:
        self._steps = steps
        self._result: tuple[Any, CacheStatus | None] = (None, None)
        self.step: _Step | None = None
        self.send(None)

    def send(self, sent: Any) -> None:
        """Hand the plan what its step gave; ``step`` becomes the next one."""
        try:
            self.step = self._steps.send(sent)
        except StopIteration as done:
            self.step = None
            self._result = done.value

    def close(self) -> None:
        """End the plan; if it is not done (its driver raised), its flight is abandoned."""
        self._steps.close()

    def answer(self) -> tuple[T, CacheStatus]:
        """What the plan ended with: the answer and its status, or the exception raised
        (here, outside the generator: a StopIteration raised in one would become a
        RuntimeError)."""
        value, status = self._result
        if status is None:
            raise value
        return value, status


class _CacheOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", title="ResponseCache")

    ttl: Seconds | None = Field(default=None, gt=0)
    max_entries: Count | None = None
    max_bytes: Count | None = None
    serve_stale_when_open: StrictBool = False
    stale_ttl: Seconds | None = Field(default=86_400.0, gt=0)
    cache_fallback_answers: StrictBool = False


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counts since the cache was made (or :meth:`ResponseCache.clear`)."""

    hits: int
    misses: int
    """Lookups that found nothing fresh and called the model."""
    shared: int
    """Callers served by another caller's identical call in the air (single flight)."""
    stale: int
    errors: int
    """Model calls that raised (never cached)."""
    unreadable: int
    """Entries that could not be read or decoded (each was a miss, with a warning)."""
    entries: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ResponseCache:
    """Cached model answers by request key, with TTL, LRU bounds and single flight.

    Args:
        backend: where entries live: a :class:`MemoryCacheBackend` (the default),
            a :class:`SQLiteCacheBackend`, or any :class:`CacheBackend`.
        ttl: seconds (or a ``timedelta``) an answer stays fresh; None (default): until
            evicted.
        max_entries, max_bytes: bounds of the default memory backend (10 000 entries,
            64 MiB); give a backend its own bounds instead.
        serve_stale_when_open: off by default. When on, an expired answer is kept
            ``stale_ttl`` more seconds and served, marked ``"stale"``, when the call
            fails with :class:`~callpolicy.CircuitOpenError` (the circuit is open and no
            fallback answered).
        stale_ttl: how long past its ``ttl`` an answer may be served stale (default one
            day; None: until evicted).
        cache_fallback_answers: off by default: an answer the fallback model gave (the
            primary failed or its circuit was open) is returned, and shared with identical
            calls in the air, but not stored under the primary's request, so it is not
            served once the primary is back. True stores it like any answer (it is then
            served until it expires, whoever is up).
        clock: wall-clock seconds (``time.time``): stored times must survive a restart.

    >>> cache = ResponseCache(ttl=3600)
    >>> calls = []
    >>> def ask():
    ...     calls.append(1)
    ...     return {"content": "Paris"}
    >>> cache.get_or_compute("k1", ask, encode=dict, decode=dict)
    ({'content': 'Paris'}, 'miss')
    >>> cache.get_or_compute("k1", ask, encode=dict, decode=dict)
    ({'content': 'Paris'}, 'hit')
    >>> len(calls)
    1
    """

    def __init__(
        self,
        *,
        backend: CacheBackend | None = None,
        ttl: float | timedelta | None = None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        serve_stale_when_open: bool = False,
        stale_ttl: float | timedelta | None = 86_400.0,
        cache_fallback_answers: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        options = _CacheOptions.model_validate(
            {
                "ttl": ttl,
                "max_entries": max_entries,
                "max_bytes": max_bytes,
                "serve_stale_when_open": serve_stale_when_open,
                "stale_ttl": stale_ttl,
                "cache_fallback_answers": cache_fallback_answers,
            }
        )
        if not callable(clock):
            raise TypeError("clock: expected a callable returning wall-clock seconds")
        if backend is None:
            backend = MemoryCacheBackend(
                max_entries=options.max_entries or DEFAULT_MAX_ENTRIES,
                max_bytes=options.max_bytes or DEFAULT_MAX_BYTES,
                clock=clock,
            )
        elif not isinstance(backend, CacheBackend):
            backend = backend_of(backend)  # a shared store (RedisStore) hands out its own
        elif options.max_entries is not None or options.max_bytes is not None:
            raise TypeError(
                "max_entries/max_bytes bound the default memory backend; "
                "give your backend its own bounds instead"
            )
        self.backend: CacheBackend = backend
        self.ttl: float | None = options.ttl
        self.serve_stale_when_open: bool = options.serve_stale_when_open
        self.stale_ttl: float | None = options.stale_ttl
        self.cache_fallback_answers: bool = options.cache_fallback_answers
        # How long the backend keeps an entry: its freshness, plus the stale grace period.
        self._keep: float | None = options.ttl
        if options.serve_stale_when_open and options.ttl is not None:
            self._keep = None if options.stale_ttl is None else options.ttl + options.stale_ttl
        self._clock = clock
        self._flights = SingleFlight()
        self._stats_lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("hits", "misses", "shared", "stale", "errors", "unreadable"), 0
        )
        self._uncacheable_kinds: set[str] = set()

    # -- the key -----------------------------------------------------------------------
    def request_key(self, key: str, describe: Callable[[], Mapping[str, Any]]) -> str | None:
        """The cache key of a call under circuit ``key`` (provider and model are always part
        of it) described by ``describe()``; None when the description holds a value with no
        canonical JSON form (:class:`~callpolicy.UncacheableRequestError`): such a call
        goes to the model without the cache, never to another request's answer. One
        warning per kind of value (per cache)."""
        try:
            return cache_key({"callpolicy_key": key, "request": describe()})
        except UncacheableRequestError as exc:
            with self._stats_lock:
                first = exc.kind not in self._uncacheable_kinds
                if first and len(self._uncacheable_kinds) < 1024:
                    self._uncacheable_kinds.add(exc.kind)
            if first:
                logger.warning(
                    "callpolicy cache: calls holding a %s (here at %s) are not cached: it has "
                    "no canonical JSON form, so a key could not tell two of them apart "
                    "(warned once per kind)",
                    exc.kind,
                    exc.where,
                )
            return None

    # -- plain access ----------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        """The fresh payload under ``key`` (a new dict each time), or None."""
        found = self._open(key, self._read(key), stale_ok=False)
        self._count("misses" if found is None else "hits")
        return found

    def set(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Store ``payload`` (JSON-able) under ``key``; False, with a warning, if it is not
        JSON-able (then nothing is stored)."""
        text = self._envelope(key, payload)
        if text is None:
            return False
        self._write(key, text)
        return True

    def get_stale(self, key: str) -> dict[str, Any] | None:
        """The payload under ``key`` even if expired (within ``stale_ttl`` when serving
        stale answers; a backend drops expired entries otherwise), or None."""
        return self._open(key, self._read(key), stale_ok=True)

    def delete(self, key: str) -> None:
        self.backend.delete(key)

    def clear(self) -> None:
        """Remove every entry and zero the counts."""
        self.backend.clear()
        with self._stats_lock:
            self._counts = dict.fromkeys(self._counts, 0)

    def __copy__(self) -> ResponseCache:
        # Shared state: a copied model (model_copy, deepcopy of a chain) keeps sharing it.
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ResponseCache:
        return self

    def stats(self) -> CacheStats:
        with self._stats_lock:
            counts = dict(self._counts)
        return CacheStats(entries=len(self.backend), **counts)

    async def aget(self, key: str) -> dict[str, Any] | None:
        """Async :meth:`get`."""
        found = self._open(key, await self._aread(key), stale_ok=False)
        self._count("misses" if found is None else "hits")
        return found

    async def aset(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Async :meth:`set`."""
        text = self._envelope(key, payload)
        if text is None:
            return False
        await self._awrite(key, text)
        return True

    async def aget_stale(self, key: str) -> dict[str, Any] | None:
        """Async :meth:`get_stale`."""
        return self._open(key, await self._aread(key), stale_ok=True)

    # -- the guarded call: one description, two drivers ---------------------------------
    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], T],
        *,
        encode: Callable[[T], Mapping[str, Any]],
        decode: Callable[[dict[str, Any]], T],
        keep: Callable[[T], bool] | None = None,
    ) -> tuple[T, CacheStatus]:
        """The answer under ``key``, or ``compute()``'s (then cached), with where it came
        from (:data:`CacheStatus`).

        Concurrent callers of one key that all miss make one ``compute()`` call (single
        flight, across threads and asyncio tasks); the others get ``decode`` of its
        encoded answer — their own copy — or its exception. An exception is never cached.
        ``encode`` turns an answer into a JSON-able dict and ``decode`` turns it back; an
        answer that does not encode is returned but not cached (with a warning).
        ``keep(answer)`` False: the answer is returned and shared with the callers waiting
        for it, but not stored (a fallback's answer, say).
        """
        value = self._fresh(key, self._read(key), decode)
        if value is not _MISS:
            return value, "hit"
        plan: _Plan[T] = _Plan(self._plan(key, encode, decode, keep))
        try:
            while plan.step is not None:
                plan.send(self._do(plan.step, compute))
        finally:
            plan.close()
        return plan.answer()

    async def aget_or_compute(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        *,
        encode: Callable[[T], Mapping[str, Any]],
        decode: Callable[[dict[str, Any]], T],
        keep: Callable[[T], bool] | None = None,
    ) -> tuple[T, CacheStatus]:
        """Async :meth:`get_or_compute`: ``compute`` returns an awaitable. Collapses with
        sync callers of the same key too. No lock is held across an ``await``; a leader
        that is cancelled leaves its waiters to try again (one of them leads)."""
        value = self._fresh(key, await self._aread(key), decode)
        if value is not _MISS:
            return value, "hit"
        plan: _Plan[T] = _Plan(self._plan(key, encode, decode, keep))
        try:
            while plan.step is not None:
                plan.send(await self._ado(plan.step, compute))
        finally:
            plan.close()  # cancelled or interrupted half way: the flight is abandoned
        return plan.answer()

    def _do(self, step: _Step, compute: Callable[[], T]) -> Any:
        """One step of a plan, sync: what the plan is sent back."""
        op, arg = step
        if op is _READ:
            return self._read(arg)
        if op is _WAIT:
            return self._flights.wait(arg)
        if op is _WRITE:
            return self._write(*arg)
        try:
            return compute()
        except Exception as exc:
            return _Failed(exc)

    async def _ado(self, step: _Step, compute: Callable[[], Awaitable[T]]) -> Any:
        """One step of a plan, async."""
        op, arg = step
        if op is _READ:
            return await self._aread(arg)
        if op is _WAIT:
            return await self._flights.await_(arg)
        if op is _WRITE:
            return await self._awrite(*arg)
        try:
            return await compute()
        except Exception as exc:
            return _Failed(exc)

    # Every decision of get_or_compute past a first lookup that found nothing fresh
    # (a hit costs no plan), once: generators that yield the steps that wait on
    # something (read, write, compute, wait for a flight) to the driver, which sends back
    # what each gave. They return (answer, status), or (exception, None) for the driver
    # to raise.
    def _plan(
        self,
        key: str,
        encode: Callable[[Any], Mapping[str, Any]],
        decode: Callable[[dict[str, Any]], Any],
        keep: Callable[[Any], bool] | None,
    ) -> _Steps:
        while True:
            flight, leader = self._flights.join(key)
            if leader:
                return (yield from self._lead(key, flight, encode, decode, keep))
            if not (yield _WAIT, flight) or flight.alone:
                return (yield from self._alone(key, decode))
            if flight.error is not None:
                return (yield from self._failed(key, flight.error, decode))
            served = self._shared(key, flight, decode)
            if served is not _MISS:
                return served, "shared"
            # Abandoned, or its answer did not decode: look again, perhaps to lead.
            value = self._fresh(key, (yield _READ, key), decode)
            if value is not _MISS:
                return value, "hit"

    def _lead(
        self,
        key: str,
        flight: Flight,
        encode: Callable[[Any], Mapping[str, Any]],
        decode: Callable[[dict[str, Any]], Any],
        keep: Callable[[Any], bool] | None,
    ) -> _Steps:
        text: str | None = None
        error: BaseException | None = None
        alone = False
        try:
            # Another leader may have stored the answer between our lookup and our lead.
            found = yield _READ, key
            value = self._fresh(key, found, decode)
            if value is not _MISS:
                text = found
                return value, "hit"
            self._count("misses")
            value = yield _COMPUTE, None
            if isinstance(value, _Failed):
                error = value.error
                self._count("errors")
                return (yield from self._failed(key, error, decode))
            text = self._encoded(key, value, encode)
            alone = text is None
            if text is not None and (keep is None or keep(value)):
                yield _WRITE, (key, text)
            return value, "miss"
        finally:
            # Also on cancellation or an interrupt (neither text nor error: abandoned, and
            # the waiters try again rather than wait forever).
            self._flights.finish(key, flight, text=text, error=error, alone=alone)

    def _alone(self, key: str, decode: Callable[[dict[str, Any]], Any]) -> _Steps:
        """A call of its own: the leader's answer could not be shared, or waiting for it
        would deadlock."""
        self._count("misses")
        value = yield _COMPUTE, None
        if isinstance(value, _Failed):
            self._count("errors")
            return (yield from self._failed(key, value.error, decode))
        return value, "miss"

    def _failed(
        self, key: str, error: BaseException, decode: Callable[[dict[str, Any]], Any]
    ) -> _Steps:
        """A call that raised ``error``: a stale answer if one may serve, else the error."""
        if self.serve_stale_when_open and isinstance(error, CircuitOpenError):
            stale = self._decoded(key, (yield _READ, key), decode, stale_ok=True)
            if stale is not _MISS:
                self._count("stale")
                logger.info("callpolicy cache: serving a stale answer for %s (%s)", key, error)
                return stale, "stale"
        return error, None

    def _fresh(self, key: str, text: str | None, decode: Callable[[dict[str, Any]], T]) -> Any:
        """A hit: the decoded answer of a fresh entry (``_MISS``: none)."""
        value = self._decoded(key, text, decode, stale_ok=False)
        if value is not _MISS:
            self._count("hits")
        return value

    def _shared(self, key: str, flight: Flight, decode: Callable[[dict[str, Any]], T]) -> Any:
        """A waiter's own copy of the leader's answer (``_MISS``: abandoned, or it did not
        decode; look again)."""
        value = self._decoded(key, flight.text, decode, stale_ok=True, stored=False)
        if value is not _MISS:
            self._count("shared")
        return value

    # -- encoding ----------------------------------------------------------------------
    def _envelope(self, key: str, payload: Mapping[str, Any]) -> str | None:
        now = self._clock()
        try:
            return pack_entry(payload, now=now, ttl=self.ttl)
        except (TypeError, ValueError) as exc:
            logger.warning("callpolicy cache: answer for %s not cached, not JSON: %s", key, exc)
            return None

    def _encoded(self, key: str, value: T, encode: Callable[[T], Mapping[str, Any]]) -> str | None:
        try:
            payload = encode(value)
        except Exception as exc:
            logger.warning(
                "callpolicy cache: answer for %s not cached, encode failed: %r", key, exc
            )
            return None
        return self._envelope(key, payload)

    def _open(self, key: str, text: str | None, *, stale_ok: bool) -> dict[str, Any] | None:
        """The payload of a stored envelope if fresh (or ``stale_ok``); None otherwise. An
        unreadable envelope is deleted, with a warning."""
        if text is None:
            return None
        try:
            payload, expires = unpack_entry(text)
        except (ValueError, KeyError, TypeError) as exc:
            self._unreadable(key, exc)
            return None
        if not stale_ok and expires is not None and expires <= self._clock():
            return None
        return payload

    def _decoded(
        self,
        key: str,
        text: str | None,
        decode: Callable[[dict[str, Any]], T],
        *,
        stale_ok: bool,
        stored: bool = True,
    ) -> Any:
        payload = self._open(key, text, stale_ok=stale_ok)
        if payload is None:
            return _MISS
        try:
            return decode(payload)
        except Exception as exc:
            self._unreadable(key, exc, stored=stored)
            return _MISS

    def _unreadable(self, key: str, why: object, *, stored: bool = True) -> None:
        self._count("unreadable")
        logger.warning(
            "callpolicy cache: unreadable entry %s (%r); treated as a miss%s",
            key,
            why,
            " and removed" if stored else "",
        )
        if stored:
            try:
                self.backend.delete(key)
            except Exception as exc:
                logger.debug("callpolicy cache: could not delete %s: %r", key, exc)

    # -- backend access: a failing backend is a miss, never a failed call ----------------
    def _read(self, key: str) -> str | None:
        try:
            return self.backend.get(key)
        except Exception as exc:
            logger.warning("callpolicy cache: lookup of %s failed: %r", key, exc)
            return None

    async def _aread(self, key: str) -> str | None:
        backend = self.backend
        try:
            if backend.is_async_native:
                return await backend.aget(key)
            return backend.get(key)
        except Exception as exc:
            logger.warning("callpolicy cache: lookup of %s failed: %r", key, exc)
            return None

    def _write(self, key: str, text: str) -> None:
        try:
            self.backend.set(key, text, ttl=self._keep)
        except Exception as exc:
            logger.warning("callpolicy cache: could not store %s: %r", key, exc)

    async def _awrite(self, key: str, text: str) -> None:
        backend = self.backend
        try:
            if backend.is_async_native:
                await backend.aset(key, text, ttl=self._keep)
            else:
                backend.set(key, text, ttl=self._keep)
        except Exception as exc:
            logger.warning("callpolicy cache: could not store %s: %r", key, exc)

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self._counts[name] += 1

    def __repr__(self) -> str:
        return f"ResponseCache(backend={self.backend!r}, ttl={self.ttl!r})"
