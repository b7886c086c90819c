"""A response cache in a SQLite file: it survives a restart (of a notebook kernel, say).

One table, ``callpolicy_cache_v1(key PRIMARY KEY, payload TEXT, created, expires, size,
last_used)``. Times are wall-clock seconds (``time.time``) because they must mean the same
after a restart; ``last_used`` is a counter, not a time, so LRU order is exact even for
entries touched within the same clock tick and across processes sharing the file.

**A read never waits for a writer.** The file is in WAL mode, where a reader sees the last
committed state while another connection (in this process or another) holds the write
lock. Three connections, each under its own lock, keep it that way (``":memory:"``, which
no other connection can see, has one connection for all three):

- the *reader* only ever runs ``SELECT`` (a read transaction): a hit never queues behind a
  write, ours or another process's;
- the *writer* runs ``set``/``delete``/``clear``; it waits up to ``timeout`` seconds for
  another process's write lock (a write that gives up only costs a future hit);
- the *toucher* does the LRU bookkeeping of hits with a busy timeout of zero: a hit
  records its key as touched and tries, once and without waiting, to write the touches
  down. When the file is locked they stay pending (at most :data:`_MAX_PENDING_TOUCHES`,
  the oldest dropped first) and the next hit or the next ``set`` applies them, before it
  evicts. LRU order is therefore exact whenever nobody else holds the lock, and
  best-effort while someone does; a hit is never turned into a blocking write.

An operation takes tens of microseconds, far less than a thread pool's hand-off, so a
connection per thread would buy nothing. Async callers go through ``asyncio.to_thread``
(``is_async_native``): a read is fast, but a write can wait on another process's lock, and
that wait must not stall an event loop. An expired entry found by a read is a miss and is
left for the next write to purge.

An entry that cannot be read (bytes that are not UTF-8, a NULL payload, a failing query)
is a miss: it is logged as a warning and deleted (best-effort, without waiting), and the
call goes to the model. A path that cannot hold a writable cache (a directory, a missing
parent directory, a read-only file or directory, a file that is not a SQLite database)
fails at construction with a ``ValueError`` naming the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable

from ._cache_backend import DEFAULT_MAX_ENTRIES, BackendBounds, entry_size

__all__ = ["SQLiteCacheBackend"]

logger = logging.getLogger("callpolicy")

DEFAULT_SQLITE_MAX_BYTES = 256 * 1024 * 1024

_MAX_PENDING_TOUCHES = 4096
"""Hits whose LRU touch is waiting for the file's write lock, at most (oldest dropped)."""

_TABLE = "callpolicy_cache_v1"
_SCHEMA = {
    _TABLE: (
        f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
        " key TEXT PRIMARY KEY,"
        " payload TEXT NOT NULL,"
        " created REAL NOT NULL,"
        " expires REAL,"
        " size INTEGER NOT NULL,"
        " last_used INTEGER NOT NULL)"
    ),
    f"{_TABLE}_last_used": (
        f"CREATE INDEX IF NOT EXISTS {_TABLE}_last_used ON {_TABLE}(last_used)"
    ),
    f"{_TABLE}_expires": f"CREATE INDEX IF NOT EXISTS {_TABLE}_expires ON {_TABLE}(expires)",
}
_NEXT_USE = f"(SELECT COALESCE(MAX(last_used), 0) + 1 FROM {_TABLE})"
_TOUCH = f"UPDATE {_TABLE} SET last_used = {_NEXT_USE} WHERE key = ?"
_MEMORY = ":memory:"


def _checked_timeout(timeout: object) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        raise ValueError(f"timeout: expected finite seconds >= 0, got {timeout!r}")
    return float(timeout)


def _check_path(path: str) -> None:
    """Refuse, naming ``path``, what can never hold a cache file (before SQLite, whose
    own message, "unable to open database file", names nothing)."""
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a directory, not a SQLite cache file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"path: {path!r} cannot be created: its directory {parent!r} is missing")


def _is_busy(exc: sqlite3.Error) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class SQLiteCacheBackend:
    """Cached answers in a SQLite file, bounded by entries and bytes, LRU-evicted; reads
    never wait for a writer (see the module's docstring).

    Args:
        path: the database file (created if missing), or ``":memory:"``.
        max_entries: entries kept at most (default 10 000).
        max_bytes: bytes of keys and UTF-8 payloads kept at most (default 256 MiB).
        clock: wall-clock seconds for expiry (``time.time``; inject a fake in tests).
        timeout: seconds a *write* waits for another process's write lock (reads and
            LRU touches never wait).

    Raises:
        ValueError: naming ``path``, when it is a directory, its directory is missing, it
            is read-only (or in a read-only directory), or it is not a SQLite database.

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
        wait = _checked_timeout(timeout)
        self.path = os.fspath(path)
        if not isinstance(self.path, str):
            raise TypeError(f"path: expected a str or os.PathLike[str], got {self.path!r}")
        self.max_entries = bounds.max_entries
        self.max_bytes = bounds.max_bytes
        self._clock = clock
        in_memory = self.path == _MEMORY
        if not in_memory:
            _check_path(self.path)
        self._connections: list[sqlite3.Connection] = []
        try:
            # Autocommit mode, with explicit transactions where several statements must
            # be atomic; shared by threads under our locks (check_same_thread=False).
            self._writer = self._connect(wait)
            if in_memory:  # one database per connection: all three must be this one
                self._reader = self._toucher = self._writer
            else:
                self._writer.execute("PRAGMA journal_mode=WAL")
                self._writer.execute("PRAGMA synchronous=NORMAL")
                self._reader = self._connect(wait)
                self._toucher = self._connect(0.0)
                self._toucher.execute("PRAGMA synchronous=NORMAL")  # no fsync per touch
            self._create_schema()
            if not in_memory:
                self._check_writable()
        except sqlite3.Error as exc:
            self._close_all()
            raise ValueError(f"path: {self.path!r} is not a usable SQLite cache ({exc})") from exc
        except BaseException:
            self._close_all()
            raise
        if in_memory:
            self._write_lock = self._read_lock = self._touch_lock = threading.Lock()
        else:
            self._write_lock = threading.Lock()
            self._read_lock = threading.Lock()
            self._touch_lock = threading.Lock()
        # Keys hit but not yet marked as used, oldest first (a dict: ordered, O(1) moves).
        self._pending: dict[str, None] = {}
        self._pending_lock = threading.Lock()

    def _connect(self, timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=timeout, check_same_thread=False, isolation_level=None
        )
        self._connections.append(db)
        return db

    def _create_schema(self) -> None:
        # Only what is missing: "CREATE ... IF NOT EXISTS" of an existing index still
        # takes the write lock, and opening a ready file must not wait for a writer.
        names = {
            row[0]
            for row in self._reader.execute(
                "SELECT name FROM sqlite_master WHERE name IN (?, ?, ?)", tuple(_SCHEMA)
            )
        }
        for name, statement in _SCHEMA.items():
            if name not in names:
                self._writer.execute(statement)

    def _check_writable(self) -> None:
        """A read-only file (or one in a read-only directory) opens for reading and would
        then fail every write with a warning: refuse it now. Busy is fine (someone else
        is writing, so it is writable)."""
        try:
            # A write that changes nothing; SQLite checks read-only before the lock.
            self._toucher.execute(f"DELETE FROM {_TABLE} WHERE 0")
        except sqlite3.Error as exc:
            if _is_busy(exc):
                return
            raise ValueError(
                f"path: {self.path!r} is not writable (a read-only file or directory?): {exc}"
            ) from exc

    def _close_all(self) -> None:
        for db in self._connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    # -- sync ------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        now = self._clock()
        with self._read_lock:
            try:
                row = self._reader.execute(
                    f"SELECT payload, expires FROM {_TABLE} WHERE key = ?", (key,)
                ).fetchone()
            except sqlite3.ProgrammingError:
                raise  # closed: a caller's mistake, not an unreadable entry
            except sqlite3.Error as exc:
                failure: object = exc
                row = None
            else:
                failure = None
        if failure is not None:
            self._unreadable(key, failure)
            return None
        if row is None:
            return None
        payload, expires = row
        if expires is not None and expires <= now:
            return None  # the next write purges it; a read does not wait to
        if not isinstance(payload, str):
            self._unreadable(key, f"payload is {type(payload).__name__}, not text")
            return None
        self._touch(key)
        return payload

    def _touch(self, key: str) -> None:
        """Mark ``key`` as used: pending, then written down now if nobody holds the lock."""
        with self._pending_lock:
            pending = self._pending
            pending.pop(key, None)
            pending[key] = None
            if len(pending) > _MAX_PENDING_TOUCHES:
                del pending[next(iter(pending))]
        if not self._touch_lock.acquire(blocking=False):
            return  # another thread is writing touches down; it or a later hit takes ours
        try:
            keys = self._take_touches()
            if not keys:
                return
            db = self._toucher
            try:
                db.execute("BEGIN IMMEDIATE")  # busy timeout zero: fails at once if locked
                db.executemany(_TOUCH, [(k,) for k in keys])
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(db)
                self._return_touches(keys)
                logger.debug("callpolicy cache: LRU touches in %s postponed: %s", self.path, exc)
        finally:
            self._touch_lock.release()

    def _take_touches(self) -> list[str]:
        with self._pending_lock:
            if not self._pending:
                return []
            keys = list(self._pending)
            self._pending = {}
        return keys

    def _return_touches(self, keys: list[str]) -> None:
        """Put back touches that could not be written, before any made since."""
        with self._pending_lock:
            merged = dict.fromkeys(keys)
            for key in self._pending:
                merged.pop(key, None)
                merged[key] = None
            while len(merged) > _MAX_PENDING_TOUCHES:
                del merged[next(iter(merged))]
            self._pending = merged

    def set(self, key: str, payload: str, *, ttl: float | None) -> None:
        size = entry_size(key, payload)
        now = self._clock()
        expires = None if ttl is None else now + ttl
        with self._write_lock:
            db = self._writer
            touched: list[str] = []
            try:
                db.execute("BEGIN IMMEDIATE")
                # Hits not yet written down count before we evict.
                touched = self._take_touches()
                if touched:
                    db.executemany(_TOUCH, [(k,) for k in touched])
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
                _rollback(db)
                if touched:
                    self._return_touches(touched)
                if not isinstance(exc, sqlite3.Error) or isinstance(exc, sqlite3.ProgrammingError):
                    raise
                # A failed write only costs a future hit; the answer in hand is fine.
                logger.warning(
                    "callpolicy cache: could not store an entry in %s: %s", self.path, exc
                )

    def _evict(self, now: float) -> None:
        db = self._writer
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
        with self._write_lock:
            self._writer.execute(f"DELETE FROM {_TABLE} WHERE key = ?", (key,))

    def clear(self) -> None:
        with self._write_lock:
            self._writer.execute(f"DELETE FROM {_TABLE}")
        with self._pending_lock:
            self._pending = {}

    def __len__(self) -> int:
        with self._read_lock:
            (count,) = self._reader.execute(f"SELECT COUNT(*) FROM {_TABLE}").fetchone()
        return int(count)

    def close(self) -> None:
        """Close the file (further use raises ``sqlite3.ProgrammingError``)."""
        with self._write_lock, contextlib.ExitStack() as stack:
            for lock in {id(lock): lock for lock in (self._read_lock, self._touch_lock)}.values():
                if lock is not self._write_lock:
                    stack.enter_context(lock)
            self._close_all()

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
        # Without waiting: a reader must not queue behind another process's write.
        with self._touch_lock:
            try:
                self._toucher.execute(f"DELETE FROM {_TABLE} WHERE key = ?", (key,))
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


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
