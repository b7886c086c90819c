"""llamaindex_breaker: a LlamaIndex LLM guarded by callpolicy's circuit breaker, retry and
fallback, usable wherever LlamaIndex takes an LLM.

>>> from llama_index.core.llms import MockLLM
>>> from llamaindex_breaker import CircuitBreakerLLM
>>> llm = CircuitBreakerLLM(inner=MockLLM(), failure_threshold=5, cooldown=30.0)
>>> llm.complete("hello").text
'hello'
>>> str(llm.state_for())
'closed'

Errors and states come from the engine: ``from callpolicy import CircuitOpenError,
CircuitState``.
"""

try:
    # the framework this package adapts to, and its instrumentation package
    import llama_index.core  # noqa: F401
    import llama_index_instrumentation  # noqa: F401
except ImportError as missing:
    raise ModuleNotFoundError(
        'llamaindex_breaker needs LlamaIndex: pip install "callpolicy[llamaindex]"'
        f" ({type(missing).__name__}: {missing})",
        name=missing.name,
    ) from missing

from ._embedding import CircuitBreakerEmbedding
from ._events import CallPolicyEvent
from ._llm import CircuitBreakerLLM
from ._markers import anthropic_finished, openai_finished
from ._served import SERVED_BY_KEY, cache_status, served_by

__all__ = [
    "SERVED_BY_KEY",
    "CallPolicyEvent",
    "CircuitBreakerEmbedding",
    "CircuitBreakerLLM",
    "anthropic_finished",
    "cache_status",
    "openai_finished",
    "served_by",
]
