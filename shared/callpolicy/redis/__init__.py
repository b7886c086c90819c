"""Shared state on Redis: ``from callpolicy.redis import RedisStore`` (needs ``callpolicy[redis]``).

>>> from callpolicy.redis import RedisStore                             # doctest: +SKIP
>>> store = RedisStore.from_url("redis://127.0.0.1:6379/0", prefix="callpolicy")  # doctest: +SKIP
>>> store.close()  # or with/async with; await store.aclose() in async code  # doctest: +SKIP
"""

try:
    import redis  # noqa: F401  (redis-py, the client every part of this package uses)
except ImportError as missing:
    raise ModuleNotFoundError(
        'callpolicy.redis needs redis-py: pip install "callpolicy[redis]"'
        f" ({type(missing).__name__}: {missing})",
        name=missing.name,
    ) from missing

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
