"""The model arguments of both wrappers (``inner=``, ``fallback=``), checked alike.

``CircuitBreakerLLM`` takes LlamaIndex LLMs and ``CircuitBreakerEmbedding`` embedding
models; both take one fallback or a list, and refuse a LangChain model with a hint to
its own wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["checked_fallback", "fallback_models", "model_checker"]

M = TypeVar("M")


def model_checker(kind: type, expected: str, langchain_hint: str) -> Callable[[str, Any], Any]:
    """A check of one model argument: ``kind`` passes; anything else is a TypeError naming
    the argument, what was ``expected`` and (for a LangChain object) the hint."""

    def checked(argument: str, value: Any) -> Any:
        if isinstance(value, kind):
            return value
        hint = f" ({langchain_hint})" if type(value).__module__.startswith("langchain") else ""
        raise TypeError(f"{argument}: expected {expected}, got {type(value).__name__}{hint}")

    return checked


def checked_fallback(value: Any, checked: Callable[[str, Any], M]) -> M | list[M] | None:
    """``fallback=`` checked: None, one model, or a list of several (a list of one is that
    model; an empty list is refused)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        models = [checked(f"fallback[{index}]", item) for index, item in enumerate(value)]
        if not models:
            raise ValueError("fallback: an empty list; give None for no fallback")
        return models[0] if len(models) == 1 else models
    return checked("fallback", value)


def fallback_models(fallback: M | list[M] | None) -> list[M]:
    """The fallbacks, in order (none, one, or a list)."""
    if fallback is None:
        return []
    return list(fallback) if isinstance(fallback, list) else [fallback]
