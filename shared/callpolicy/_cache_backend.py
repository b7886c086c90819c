"""Where cached answers live: the :class:`CacheBackend` protocol and the in-memory backend.

A backend stores JSON text under a key, with a time to live, and knows nothing of what the
text means: :class:`~callpolicy.ResponseCache` encodes and decodes (JSON only, never
pickle, so a cache file can never run code). Bounds (entries, bytes) and LRU eviction are
the backend's; freshness is the cache's (see ``_cache``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Protocol, runtime_checkable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "CacheBackend",
    "MemoryCacheBackend",
    "SyncBackend",
    "backend_of",
]

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a bool")
    return value


class BackendBounds(BaseModel):
    """Validated bounds of a backend; a bad value names its field."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="cache backend")

    max_entries: Annotated[int, BeforeValidator(_not_bool), Field(ge=1)] = DEFAULT_MAX_ENTRIES
    max_bytes: Annotated[int, BeforeValidator(_not_bool), Field(ge=1)] = DEFAULT_MAX_BYTES


def entry_size(key: str, payload: str) -> int:
    """Bytes an entry is charged: its key and its UTF-8 payload."""
    if payload.isascii():
        return len(key) + len(payload)
    return len(key) + len(payload.encode("utf-8"))


@runtime_checkable
class CacheBackend(Protocol):
    """A store of JSON text by key, bounded and LRU-evicted. Safe from any thread."""

    is_async_native: bool
    """True when async callers must use the ``a*`` methods (network or disk I/O that could
    block an event loop); False when the sync methods are fast enough to call from one."""

    def get(self, key: str) -> str | None:
        """The payload under ``key``, or None (missing, expired or unreadable). A hit makes
        the entry the most recently used."""

    def set(self, key: str, payload: str, *, ttl: float | None) -> None:
        """Store ``payload`` for ``ttl`` seconds (None: until evicted), evicting the least
        recently used entries beyond the bounds. A payload bigger than the byte bound is not
        stored."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error when missing)."""

    def clear(self) -> None:
        """Remove every entry."""

    def __len__(self) -> int:
        """Entries stored (expired ones not yet purged may be included)."""

    async def aget(self, key: str) -> str | None:
        """Async :meth:`get`."""

    async def aset(self, key: str, payload: str, *, ttl: float | None) -> None:
        """Async :meth:`set`."""

    async def adelete(self, key: str) -> None:
        """Async :meth:`delete`."""


def backend_of(backend: object) -> CacheBackend:
    """``backend`` if it is a :class:`CacheBackend`, else the one it hands out: a store of
    several kinds of shared state (``RedisStore``) has a ``cache_backend()``. A
    ``TypeError`` naming the argument otherwise."""
    if isinstance(backend, CacheBackend):
        return backend
    as_backend = getattr(backend, "cache_backend", None)
    if not callable(as_backend):
        raise TypeError(f"backend: {type(backend).__name__} does not implement CacheBackend")
    found: CacheBackend = as_backend()
    return found


class SyncBackend:
    """The async side of a backend whose sync calls never block an event loop for long
    (memory, one short loopback round trip): each ``a*`` method is its sync twin."""

    is_async_native = False

    def get(self, key: str) -> str | None:
        raise NotImplementedError

    def set(self, key: str, payload: str, *, ttl: float | None) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    async def aget(self, key: str) -> str | None:
        return self.get(key)

    async def aset(self, key: str, payload: str, *, ttl: float | None) -> None:
        self.set(key, payload, ttl=ttl)

    async def adelete(self, key: str) -> None:
        self.delete(key)


class MemoryCacheBackend(SyncBackend):
    """Entries in this process's memory: an ``OrderedDict`` in LRU order under one lock.

    Every operation is O(1) (eviction amortised) and holds the lock for about a
    microsecond, so async callers use the sync methods directly.

    Args:
        max_entries: entries kept at most (default 10 000).
        max_bytes: bytes of keys and UTF-8 payloads kept at most (default 64 MiB).
        clock: wall-clock seconds for expiry (``time.time``; inject a fake in tests).

    >>> backend = MemoryCacheBackend(max_entries=2)
    >>> for key in "abc":
    ...     backend.set(key, '{"n": 1}', ttl=None)
    >>> sorted(backend.keys())
    ['b', 'c']
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        bounds = BackendBounds(max_entries=max_entries, max_bytes=max_bytes)
        if not callable(clock):
            raise TypeError("clock: expected a callable returning seconds")
        self.max_entries = bounds.max_entries
        self.max_bytes = bounds.max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (payload, size, expires at or None)
        self._entries: OrderedDict[str, tuple[str, int, float | None]] = OrderedDict()
        self._bytes = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def keys(self) -> list[str]:
        """Keys from least to most recently used (expired ones not yet purged included)."""
        with self._lock:
            return list(self._entries)

    def get(self, key: str) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            payload, size, expires = entry
            if expires is not None and expires <= self._clock():
                del self._entries[key]
                self._bytes -= size
                return None
            self._entries.move_to_end(key)
            return payload

    def set(self, key: str, payload: str, *, ttl: float | None) -> None:
        size = entry_size(key, payload)
        expires = None if ttl is None else self._clock() + ttl
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return  # would evict everything and still not fit
            self._entries[key] = (payload, size, expires)
            self._bytes += size
            entries = self._entries
            while len(entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped, _) = entries.popitem(last=False)
                self._bytes -= dropped

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"MemoryCacheBackend({len(self)} entries, {self._bytes} bytes; "
            f"max_entries={self.max_entries}, max_bytes={self.max_bytes})"
        )
