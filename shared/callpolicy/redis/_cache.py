"""Cached answers on Redis, shared by every process: JSON text under a key, with a TTL and
an LRU bound on entries and bytes kept by Lua scripts (one round trip per get or set).

Scripts name the entries they evict at run time, which Redis allows of keys in the slot
of the keys the script declares. On a Redis Cluster every key of a store's cache carries
the hash tag ``{<prefix>:cache}`` (``{myapp:cache}:e:<key>``, ``{myapp:cache}:lru``...):
one slot, so one primary holds the whole cache and serves its traffic (one cache per
prefix; give apps their own prefix to spread them). On one server the keys are
``myapp:cache:e:<key>``, ``myapp:cache:lru``...
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from .._cache_backend import BackendBounds, SyncBackend, entry_size
from ._connection import REFUSED, UNREACHABLE, Health, StoreAccessError, glob_escape, text
from ._topology import one_slot

__all__ = ["CacheStore", "RedisCacheBackend"]


class CacheStore(Protocol):
    """What a :class:`RedisCacheBackend` needs of the store that hands it out (a
    :class:`~callpolicy.redis.RedisStore`): the store imports the backend, never the
    other way round."""

    prefix: str
    is_cluster: bool
    client: Any

    @property
    def health(self) -> Health:
        """Whether Redis is thought reachable (the store's, shared by all it hands out)."""

    def _access_error(self, exc: BaseException) -> StoreAccessError:
        """What a refusal of credentials or permissions raises."""

    def _reaching(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Around an inspection or control call: Redis's errors as the store's."""


# KEYS: entry, lru, sizes, bytes, clock. ARGV: key -> payload or nil
GET = """
local v = redis.call('GET', KEYS[1])
if not v then
  local size = redis.call('HGET', KEYS[3], ARGV[1])
  if size then
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('DECRBY', KEYS[4], size)
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
  return false
end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[5]), ARGV[1])
return v
"""

# KEYS: lru, sizes, bytes, clock. ARGV: key, payload, ttl_ms (0: none), size, max_entries,
#       max_bytes, entry prefix -> 1 stored, 0 too big
SET = """
local size = tonumber(ARGV[4])
if size > tonumber(ARGV[6]) then return 0 end
local entry = ARGV[7] .. ARGV[1]
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then redis.call('DECRBY', KEYS[3], old) end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', entry, ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', entry, ARGV[2])
end
redis.call('HSET', KEYS[2], ARGV[1], size)
redis.call('INCRBY', KEYS[3], size)
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[4]), ARGV[1])
while redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[5])
    or tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[6]) do
  local popped = redis.call('ZPOPMIN', KEYS[1])
  if #popped == 0 then break end
  local victim = popped[1]
  local victim_size = redis.call('HGET', KEYS[2], victim)
  if victim_size then
    redis.call('HDEL', KEYS[2], victim)
    redis.call('DECRBY', KEYS[3], victim_size)
  end
  redis.call('DEL', ARGV[7] .. victim)
end
return 1
"""

# KEYS: entry, lru, sizes, bytes. ARGV: key
DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DECRBY', KEYS[4], size)
end
return 1
"""


class RedisCacheBackend(SyncBackend):
    """A :class:`~callpolicy.CacheBackend` on Redis; get one from
    ``RedisStore.cache_backend()``. An unreachable Redis is a miss (and a skipped store),
    never an error: the cache is an optimisation. A refusal of credentials or
    permissions raises :class:`~callpolicy.redis.StoreAccessError` (a
    :class:`~callpolicy.ResponseCache` logs it and answers a miss). Its inspection and
    control calls (``len()``, ``clear()``, ``delete()``) raise
    :class:`~callpolicy.redis.StoreUnavailableError` while Redis cannot be reached.

    It uses that store's connections: it has no ``close()`` of its own, and once the store
    is closed its calls raise :class:`~callpolicy.redis.StoreClosedError`."""

    def __init__(self, store: CacheStore, *, max_entries: int, max_bytes: int) -> None:
        bounds = BackendBounds(max_entries=max_entries, max_bytes=max_bytes)
        self._store = store
        self.max_entries = bounds.max_entries
        self.max_bytes = bounds.max_bytes
        # On a cluster, one hash tag: the scripts bound and evict the cache as a whole.
        base = f"{{{store.prefix}:cache}}" if store.is_cluster else f"{store.prefix}:cache"
        self._entry_prefix = f"{base}:e:"
        self._lru, self._sizes = f"{base}:lru", f"{base}:sizes"
        self._bytes, self._clock = f"{base}:bytes", f"{base}:clock"
        if store.is_cluster and not one_slot([self._lru, f"{self._entry_prefix}x"]):
            raise ValueError(
                f"prefix: {store.prefix!r} spreads the cache over hash slots of a Redis "
                "Cluster (a prefix starting with '}'): choose another"
            )
        client = store.client
        self._get = client.register_script(GET)
        self._set = client.register_script(SET)
        self._delete = client.register_script(DELETE)

    def get(self, key: str) -> str | None:
        health = self._store.health
        if not health.usable():
            return None
        epoch = health.epoch
        try:
            found = self._get(
                keys=[self._entry_prefix + key, self._lru, self._sizes, self._bytes, self._clock],
                args=[key],
            )
        except REFUSED as exc:  # before UNREACHABLE: some are ConnectionErrors
            raise self._store._access_error(exc) from None
        except UNREACHABLE as exc:
            health.failed(exc, epoch)
            return None
        health.succeeded(epoch)
        return None if found is None else text(found)

    def set(self, key: str, payload: str, *, ttl: float | None) -> None:
        health = self._store.health
        if not health.usable():
            return
        epoch = health.epoch
        try:
            self._set(
                keys=[self._lru, self._sizes, self._bytes, self._clock],
                args=[
                    key,
                    payload,
                    0 if ttl is None else max(int(ttl * 1000), 1),
                    entry_size(key, payload),
                    self.max_entries,
                    self.max_bytes,
                    self._entry_prefix,
                ],
            )
        except REFUSED as exc:
            raise self._store._access_error(exc) from None
        except UNREACHABLE as exc:
            health.failed(exc, epoch)
            return
        health.succeeded(epoch)

    def delete(self, key: str) -> None:
        with self._store._reaching("deleting a cache entry"):
            self._delete(
                keys=[self._entry_prefix + key, self._lru, self._sizes, self._bytes], args=[key]
            )

    def clear(self) -> None:
        client = self._store.client
        with self._store._reaching("clearing the cache"):
            names = list(client.scan_iter(match=f"{glob_escape(self._entry_prefix)}*", count=1000))
            names += [self._lru, self._sizes, self._bytes, self._clock]
            for start in range(0, len(names), 500):
                client.delete(*names[start : start + 500])

    def __len__(self) -> int:
        with self._store._reaching("counting cache entries"):
            count = int(self._store.client.zcard(self._lru))
        return count

    def __repr__(self) -> str:
        return (
            f"RedisCacheBackend({self._store!r}, max_entries={self.max_entries}, "
            f"max_bytes={self.max_bytes})"
        )
