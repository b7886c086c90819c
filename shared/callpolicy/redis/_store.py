"""``RedisStore``: circuit state shared by every process of an app, on one Redis server
(or a Redis Cluster, or the primary a set of Sentinels name).

The store is the public face: it hands out its circuits (``_circuit``: the scripts'
admit, record, snapshot and force), its budget store and its cache backend, all on one
link to Redis (``_link``: the clients, their health, opening and closing them). When
Redis cannot be reached, each circuit falls back to local in-process state (a warning is
logged once per outage) and the link tries Redis again with a growing backoff; when it
answers again, the shared state takes over.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Literal

import redis
from redis.cluster import RedisCluster

from .._config import BreakerConfig
from .._memory import MemoryStore
from .._store import TransitionListener as Listener
from .._types import split_key
from ._budget import RedisBudgetStore
from ._cache import RedisCacheBackend
from ._circuit import RedisCircuit
from ._connection import Health, StoreAccessError, glob_escape, text
from ._link import Opened, RedisLink, open_sentinel, open_url

__all__ = ["RedisStore"]


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
        self._link = RedisLink(
            client,
            prefix=prefix,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            close_client=close_client,
        )
        self._lease_ms = int(probe_lease * 1000)
        self._key_ttl = key_ttl
        self._local = MemoryStore()
        self._circuits: dict[str, RedisCircuit] = {}
        self._lock = threading.Lock()

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
        return cls._adopting(open_url(url, settings, cluster=cluster), prefix, options)

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
        opened = open_sentinel(
            sentinels,
            service_name,
            settings={**timeouts, "max_connections": max_connections, **(connection_kwargs or {})},
            sentinel_kwargs={**timeouts, **(sentinel_kwargs or {})},
            threads=max_connections,
        )
        return cls._adopting(opened, prefix, options)

    @classmethod
    def _adopting(
        cls,
        opened: tuple[redis.Redis | RedisCluster, Opened],
        prefix: str,
        options: dict[str, Any],
    ) -> RedisStore:
        """A store on the client ``from_url``/``from_sentinel`` opened, owning it and
        what was opened with it."""
        client, what = opened
        store = cls(client, prefix=prefix, **options)
        store._link.adopt(what)
        return store

    # -- naming, health ------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The server's URL, without its password (``***``): what messages show."""
        return self._link.url

    def __repr__(self) -> str:
        return self._link.describe()

    @property
    def health(self) -> Health:
        """Whether Redis is thought reachable, and when to try again if not."""
        return self._link.health

    # What the budget store and the cache backend reach Redis through (see RedisLink).
    def _access_error(self, exc: BaseException) -> StoreAccessError:
        return self._link.access_error(exc)

    def _reaching(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self._link.reaching(what)

    # -- closing -----------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` or :meth:`aclose` was called."""
        return self._link.closed

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
        self._link.close()

    async def aclose(self) -> None:
        """:meth:`close`, from async code: the running loop's client is closed (awaited)
        before this returns — after the round trips of its cancelled calls, which free
        their probe leases, are done (up to 5 s)."""
        await self._link.aclose()

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

    # -- what the store hands out ------------------------------------------------------
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
        self._link.check_open()
        return RedisBudgetStore(self, on_unavailable=on_unavailable)

    def cache_backend(
        self, *, max_entries: int = 10_000, max_bytes: int = 256 * 1024 * 1024
    ) -> RedisCacheBackend:
        """Cached answers on this Redis: ``ResponseCache(backend=store.cache_backend())``.

        It uses this store's connections and closes with it (it has no ``close()``)."""
        self._link.check_open()
        return RedisCacheBackend(self, max_entries=max_entries, max_bytes=max_bytes)

    def circuit(
        self, key: str, *, provider: str, model: str, config: BreakerConfig, on_transition: Listener
    ) -> RedisCircuit:
        found = self._circuits.get(key)
        if found is None:
            with self._lock:
                found = self._circuits.get(key)
                if found is None:
                    found = self._new_circuit(key, provider, model, config, on_transition)
                    self._circuits[key] = found
        return found

    def _new_circuit(
        self, key: str, provider: str, model: str, config: BreakerConfig, notify: Listener
    ) -> RedisCircuit:
        local = self._local.circuit(
            key, provider=provider, model=model, config=config, on_transition=notify
        )
        # An idle circuit's keys outlive twice its longest cooldown, whatever key_ttl says.
        longest = config.max_cooldown or config.cooldown_for(1)
        ttl_ms = int(max(self._key_ttl, 2 * longest) * 1000)
        return RedisCircuit(
            self._link, local, config, notify, lease_ms=self._lease_ms, ttl_ms=ttl_ms
        )

    def circuits(self) -> Iterable[RedisCircuit]:
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
        with self._link.reaching("listing circuits"):
            for raw in self.client.scan_iter(match=pattern, count=500):
                found.append(text(raw)[start:-1])
        return sorted(found)

    def circuit_for_key(self, key: str, config: BreakerConfig | None = None) -> RedisCircuit:
        """A circuit view of ``key`` (for inspection tools), without listeners."""
        provider, model = split_key(key)
        return self.circuit(
            key,
            provider=provider,
            model=model,
            config=config or BreakerConfig(),
            on_transition=lambda _t: None,
        )
