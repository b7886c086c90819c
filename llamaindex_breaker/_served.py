"""How a response says that the fallback model answered it.

A response the fallback produced carries ``additional_kwargs["callpolicy"]`` on the
``ChatResponse``/``CompletionResponse`` (never on its ``message``: integrations such as
OpenAI's send a message's ``additional_kwargs`` back to the provider with the history).
The adapter reads the mark back in ``get_tool_calls_from_response`` to let the model that
produced a response parse its tool calls. A response without the mark came from the
primary model.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse

__all__ = ["SERVED_BY_KEY", "fallback_mark", "mark_fallback", "served_by"]

SERVED_BY_KEY = "callpolicy"
"""The key of the mark in a response's ``additional_kwargs``."""

R = TypeVar("R", ChatResponse, CompletionResponse)


def mark_fallback(response: R, key: str | None, model_name: str) -> R:
    """A copy of ``response`` marked as the fallback's (the original is left untouched).

    ``key`` is the fallback's circuit key (None for a fallback that runs unguarded)."""
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
