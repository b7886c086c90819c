"""langchain_breaker: a LangChain chat model guarded by a circuit breaker, with optional
retry and a fallback model, on the framework-free :mod:`callpolicy` engine.

>>> from langchain_core.language_models import FakeListChatModel
>>> from langchain_breaker import CircuitBreakerChatModel
>>> model = CircuitBreakerChatModel(inner=FakeListChatModel(responses=["hello"]))
>>> model.invoke("hi").content
'hello'

The engine's types (``CircuitOpenError``, ``CircuitState``, ``RetryPolicy``, ``CallPolicy``,
...) are imported from :mod:`callpolicy`.
"""

try:
    import langchain_core  # noqa: F401  (the framework this package adapts to)
except ImportError as missing:
    raise ModuleNotFoundError(
        'langchain_breaker needs LangChain: pip install "callpolicy[langchain]"'
        f" ({type(missing).__name__}: {missing})",
        name=missing.name,
    ) from missing

from ._chat_model import CircuitBreakerChatModel
from ._events import EVENT_PREFIX
from ._guarded import GuardedRunnable
from ._outer import META_CACHE
from ._route import META_ATTEMPT, META_KEY, META_ROLE, META_STATE

__all__ = [
    "EVENT_PREFIX",
    "META_ATTEMPT",
    "META_CACHE",
    "META_KEY",
    "META_ROLE",
    "META_STATE",
    "CircuitBreakerChatModel",
    "GuardedRunnable",
]
