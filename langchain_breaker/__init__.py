"""langchain_breaker: a LangChain chat model guarded by a circuit breaker, with optional
retry and a fallback model, on the framework-free :mod:`callpolicy` engine.

>>> from langchain_core.language_models import FakeListChatModel
>>> from langchain_breaker import CircuitBreakerChatModel
>>> model = CircuitBreakerChatModel(inner=FakeListChatModel(responses=["hello"]))
>>> model.invoke("hi").content
'hello'

``CircuitBreakerMiddleware`` (for ``langchain.agents.create_agent``) needs the ``langchain``
package besides ``langchain-core``; it is imported on first use of the name.

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
from ._embeddings import CircuitBreakerEmbeddings
from ._events import EVENT_PREFIX
from ._guarded import GuardedRunnable
from ._outer import META_CACHE
from ._route import META_ATTEMPT, META_KEY, META_ROLE, META_STATE
from ._served import META_SERVED_BY, served_by

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._middleware import CircuitBreakerMiddleware

__all__ = [
    "EVENT_PREFIX",
    "META_ATTEMPT",
    "META_CACHE",
    "META_KEY",
    "META_ROLE",
    "META_SERVED_BY",
    "META_STATE",
    "CircuitBreakerChatModel",
    "CircuitBreakerEmbeddings",
    "CircuitBreakerMiddleware",
    "GuardedRunnable",
    "served_by",
]


def __getattr__(name: str) -> object:
    # The middleware imports ``langchain`` (agents), which a chat-model user may not have.
    if name == "CircuitBreakerMiddleware":
        try:
            from ._middleware import CircuitBreakerMiddleware
        except ImportError as exc:
            raise ImportError(
                "CircuitBreakerMiddleware needs the langchain package (langchain.agents): "
                f"pip install 'langchain>=1.0' ({exc})"
            ) from exc
        return CircuitBreakerMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
