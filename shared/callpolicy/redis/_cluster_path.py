"""The sync hot path (admit, record) on a Redis Cluster: each calling thread's own
connection to each primary, the script sent to the primary of its keys' slot.

A call through ``redis.cluster.RedisCluster`` costs the client ~4-5x a single server's
per-thread fast path (command policies, node lookup, a pool checkout per call: see
``benchmarks/redis_fleet.py``). Here the slot is computed once per circuit (its keys
share a hash tag), its primary looked up in the client's own slot map, and the script
sent on this thread's connection to that primary (:class:`~._connection.ThreadConnection`,
one per primary).

A reply that says the slot is elsewhere or busy (``MOVED``, ``ASK``, ``TRYAGAIN``,
``CLUSTERDOWN``) means the script did not run: the call is made again through the cluster
client, which follows the redirection and refreshes its slot map. A connection error is
raised (the store's outage path) after asking the client to fetch the slot map again, so
that the next try, after the store's backoff, goes to the node now serving the slot.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from ._connection import UNREACHABLE, ThreadConnection

__all__ = ["ClusterPath"]

_NOT_RUN = (AskError, TryAgainError, ClusterDownError)  # AskError covers MovedError


class ClusterPath:
    """Per-thread connections to each primary of ``client``, at most ``limit`` in all."""

    def __init__(self, client: RedisCluster, *, limit: int) -> None:
        self._client = client
        self._limit = limit
        self._lock = threading.Lock()
        self._thread = threading.local()
        self._slots: dict[str, int] = {}
        self.connections: weakref.WeakSet[ThreadConnection] = weakref.WeakSet()

    def evalsha(
        self,
        script: Script,
        keys: Sequence[Any],
        args: Sequence[Any],
        through_client: Callable[[], Any],
    ) -> Any:
        """``script`` on the primary of ``keys``' slot, on this thread's connection to it;
        through the cluster client (``through_client()``) when it has none to spare or
        the slot is not there."""
        first = keys[0]
        slot = self._slots.get(first)
        if slot is None:
            slot = self._slots[first] = key_slot(first.encode())
        try:
            node = self._client.nodes_manager.slots_cache[slot][0]
        except (KeyError, IndexError):  # not covered: the client raises what fits
            return through_client()
        try:
            mine: dict[str, ThreadConnection | None] = self._thread.connections
        except AttributeError:
            mine = self._thread.connections = {}
        own = mine.get(node.name)
        if own is not None and own.pid != os.getpid():  # a forked child: its parent's
            del mine[node.name]
            own = None
        if own is None:
            if node.name in mine or node.redis_connection is None:
                return through_client()  # this thread has none to spare
            own = mine[node.name] = self._new(node.redis_connection.connection_pool)
            if own is None:
                return through_client()
        try:
            return own.evalsha(script, keys, args)
        except _NOT_RUN:
            return through_client()
        except UNREACHABLE:
            with contextlib.suppress(*UNREACHABLE):  # the outage is the caller's to record
                self._client.nodes_manager.initialize()
            raise

    def _new(self, pool: Any) -> ThreadConnection | None:
        with self._lock:
            if len(self.connections) >= self._limit:
                return None
            own = ThreadConnection(pool)
            self.connections.add(own)
            return own

    def release(self) -> None:
        """Disconnect every thread's connections (a later call would connect again)."""
        with self._lock:
            connections = list(self.connections)
            self.connections = weakref.WeakSet()
        for own in connections:
            own.release()
