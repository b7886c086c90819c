"""A :class:`~callpolicy.redis.RedisStore`'s link to Redis: its clients, their health, and
their life from opening to closing.

The store's circuits, budget store and cache backend reach Redis only through its link:
the sync client (and the Lua scripts registered on it), one ``redis.asyncio`` client per
event loop, the health that turns an unreachable Redis into local state (with a growing
backoff) and a refusal into :class:`StoreAccessError`, and what ``close()``/``aclose()``
release.

A link opened by ``from_url`` runs the sync ``admit``/``record`` scripts on a connection
of each calling thread's own (:class:`~._connection.ThreadConnection`: no pool checkout,
no redis-py command layers; on loopback a fifth to a quarter off a one-thread guarded
call, ~1.7x the calls/s of 16 threads), on a cluster one per primary
(:class:`~._cluster_path.ClusterPath`); everything else goes through its pool. A link on
a client the caller handed in uses only that client's pool.

A link closes what it opened: the connection pool ``from_url`` built, its threads' own
connections (each also closed when its thread ends) and the ``redis.asyncio`` clients it
built, one per event loop; a client handed in stays the caller's unless
``close_client=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from .._redact import redact
from . import _scripts
from ._cluster_path import ClusterPath
from ._connection import (
    REFUSED,
    UNREACHABLE,
    ClosedHealth,
    Health,
    StoreAccessError,
    StoreClosedError,
    StoreUnavailableError,
    ThreadConnection,
    release_closed_loop_client,
)
from ._topology import (
    AsyncClientFactory,
    InitializedFirst,
    async_cluster_factory,
    cluster_display_url,
    cluster_from_url,
    cluster_url,
    sentinel_clients,
)

__all__ = ["OUTAGE", "Opened", "RedisLink", "open_sentinel", "open_url"]

logger = logging.getLogger("callpolicy.redis")

OUTAGE: Any = object()
"""What :meth:`RedisLink.run` returns when Redis could not be reached: go local."""

_DRAIN_TIMEOUT = 5.0
"""Seconds ``aclose()`` waits for the round trips of cancelled calls (see ``drain``)."""
_FAULTS: tuple[type[BaseException], ...] = (*REFUSED, *UNREACHABLE)
_ASYNC_CLIENT_SETTINGS = frozenset(inspect.signature(aioredis.Redis.__init__).parameters) - {
    "self",
    "connection_pool",
}
_CIRCUIT_SCRIPTS = (("admit", _scripts.ADMIT), ("record", _scripts.RECORD))


class _ClosedScripts(dict[str, Any]):
    """A closed link's scripts: every lookup raises (no check on the way to them)."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def __missing__(self, name: str) -> Any:
        raise StoreClosedError(self.message)


def _client_url(client: redis.Redis | RedisCluster) -> str:
    """A URL naming ``client``'s server, without a password (a store given a client)."""
    if isinstance(client, RedisCluster):
        return cluster_display_url(client)
    pool: Any = client.connection_pool
    settings: dict[str, Any] = pool.connection_kwargs
    user = settings.get("username")
    credentials = f"{user}:***@" if user else ":***@" if settings.get("password") else ""
    db = settings.get("db", 0)
    path = settings.get("path")
    if path:
        return f"unix://{credentials}{path}?db={db}"
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    host = settings.get("host", "localhost")
    return f"{scheme}://{credentials}{host}:{settings.get('port', 6379)}/{db}"


def _report_failed_close(done: Future[None]) -> None:
    """Done callback of an async client's ``aclose()`` that ``close()`` handed its loop."""
    if done.cancelled():  # the loop ended (cancelling its tasks) before it ran
        logger.warning("callpolicy: a RedisStore's async client was not closed: its loop ended")
        return
    exc = done.exception()
    if exc is not None:
        logger.warning("callpolicy: closing a RedisStore's async client failed: %r", exc)


@dataclass
class Opened:
    """What ``from_url``/``from_sentinel`` built beside the sync client: the link owns
    (and closes) all of it."""

    url: str
    """The server's name in messages, without a password."""
    thread_connections: int = 0
    """Threads that get a connection of their own for the sync hot path (0: none)."""
    cluster_connections: int = 0
    """On a cluster: such connections in all, over its primaries (0: not a cluster)."""
    async_pool: tuple[str, dict[str, Any]] | None = None
    """The URL and pool settings of each event loop's client."""
    async_factory: AsyncClientFactory | None = None
    also_close: list[redis.Redis] = field(default_factory=list)


def open_url(
    url: str, settings: dict[str, Any], *, cluster: bool
) -> tuple[redis.Redis | RedisCluster, Opened]:
    """The sync client of ``RedisStore.from_url`` (see there) with the pool ``settings``,
    and what else it opened."""
    limit = settings["max_connections"]
    plain_url, named_cluster = cluster_url(url)
    if cluster or named_cluster:
        client = cluster_from_url(plain_url, settings)
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        return client, Opened(
            url=redact(url if named_cluster else cluster_display_url(client)),
            cluster_connections=limit * max(len(primaries), 1),
        )
    pool = redis.BlockingConnectionPool.from_url(url, **settings)
    # from_pool: the client owns the pool, and closing it disconnects the pool.
    return redis.Redis.from_pool(pool), Opened(
        url=redact(url), thread_connections=limit, async_pool=(url, settings)
    )


def open_sentinel(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    *,
    settings: dict[str, Any],
    sentinel_kwargs: dict[str, Any],
    threads: int,
) -> tuple[redis.Redis, Opened]:
    """The sync client of ``RedisStore.from_sentinel`` (see there), and what else it
    opened: the primary's connections get ``settings``, the Sentinels' ``sentinel_kwargs``;
    up to ``threads`` threads get a connection of their own."""
    client, others, build_async = sentinel_clients(
        sentinels, service_name, settings=settings, sentinel_kwargs=sentinel_kwargs
    )
    nodes = ",".join(f"{host}:{port}" for host, port in sentinels)
    return client, Opened(
        url=f"redis+sentinel://{nodes}/{service_name}",  # a name for messages
        thread_connections=threads,
        async_factory=build_async,
        also_close=others,
    )


class RedisLink:
    """One store's clients, their health, and closing them; see the module's docstring."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        prefix: str,
        backoff_base: float,
        backoff_max: float,
        close_client: bool,
    ) -> None:
        self.client: Any = client
        self.prefix = prefix
        self.is_cluster = isinstance(client, RedisCluster)
        # How async calls get their client, one per event loop (None: from the sync
        # client's pool settings), and what else to close with the sync client.
        self._async_factory: AsyncClientFactory | None = (
            async_cluster_factory(client) if isinstance(client, RedisCluster) else None
        )
        self._async_pool: tuple[str, dict[str, Any]] | None = None
        self._also_close: list[redis.Redis] = []
        # On a cluster from from_url: the sync hot path's connections, per thread per
        # primary (see ClusterPath); None otherwise.
        self._cluster_path: ClusterPath | None = None
        self._close_client = close_client
        self.closed = False
        self.url = _client_url(client)
        self.health = Health(
            backoff_base=backoff_base, backoff_max=backoff_max, name=self._health_name()
        )
        # Round trips finishing for cancelled calls (see hold): kept until done.
        self._background: set[asyncio.Future[Any]] = set()
        self._lock = threading.Lock()
        # The sync hot path's connections, one per thread (see ThreadConnection): at most
        # this many (from_url sets it; 0: none, every call through the client's pool).
        self._thread_connection_limit = 0
        self._thread = threading.local()
        self._thread_connections: weakref.WeakSet[ThreadConnection] = weakref.WeakSet()
        self._pid = os.getpid()
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                *_CIRCUIT_SCRIPTS,
                ("snapshot", _scripts.SNAPSHOT),
                ("force", _scripts.FORCE),
            )
        }
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def adopt(self, opened: Opened) -> None:
        """Take over what ``from_url``/``from_sentinel`` opened with the client: the link
        owns the client from now on, and closes it."""
        self.url = opened.url
        self.health.name = self._health_name()
        self._close_client = True
        self._thread_connection_limit = opened.thread_connections
        self._async_pool = opened.async_pool
        self._also_close = opened.also_close
        if opened.async_factory is not None:
            self._async_factory = opened.async_factory
        if opened.cluster_connections:
            self._cluster_path = ClusterPath(self.client, limit=opened.cluster_connections)
            self.evalsha = self._cluster_evalsha  # type: ignore[method-assign]

    # -- naming, and the errors that name it ---------------------------------------------
    def describe(self) -> str:
        """The store as messages name it (its URL without password, its prefix)."""
        closed = ", closed" if self.closed else ""
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}{closed})"

    def __repr__(self) -> str:
        return f"RedisLink of {self.describe()}"

    def _health_name(self) -> str:
        return f"Redis at {self.url} (prefix {self.prefix!r})"

    def access_error(self, exc: BaseException) -> StoreAccessError:
        """What a refusal of credentials or permissions raises: configuration, to fix."""
        return StoreAccessError(
            f"{self.describe()}: Redis refused access ({type(exc).__name__}: "
            f"{redact(str(exc))}). This is configuration, not an outage: check the "
            "credentials in the URL (or the client's), and that the ACL user may run "
            f"EVALSHA, SCRIPT LOAD and SCAN and read and write the keys {self.prefix}:*"
        )

    @contextlib.contextmanager
    def reaching(self, what: str) -> Iterator[None]:
        """Around an inspection or control call: a closed store raises
        :class:`StoreClosedError`, a refusal :class:`StoreAccessError`, an unreachable
        Redis :class:`StoreUnavailableError` (all naming the store, no password) —
        never a redis-py exception."""
        self.check_open()
        health = self.health
        epoch = health.epoch
        try:
            yield
        except REFUSED as exc:
            raise self.access_error(exc) from None
        except UNREACHABLE as exc:
            health.failed(exc, epoch)
            raise StoreUnavailableError(
                f"{what}: {self.describe()} cannot be reached ({type(exc).__name__}: "
                f"{redact(str(exc))})"
            ) from exc
        except redis.RedisError as exc:  # READONLY, OOM, BUSY...: answered, not read
            raise StoreUnavailableError(
                f"{what}: {self.describe()} answered with an error ({type(exc).__name__}: "
                f"{redact(str(exc))})"
            ) from exc
        health.succeeded(epoch)

    # -- a round trip of the hot path: its reply, or OUTAGE ----------------------------------
    def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Script ``name``'s reply; :data:`OUTAGE` if Redis could not be reached (told to
        :attr:`health`). A refusal raises :class:`StoreAccessError`."""
        health = self.health
        epoch = health.epoch
        try:
            reply = self.evalsha(name, keys, args)
        except _FAULTS as exc:
            self._unreached(exc, epoch)
            return OUTAGE
        health.succeeded(epoch)
        return reply

    # Each async round trip runs as a task of its own, awaited through a shield:
    # cancelling the caller neither interrupts it half way (the script may have run on
    # the server, its reply unread: a probe lease nobody would free) nor reaches the
    # client library, which can swallow a cancellation — redis-py sends through
    # asyncio.wait_for, which on Python <= 3.11 returns a result that completed with the
    # cancellation (fixed in 3.12), and with async-timeout (Python 3.10) a cancellation
    # can become a TimeoutError, read as an outage: either way the call went on to the
    # model. A shield works the same on every version, where
    # asyncio.current_task().cancelling() exists only from 3.11. The caller sees
    # CancelledError at once; the reply, when it is in, goes to ``then``, which gives
    # back what the round trip took.
    async def arun(
        self, name: str, keys: list[str], args: list[Any], then: Callable[[Any], object]
    ) -> Any:
        """Async :meth:`run`; if the caller is cancelled, ``then(reply)`` runs once the
        reply is in (not if the round trip failed)."""
        health = self.health
        epoch = health.epoch
        trip = asyncio.ensure_future(self.ascript(name)(keys=keys, args=args))
        try:
            reply = await asyncio.shield(trip)
        except _FAULTS as exc:
            self._unreached(exc, epoch)
            return OUTAGE
        except asyncio.CancelledError:
            trip.add_done_callback(functools.partial(self._settle, epoch, then))
            self.hold(trip)
            raise
        health.succeeded(epoch)
        return reply

    def _unreached(self, exc: BaseException, epoch: int) -> None:
        # Refusals first: some of them are ConnectionErrors.
        if isinstance(exc, REFUSED):
            raise self.access_error(exc) from None
        self.health.failed(exc, epoch)

    def _settle(self, epoch: int, then: Callable[[Any], object], trip: asyncio.Future[Any]) -> None:
        """The round trip of a cancelled call is done: its reply to ``then``."""
        if trip.cancelled():
            return
        exc = trip.exception()
        if exc is None:
            self.health.succeeded(epoch)
            then(trip.result())
        elif isinstance(exc, UNREACHABLE) and not isinstance(exc, REFUSED):
            self.health.failed(exc, epoch)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as a task of the running loop, held until done."""
        self.hold(asyncio.get_running_loop().create_task(work))

    def hold(self, task: asyncio.Future[Any]) -> None:
        """Keep ``task`` (a round trip of a cancelled call, or what frees its lease)
        until it is done: the loop keeps only a weak reference to its tasks, and
        :meth:`aclose` waits for them (see :meth:`drain`)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait (up to ``_DRAIN_TIMEOUT`` s) for the running loop's round trips of
        cancelled calls and the releases they spawn: closing the connections under
        them would leave their probe leases to expire instead."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DRAIN_TIMEOUT
        while True:
            # tuple(): one step under the GIL, while other threads' loops add and discard.
            mine = [task for task in tuple(self._background) if task.get_loop() is loop]
            left = deadline - loop.time()
            if not mine or left <= 0:
                return
            await asyncio.wait(mine, timeout=left)

    # -- the scripts, sync ---------------------------------------------------------------
    def script(self, name: str) -> Callable[..., Any]:
        return self._scripts[name]

    def evalsha(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Script ``name`` run on the calling thread's own connection, or through the
        pool on a thread without one: ``self.script(name)(keys=keys, args=args)``, faster.
        """
        if self.closed:
            raise StoreClosedError(self.closed_message())
        try:
            own: ThreadConnection | None = self._thread.connection
        except AttributeError:  # the thread's first call
            own = self._new_thread_connection()
        else:
            if own is not None and own.pid != os.getpid():  # a forked child: the parent's
                own = self._new_thread_connection()
        if own is None:
            return self._scripts[name](keys=keys, args=args)
        try:
            return own.evalsha(self._scripts[name], keys, args)
        finally:
            if self.closed:  # by another thread meanwhile: this call may have reconnected
                own.release()

    def _cluster_evalsha(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """:meth:`evalsha` of a link to a cluster: on this thread's connection to the
        primary of the keys' slot (see :class:`ClusterPath`)."""
        script = self._scripts[name]  # raises once the link is closed
        path: Any = self._cluster_path
        try:
            return path.evalsha(script, keys, args, lambda: script(keys=keys, args=args))
        finally:
            if self.closed:  # by another thread meanwhile: this call may have reconnected
                path.release()

    def _new_thread_connection(self) -> ThreadConnection | None:
        """The calling thread's own connection, made on its first call (or its first in
        a forked child); ``None`` if the link gives none, or ``max_connections`` threads
        have one already: then this thread's calls go through the pool."""
        with self._lock:
            self.check_open()
            pid = os.getpid()
            if pid != self._pid:  # a forked child: its parent's threads' are no concern
                self._pid = pid
                self._thread_connections = weakref.WeakSet()
            own = None
            if len(self._thread_connections) < self._thread_connection_limit:
                own = ThreadConnection(self.client.connection_pool)
                self._thread_connections.add(own)
        # Cleared when the thread ends: then `own` goes, and disconnects (its finalizer).
        self._thread.connection = own
        return own

    # -- the scripts, async: one client per event loop ----------------------------------
    def ascript(self, name: str) -> Callable[..., Any]:
        loop = asyncio.get_running_loop()
        scripts = self._async.get(loop)
        if scripts is None:
            scripts = self._new_async_scripts(loop)
        return scripts[name]  # type: ignore[no-any-return]

    def _new_async_scripts(self, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        """The scripts of a new ``redis.asyncio`` client for ``loop`` (first call on it)."""
        with self._lock:
            self.check_open()
            scripts = self._async.get(loop)
            if scripts is not None:
                return scripts
            # Loops closed since their first call: their clients' sockets are closed now,
            # not left for the garbage collector (many asyncio.run() would pile them up).
            for old, old_scripts in list(self._async.items()):
                if old.is_closed():
                    del self._async[old]
                    for aclient in _clients_of(old_scripts):
                        release_closed_loop_client(aclient)
            aclient, others = self._new_async_client()
            made: dict[str, Any] = {
                name: aclient.register_script(source) for name, source in _CIRCUIT_SCRIPTS
            }
            if isinstance(aclient, AsyncRedisCluster):
                made = {name: InitializedFirst(script) for name, script in made.items()}
            if others:
                made["others"] = others
            self._async[loop] = made
            return made

    def _new_async_client(self) -> tuple[Any, list[Any]]:
        """A ``redis.asyncio`` client for the running loop (its connections belong to one
        event loop), and what else to close with it. Same server and timeouts as the sync
        client (only the settings both share). Either way the client owns its pool:
        closing it disconnects the pool."""
        if self._async_factory is not None:  # a cluster's, a Sentinel's primary's
            return self._async_factory()
        if self._async_pool is not None:
            url, pool_settings = self._async_pool
            pool = aioredis.BlockingConnectionPool.from_url(url, **pool_settings)
            return aioredis.Redis.from_pool(pool), []
        settings = self.client.connection_pool.connection_kwargs
        kwargs = {k: v for k, v in settings.items() if k in _ASYNC_CLIENT_SETTINGS}
        return aioredis.Redis(**kwargs), []

    # -- closing -------------------------------------------------------------------------
    def close(self) -> None:
        """See ``RedisStore.close``."""
        for loop, aclient in self._shut():
            _hand_close(loop, aclient)

    async def aclose(self) -> None:
        """See ``RedisStore.aclose``."""
        if not self.closed:
            await self.drain()
        running = asyncio.get_running_loop()
        mine = []
        for loop, aclient in self._shut():
            if loop is running:
                mine.append(aclient)
            else:
                _hand_close(loop, aclient)
        for aclient in mine:
            await aclient.aclose()

    def _shut(self) -> list[tuple[asyncio.AbstractEventLoop, aioredis.Redis]]:
        """Mark the link closed; close the sync client if owned; return the async
        clients (and their loops) still to close — none if it was closed already."""
        with self._lock:
            if self.closed:
                return []
            self.closed = True
            message = self.closed_message()
            # The calls ask health.usable() and look their script up anyway: swapping
            # both makes them raise, with no check of their own on every call.
            self.health = ClosedHealth(message)
            self._scripts = _ClosedScripts(message)
            clients = [
                (loop, aclient)
                for loop, scripts in list(self._async.items())
                for aclient in _clients_of(scripts)
            ]
            self._async.clear()
            threads = list(self._thread_connections)
            self._thread_connections.clear()
        # A thread in a call meanwhile may reconnect its own: it releases it once the
        # call is over (see evalsha), as it finds the link closed.
        for own in threads:
            own.release()
        if self._cluster_path is not None:
            self._cluster_path.release()
        if self._close_client:
            self.client.close()
            for other in self._also_close:
                other.close()
        return clients

    def closed_message(self) -> str:
        return (
            f"RedisStore(prefix={self.prefix!r}) is closed: its circuits, budget store "
            "and cache backend no longer reach Redis"
        )

    def check_open(self) -> None:
        """For the calls that reach Redis without asking ``health`` first."""
        if self.closed:
            raise StoreClosedError(self.closed_message())


def _clients_of(scripts: dict[str, Any]) -> list[Any]:
    """The async clients behind one loop's scripts: the one they run on, and the others
    built with it (a Sentinel's own)."""
    return [scripts["admit"].registered_client, *scripts.get("others", ())]


def _hand_close(loop: asyncio.AbstractEventLoop, aclient: Any) -> None:
    """Close ``aclient`` of another loop than the running one (or of none): its sockets
    at once if its loop is closed, else ``aclose()`` handed to that loop."""
    if loop.is_closed():
        release_closed_loop_client(aclient)
    else:
        closing = asyncio.run_coroutine_threadsafe(aclient.aclose(), loop)
        closing.add_done_callback(_report_failed_close)
