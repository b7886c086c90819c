"""How a LangChain answer says that a fallback served it, and why.

An answer a fallback produced carries ``response_metadata["callpolicy_served_by"]``:
``{"served_by": "fallback", "model": ..., "key": ..., "primary": ..., "reason": ...,
"error_type": ...}`` (as LlamaIndex answers carry ``additional_kwargs["callpolicy"]``).
The mark is put on a copy, only by the fallback's own callable: the healthy path never
builds it. ``response_metadata`` is the answer's, not the conversation's content: it is
not sent back to a provider with the history.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, Literal

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from callpolicy import CircuitOpenError, fallback_start

__all__ = ["META_SERVED_BY", "fallback_mark", "mark_served", "served_by", "served_mark"]

META_SERVED_BY: Final = "callpolicy_served_by"
"""``response_metadata`` key of an answer a fallback served: which model (``model``, its
circuit ``key``), for which primary (``primary``), and why: ``reason`` is
``"circuit_open"`` (the primary was not called) or ``"failure"`` (it failed; its error's
class name in ``error_type``)."""


def served_mark(key: str | None, model: str) -> dict[str, Any]:
    """The mark of an answer served now by the fallback ``model`` (circuit ``key``): why,
    read from :func:`callpolicy.fallback_start` (None fields outside a fallback)."""
    start = fallback_start()
    mark: dict[str, Any] = {"served_by": "fallback", "model": model, "key": key}
    if start is None:
        mark.update(primary=None, reason=None, error_type=None, primary_state=None)
        return mark
    refused = isinstance(start.cause, CircuitOpenError)
    mark.update(
        primary=start.key,
        reason="circuit_open" if refused else "failure",
        error_type=None if refused else type(start.cause).__name__,
        primary_state=start.state.value,
    )
    return mark


def mark_served(answer: Any, mark: dict[str, Any]) -> Any:
    """A copy of ``answer`` marked with ``mark``: an ``AIMessage``, a ``ChatResult`` (each
    generation's message), or an agent ``ModelResponse`` (its last ``AIMessage``); anything
    else (a parsed structured output) is returned as it is."""
    if isinstance(answer, AIMessage):
        return _marked(answer, mark)
    if isinstance(answer, ChatResult):
        generations = [
            ChatGeneration(
                message=_marked(g.message, mark),
                generation_info=g.generation_info,
            )
            if isinstance(g, ChatGeneration)
            else g
            for g in answer.generations
        ]
        return ChatResult(generations=generations, llm_output=answer.llm_output)
    if not dataclasses.is_dataclass(answer) or isinstance(answer, type):
        return answer
    result = getattr(answer, "result", None)  # langchain.agents ModelResponse
    if isinstance(result, list):
        for index in range(len(result) - 1, -1, -1):
            if isinstance(result[index], AIMessage):
                marked = list(result)
                marked[index] = _marked(result[index], mark)
                return dataclasses.replace(answer, result=marked)
        return answer
    inner = getattr(answer, "model_response", None)  # ExtendedModelResponse
    if inner is not None:
        return dataclasses.replace(answer, model_response=mark_served(inner, mark))
    return answer


def _marked(message: BaseMessage, mark: dict[str, Any]) -> Any:
    metadata = {**message.response_metadata, META_SERVED_BY: mark}
    return message.model_copy(update={"response_metadata": metadata})


def fallback_mark(message: Any) -> dict[str, Any] | None:
    """The fallback's mark on ``message``, or None."""
    metadata = getattr(message, "response_metadata", None)
    mark = metadata.get(META_SERVED_BY) if isinstance(metadata, dict) else None
    return mark if isinstance(mark, dict) else None


def served_by(message: Any) -> Literal["primary", "fallback"]:
    """Which model answered: ``"fallback"`` for an answer marked as a fallback's.

    >>> from langchain_core.messages import AIMessage
    >>> served_by(AIMessage("hi"))
    'primary'
    >>> served_by(mark_served(AIMessage("hi"), served_mark("b::m", "m")))
    'fallback'
    """
    return "fallback" if fallback_mark(message) is not None else "primary"
