"""A response cache in a SQLite file: it survives a restart (of a notebook kernel, say).

One table, ``callpolicy_cache_v1(key PRIMARY KEY, payload TEXT, created, expires, size,
last_used)``. Times are wall-clock seconds (``time.time``) because they must mean the same
after a restart; ``last_used`` is a counter, not a time, so LRU order is exact even for
entries touched within the same clock tick and across processes sharing the file.

The file is opened in WAL mode (readers never wait for the writer) with one connection
guarded by a lock: an operation takes tens of microseconds, far less than a thread pool's
hand-off, so a connection per thread would buy nothing. Async callers go through
``asyncio.to_thread`` (``is_async_native``): a local read is fast, but a write can wait
on another process's lock, and that wait must not stall an event loop.

An entry that cannot be read (bytes that are not UTF-8, a NULL payload, a failing query)
is a miss: it is logged as a warning and deleted, and the call goes to the model. A file
that is not a SQLite database fails at construction, loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable

from ._cache_backend import DEFAULT_MAX_ENTRIES, BackendBounds, entry_size

__all__ = ["SQLiteCacheBackend"]

logger = logging.getLogger("callpolicy")

DEFAULT_SQLITE_MAX_BYTES = 256 * 1024 * 1024

_TABLE = "callpolicy_cache_v1"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
    " key TEXT PRIMARY KEY,"
    " payload TEXT NOT NULL,"
    " created REAL NOT NULL,"
    " expires REAL,"
    " size INTEGER NOT NULL,"
    " last_used INTEGER NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_last_used ON {_TABLE}(last_used)",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_expires ON {_TABLE}(expires)",
)
_NEXT_USE = f"(SELECT COALESCE(MAX(last_used), 0) + 1 FROM {_TABLE})"


class SQLiteCacheBackend:
    """Cached answers in a SQLite file, bounded by entries and bytes, LRU-evicted.

    Args:
        path: the database file (created if missing), or ``":memory:"``.
        max_entries: entries kept at most (default 10 000).
        max_bytes: bytes of keys and UTF-8 payloads kept at most (default 256 MiB).
        clock: wall-clock seconds for expiry (``time.time``; inject a fake in tests).
        timeout: seconds to wait for another process's write lock.

    >>> backend = SQLiteCacheBackend(":memory:")
    >>> backend.set("k", '{"answer": 42}', ttl=None)
    >>> backend.get("k")
    '{"answer": 42}'
    >>> backend.close()
    """

    is_async_native = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_SQLITE_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        timeout: float = 5.0,
    ) -> None:
        bounds = BackendBounds(max_entries=max_entries, max_bytes=max_bytes)
        if not callable(clock):
            raise TypeError("clock: expected a callable returning seconds")
        self.path = os.fspath(path)
        self.max_entries = bounds.max_entries
        self.max_bytes = bounds.max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # One connection shared under our lock (check_same_thread=False); autocommit mode,
        # with explicit transactions where several statements must be atomic.
        self._db = sqlite3.connect(
            self.path, timeout=timeout, check_same_thread=False, isolation_level=None
        )
        try:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ValueError(f"path: {self.path!r} is not a usable SQLite cache ({exc})") from exc

    # -- sync ------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        now = self._clock()
        with self._lock:
            try:
                row = self._db.execute(
                    f"SELECT payload, expires FROM {_TABLE} WHERE key = ?", (key,)
                ).fetchone()
            except sqlite3.Error as exc:
                self._unreadable(key, exc)
                return None
            if row is None:
                return None
            payload, expires = row
            if expires is not None and expires <= now:
                self._delete_quietly(key)
                return None
            if not isinstance(payload, str):
                self._unreadable(key, f"payload is {type(payload).__name__}, not text")
                return None
            try:
                self._db.execute(
                    f"UPDATE {_TABLE} SET last_used = {_NEXT_USE} WHERE key = ?", (key,)
                )
            except sqlite3.Error as exc:  # busy elsewhere: the hit stands, the LRU touch waits
                logger.debug("callpolicy cache: could not mark %s as used: %s", key, exc)
            return payload

    def set(self, key: str, payload: str, *, ttl: float | None) -> None:
        size = entry_size(key, payload)
        now = self._clock()
        expires = None if ttl is None else now + ttl
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                if size > self.max_bytes:  # could never fit: just drop an older version
                    db.execute(f"DELETE FROM {_TABLE} WHERE key = ?", (key,))
                else:
                    db.execute(
                        f"INSERT OR REPLACE INTO {_TABLE}"
                        " (key, payload, created, expires, size, last_used)"
                        f" VALUES (?, ?, ?, ?, ?, {_NEXT_USE})",
                        (key, payload, now, expires, size),
                    )
                    self._evict(now)
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if not isinstance(exc, sqlite3.Error):
                    raise
                # A failed write only costs a future hit; the answer in hand is fine.
                logger.warning(
                    "callpolicy cache: could not store an entry in %s: %s", self.path, exc
                )

    def _evict(self, now: float) -> None:
        db = self._db
        db.execute(f"DELETE FROM {_TABLE} WHERE expires IS NOT NULL AND expires <= ?", (now,))
        count, total = db.execute(f"SELECT COUNT(*), TOTAL(size) FROM {_TABLE}").fetchone()
        excess_entries = count - self.max_entries
        excess_bytes = int(total) - self.max_bytes
        if excess_entries <= 0 and excess_bytes <= 0:
            return
        doomed: list[tuple[str]] = []
        for key, size in db.execute(f"SELECT key, size FROM {_TABLE} ORDER BY last_used"):
            if excess_entries <= 0 and excess_bytes <= 0:
                break
            doomed.append((key,))
            excess_entries -= 1
            excess_bytes -= size
        db.executemany(f"DELETE FROM {_TABLE} WHERE key = ?", doomed)

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {_TABLE} WHERE key = ?", (key,))

    def clear(self) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {_TABLE}")

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute(f"SELECT COUNT(*) FROM {_TABLE}").fetchone()
        return int(count)

    def close(self) -> None:
        """Close the file (further use raises ``sqlite3.ProgrammingError``)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SQLiteCacheBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreadable(self, key: str, why: object) -> None:
        logger.warning(
            "callpolicy cache: unreadable entry %s in %s (%s); treated as a miss and removed",
            key,
            self.path,
            why,
        )
        self._delete_quietly(key)

    def _delete_quietly(self, key: str) -> None:
        try:
            self._db.execute(f"DELETE FROM {_TABLE} WHERE key = ?", (key,))
        except sqlite3.Error as exc:
            logger.debug("callpolicy cache: could not delete %s: %s", key, exc)

    # -- async: the same, off the event loop ------------------------------------------
    async def aget(self, key: str) -> str | None:
        return await asyncio.to_thread(self.get, key)

    async def aset(self, key: str, payload: str, *, ttl: float | None) -> None:
        await asyncio.to_thread(self.set, key, payload, ttl=ttl)

    async def adelete(self, key: str) -> None:
        await asyncio.to_thread(self.delete, key)

    def __repr__(self) -> str:
        return (
            f"SQLiteCacheBackend({self.path!r}, max_entries={self.max_entries}, "
            f"max_bytes={self.max_bytes})"
        )
