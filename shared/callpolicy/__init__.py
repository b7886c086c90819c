"""callpolicy: a circuit breaker per provider and model, with error classification, retry
and fallback, for LLM calls. Framework-free; the LangChain and LlamaIndex wrappers
(``langchain_breaker``, ``llamaindex_breaker``) delegate to it.

>>> from callpolicy import CallPolicy, CircuitOpenError, CircuitState
>>> policy = CallPolicy(failure_threshold=1, cooldown=30)
>>> def down():
...     raise ConnectionError("connection refused")
>>> try:
...     policy.execute("acme::m1", down)
... except ConnectionError:
...     pass
>>> policy.state("acme::m1")
<CircuitState.OPEN: 'open'>
>>> policy.execute("acme::m1", down, fallback=lambda: "served by the fallback")
'served by the fallback'
"""

from ._budget import Budget, BudgetUsage, MissingPriceError, Price, Usage
from ._budget_store import BudgetExceededError, BudgetStore, MemoryBudgetStore, Reservation
from ._cache import CacheStats, CacheStatus, ResponseCache
from ._cache_backend import CacheBackend, MemoryCacheBackend
from ._cache_key import (
    ENDPOINT_ARGUMENTS,
    SCHEMA_ARGUMENTS,
    UncacheableRequestError,
    by_type,
    cache_key,
    describe_arguments,
    key_data,
    key_text,
)
from ._cache_sqlite import SQLiteCacheBackend
from ._classify import Classification, Classifier, classify_error, retry_after_from_headers
from ._config import (
    DEFAULT_COUNTED_ERRORS,
    DEFAULT_RETRYABLE_ERRORS,
    BreakerConfig,
    FallbackOn,
    RetryPolicy,
)
from ._embed import EmbeddingGuard
from ._embed_cache import EmbedKind, VectorCache
from ._errors import (
    AllModelsFailedError,
    CallPolicyError,
    CircuitOpenError,
    IncompleteStreamError,
)
from ._events import Event, EventKind, Listener
from ._fallback import Fallbacks, FallbackStart, fallback_start
from ._guard import Identity, ModelGuard
from ._memory import MemoryStore
from ._options import ENGINE_OPTIONS, EngineOptions, policy_from_options, takes_engine_options
from ._policy import CallPolicy
from ._request import CallRequest
from ._store import Circuit, CircuitStore, Permit, Transition
from ._types import (
    CircuitSnapshot,
    CircuitState,
    ErrorClass,
    KeyMetrics,
    Outcome,
    circuit_key,
    split_key,
)

__all__ = [
    "DEFAULT_COUNTED_ERRORS",
    "ENDPOINT_ARGUMENTS",
    "ENGINE_OPTIONS",
    "AllModelsFailedError",
    "DEFAULT_RETRYABLE_ERRORS",
    "BreakerConfig",
    "Budget",
    "BudgetExceededError",
    "BudgetStore",
    "BudgetUsage",
    "CacheBackend",
    "CacheStats",
    "CacheStatus",
    "CallPolicy",
    "CallRequest",
    "CallPolicyError",
    "Circuit",
    "CircuitOpenError",
    "CircuitSnapshot",
    "CircuitState",
    "CircuitStore",
    "Classification",
    "Classifier",
    "EmbedKind",
    "EmbeddingGuard",
    "EngineOptions",
    "ErrorClass",
    "Event",
    "EventKind",
    "FallbackOn",
    "FallbackStart",
    "Identity",
    "IncompleteStreamError",
    "Fallbacks",
    "KeyMetrics",
    "Listener",
    "MemoryBudgetStore",
    "MemoryCacheBackend",
    "MemoryStore",
    "MissingPriceError",
    "ModelGuard",
    "Outcome",
    "Permit",
    "Price",
    "Reservation",
    "ResponseCache",
    "RetryPolicy",
    "SCHEMA_ARGUMENTS",
    "SQLiteCacheBackend",
    "Transition",
    "UncacheableRequestError",
    "Usage",
    "by_type",
    "VectorCache",
    "cache_key",
    "circuit_key",
    "classify_error",
    "describe_arguments",
    "fallback_start",
    "key_data",
    "key_text",
    "policy_from_options",
    "retry_after_from_headers",
    "split_key",
    "takes_engine_options",
]

__version__ = "0.1.0"
