"""Redis beyond one server: Redis Cluster and Sentinel.

What a :class:`~callpolicy.redis.RedisStore` needs to know of a topology: which errors are
the topology's faults (a moved or migrating slot, a cluster that is down, a demoted
primary), how to build a cluster client from a URL and its asyncio twin from a sync one,
how to build a client of a Sentinel's primary, and which hash slot a key lands on.

Every script of the store touches the keys of one hash slot only: a circuit's keys and a
budget scope's keys share a hash tag (``{provider::model}``, ``{scope}``), and on a
cluster every key of the response cache shares the tag ``{<prefix>:cache}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel

__all__ = [
    "CLUSTER_SCHEMES",
    "TOPOLOGY_FAULTS",
    "AsyncClientFactory",
    "InitializedFirst",
    "async_cluster_factory",
    "cluster_display_url",
    "cluster_from_url",
    "cluster_url",
    "one_slot",
    "sentinel_clients",
]

TOPOLOGY_FAULTS: tuple[type[BaseException], ...] = (
    ClusterError,  # CLUSTERDOWN, MASTERDOWN, and redis-py's "TTL exhausted" redirections
    AskError,  # ASK and MOVED (a subclass) the client could not follow
    TryAgainError,  # a multi-key command during a slot's migration
    ReadOnlyError,  # a primary demoted to replica (a Sentinel or cluster failover)
    RedisClusterException,  # no node answers (the slot map cannot be fetched), a slot not covered
)
"""Errors of a cluster or a failover that a store takes for an outage (local state, retry
later), as it does a connection error: never raised to a guarded call's caller."""

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes of :meth:`RedisStore.from_url` that mean a Redis Cluster, and the plain
scheme redis-py is given."""

AsyncClientFactory = Callable[[], tuple[Any, list[Any]]]
"""Builds an asyncio client for the running loop: ``(client, others to close with it)``."""


def cluster_url(url: str) -> tuple[str, bool]:
    """``url`` with a cluster scheme made plain, and whether it named a cluster."""
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if plain is None:
        return url, False
    return urlunsplit((plain, *parts[1:])), True


def cluster_display_url(client: RedisCluster) -> str:
    """A ``redis+cluster://`` URL naming one of ``client``'s startup nodes, with no
    password: for messages."""
    settings = client.nodes_manager.connection_kwargs
    user = settings.get("username")
    credentials = f"{user}:***@" if user else ":***@" if settings.get("password") else ""
    scheme = "rediss+cluster" if settings.get("ssl") else "redis+cluster"
    node = next(iter(client.nodes_manager.startup_nodes.values()), None)
    where = f"{node.host}:{node.port}" if node is not None else "?"
    return f"{scheme}://{credentials}{where}"


def cluster_from_url(url: str, settings: dict[str, Any]) -> RedisCluster:
    """A sync cluster client with the store's pool settings on every node: a *blocking*
    pool of ``max_connections`` per node, and one retry after a connection error (with the
    slot map fetched again: a node failed over) instead of redis-py's ten with backoff,
    which would hold a guarded call for seconds before its local fallback."""
    return RedisCluster.from_url(
        url,
        connection_pool_class=redis.BlockingConnectionPool,
        retry=Retry(NoBackoff(), 1),
        **settings,
    )


_ASYNC_CLUSTER_SKIP = frozenset(
    {"host", "port", "connection_pool_class", "redis_connect_func", "timeout", "retry"}
)


def async_cluster_factory(client: RedisCluster) -> AsyncClientFactory:
    """How to build the asyncio twin of ``client``, one per event loop: from its startup
    nodes, with the connection settings the two clients share (timeouts, credentials,
    TLS, ``max_connections`` per node)."""
    accepted = frozenset(inspect.signature(AsyncRedisCluster.__init__).parameters)
    kwargs = {
        k: v
        for k, v in client.nodes_manager.connection_kwargs.items()
        if k in accepted and k not in _ASYNC_CLUSTER_SKIP
    }
    nodes = [(node.host, node.port) for node in client.nodes_manager.startup_nodes.values()]

    def build() -> tuple[Any, list[Any]]:
        startup = [AsyncClusterNode(host, port) for host, port in nodes]
        aclient = AsyncRedisCluster(
            startup_nodes=startup, retry=AsyncRetry(NoBackoff(), 1), **kwargs
        )
        return aclient, []

    return build


class InitializedFirst:
    """A script of a ``redis.asyncio.cluster.RedisCluster`` whose first call initialises
    the client (fetches the slot map) before it runs: concurrent first calls on a new
    client otherwise race in redis-py 8 (a ``ConnectionError``, or an ``AttributeError``
    of a connection another task reset). ``initialize()`` is idempotent and locked."""

    __slots__ = ("registered_client", "script")

    def __init__(self, script: Any) -> None:
        self.script = script
        self.registered_client = script.registered_client

    async def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        client = self.registered_client
        if client._initialize:  # until its slot map is fetched
            await client.initialize()
        return await self.script(keys=keys, args=args)


def sentinel_clients(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    *,
    settings: dict[str, Any],
    sentinel_kwargs: dict[str, Any],
) -> tuple[redis.Redis, list[redis.Redis], AsyncClientFactory]:
    """A sync client of the primary that the Sentinels name ``service_name`` (it asks them
    again on every new connection, so after a failover it reaches the new primary), the
    Sentinels' own clients (to close with it), and how to build the asyncio twin."""
    # redis-py's Sentinel classes are untyped.
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(sentinels), sentinel_kwargs=dict(sentinel_kwargs), **settings
    )
    client: redis.Redis = manager.master_for(service_name)  # type: ignore[no-untyped-call]

    def build() -> tuple[Any, list[Any]]:
        amanager = AsyncSentinel(  # type: ignore[no-untyped-call]
            list(sentinels), sentinel_kwargs=dict(sentinel_kwargs), **settings
        )
        aclient: aioredis.Redis = amanager.master_for(service_name)
        return aclient, list(amanager.sentinels)

    return client, list(manager.sentinels), build


def one_slot(names: Sequence[str]) -> bool:
    """Whether every key of ``names`` lands on the same hash slot."""
    return len({key_slot(name.encode()) for name in names}) == 1
