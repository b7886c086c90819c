"""Shared state on Redis: ``from callpolicy.redis import RedisStore`` (needs ``callpolicy[redis]``).

>>> from callpolicy.redis import RedisStore                             # doctest: +SKIP
>>> store = RedisStore.from_url("redis://127.0.0.1:6379/0", prefix="callpolicy")  # doctest: +SKIP
>>> store.close()  # or with/async with; await store.aclose() in async code  # doctest: +SKIP
"""

from ._budget import BudgetUnavailableError, RedisBudgetStore
from ._cache import RedisCacheBackend
from ._connection import StoreAccessError, StoreClosedError, StoreUnavailableError
from ._store import RedisStore

__all__ = [
    "BudgetUnavailableError",
    "RedisBudgetStore",
    "RedisCacheBackend",
    "RedisStore",
    "StoreAccessError",
    "StoreClosedError",
    "StoreUnavailableError",
]
