"""What the Redis-backed stores share: which errors mean "unreachable" and which mean
"refused" (credentials, ACL: configuration, not an outage), the health of the connection
(one warning per outage, one line when it ends, retries with a growing backoff), a
thread's own connection for the sync hot path (:class:`ThreadConnection`), what a closed
store leaves behind (:class:`StoreClosedError`, :func:`release_closed_loop_client`), and
key patterns that match only their own prefix (:func:`glob_escape`)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import Script
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    NoScriptError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import CallPolicyError
from ._topology import TOPOLOGY_FAULTS

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # what redis-py's own packer calls, without its checks of every argument (~4 us)
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis comes with the redis extra
    _hiredis_pack = None

__all__ = [
    "REFUSED",
    "UNREACHABLE",
    "ClosedHealth",
    "Health",
    "StoreAccessError",
    "StoreClosedError",
    "StoreUnavailableError",
    "ThreadConnection",
    "glob_escape",
    "release_closed_loop_client",
    "text",
]

logger = logging.getLogger("callpolicy.redis")

UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    *TOPOLOGY_FAULTS,
)
"""Errors that mean Redis could not be reached, or could not serve this call where it
was sent (a cluster's slot moved or down, a primary demoted by a failover): the stores
fall back to local state."""

REFUSED = (
    AuthenticationError,  # WRONGPASS, NOAUTH, "invalid password" (a ConnectionError!)
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,  # NOPERM: the ACL user may not run a command or touch a key
)
"""Errors that mean Redis answered and refused this client: wrong credentials or missing
ACL permissions. Configuration, not an outage: never a fallback to local state. Some are
``ConnectionError`` subclasses, so they are caught before :data:`UNREACHABLE`."""


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_GLOB = re.compile(r"([*?\[\]\\])")


def glob_escape(literal: str) -> str:
    """``literal`` as a ``SCAN MATCH`` pattern that matches exactly it: Redis's glob
    characters (``*``, ``?``, ``[``, ``]``, ``\\``) escaped with a backslash."""
    return _GLOB.sub(r"\\\1", literal)


class StoreAccessError(CallPolicyError, RuntimeError):
    """Redis refused a store's credentials or permissions (``WRONGPASS``, ``NOAUTH``,
    ``NOPERM``): configuration, not an outage, so it is raised at the call, never
    answered from local state. The message names the store (its URL without password)."""


class StoreUnavailableError(CallPolicyError, RuntimeError):
    """An inspection or control call (``budget.usage()``, ``cache.stats()``,
    ``policy.trip()``, the status command) could not reach Redis. Calls through a
    circuit never raise it: they go on with local state."""


class Health:
    """Whether Redis is thought reachable, and when to try again if not.

    Exactly one warning when an outage begins and one when it ends ("reachable again
    after X s"), however many threads and tasks see it. ``epoch`` counts those changes:
    a call reads it before its round trip and hands it to :meth:`failed` or
    :meth:`succeeded`, so that a call that started before the last change cannot undo
    it — a reply read just before Redis died does not end the outage that began
    meanwhile, and a timeout of a call sent during the outage does not begin a second
    one after Redis answered again.
    """

    def __init__(self, *, backoff_base: float, backoff_max: float, name: str = "Redis") -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = backoff_base
        self._base = backoff_base
        self._max = backoff_max
        self.name = name
        """What the warnings call the server (a URL without its password)."""
        self.epoch = 0
        """Even while reachable, odd while down; +1 at each change."""

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def usable(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException, epoch: int | None = None) -> None:
        """A call that started at ``epoch`` (default: now) could not reach Redis."""
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                if epoch is not None and epoch != self.epoch:
                    return  # sent before Redis answered again: not a new outage
                self._down_since = now
                self._backoff = self._base
                self.epoch += 1
                logger.warning(
                    "callpolicy: %s unreachable (%s); using local state until it answers again",
                    self.name,
                    type(exc).__name__,
                )
            else:
                self._backoff = min(self._backoff * 2, self._max)
            self._retry_at = now + self._backoff

    def succeeded(self, epoch: int | None = None) -> None:
        """A call that started at ``epoch`` (default: now) reached Redis."""
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None or (epoch is not None and epoch != self.epoch):
                return  # answered before the outage began: it does not end it
            logger.warning(
                "callpolicy: %s reachable again after %.1f s; shared state resumes",
                self.name,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
            self.epoch += 1


class ThreadConnection:
    """One thread's own connection, for the scripts of the sync hot path (admit, record).

    A call through a pooled client pays for a checkout (a lock, a queue), redis-py's
    ``Script`` and ``execute_command`` layers and its argument checks: ~90 us of CPU of a
    guarded call on loopback here, a fifth to a quarter of its time. Here the command is
    packed, sent, and its reply read, on a connection no other thread uses. It is made
    with the pool's own connection class and settings (address, timeouts, client name,
    credentials, TLS, protocol), but it is not taken from the pool: a thread keeps it for
    its life, and would run a bounded pool dry.

    Like the pool before it hands a connection out, each call first checks that Redis has
    not closed it meanwhile (``CLIENT KILL``, the server's idle ``timeout``, a restart):
    such a connection is reconnected and the call goes on, rather than fail over to
    local state. An error of the round trip itself is raised as redis-py raises it
    (``ConnectionError``, ``TimeoutError``: the store's ``UNREACHABLE``), the connection
    disconnected, to be reconnected by the next call; a script the server does not have
    (``NOSCRIPT``: a restart, ``SCRIPT FLUSH``) is loaded and run again, once, as
    redis-py's ``Script`` does. No retry otherwise: the pool of ``from_url`` has none
    either (redis-py's default for a pool).

    It is disconnected by :meth:`release` (the store's ``close()``), and when this object
    goes: when its thread ends, the thread-local that holds it is cleared. ``pid`` tells
    a forked child that the socket is its parent's.
    """

    __slots__ = ("__weakref__", "connection", "pid")

    def __init__(self, pool: redis.ConnectionPool) -> None:
        connection: Any = pool.connection_class(**pool.connection_kwargs)
        self.connection = connection
        self.pid = os.getpid()
        # Not __del__: the finalizer also runs at interpreter exit if the thread-local is
        # still alive then (the main thread's), and holds no reference to this object.
        weakref.finalize(self, connection.disconnect)

    def release(self) -> None:
        """Disconnect (a later :meth:`evalsha` would connect again)."""
        self.connection.disconnect()

    def evalsha(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``script`` run with ``keys`` and ``args``: its reply, as redis-py's would be."""
        connection = self.connection
        self._ready()
        command = _pack(("EVALSHA", script.sha, len(keys), *keys, *args), connection)
        connection.send_packed_command(command, check_health=False)
        try:
            return connection.read_response()
        except NoScriptError:
            pass
        load = _pack(("SCRIPT", "LOAD", script.script), connection)
        connection.send_packed_command(load, check_health=False)
        connection.read_response()
        connection.send_packed_command(command, check_health=False)
        return connection.read_response()

    def _ready(self) -> None:
        """Connected, with nothing to read: what the pool checks of a connection it hands
        out (redis-py's ``ConnectionPool.get_connection``), at the same cost (a poll)."""
        connection = self.connection
        connection.connect()  # no-op when connected
        try:
            if connection.can_read():  # EOF (closed by the server), or an unread reply
                raise RedisConnectionError("Connection has data")
        except UNREACHABLE:
            connection.disconnect()
            connection.connect()
            if connection.can_read():
                raise RedisConnectionError("Connection not ready") from None


def _pack(parts: tuple[Any, ...], connection: Any) -> list[bytes]:
    """``parts`` in the Redis protocol, as ``send_packed_command`` takes them."""
    if _hiredis_pack is not None:
        return [_hiredis_pack(parts)]
    return connection.pack_command(*parts)  # type: ignore[no-any-return]


class StoreClosedError(CallPolicyError, RuntimeError):
    """Raised when a :class:`~callpolicy.redis.RedisStore` (or the budget store or cache
    backend it handed out) is used after ``close()``/``aclose()``."""


class ClosedHealth(Health):
    """The health of a closed store: any call that would reach Redis raises
    :class:`StoreClosedError`. Swapped in by ``close()``, so that the calls, which ask
    ``usable()`` anyway, need no check of their own."""

    def __init__(self, message: str) -> None:
        super().__init__(backoff_base=1.0, backoff_max=1.0)
        self.message = message

    def usable(self) -> bool:
        raise StoreClosedError(self.message)

    def failed(self, exc: BaseException, epoch: int | None = None) -> None:
        """A call in flight when the store closed lost its connection: no outage."""

    def succeeded(self, epoch: int | None = None) -> None:
        pass


def release_closed_loop_client(client: aioredis.Redis) -> None:
    """Close the sockets of ``client``, whose event loop is already closed.

    Its connections can no longer be closed the usual way (``await client.aclose()``
    needs their loop), and left to the garbage collector each one warns (unclosed
    transport, "loop is closed"). Each transport is marked closing (``abort()``; the
    closed loop refuses to schedule the rest), then what its loop would have run next is
    run here: ``connection_lost``, which closes the socket. A transport without that
    step (not asyncio's selector transport: uvloop, TLS) is left to the collector.
    """
    pool: Any = getattr(client, "connection_pool", None)
    connection: Any
    if pool is None:  # a redis.asyncio.cluster.RedisCluster: a list of connections per node
        for node in client.nodes_manager.nodes_cache.values():  # type: ignore[attr-defined]
            for connection in node._connections:
                _release_connection(connection)
            node._free.clear()
        return
    for connection in [*pool._available_connections, *pool._in_use_connections]:
        _release_connection(connection)
    pool.reset()


def _release_connection(connection: Any) -> None:
    """One connection of :func:`release_closed_loop_client`: its socket closed."""
    writer = getattr(connection, "_writer", None)
    if writer is None:
        return
    transport = writer.transport
    # "Event loop is closed": the loop could not schedule connection_lost.
    with contextlib.suppress(RuntimeError):
        transport.abort()
    lost = getattr(transport, "_call_connection_lost", None)
    if lost is not None and getattr(transport, "_sock", None) is not None:
        # Waking a waiter of the closed loop may raise too; the socket is closed first.
        with contextlib.suppress(RuntimeError):
            lost(None)
    connection._close()  # forget the streams (the transport is closing: no loop call)
