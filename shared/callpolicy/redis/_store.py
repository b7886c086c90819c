"""``RedisStore``: circuit state shared by every process of an app, on one Redis server.

Each admission and each recorded outcome is one Lua script run (one round trip), atomic
on the server and timed by the server's clock. When Redis cannot be reached, each circuit
falls back to local in-process state (a warning is logged once per outage) and the store
tries Redis again with a growing backoff; when it answers again, the shared state takes
over.

A store from ``from_url`` runs the sync ``admit``/``record`` scripts on a connection of
each calling thread's own (:class:`~._connection.ThreadConnection`: no pool checkout, no
redis-py command layers; on loopback a fifth to a quarter off a one-thread guarded call,
~1.7x the calls/s of 16 threads); everything else goes through its pool. A store handed a
client uses only that client's pool.

A store closes what it opened (``close()``/``aclose()``, or ``with``/``async with``): the
connection pool ``from_url`` built, its threads' own connections (each also closed when
its thread ends) and the ``redis.asyncio`` clients it built, one per event loop; a
client you hand it stays yours unless ``close_client=True``.
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
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from .._config import BreakerConfig
from .._errors import CircuitOpenError
from .._memory import MemoryStore
from .._redact import redact
from .._store import Circuit, Permit, Transition, TransitionListener
from .._types import CircuitSnapshot, CircuitState, Outcome, split_key
from . import _scripts
from ._budget import RedisBudgetStore
from ._cache import RedisCacheBackend
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
    glob_escape,
    release_closed_loop_client,
    text,
)
from ._topology import (
    AsyncClientFactory,
    InitializedFirst,
    async_cluster_factory,
    cluster_display_url,
    cluster_from_url,
    cluster_url,
    one_slot,
    sentinel_clients,
)

__all__ = ["RedisStore"]

logger = logging.getLogger("callpolicy.redis")

_DRAIN_TIMEOUT = 5.0
"""Seconds ``aclose()`` waits for the round trips of cancelled calls (see ``_drain``)."""
_OUTCOME_CODES = {Outcome.SUCCESS: "s", Outcome.FAILURE: "f", Outcome.IGNORED: "i"}
_STATES = {s.value: s for s in CircuitState}
_ASYNC_CLIENT_SETTINGS = frozenset(inspect.signature(aioredis.Redis.__init__).parameters) - {
    "self",
    "connection_pool",
}


def _new_permit_id() -> str:
    """A probe's lease id, unique across processes: 16 random bytes, as a uuid4 has,
    without building a UUID object on every admission (~5 us -> ~1 us)."""
    return os.urandom(16).hex()


class _ClosedScripts(dict[str, Any]):
    """A closed store's scripts: every lookup raises (no check on the way to them)."""

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


class _RedisPermit(Permit):
    __slots__ = ("clean", "permit_id")

    def __init__(self, generation: int, probe: bool, permit_id: str, clean: bool = False) -> None:
        super().__init__(generation, probe)
        self.permit_id = permit_id
        self.clean = clean
        """Admitted while closed with no failure on record: a success changes nothing."""


class _RedisCircuit:
    is_async_native = True

    def __init__(
        self,
        store: RedisStore,
        key: str,
        provider: str,
        model: str,
        config: BreakerConfig,
        notify: TransitionListener,
    ) -> None:
        self.key = key
        self.provider = provider
        self.model = model
        self._store = store
        self._config = config
        self._notify = notify
        base = f"{store.prefix}:cb:{{{key}}}"  # braces: one hash slot on a cluster
        self._keys = [base, f"{base}:probes", f"{base}:window"]
        if store.is_cluster and not one_slot(self._keys):
            raise ValueError(
                f"key: {key!r} with prefix {store.prefix!r} spreads a circuit over hash "
                "slots of a Redis Cluster (a key or prefix starting with '}' or holding "
                "'{}'): choose another"
            )
        self._local: Circuit = store._local.circuit(
            key, provider=provider, model=model, config=config, on_transition=notify
        )
        cooldown_ms = int(config.cooldown * 1000)
        self._record_args: list[Any] = [
            config.failure_threshold,
            cooldown_ms,
            config.success_threshold,
            config.failure_rate_threshold or 0,
            config.window_size,
            config.minimum_calls,
            config.cooldown_multiplier,
            int(config.cooldown_cap * 1000),
            store._ttl_ms(config),
        ]
        self._clean_permit = _RedisPermit(0, False, "", clean=True)
        # A success needs no round trip when the call was admitted closed with a clean
        # record (nothing to reset) and no failure-rate window needs the sample. Another
        # process's failure in between is then not reset by this success: across
        # processes "consecutive" is approximate anyway, and this halves the round trips.
        self._skip_clean_success = config.failure_rate_threshold is None

    # -- results of the scripts ------------------------------------------------------
    def _admitted(self, reply: Sequence[Any], permit_id: str) -> Permit:
        # 5 elements; a refusal adds a 6th, the trip's reason (see _scripts.ADMIT).
        decision, generation, failures, retry_in_ms, moved = reply[:5]
        moved = text(moved)
        if moved:
            self._notify(
                Transition(
                    self.key,
                    self.provider,
                    self.model,
                    _STATES[moved],
                    CircuitState.HALF_OPEN,
                    int(failures),
                    "cooldown_elapsed",
                )
            )
        if decision == 1:
            if failures:
                return _RedisPermit(int(generation), False, "")
            if generation != self._clean_permit.generation:
                self._clean_permit = _RedisPermit(int(generation), False, "", clean=True)
            return self._clean_permit
        if decision == 2:
            return _RedisPermit(int(generation), True, permit_id)
        retry_in = None if retry_in_ms < 0 else retry_in_ms / 1000.0
        reason = text(reply[5]) if len(reply) > 5 else ""
        raise CircuitOpenError(
            self.provider, self.model, int(failures), retry_in, reason=reason or None
        )

    def _recorded(self, reply: Sequence[Any]) -> CircuitState:
        state, old, reason, failures, cooldown_ms = reply
        new = _STATES[text(state)]
        old_text = text(old)
        if old_text:
            self._notify(
                Transition(
                    self.key,
                    self.provider,
                    self.model,
                    _STATES[old_text],
                    new,
                    int(failures),
                    text(reason),
                    cooldown_ms / 1000.0 if new is CircuitState.OPEN else None,
                )
            )
        return new

    def _admit_args(self, permit_id: str) -> list[Any]:
        store = self._store
        return [
            self._config.half_open_max_calls,
            store._lease_ms,
            store._ttl_ms(self._config),
            permit_id,
        ]

    def _outcome_args(self, permit: Permit, outcome: Outcome) -> list[Any]:
        permit_id = permit.permit_id if isinstance(permit, _RedisPermit) else ""
        return [
            permit.generation,
            1 if permit.probe else 0,
            _OUTCOME_CODES[outcome],
            permit_id,
            *self._record_args,
        ]

    # -- sync ----------------------------------------------------------------------
    def admit(self) -> Permit:
        health = self._store.health
        if not health.usable():
            return self._local.admit()
        epoch = health.epoch
        permit_id = _new_permit_id()
        try:
            reply = self._store._evalsha("admit", self._keys, self._admit_args(permit_id))
        except REFUSED as exc:  # before UNREACHABLE: some are ConnectionErrors
            raise self._store._access_error(exc) from None
        except UNREACHABLE as exc:
            health.failed(exc, epoch)
            return self._local.admit()
        health.succeeded(epoch)
        return self._admitted(reply, permit_id)

    def record(self, permit: Permit, outcome: Outcome) -> CircuitState:
        if not isinstance(permit, _RedisPermit):  # admitted locally during an outage
            return self._local.record(permit, outcome)
        if permit.clean and outcome is Outcome.SUCCESS and self._skip_clean_success:
            return CircuitState.CLOSED
        health = self._store.health
        epoch = health.epoch
        try:
            reply = self._store._evalsha("record", self._keys, self._outcome_args(permit, outcome))
        except REFUSED as exc:
            raise self._store._access_error(exc) from None
        except UNREACHABLE as exc:
            # The outcome is lost to the shared state; a probe's lease frees its slot.
            health.failed(exc, epoch)
            return CircuitState.CLOSED
        health.succeeded(epoch)
        return self._recorded(reply)

    # -- async ---------------------------------------------------------------------
    # Each round trip runs as a task of its own, awaited through a shield: cancelling the
    # caller neither interrupts it half way (the script may have run on the server, its
    # reply unread: a probe lease nobody would free) nor reaches the client library,
    # which can swallow a cancellation — redis-py sends through asyncio.wait_for, which
    # on Python <= 3.11 returns a result that completed with the cancellation (fixed in
    # 3.12), and with async-timeout (Python 3.10) a cancellation can become a
    # TimeoutError, read as an outage: either way the call went on to the model. A
    # shield works the same on every version, where asyncio.current_task().cancelling()
    # exists only from 3.11. The caller sees CancelledError at once; what the round trip
    # took is given back when its reply is in (see _after_cancelled_admit/_record).

    async def aadmit(self) -> Permit:
        store = self._store
        health = store.health
        if not health.usable():
            return self._local.admit()
        epoch = health.epoch
        permit_id = _new_permit_id()
        script = store._ascript("admit")
        trip = asyncio.ensure_future(script(keys=self._keys, args=self._admit_args(permit_id)))
        try:
            reply = await asyncio.shield(trip)
        except REFUSED as exc:  # before UNREACHABLE: some are ConnectionErrors
            raise store._access_error(exc) from None
        except UNREACHABLE as exc:
            health.failed(exc, epoch)
            return self._local.admit()
        except asyncio.CancelledError:
            trip.add_done_callback(functools.partial(self._after_cancelled_admit, permit_id, epoch))
            store._hold(trip)
            raise
        health.succeeded(epoch)
        return self._admitted(reply, permit_id)

    async def arecord(self, permit: Permit, outcome: Outcome) -> CircuitState:
        if not isinstance(permit, _RedisPermit):
            return self._local.record(permit, outcome)
        if permit.clean and outcome is Outcome.SUCCESS and self._skip_clean_success:
            return CircuitState.CLOSED
        store = self._store
        health = store.health
        epoch = health.epoch
        script = store._ascript("record")
        trip = asyncio.ensure_future(
            script(keys=self._keys, args=self._outcome_args(permit, outcome))
        )
        try:
            reply = await asyncio.shield(trip)
        except REFUSED as exc:
            raise store._access_error(exc) from None
        except UNREACHABLE as exc:
            health.failed(exc, epoch)
            return CircuitState.CLOSED
        except asyncio.CancelledError:
            trip.add_done_callback(functools.partial(self._after_cancelled_record, epoch))
            store._hold(trip)
            raise
        health.succeeded(epoch)
        return self._recorded(reply)

    def _after_cancelled_admit(self, permit_id: str, epoch: int, trip: asyncio.Future[Any]) -> None:
        """The admission of a cancelled call is done: a probe lease it took is freed
        (recorded as ignored, as the policy records any cancelled call)."""
        reply = self._settled_trip(trip, epoch)
        if reply is None:
            return
        try:
            permit = self._admitted(reply, permit_id)
        except CircuitOpenError:
            return
        if permit.probe:
            self._store._spawn(self._release(permit))

    async def _release(self, permit: Permit) -> None:
        """Free the lease of a cancelled call's probe (in the background: nobody awaits
        it, so a failure is logged here; the lease then ends on its own)."""
        try:
            await self.arecord(permit, Outcome.IGNORED)
        except Exception as exc:  # closed meanwhile, or refused
            logger.debug(
                "callpolicy: a cancelled probe's lease on %s was not freed: %r", self.key, exc
            )

    def _after_cancelled_record(self, epoch: int, trip: asyncio.Future[Any]) -> None:
        """The outcome of a cancelled call's record is in: its transition is reported."""
        reply = self._settled_trip(trip, epoch)
        if reply is not None:
            self._recorded(reply)

    def _settled_trip(self, trip: asyncio.Future[Any], epoch: int) -> Any:
        """The reply of a round trip whose caller was cancelled; None if it failed."""
        if trip.cancelled():
            return None
        exc = trip.exception()
        if exc is None:
            self._store.health.succeeded(epoch)
            return trip.result()
        if isinstance(exc, UNREACHABLE) and not isinstance(exc, REFUSED):
            self._store.health.failed(exc, epoch)
        return None

    # -- inspection and control ------------------------------------------------------------
    def snapshot(self) -> CircuitSnapshot:
        """The shared state; this process's local state while Redis is unreachable."""
        try:
            return self.shared_snapshot()
        except StoreUnavailableError:
            return self._local.snapshot()

    def shared_snapshot(self) -> CircuitSnapshot:
        """The state in Redis; :class:`StoreUnavailableError` if it cannot be reached."""
        with self._store._reaching(f"reading circuit {self.key!r}"):
            reply = self._store._script("snapshot")(keys=self._keys, args=[])
        state, failures, retry_in_ms, trips, probes, hold, calls, bad, reason = reply
        state_value = _STATES[text(state)]
        opened_by = text(reason) or None
        return CircuitSnapshot(
            key=self.key,
            provider=self.provider,
            model=self.model,
            state=state_value,
            failures=int(failures),
            retry_in=None if retry_in_ms < 0 else retry_in_ms / 1000.0,
            trips=int(trips),
            probes_in_flight=int(probes),
            forced=state_value if hold else None,
            calls_in_window=int(calls),
            failures_in_window=int(bad),
            opened_by=None if state_value is CircuitState.CLOSED else opened_by,
        )

    def force(self, state: CircuitState | None, *, hold: bool) -> None:
        if state is CircuitState.HALF_OPEN:
            raise ValueError("state: cannot force a circuit to half_open")
        target = "open" if state is CircuitState.OPEN else "closed"
        cooldown_ms = 0 if hold else int(self._config.cooldown_for(1) * 1000)
        if hold and target == "open":
            cooldown_ms = 2**40  # held open: no probe until reset
        with self._store._reaching(f"forcing circuit {self.key!r} {target}"):
            reply = self._store._script("force")(
                keys=self._keys,
                args=[
                    target,
                    1 if hold and state is not None else 0,
                    cooldown_ms,
                    self._store._ttl_ms(self._config),
                ],
            )
        old, failures, _ = reply
        new = _STATES[target]
        if _STATES[text(old)] is not new:
            self._notify(
                Transition(
                    self.key,
                    self.provider,
                    self.model,
                    _STATES[text(old)],
                    new,
                    int(failures),
                    "manual",
                    None if new is CircuitState.CLOSED or hold else cooldown_ms / 1000.0,
                )
            )


class RedisStore:
    """Circuit state in Redis, shared by every process that uses the same server and prefix.

    Args:
        client: a sync ``redis.Redis``, or a ``redis.cluster.RedisCluster``; async calls
            use a ``redis.asyncio.Redis`` (a ``redis.asyncio.cluster.RedisCluster``)
            built from the same connection settings, one per event loop.
        prefix: namespace of every key (``{prefix}:cb:{provider::model}``).
        probe_lease: seconds a half-open probe holds its slot if its process never
            reports back (it died): then the slot frees itself.
        key_ttl: seconds after its last change that an idle circuit's keys expire (at
            least twice the longest cooldown is kept).
        close_client: whether :meth:`close` closes ``client`` too (``client.close()``,
            which closes its pool if the client owns it). Off by default: a client you
            hand the store stays yours. A store from :meth:`from_url` owns its client.

    A store handed a client makes every call through that client (its pool, its retry
    settings, its connection limit). :meth:`from_url` builds a store that also gives each
    calling thread a connection of its own for the hot path (see :meth:`from_url`).

    >>> store = RedisStore.from_url("redis://127.0.0.1:6379/0", prefix="myapp")  # doctest: +SKIP
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        prefix: str = "callpolicy",
        probe_lease: float = 60.0,
        key_ttl: float = 86_400.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        close_client: bool = False,
    ) -> None:
        if not isinstance(client, (redis.Redis, RedisCluster)):
            raise TypeError(
                "client: expected a redis.Redis or a redis.cluster.RedisCluster, got "
                f"{type(client).__name__}"
            )
        if not isinstance(prefix, str) or not prefix or prefix != prefix.strip():
            raise ValueError("prefix: expected a non-empty string without surrounding spaces")
        if probe_lease <= 0:
            raise ValueError("probe_lease: must be > 0 seconds")
        if key_ttl <= 0:
            raise ValueError("key_ttl: must be > 0 seconds")
        self.client: Any = client
        self.prefix = prefix
        self.is_cluster = isinstance(client, RedisCluster)
        """Whether the store is on a Redis Cluster (every script's keys in one slot)."""
        # How async calls get their client, one per event loop (None: from the sync
        # client's pool settings), and what else to close with the sync client.
        self._async_factory: AsyncClientFactory | None = (
            async_cluster_factory(client) if isinstance(client, RedisCluster) else None
        )
        self._also_close: list[redis.Redis] = []
        # On a cluster from from_url: the sync hot path's connections, per thread per
        # primary (see ClusterPath); None otherwise.
        self._cluster_path: ClusterPath | None = None
        self._close_client = close_client
        self._closed = False
        self._async_pool_settings: tuple[str, dict[str, Any]] | None = None
        self._lease_ms = int(probe_lease * 1000)
        self._key_ttl = key_ttl
        self._url = _client_url(client)
        self.health = Health(
            backoff_base=backoff_base, backoff_max=backoff_max, name=self._health_name()
        )
        # Round trips finishing for cancelled calls (see _spawn): kept until done.
        self._background: set[asyncio.Future[Any]] = set()
        self._local = MemoryStore()
        self._circuits: dict[str, _RedisCircuit] = {}
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
                ("admit", _scripts.ADMIT),
                ("record", _scripts.RECORD),
                ("snapshot", _scripts.SNAPSHOT),
                ("force", _scripts.FORCE),
            )
        }
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "callpolicy",
        socket_timeout: float = 0.5,
        max_connections: int = 100,
        pool_timeout: float = 5.0,
        cluster: bool = False,
        **options: Any,
    ) -> RedisStore:
        """A store on the server at ``url``; on a Redis Cluster with ``cluster=True`` or a
        ``redis+cluster://`` (``rediss+cluster://``) URL naming any of its nodes.

        ``socket_timeout`` bounds how long a call can wait on an unresponsive Redis before
        it falls back to local state. Connections come from a *blocking* pool of
        ``max_connections`` (per process, and per event loop for async callers): more
        concurrent callers than that wait up to ``pool_timeout`` for a connection instead
        of failing — redis-py's default pool raises at once, which would read as an outage.

        Sync circuit calls (admit, record) run on a connection of the calling thread's own
        instead, with the pool's settings, opened on its first call and closed when the
        thread ends (or by :meth:`close`): up to ``max_connections`` threads have one, any
        more share the pool. A process can so hold up to twice ``max_connections``.

        On a cluster, the client is a ``redis.cluster.RedisCluster`` (it fetches the slot
        map at once: it raises if no node answers) with a blocking pool of
        ``max_connections`` per node, that follows ``MOVED``/``ASK`` redirections itself
        and retries once, on a fresh slot map, after a connection error. Sync circuit
        calls run on a connection of the calling thread's own to the primary of their
        slot (found in that client's slot map; a redirection is followed by the client),
        up to ``max_connections`` per primary in all; everything else goes through it.
        """
        if max_connections < 1:
            raise ValueError("max_connections: must be >= 1")
        settings: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "max_connections": max_connections,
            "timeout": pool_timeout,
        }
        plain_url, named_cluster = cluster_url(url)
        if cluster or named_cluster:
            client = cluster_from_url(plain_url, settings)
            store = cls(client, prefix=prefix, **options)
            store._url = redact(url if named_cluster else cluster_display_url(client))
            store.health.name = store._health_name()
            store._close_client = True
            primaries = client.get_primaries()  # type: ignore[no-untyped-call]
            limit = max_connections * max(len(primaries), 1)
            store._cluster_path = ClusterPath(client, limit=limit)
            store._evalsha = store._cluster_evalsha  # type: ignore[method-assign]
            return store
        pool = redis.BlockingConnectionPool.from_url(url, **settings)
        # from_pool: the client owns the pool, and closing it disconnects the pool.
        store = cls(redis.Redis.from_pool(pool), prefix=prefix, **options)
        store._url = redact(url)
        store.health.name = store._health_name()
        store._async_pool_settings = (url, settings)
        store._close_client = True
        store._thread_connection_limit = max_connections
        return store

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        *,
        prefix: str = "callpolicy",
        socket_timeout: float = 0.5,
        max_connections: int = 100,
        sentinel_kwargs: dict[str, Any] | None = None,
        connection_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> RedisStore:
        """A store on the primary that the Sentinels at ``sentinels`` (``(host, port)``
        pairs) monitor as ``service_name``.

        Each new connection asks the Sentinels where the primary is. When it fails and
        a replica is promoted, calls meanwhile fall back to local state (as for any
        outage: a connection error, ``READONLY`` from the demoted primary, no primary
        known) and the shared state resumes on the new primary once the store retries.

        ``connection_kwargs`` go to the primary's connections (``password``,
        ``username``, ``ssl``...), ``sentinel_kwargs`` to the Sentinels' (their own
        password, if any); both get ``socket_timeout``. The primary's pool is redis-py's
        ``SentinelConnectionPool`` (not a blocking one): past ``max_connections``
        concurrent callers, a call falls back to local state. Sync circuit calls run on
        a connection of each calling thread's own, as with :meth:`from_url`.
        """
        if max_connections < 1:
            raise ValueError("max_connections: must be >= 1")
        if not sentinels:
            raise ValueError("sentinels: expected at least one (host, port) pair")
        if not isinstance(service_name, str) or not service_name:
            raise ValueError("service_name: expected the name the Sentinels monitor")
        timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        client, others, build_async = sentinel_clients(
            sentinels,
            service_name,
            settings={**timeouts, "max_connections": max_connections, **(connection_kwargs or {})},
            sentinel_kwargs={**timeouts, **(sentinel_kwargs or {})},
        )
        store = cls(client, prefix=prefix, **options)
        nodes = ",".join(f"{host}:{port}" for host, port in sentinels)
        store._url = f"redis+sentinel://{nodes}/{service_name}"  # a name for messages
        store.health.name = store._health_name()
        store._close_client = True
        store._also_close = others
        store._async_factory = build_async
        store._thread_connection_limit = max_connections
        return store

    # -- naming, and the errors that name it -----------------------------------------------
    @property
    def url(self) -> str:
        """The server's URL, without its password (``***``): what messages show."""
        return self._url

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return f"RedisStore({self._url!r}, prefix={self.prefix!r}{closed})"

    def _health_name(self) -> str:
        return f"Redis at {self._url} (prefix {self.prefix!r})"

    def _access_error(self, exc: BaseException) -> StoreAccessError:
        """What a refusal of credentials or permissions raises: configuration, to fix."""
        return StoreAccessError(
            f"{self!r}: Redis refused access ({type(exc).__name__}: {redact(str(exc))}). "
            "This is configuration, not an outage: check the credentials in the URL (or "
            "the client's), and that the ACL user may run EVALSHA, SCRIPT LOAD and SCAN "
            f"and read and write the keys {self.prefix}:*"
        )

    @contextlib.contextmanager
    def _reaching(self, what: str) -> Iterator[None]:
        """Around an inspection or control call: a closed store raises
        :class:`StoreClosedError`, a refusal :class:`StoreAccessError`, an unreachable
        Redis :class:`StoreUnavailableError` (all naming the store, no password) —
        never a redis-py exception."""
        self._check_open()
        health = self.health
        epoch = health.epoch
        try:
            yield
        except REFUSED as exc:
            raise self._access_error(exc) from None
        except UNREACHABLE as exc:
            health.failed(exc, epoch)
            raise StoreUnavailableError(
                f"{what}: {self!r} cannot be reached ({type(exc).__name__}: {redact(str(exc))})"
            ) from exc
        except redis.RedisError as exc:  # READONLY, OOM, BUSY...: answered, not read
            raise StoreUnavailableError(
                f"{what}: {self!r} answered with an error ({type(exc).__name__}: "
                f"{redact(str(exc))})"
            ) from exc
        health.succeeded(epoch)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as a task of the running loop, held until done."""
        self._hold(asyncio.get_running_loop().create_task(work))

    def _hold(self, task: asyncio.Future[Any]) -> None:
        """Keep ``task`` (a round trip of a cancelled call, or what frees its lease)
        until it is done: the loop keeps only a weak reference to its tasks, and
        :meth:`aclose` waits for them (see :meth:`_drain`)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self) -> None:
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

    # -- closing -----------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` or :meth:`aclose` was called."""
        return self._closed

    def close(self) -> None:
        """Close the connections this store opened; idempotent.

        Closes the sync client if the store owns it (:meth:`from_url`, or
        ``close_client=True``), never a client it was handed otherwise; the connections
        of its threads (:meth:`from_url`), each thread's own; and the
        ``redis.asyncio`` clients it built, one per event loop: those of loops already
        closed at once, their sockets closed without their loop; each still-open loop's
        is handed to that loop (``aclose()`` scheduled on it, run when it next runs). From
        async code prefer ``await store.aclose()``, which closes the running loop's client
        before it returns.

        Afterwards every call that would reach Redis — through the store's circuits, its
        budget store or its cache backend — raises :class:`StoreClosedError` (a
        :class:`~callpolicy.ResponseCache` logs it and answers a miss, as for any failing
        backend). Calls in flight meanwhile may fail with it, or lose their connection.
        """
        for loop, aclient in self._shut():
            if loop.is_closed():
                release_closed_loop_client(aclient)
            else:
                closing = asyncio.run_coroutine_threadsafe(aclient.aclose(), loop)
                closing.add_done_callback(_report_failed_close)

    async def aclose(self) -> None:
        """:meth:`close`, from async code: the running loop's client is closed (awaited)
        before this returns — after the round trips of its cancelled calls, which free
        their probe leases, are done (up to 5 s)."""
        if not self._closed:
            await self._drain()
        running = asyncio.get_running_loop()
        mine = []
        for loop, aclient in self._shut():
            if loop is running:
                mine.append(aclient)
            elif loop.is_closed():
                release_closed_loop_client(aclient)
            else:
                closing = asyncio.run_coroutine_threadsafe(aclient.aclose(), loop)
                closing.add_done_callback(_report_failed_close)
        for aclient in mine:
            await aclient.aclose()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _shut(self) -> list[tuple[asyncio.AbstractEventLoop, aioredis.Redis]]:
        """Mark the store closed; close the sync client if owned; return the async
        clients (and their loops) still to close — none if it was closed already."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            message = self._closed_message()
            # The calls ask health.usable() and look their script up anyway: swapping
            # both makes them raise, with no check of their own on every call.
            self.health = ClosedHealth(message)
            self._scripts = _ClosedScripts(message)
            clients = [
                (loop, aclient)
                for loop, scripts in list(self._async.items())
                for aclient in (scripts["admit"].registered_client, *scripts.get("others", ()))
            ]
            self._async.clear()
            threads = list(self._thread_connections)
            self._thread_connections.clear()
        # A thread in a call meanwhile may reconnect its own: it releases it once the
        # call is over (see _evalsha), as it finds the store closed.
        for own in threads:
            own.release()
        if self._cluster_path is not None:
            self._cluster_path.release()
        if self._close_client:
            self.client.close()
            for other in self._also_close:
                other.close()
        return clients

    def _closed_message(self) -> str:
        return (
            f"RedisStore(prefix={self.prefix!r}) is closed: its circuits, budget store "
            "and cache backend no longer reach Redis"
        )

    def _check_open(self) -> None:
        """For the calls that reach Redis without asking ``health`` first."""
        if self._closed:
            raise StoreClosedError(self._closed_message())

    @property
    def key_ttl_ms(self) -> int:
        """Milliseconds after its last change that an idle key expires."""
        return int(self._key_ttl * 1000)

    def budget_store(
        self, *, on_unavailable: Literal["open", "closed"] = "open"
    ) -> RedisBudgetStore:
        """Budget counters on this Redis: ``Budget(..., store=store.budget_store())``.

        ``on_unavailable`` decides what happens while Redis is unreachable: ``"open"``
        (default) lets calls go on, counted locally and added to the shared counters when
        Redis is back; ``"closed"`` refuses them (:class:`BudgetUnavailableError`).

        It uses this store's connections and closes with it (it has no ``close()``)."""
        self._check_open()
        return RedisBudgetStore(self, on_unavailable=on_unavailable)

    def cache_backend(
        self, *, max_entries: int = 10_000, max_bytes: int = 256 * 1024 * 1024
    ) -> RedisCacheBackend:
        """Cached answers on this Redis: ``ResponseCache(backend=store.cache_backend())``.

        It uses this store's connections and closes with it (it has no ``close()``)."""
        self._check_open()
        return RedisCacheBackend(self, max_entries=max_entries, max_bytes=max_bytes)

    def _ttl_ms(self, config: BreakerConfig) -> int:
        longest = config.max_cooldown or config.cooldown_for(1)
        return int(max(self._key_ttl, 2 * longest) * 1000)

    def _script(self, name: str) -> Callable[..., Any]:
        return self._scripts[name]

    def _evalsha(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Script ``name`` run on the calling thread's own connection, or through the
        pool on a thread without one: ``self._script(name)(keys=keys, args=args)``, faster.
        """
        if self._closed:
            raise StoreClosedError(self._closed_message())
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
            if self._closed:  # by another thread meanwhile: this call may have reconnected
                own.release()

    def _cluster_evalsha(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """:meth:`_evalsha` of a store on a cluster: on this thread's connection to the
        primary of the keys' slot (see :class:`ClusterPath`)."""
        script = self._scripts[name]  # raises once the store is closed
        path: Any = self._cluster_path
        try:
            return path.evalsha(script, keys, args, lambda: script(keys=keys, args=args))
        finally:
            if self._closed:  # by another thread meanwhile: this call may have reconnected
                path.release()

    def _new_thread_connection(self) -> ThreadConnection | None:
        """The calling thread's own connection, made on its first call (or its first in
        a forked child); ``None`` if the store gives none, or ``max_connections`` threads
        have one already: then this thread's calls go through the pool."""
        with self._lock:
            self._check_open()
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

    def _ascript(self, name: str) -> Callable[..., Any]:
        loop = asyncio.get_running_loop()
        scripts = self._async.get(loop)
        if scripts is None:
            scripts = self._new_async_scripts(loop)
        return scripts[name]  # type: ignore[no-any-return]

    def _new_async_scripts(self, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        """The scripts of a new ``redis.asyncio`` client for ``loop`` (first call on it)."""
        with self._lock:
            self._check_open()
            scripts = self._async.get(loop)
            if scripts is not None:
                return scripts
            # Loops closed since their first call: their clients' sockets are closed now,
            # not left for the garbage collector (many asyncio.run() would pile them up).
            for old, old_scripts in list(self._async.items()):
                if old.is_closed():
                    del self._async[old]
                    release_closed_loop_client(old_scripts["admit"].registered_client)
                    for other in old_scripts.get("others", ()):
                        release_closed_loop_client(other)
            # redis.asyncio connections belong to one event loop: one client per loop.
            # Same server and timeouts as the sync client (only the settings both share).
            # Either way the client owns its pool: closing it disconnects the pool.
            others: list[Any] = []
            if self._async_factory is not None:  # a cluster's, a Sentinel's primary's
                aclient, others = self._async_factory()
            elif self._async_pool_settings is not None:
                url, pool_settings = self._async_pool_settings
                aclient = aioredis.Redis.from_pool(
                    aioredis.BlockingConnectionPool.from_url(url, **pool_settings)
                )
            else:
                settings = self.client.connection_pool.connection_kwargs
                aclient = aioredis.Redis(
                    **{k: v for k, v in settings.items() if k in _ASYNC_CLIENT_SETTINGS}
                )
            made: dict[str, Any] = {
                name: aclient.register_script(source)
                for name, source in (("admit", _scripts.ADMIT), ("record", _scripts.RECORD))
            }
            if isinstance(aclient, AsyncRedisCluster):
                made = {name: InitializedFirst(script) for name, script in made.items()}
            if others:
                made["others"] = others
            self._async[loop] = made
            return made

    def circuit(
        self,
        key: str,
        *,
        provider: str,
        model: str,
        config: BreakerConfig,
        on_transition: TransitionListener,
    ) -> _RedisCircuit:
        found = self._circuits.get(key)
        if found is None:
            with self._lock:
                found = self._circuits.get(key)
                if found is None:
                    found = _RedisCircuit(self, key, provider, model, config, on_transition)
                    self._circuits[key] = found
        return found

    def circuits(self) -> Iterable[_RedisCircuit]:
        return list(self._circuits.values())

    def shared_keys(self) -> list[str]:
        """Every circuit key with state in Redis under this prefix (any process's): each
        circuit that has recorded a failure, been forced, tripped or reset, or admitted
        a probe, until its keys expire (``key_ttl`` after its last change). A circuit
        that has only ever succeeded has nothing in Redis (a clean success writes
        nothing), so it is not listed: it is closed.

        Raises :class:`StoreUnavailableError` or :class:`StoreAccessError` when Redis
        cannot be read."""
        pattern = f"{glob_escape(self.prefix)}:cb:{{*}}"
        start = len(self.prefix) + len(":cb:{")
        found = []
        with self._reaching("listing circuits"):
            for raw in self.client.scan_iter(match=pattern, count=500):
                found.append(text(raw)[start:-1])
        return sorted(found)

    def circuit_for_key(self, key: str, config: BreakerConfig | None = None) -> _RedisCircuit:
        """A circuit view of ``key`` (for inspection tools), without listeners."""
        provider, model = split_key(key)
        return self.circuit(
            key,
            provider=provider,
            model=model,
            config=config or BreakerConfig(),
            on_transition=lambda _t: None,
        )
