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

from ._embedding import CircuitBreakerEmbedding
from ._events import CallPolicyEvent
from ._llm import CircuitBreakerLLM
from ._served import SERVED_BY_KEY, cache_status, served_by

__all__ = [
    "SERVED_BY_KEY",
    "CallPolicyEvent",
    "CircuitBreakerEmbedding",
    "CircuitBreakerLLM",
    "cache_status",
    "served_by",
]
