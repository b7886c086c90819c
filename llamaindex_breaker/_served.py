"""How a response says that the fallback model answered it, or the cache.

A response the fallback produced carries ``additional_kwargs["callpolicy"]`` on the
``ChatResponse``/``CompletionResponse`` (never on its ``message``: integrations such as
OpenAI's send a message's ``additional_kwargs`` back to the provider with the history).
The adapter reads the mark back in ``get_tool_calls_from_response`` to let the model that
produced a response parse its tool calls. A response without the mark came from the
primary model. An answer served by the response cache carries ``"cache"`` in the same
mark (``"hit"``, ``"shared"`` or ``"stale"``), next to the fallback's entries when the
fallback produced it.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar, cast

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse

__all__ = [
    "SERVED_BY_KEY",
    "cache_status",
    "fallback_mark",
    "mark_cached",
    "mark_fallback",
    "served_by",
]

SERVED_BY_KEY = "callpolicy"
"""The key of the mark in a response's ``additional_kwargs``."""

R = TypeVar("R", ChatResponse, CompletionResponse)


def mark_fallback(response: R, key: str, model_name: str) -> R:
    """A copy of ``response`` marked as the fallback's (the original is left untouched);
    ``key`` is the fallback's circuit key."""
    extra = dict(response.additional_kwargs)
    extra[SERVED_BY_KEY] = {"served_by": "fallback", "key": key, "model": model_name}
    return response.model_copy(update={"additional_kwargs": extra})


def fallback_mark(response: Any) -> dict[str, Any] | None:
    """The fallback's mark on ``response``, or None (also for objects that are not responses)."""
    extra = getattr(response, "additional_kwargs", None)
    if not isinstance(extra, dict):
        return None
    mark = extra.get(SERVED_BY_KEY)
    if isinstance(mark, dict) and mark.get("served_by") == "fallback":
        return mark
    return None


def served_by(response: ChatResponse | CompletionResponse) -> Literal["primary", "fallback"]:
    """Which model answered a response returned by ``CircuitBreakerLLM``.

    >>> from llama_index.core.base.llms.types import CompletionResponse
    >>> served_by(CompletionResponse(text="hi"))
    'primary'
    >>> served_by(mark_fallback(CompletionResponse(text="hi"), "B::m", "m"))
    'fallback'
    """
    return "fallback" if fallback_mark(response) is not None else "primary"


def mark_cached(response: R, status: str) -> R:
    """A copy of ``response`` marked as served by the cache (``status``: ``"hit"``,
    ``"shared"`` or ``"stale"``), next to a fallback's mark if it has one."""
    extra = dict(response.additional_kwargs)
    found = extra.get(SERVED_BY_KEY)
    mark = dict(found) if isinstance(found, dict) else {}
    mark["cache"] = status
    extra[SERVED_BY_KEY] = mark
    return response.model_copy(update={"additional_kwargs": extra})


def cache_status(
    response: ChatResponse | CompletionResponse,
) -> Literal["hit", "shared", "stale"] | None:
    """How the response cache served a response returned by ``CircuitBreakerLLM``: ``"hit"``
    (a stored answer), ``"shared"`` (an identical call in the air answered it: single
    flight), ``"stale"`` (an expired answer, served while the circuit is open), or None
    (a model answered this call).

    >>> from llama_index.core.base.llms.types import CompletionResponse
    >>> cache_status(CompletionResponse(text="hi")) is None
    True
    >>> cache_status(mark_cached(CompletionResponse(text="hi"), "hit"))
    'hit'
    """
    extra = getattr(response, "additional_kwargs", None)
    mark = extra.get(SERVED_BY_KEY) if isinstance(extra, dict) else None
    status = mark.get("cache") if isinstance(mark, dict) else None
    if status in ("hit", "shared", "stale"):
        return cast(Literal["hit", "shared", "stale"], status)
    return None
