"""The model arguments of both wrappers (``inner=``, ``fallback=``), checked alike.

``CircuitBreakerLLM`` takes LlamaIndex LLMs and ``CircuitBreakerEmbedding`` embedding
models, and refuses a LangChain model with a hint to its own wrapper; the engine
(:meth:`callpolicy.ModelGuard.fallback_argument`) reads one fallback or a list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["model_checker"]


def model_checker(kind: type, expected: str, langchain_hint: str) -> Callable[[str, Any], Any]:
    """A check of one model argument: ``kind`` passes; anything else is a TypeError naming
    the argument, what was ``expected`` and (for a LangChain object) the hint."""

    def checked(argument: str, value: Any) -> Any:
        if isinstance(value, kind):
            return value
        hint = f" ({langchain_hint})" if type(value).__module__.startswith("langchain") else ""
        raise TypeError(f"{argument}: expected {expected}, got {type(value).__name__}{hint}")

    return checked
